"""`dbre restore --follow`: a standby kept current from segments while a writer commits and the
replicator runs (a VACUUM in between: a new generation, followed in place), readers of the standby always
see one consistent state, the standby equals the source once the writer stops, SIGTERM exits 0; an
apply killed half-way leaves a hot journal that SQLite rolls back."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from dbre.repository.repo import Repository
from tests.replication import (
    dbre_cmd,
    make_source,
    start_replicator,
    start_writer,
    stop_replicator,
    stuck_in_c_shim,
    wait_for_generation,
)

Q = "SELECT count(*), max(seq), (SELECT n FROM counter) FROM t"


def _state(path: Path) -> tuple[int, int, int]:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return tuple(c.execute(Q).fetchone())  # type: ignore[return-value]
    finally:
        c.close()


def _bases(repo_url: str) -> list[str]:
    return [k for k in Repository.open(repo_url).store.list("segments/app/") if k.endswith("/base")]


def test_follow_keeps_a_consistent_standby_current(tmp_path: Path) -> None:
    repo_url, src, log, standby = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "w.log", tmp_path / "sb.db"
    make_source(src, 3000)
    rep = start_replicator(src, repo_url, interval="200ms")
    follower: subprocess.Popen[bytes] | None = None
    seen: list[tuple[int, int, int]] = []
    bad: list[str] = []
    done = threading.Event()

    def read() -> None:  # a reader of the standby: every state it sees is whole
        while not done.is_set():
            try:
                count, top, n = _state(standby)
                if count != n:  # (every committed state has as many rows as its counter says)
                    bad.append(f"{count} rows, max {top}, counter {n}")
                seen.append((count, top, n))
            except (sqlite3.Error, AssertionError) as err:
                bad.append(repr(err))
            time.sleep(0.05)

    try:
        wait_for_generation(repo_url, proc=rep)
        follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--to", str(standby),
                                             "--follow", "--interval", "200ms"), stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while not standby.exists():
            assert follower.poll() is None and time.time() < deadline, "no standby"
            time.sleep(0.05)
        first_file = standby.stat().st_ino
        reader = threading.Thread(target=read)
        reader.start()
        assert start_writer(src, log, 3.0, start_seq=3000, ckpt_every=200).wait(timeout=60) == 0
        c = sqlite3.connect(src, isolation_level=None)
        c.execute("BEGIN")
        c.execute("DELETE FROM t WHERE seq % 3 = 0")
        c.execute("UPDATE counter SET n = (SELECT count(*) FROM t)")  # (count == counter still)
        c.execute("COMMIT")
        c.execute("VACUUM")  # a new generation: the follower restores it
        c.close()
        want = sqlite3.connect(src).execute(Q).fetchone()
        deadline = time.time() + 90  # (a liveness bound: on a busy machine the new base takes a while)
        # the VACUUM starts a new generation (after shipping it): the standby follows it in place
        while _state(standby) != want or len(_bases(repo_url)) < 2:
            assert follower.poll() is None, follower.stderr.read().decode() if follower.stderr else ""
            assert time.time() < deadline, (_state(standby), want)
            time.sleep(0.1)
        time.sleep(1.0)  # a few polls: the follower lists the new generation
        done.set()
        reader.join()
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err.decode()
    finally:
        done.set()
        if follower is not None and follower.poll() is None:
            follower.kill()
        code, rerr = stop_replicator(rep)
    assert code == 0, rerr
    assert not bad, bad[:5]
    assert len({s[1] for s in seen}) >= 5, "the reader saw the standby move only a few times"
    line = err.decode().strip().splitlines()[-1]
    assert len(line.split("(generations ")[1].split(")")[0].split(", ")) >= 2, line  # the VACUUM's generation
    assert standby.stat().st_ino == first_file, "the standby was replaced: the VACUUM's generation was restored whole"
    assert not Path(str(standby) + "-wal").exists()  # rollback journal mode: readers need no -wal


CRASH = r'''
import os, sys
from pathlib import Path
from dbre.restore.follow import Standby
path, ps = Path(sys.argv[1]), int(sys.argv[2])
sb = Standby(path, ps)
n = os.path.getsize(path) // ps
real = os.ftruncate
def die(fd, size):
    os._exit(9)  # after the new pages were written, before the size and the commit
os.ftruncate = die
sb.apply({p: bytes([p % 251]) * ps for p in range(2, n + 5)}, n + 4)
'''


def test_an_apply_killed_half_way_is_rolled_back_by_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "sb.db"
    make_source(db, 2000)
    c = sqlite3.connect(db)
    c.execute("PRAGMA journal_mode=DELETE")
    c.close()
    before = _state(db)
    size = db.stat().st_size
    ps = sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    r = subprocess.run([sys.executable, "-c", CRASH, str(db), str(ps)], capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 9, r.stderr.decode()
    assert Path(str(db) + "-journal").exists()  # a hot journal; the file holds garbage pages now
    raw = db.read_bytes()
    assert raw[ps : 2 * ps] == bytes([2]) * ps
    assert _state_rw(db) == before  # the next reader rolls it back (with write access to the directory)
    assert db.stat().st_size == size
    assert not Path(str(db) + "-journal").exists()


def _state_rw(path: Path) -> tuple[int, int, int]:
    c = sqlite3.connect(path, timeout=10)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return tuple(c.execute(Q).fetchone())  # type: ignore[return-value]
    finally:
        c.close()


def test_periodic_bases_are_followed_in_place(tmp_path: Path) -> None:
    """A replicator that starts a new generation every 5 segments (a periodic base of the same
    history, as every 600 by default): the standby follows each in place, restored once at the
    start, and ends equal to the source; the standby file is never replaced (same inode)."""
    repo_url, src, log, standby = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "w.log", tmp_path / "sb.db"
    make_source(src, 2000)
    rep = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "5"})
    follower: subprocess.Popen[bytes] | None = None
    try:
        wait_for_generation(repo_url, proc=rep)
        follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--to", str(standby),
                                             "--follow", "--interval", "200ms"), stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while not standby.exists():
            assert follower.poll() is None and time.time() < deadline, "no standby"
            time.sleep(0.05)
        inode = standby.stat().st_ino
        assert start_writer(src, log, 4.0, start_seq=2000, pause=0.01).wait(timeout=60) == 0
        want = sqlite3.connect(src).execute(Q).fetchone()
        deadline = time.time() + 30
        while _state(standby) != want:
            assert follower.poll() is None, follower.stderr.read().decode() if follower.stderr else ""
            assert time.time() < deadline, (_state(standby), want)
            time.sleep(0.1)
        assert standby.stat().st_ino == inode, "the standby was replaced: a generation was restored whole"
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err.decode()
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        code, rerr = stop_replicator(rep)
    assert code == 0, rerr
    line = err.decode().strip().splitlines()[-1]
    gens = line.split("(generations ")[1].split(")")[0].split(", ")
    assert len(gens) >= 3, line  # the writer's 4 s at 200 ms made several periodic bases
    assert " 1 restores " in line, line


def test_a_second_signal_ends_a_stuck_standby_at_once(tmp_path: Path) -> None:
    """The first SIGTERM asks the standby to stop after the apply in progress, however long; a second one
    ends it at once, exit 1, one line saying the standby is consistent, even while its main thread is
    stuck in one C call (where no Python handler runs: a second signal used to do nothing at all). The
    standby then reads whole."""
    repo_url, src, standby, stick = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "sb.db", tmp_path / "stick"
    env = stuck_in_c_shim(tmp_path / "shim", "dbre.restore.follow", "Follower", "poll", stick)
    make_source(src, 500)
    rep = start_replicator(src, repo_url, interval="200ms")
    follower: subprocess.Popen[bytes] | None = None
    try:
        wait_for_generation(repo_url, proc=rep)
        follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--to", str(standby),
                                             "--follow", "--interval", "100ms"), stderr=subprocess.PIPE,
                                    env={**os.environ, **env})
        deadline = time.time() + 30
        while not standby.exists():
            assert follower.poll() is None and time.time() < deadline, "no standby"
            time.sleep(0.05)
        stick.touch()
        time.sleep(1.0)  # (a poll every 0.1 s: stuck by now)
        follower.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert follower.poll() is None, "the first signal waits for the apply in progress"
        began = time.monotonic()
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        stop_replicator(rep)
    assert follower.returncode == 1, err.decode()
    assert took < 3.0, f"exited {took:.1f} s after the second SIGTERM"
    line = err.decode().strip().splitlines()[-1]
    assert line.startswith("dbre: restore --follow: a second signal: exiting now"), line
    assert "the standby is consistent" in line
    assert _state(standby)[0] == 500
