"""Finding of the torture suite (replicate, S3, seed 20261201, trial 3 of the first full run): a
replicator restarted after kill -9 found the WAL restarted (the application checkpointed while it
was down), so it needed a new generation's base snapshot; the writer kept the source's write lock
busy for the 2 s the base waits for it, the base fell back to SQLite's backup API (no WAL
position), and `dbre replicate` exited 1: "the snapshot's WAL position is unknown (backup API
(write lock not available (BusyError))) (the write lock stayed busy: run it again)". Nothing was
lost, but replication stayed down until someone (or a supervisor) started it again — while a
repository lock held by another run is retried (`shipper.py`: "retrying"; LOCK_RETRY_SECONDS), a
busy source is not.

Reproduction, deterministic: a writer holding the write lock in 3 s transactions back to back (in
the torture run it was a writer committing every 10 ms, under a load average of 5-6: the base's
2 s of waiting lost every race for the lock), and a replicator started on it (a first start needs
a base, as a restart after a WAL restart does).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.replication import make_source
from tests.torture.launcher import Launcher

# Holds the write lock almost all the time: 3 s transactions (a batch job), back to back, for `seconds`.
_HOG = r'''
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("PRAGMA journal_mode=WAL")
end = time.time() + float(sys.argv[2])
seq = 10**6
first = True
while time.time() < end:
    seq += 1
    c.execute("BEGIN IMMEDIATE")
    if first:
        print("holding", flush=True)
        first = False
    c.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(100))", (seq,))
    c.execute("UPDATE counter SET n = n + 1")
    time.sleep(3)
    c.execute("COMMIT")
'''


# the torture finding (fixed): a base without a WAL position is tried again
def test_replicate_retries_a_base_a_busy_writer_delayed(tmp_path: Path, launcher: Launcher) -> None:
    src = tmp_path / "src.db"
    make_source(src, 200)
    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(src), "12"], stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None and hog.stdout.readline() == "holding\n"
    run = launcher.start(["replicate", src, "--repo", tmp_path / "repo", "--db", "app", "--interval", "200ms"])
    try:
        time.sleep(0.5)
        ended = run.wait(8)  # the base waits 2 s for the lock; a retrying replicator is still running
        assert not ended, f"the replicator stopped while the writer was busy: {run}"
        assert hog.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        while "shipped " not in run.out() and time.monotonic() < deadline:
            assert run.running(), f"the replicator stopped: {run}"
            time.sleep(0.1)
        assert "shipped " not in run.out() or run.running()
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()
        if run.running():
            assert run.terminate() == 0, run
