"""`dbre replicate` stops within a bound after SIGTERM, whatever it was waiting for (cli_replicate.py docstring).

A replicator that must start a generation while prune holds the repository lock, or while an application
holds the source's write lock, cannot ship: it used to exit 0 as if it had shipped (prune), or to try its
base nine more times, about 2 s each, before exiting (the write lock: 18.6 s measured, minutes on a
loaded machine). Now it exits within ``SHUTDOWN_SECONDS``, exit 1, one line saying what is not in the
repository, and the repository verifies clean. A replicator that has a generation ships its commits under
prune's lock (segments need none) and exits 0. A second signal exits at once, and so does a process still
stopping ``HARD_STOP_SECONDS`` after the signal (a store request that does not return).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbre.errors import LockedError
from dbre.replicate.shipper import SHUTDOWN_SECONDS
from dbre.repository.lock import Lock
from dbre.repository.repo import Repository
from tests.dbfactory import run_dbre
from tests.replication import (
    make_source,
    restore_at,
    restored_seq,
    start_replicator,
    stuck_in_c_shim,
    utc,
    wait_for_generation,
)

# the replicators below have nothing left to wait for once the signal is handled: well under the bound
PROMPT = SHUTDOWN_SECONDS / 2


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "repo") if request.param == "local" else str(request.getfixturevalue("s3_repo_url"))


class Replicator:
    """`dbre replicate` as a subprocess, its stderr read line by line as it comes."""

    def __init__(self, src: Path, url: str, env: dict[str, str] | None = None) -> None:
        self.proc = start_replicator(src, url, db="c", interval="200ms", env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"replicator exited {self.proc.returncode}: {self.lines}"
            assert time.monotonic() < deadline, f"no {text!r} on stderr: {self.lines}"
            time.sleep(0.05)

    def stop(self, *signals: float) -> tuple[int, float]:
        """SIGTERM (then another after each delay given); (exit code, seconds from the first signal to the exit)."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        for delay in signals:
            time.sleep(delay)
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        took = time.monotonic() - began
        self._reader.join(10)
        return code, took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def replicators() -> Iterator[list[Replicator]]:
    started: list[Replicator] = []
    yield started
    for rep in started:
        rep.kill()


@pytest.fixture
def held_locks() -> Iterator[list[Lock]]:
    held: list[Lock] = []
    yield held
    for lock in held:
        lock.release()


def _prune_lock(url: str, held: list[Lock]) -> Lock:
    """An exclusive repository lock, as `forget --prune` holds it (this process is alive: never stale).
    The replicator holds its own lock while it writes a generation's base, and lets go just after the
    base appears: on a loaded machine that took long enough for the first try to meet it, so this tries
    again for a while, as `dbre --retry-lock` would."""
    deadline = time.monotonic() + 30
    while True:
        lock = Lock(Repository.open_or_init(url, None).store, "forget --prune", exclusive=True)
        try:
            lock.acquire()
        except LockedError as err:
            if "replicate" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        held.append(lock)
        return lock


def _verify_clean(url: str) -> None:
    r = run_dbre("verify", "--repo", url)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r


def test_sigterm_while_prune_holds_the_repository(repo_url: str, tmp_path: Path, replicators: list[Replicator],
                                                  held_locks: list[Lock]) -> None:
    """A replicator that must take its first base waits for prune; SIGTERM then: exit 1 within the bound,
    one line naming prune's lock and what is not shipped (not the clean stop line), no lease or lock left."""
    src = tmp_path / "c.db"
    make_source(src, 50)
    lock = _prune_lock(repo_url, held_locks)
    rep = Replicator(src, repo_url)
    replicators.append(rep)
    rep.wait_for_line("waiting to start a generation")
    code, took = rep.stop()
    assert code == 1, rep.lines
    assert took < PROMPT, f"exited {took:.1f} s after SIGTERM"
    last = rep.lines[-1]
    assert last.startswith("dbre: replicate c: stopped before shipping every commit: a new generation could "
                           "not start (repository is locked by forget --prune"), rep.lines
    assert "no commit read by this run is in the repository" in last, last
    assert not any("stopped;" in line for line in rep.lines), rep.lines  # no claim of a clean stop
    store = Repository.open(repo_url).store
    assert list(store.list("locks/")) == [lock.key] and list(store.list("leases/")) == []
    lock.release()
    held_locks.remove(lock)
    _verify_clean(repo_url)


