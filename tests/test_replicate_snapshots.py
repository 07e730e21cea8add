"""The replicator takes its generation snapshots on the direct path (the file and WAL mapped), and
the application's -wal is never deleted while it runs: its pin keeps every dbre descriptor of the
database open while its connections are, so no snapshot's close drops the reader's POSIX locks
(before 357f13b a direct snapshot did, and the application's last close deleted -wal under it)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from dbre.repository.repo import Repository
from tests.replication import (
    check_chains,
    make_source,
    restore_at,
    start_replicator,
    stop_replicator,
    utc,
    wait_for_generation,
)

# The application: open, commit, close, over and over. Each close is the last connection of the
# system unless the replicator still holds its shared lock, and a last close checkpoints and
# deletes -wal and -shm. It logs "gone" whenever -wal is missing right after its close.
APP = r'''
import os, sqlite3, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end, seq, gone = time.time() + seconds, 100000, 0
while time.time() < end:
    seq += 1
    c = sqlite3.connect(path, isolation_level=None, timeout=5)
    c.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(200))", (seq,))
    c.execute("UPDATE counter SET n = n + 1")
    c.close()
    if not os.path.exists(path + "-wal"):
        gone += 1
    time.sleep(0.01)
print(gone)
'''


def test_direct_generation_snapshots_never_let_the_wal_be_deleted(tmp_path: Path) -> None:
    repo_url, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 300)
    # a generation (a fresh direct snapshot) every 3 segments, a segment every 0.2 s with commits
    rep = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "3"})
    missing: list[float] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            if not Path(str(src) + "-wal").exists():
                missing.append(time.time())
            time.sleep(0.002)

    try:
        wait_for_generation(repo_url, proc=rep)
        watcher = threading.Thread(target=watch)
        watcher.start()
        app = subprocess.run([sys.executable, "-c", APP, str(src), "8"], capture_output=True, timeout=90,
                             check=True)
        time.sleep(1.0)
        watching.set()
        watcher.join()
        assert rep.poll() is None, rep.stderr.read().decode() if rep.stderr else ""
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert int(app.stdout) == 0, "the application's close deleted -wal: the replicator lost its locks"
    assert not missing, f"-wal missing {len(missing)} times while the replicator ran"
    repo = Repository.open(repo_url)
    gens = check_chains(repo)
    assert len(gens) >= 3, gens  # several snapshots were taken while the application committed
    reads = [m.stats.get("read") for m in repo.snapshots("app")]
    assert reads and all(r == "direct" for r in reads), reads
    # the newest state restores to exactly the source's content
    out = tmp_path / "restored.db"
    restore_at(repo, "app", utc(time.time() + 1), out)
    a, b = sqlite3.connect(src), sqlite3.connect(out)
    try:
        q = "SELECT count(*), max(seq), (SELECT n FROM counter) FROM t"
        assert a.execute(q).fetchone() == b.execute(q).fetchone()
    finally:
        a.close()
        b.close()
