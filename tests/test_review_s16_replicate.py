"""Findings of session 16's bug hunt on replication: a database file replaced (mv) while `dbre replicate`
ran was corrupted. The replicator's read transaction kept the old database's -wal beside the path after
the application closed; the next opener of the new file replayed those frames into it (malformed), and the
replicator itself died opening it. Now it empties that -wal through its connection to the old file first."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dbre.replicate.segment import list_generations, open_segment, read_base
from dbre.repository.repo import Repository
from tests.dbfactory import cli
from tests.replication import make_source, restored_seq, start_replicator, stop_replicator, wait_for_generation

_APP = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    c.execute("INSERT INTO t VALUES (?, randomblob(300))", (i,))
c.execute("UPDATE counter SET n = ?", (int(sys.argv[3]) - 1,))
c.close()
"""


def _app(src: Path, first: int, stop: int) -> None:
    """The application in its own process: commits rows first..stop-1, then closes its connection."""
    subprocess.run([sys.executable, "-c", _APP, str(src), str(first), str(stop)], check=True)


def test_a_file_moved_over_the_database_is_not_given_the_old_wal(tmp_path: Path) -> None:
    src, other, aside = tmp_path / "app.db", tmp_path / "other.db", tmp_path / "app.db.old"
    repo_url = str(tmp_path / "repo")
    make_source(src, 200)
    make_source(other, 50)
    rep = start_replicator(src, repo_url, interval="200ms")
    try:
        wait_for_generation(repo_url, proc=rep)
        _app(src, 201, 501)  # 300 commits; its close cannot remove the -wal: the replicator reads it
        time.sleep(1.0)
        assert os.path.getsize(str(src) + "-wal") > 0
        os.rename(src, aside)  # the operator keeps the old one aside and swaps another database in
        os.rename(other, src)
        deadline = time.time() + 20
        while time.time() < deadline and os.path.exists(str(src) + "-wal") and os.path.getsize(str(src) + "-wal"):
            time.sleep(0.05)
        assert rep.poll() is None, rep.stderr.read() if rep.stderr else ""
        # the application starts again, on the new file
        c = sqlite3.connect(src)
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT count(*), max(seq) FROM t").fetchone() == (50, 50)
        c.close()
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert "the database file was replaced" in err
    # the old database, moved aside, got its last commits back from that -wal: complete, and healthy
    c = sqlite3.connect(aside)
    assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert c.execute("SELECT count(*), max(seq) FROM t").fetchone() == (500, 500)
    c.close()
    # and every one of its 300 commits was shipped with the old generation: its last one restores it whole
    repo = Repository.open(repo_url)
    gens = list_generations(repo, "app")
    assert len(gens) == 2, gens
    old_gen = min(gens)  # (ids begin with their time)
    state = bytes.fromhex(read_base(repo, "app", old_gen).state)
    last = 0
    for name in gens[old_gen]:
        seg = open_segment(repo, name, state)
        state = seg.state_after
        last = max([last, *(tx.txid for tx in seg.transactions)])
    out = tmp_path / "old-end.db"
    assert cli("restore", "--repo", repo_url, "--db", "app", "--txid", str(last), "--to", out).returncode == 0
    assert restored_seq(out) == (500, 500, 500)


def test_a_signal_while_the_main_thread_waits_on_the_stop_event_does_not_deadlock() -> None:
    """Seen live in a CI run: a replicator hung forever after SIGTERM, every thread waiting on a futex. The
    signal came while the main thread, in `stop.wait(0.02)`, was re-taking the event's condition lock; the
    Python handler, run right there, set that same event and waited for the lock its own thread held (and
    the watch thread then waited for the handler's). The handler now only counts and hands over."""
    import threading

    from dbre.cli_replicate import _Stopping

    stop = threading.Event()
    stopping = _Stopping(stop, None)  # (not installed: the handler's fallback, a thread of its own, acts)
    done = threading.Event()

    def interrupted_inside_wait() -> None:
        with stop._cond:  # what Event.wait holds while it re-takes its lock
            stopping._python_handler(15, None)
        done.set()

    t = threading.Thread(target=interrupted_inside_wait, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set(), "the signal handler deadlocked on the stop event's lock"
    assert stop.wait(5) and stopping.signals == 1