def _stopped_while_busy(tmp_path: Path, url: str, replicators: list[Replicator],
                        again: float | None = None) -> tuple[Replicator, int, float]:
    """A replicator of a new source whose write lock an application holds, signalled once its first base
    found the lock busy (``again``: signalled a second time that many seconds later): (it, exit, seconds)."""
    src = tmp_path / "c.db"
    make_source(src, 50)
    app = sqlite3.connect(src, isolation_level=None)
    try:
        app.execute("BEGIN IMMEDIATE")
        app.execute("UPDATE counter SET n = n + 1")
        rep = Replicator(src, url)
        replicators.append(rep)
        rep.wait_for_line("stayed busy during the base snapshot (try 1 of 10)")
        code, took = rep.stop() if again is None else rep.stop(again)
    finally:
        app.execute("ROLLBACK")
        app.close()
    return rep, code, took


def test_sigterm_while_the_source_write_lock_is_busy(tmp_path: Path, replicators: list[Replicator]) -> None:
    """An application holds the source's write lock: every base falls back to the backup API, without a WAL
    position, and was tried again up to 10 times (~2 s each) after SIGTERM. Now: no retry once stopping."""
    url = str(tmp_path / "repo")
    rep, code, took = _stopped_while_busy(tmp_path, url, replicators)
    assert code == 1, rep.lines
    # the base under way when the signal came may finish its 2 s wait for the write lock; no other starts
    assert took < PROMPT, f"exited {took:.1f} s after SIGTERM: {rep.lines}"
    assert rep.lines[-1].startswith("dbre: replicate c: stopped before shipping every commit: a new generation "
                                    "could not start (the source's write lock stayed busy"), rep.lines
    _verify_clean(url)


def test_sigterm_under_prune_ships_what_is_committed(repo_url: str, tmp_path: Path,
                                                     replicators: list[Replicator], held_locks: list[Lock]) -> None:
    """With a generation started, prune's lock stops nothing: the commits made while it is held are shipped
    at SIGTERM (segments take no repository lock), exit 0, at once; the newest state restores them."""
    src = tmp_path / "c.db"
    make_source(src, 50)
    rep = Replicator(src, repo_url)
    replicators.append(rep)
    wait_for_generation(repo_url, "c", timeout=60, proc=rep.proc)
    _prune_lock(repo_url, held_locks)
    app = sqlite3.connect(src, isolation_level=None)
    try:
        for seq in range(51, 61):
            app.execute("BEGIN IMMEDIATE")
            app.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(100))", (seq,))
            app.execute("UPDATE counter SET n = ?", (seq,))
            app.execute("COMMIT")
    finally:
        app.close()
    code, took = rep.stop()
    assert code == 0, rep.lines
    assert took < PROMPT, f"exited {took:.1f} s after SIGTERM"
    assert "replicate c: stopped; " in rep.lines[-1], rep.lines
    for lock in held_locks:
        lock.release()
    held_locks.clear()
    out = tmp_path / "newest.db"
    restore_at(Repository.open(repo_url), "c", utc(time.time() + 1), out)
    assert restored_seq(out) == (60, 60, 60)
    _verify_clean(repo_url)


def test_second_signal_exits_at_once(tmp_path: Path, replicators: list[Replicator]) -> None:
    """A second SIGTERM while the first is being handled (a base waiting 2 s for the source's write lock):
    exit 1 at once, one line saying the process did not wait; the repository verifies clean."""
    url = str(tmp_path / "repo")
    rep, code, took = _stopped_while_busy(tmp_path, url, replicators, again=0.3)  # (the second try starts now)
    assert code == 1, rep.lines
    assert took < 1.5, f"exited {took:.1f} s after the first SIGTERM"
    assert rep.lines[-1].startswith("dbre: replicate: a second signal: exiting now"), rep.lines
    _verify_clean(url)


