"""`dbre replicate --accept-new-source`: a database copied to another path is refused (exit 2,
nothing written) until the operator says it moved; then its bases join the same chain."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from dbre.repository.repo import Repository
from tests.replication import dbre_cmd, make_source, start_replicator, stop_replicator, wait_for_generation


def test_a_moved_database_is_refused_then_accepted(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    src = tmp_path / "old" / "app.db"
    repo_url = str(tmp_path / "repo")
    make_source(src, 200)
    rep = start_replicator(src, repo_url, interval="200ms")
    try:
        wait_for_generation(repo_url, proc=rep)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    # moved by copying (a restore elsewhere, another volume): a new file, so a new generation and its
    # base, whose backup sees another source (a rename keeps the inode: the generation just goes on)
    moved = tmp_path / "new" / "app.db"
    with sqlite3.connect(src) as a, sqlite3.connect(moved) as b:
        a.backup(b)
    for side in ("", "-wal", "-shm"):
        Path(str(src) + side).unlink(missing_ok=True)
    before = sorted(Repository.open(repo_url).store.list("snapshots/"))
    refused = subprocess.run(dbre_cmd("replicate", str(moved), "--repo", repo_url, "--db", "app", "-q"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]  # (after the line saying a new generation starts)
    assert last.startswith("dbre: ") and "--accept-new-source" in last, refused.stderr
    assert sorted(Repository.open(repo_url).store.list("snapshots/")) == before

    rep = subprocess.Popen(dbre_cmd("replicate", str(moved), "--repo", repo_url, "--db", "app", "--interval",
                                    "200ms", "-q", "--accept-new-source"), stderr=subprocess.PIPE)
    try:
        repo = Repository.open(repo_url)
        import time

        deadline = time.time() + 60
        while len(list(repo.store.list("snapshots/"))) <= len(before):
            assert rep.poll() is None, rep.stderr.read().decode() if rep.stderr else ""
            assert time.time() < deadline, "no base of the moved database"
            time.sleep(0.1)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    newest = Repository.open(repo_url).find_snapshot("app")
    assert newest.parent is not None  # the same chain: an incremental of the old place's snapshots
