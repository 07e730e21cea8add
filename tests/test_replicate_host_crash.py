"""The application and `dbre replicate` killed together (kill -9 of both at one instant, as a crash
of their container takes both) while the application commits and checkpoints in every mode: when
both come back, the application's own recovery of the WAL and the replicator's restart lose
nothing. Every commit the database holds after recovery is in the newest replicated state, every
chain verifies, and restores at the writer's stamps stay consistent prefixes. Three rounds."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from dbre.repository.repo import Repository
from tests.replication import (
    check_chains,
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    restored_seq,
    segment_keys,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 200


def _recovered_top(src: Path) -> int:
    """What the database holds after the crash, as the next application run sees it (SQLite
    recovers the WAL on open): rows 1..top, the counter at top."""
    c = sqlite3.connect(src)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count, top = c.execute("SELECT count(*), max(seq) FROM t").fetchone()
        (n,) = c.execute("SELECT n FROM counter").fetchone()
        assert count == top == n, (count, top, n)
        return int(top)
    finally:
        c.close()


def test_application_and_replicator_killed_together_lose_nothing(tmp_path: Path) -> None:
    repo_url = str(tmp_path / "repo")
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    log = tmp_path / "writer.log"
    rng = random.Random(5)
    top = BASE_ROWS
    for round_ in range(3):
        rep = start_replicator(src, repo_url, interval="200ms")
        if round_ == 0:
            wait_for_generation(repo_url, proc=rep)
        # checkpoints of every mode every 40 commits, and SQLite's own automatic ones
        writer = start_writer(src, log, 30, start_seq=top, ckpt_every=40, pause=0.003)
        time.sleep(rng.uniform(1.0, 2.5))
        for proc in (writer, rep):  # (as close together as two signals go)
            proc.send_signal(signal.SIGKILL)
        writer.wait()
        rep.wait()
        top = _recovered_top(src)
        assert top > BASE_ROWS + 10 * round_
    # both come back: the replicator first (it finds what the crash left), then the application
    before = segment_keys(Repository.open(repo_url))
    rep = start_replicator(src, repo_url, interval="200ms")
    try:
        writer = start_writer(src, log, 1.0, start_seq=top, ckpt_every=40, pause=0.003)
        assert writer.wait(timeout=60) == 0
        # it writes to the repository (so it is past start-up and takes SIGTERM as "ship and exit 0")
        # before it is stopped: on a busy machine its start-up can outlast the writer's second
        deadline = time.monotonic() + 60
        while segment_keys(Repository.open(repo_url)) == before:
            assert rep.poll() is None and time.monotonic() < deadline, "the replicator wrote nothing"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    final = _recovered_top(src)

    repo = Repository.open(repo_url)
    chains = check_chains(repo)  # every generation contiguous and chained from its base
    assert chains, "no generation"
    out = tmp_path / "newest.db"
    r = subprocess.run(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--to", str(out)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert restored_seq(out) == (final, final, final)  # every commit the database holds, nothing more
    diff = subprocess.run(["sqldiff", str(src), str(out)], capture_output=True, text=True, timeout=60)
    assert diff.returncode == 0 and diff.stdout == "", diff.stdout[:500]

    # restores at the writer's stamps: each a consistent prefix (the oracle of the kill tests)
    commits, _ = read_log(log)
    for i, c in enumerate(rng.sample(commits, 6)):
        at = tmp_path / f"at{i}.db"
        restore_at(repo, "app", utc(c.after + 0.5), at)
        count, got, n = restored_seq(at)
        assert count == got == n, (count, got, n)
        at.unlink()
    print(f"\n3 crashes of application + replicator; {final - BASE_ROWS} commits; generations {len(chains)}")