HANG_RELEASE = """
import time
import dbre.replicate.lease as lease

def _hang(self):  # the lease's removal, a store request that never returns
    time.sleep(3600)

lease.Lease.release = _hang
"""


def test_a_stop_that_hangs_exits_at_the_hard_bound(tmp_path: Path, replicators: list[Replicator]) -> None:
    """The replicator ships at SIGTERM, then its last store request (the lease's removal) never returns:
    the process exits at ``HARD_STOP_SECONDS`` (3 s here), exit 1, one line; what it shipped restores, and
    the repository verifies clean (the lease is left behind, as by kill -9)."""
    src, url, shim = tmp_path / "c.db", str(tmp_path / "repo"), tmp_path / "shim"
    make_source(src, 50)
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HANG_RELEASE)
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    rep = Replicator(src, url, env={"PYTHONPATH": path, "DBRE_REPLICATE_HARD_STOP": "3"})
    replicators.append(rep)
    wait_for_generation(url, "c", timeout=60, proc=rep.proc)
    app = sqlite3.connect(src, isolation_level=None)
    try:
        app.execute("INSERT INTO t(seq, pad) VALUES (51, randomblob(100))")
        app.execute("UPDATE counter SET n = 51")
    finally:
        app.close()
    code, took = rep.stop()
    assert code == 1, rep.lines
    assert 3.0 <= took < 3.0 + PROMPT, f"exited {took:.1f} s after SIGTERM"
    assert rep.lines[-1].startswith("dbre: replicate: still stopping 3 s after the signal: exiting now"), rep.lines
    assert list(Repository.open(url).store.list("leases/c/")), "the hung removal removed the lease"
    out = tmp_path / "newest.db"
    restore_at(Repository.open(url), "c", utc(time.time() + 1), out)
    assert restored_seq(out) == (51, 51, 51)
    _verify_clean(url)


@pytest.mark.parametrize("second", [False, True], ids=["hard-bound", "second-signal"])
def test_a_stop_stuck_in_c_still_exits(tmp_path: Path, replicators: list[Replicator], second: bool) -> None:
    """The main thread stuck in one C call (an SQLite statement here; an fsync on a stalled disk, a busy
    wait) when SIGTERM comes: no Python signal handler can run until it returns. The signals are counted
    by the watch thread on the wakeup fd, so the hard bound (3 s here) and a second signal still end the
    process, exit 1, one line, and the repository verifies clean. (With the handler alone this process
    never exited.)"""
    src, url, stick = tmp_path / "c.db", str(tmp_path / "repo"), tmp_path / "stick"
    make_source(src, 50)
    env = stuck_in_c_shim(tmp_path / "shim", "dbre.replicate.wal", "WalTail", "replaced", stick)  # (every poll)
    rep = Replicator(src, url, env={**env, "DBRE_REPLICATE_HARD_STOP": "3"})
    replicators.append(rep)
    wait_for_generation(url, "c", timeout=60, proc=rep.proc)
    stick.touch()
    time.sleep(1.0)  # (a poll every 20 ms: stuck by now)
    code, took = rep.stop(1.0) if second else rep.stop()
    assert code == 1, rep.lines
    if second:
        assert 1.0 <= took < 1.0 + PROMPT, f"exited {took:.1f} s after the first SIGTERM"
        assert rep.lines[-1].startswith("dbre: replicate: a second signal: exiting now"), rep.lines
    else:
        assert 3.0 <= took < 3.0 + PROMPT, f"exited {took:.1f} s after SIGTERM"
        assert rep.lines[-1].startswith("dbre: replicate: still stopping 3 s after the signal: exiting now"), \
            rep.lines
    _verify_clean(url)


def test_the_documented_bounds() -> None:
    """The bounds the command's docstring states are the ones the code applies."""
    from dbre import cli_replicate

    assert SHUTDOWN_SECONDS == 10.0 and cli_replicate.HARD_STOP_SECONDS == 15.0
    doc = " ".join((cli_replicate.__doc__ or "").split())
    assert "``SHUTDOWN_SECONDS`` (10 s:" in doc and "``HARD_STOP_SECONDS`` (15 s)" in doc
