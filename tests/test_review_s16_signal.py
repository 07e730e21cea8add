"""Review of 5f71210 (`_Stopping._python_handler` only counts, then pokes the watch thread through the
wakeup pipe, or starts a thread of its own): can the handler still block, are signals counted exactly,
and does a real replicator exit within its bound when SIGTERM lands at random moments of its poll loop.

In-process tests drive `_Stopping` in this (main) thread with `_hard_exit` recorded, not run (the
`stopping_env` fixture of tests/test_review_s15_stopping.py); the last two run `dbre replicate`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.replication import make_source, start_replicator, wait_for_generation
from tests.test_review_s15_stopping import _fill_pipe, _settle, stopping_env  # noqa: F401

TERM, INT = signal.SIGTERM, signal.SIGINT


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _kill_self(*sigs: signal.Signals) -> None:
    for s in sigs:
        os.kill(os.getpid(), s)


@pytest.mark.parametrize("held", ["_active_limbo_lock", "_shutdown_locks_lock", "full poke pipe"])
def test_the_handler_returns_inside_threading_locks_and_with_a_full_pipe(held: str) -> None:
    """The handler's fallback starts a thread while the interrupted thread holds threading's own locks
    (a Thread.start() or join() in the main thread), and its poke meets a full non-blocking pipe."""
    from dbre.cli_replicate import _Stopping

    stopping, fds = _Stopping(threading.Event(), None), ()
    returned = threading.Event()
    if held == "full poke pipe":
        fds = os.pipe()
        os.set_blocking(fds[1], False)
        _fill_pipe(fds[1])
        stopping._poke = fds[1]

    def interrupted() -> None:
        lock = getattr(threading, held, None)
        if lock is None:
            stopping._python_handler(15, None)
        else:
            with lock:
                stopping._python_handler(15, None)
        returned.set()

    threading.Thread(target=interrupted, daemon=True).start()
    try:
        assert returned.wait(5), f"the handler blocked ({held})"
        assert stopping.stop.wait(5) and stopping.signals == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_counts_timer_second_signal_burst_and_sigint_then_sigterm(stopping_env) -> None:  # noqa: F811
    cli_replicate, exits = stopping_env
    s = cli_replicate._Stopping(threading.Event(), 1.0)
    s.install()
    began = time.monotonic()
    _kill_self(TERM)
    assert s.stop.wait(2) and s.signals == 1 and exits == []
    _settle(s, exits, 1)  # the hard-stop timer: `bound` s after the first signal
    took = time.monotonic() - began
    assert exits == ["still stopping 1 s after the signal"] and 0.9 <= took <= 2.5, (exits, took)
    _kill_self(TERM)
    _settle(s, exits, 2)
    assert exits[1:] == ["a second signal"] and s.signals == 2, (exits, s.signals)
    s.finished()
    for sigs in ((TERM,) * 6, (INT,)):  # a burst; SIGINT, then SIGTERM
        exits.clear()
        s = cli_replicate._Stopping(threading.Event(), None)
        s.install()
        _kill_self(*sigs)
        _settle(s, exits, 1)
        assert s.stop.is_set() and (exits[:1] == ["a second signal"]) == (len(sigs) > 1), (sigs, exits)
        if len(sigs) == 1:
            assert s.signals == 1
            _kill_self(TERM)
            _settle(s, exits, 1)
            assert exits == ["a second signal"] and s.signals == 2, exits
        s.finished()


def test_a_signal_with_the_wakeup_pipe_full_still_counts(stopping_env) -> None:  # noqa: F811
    """The watch thread held up (here: `_lock` held) and the pipe full: the second SIGTERM's byte is lost
    and its poke fails; the handler's count and its thread still make it 'a second signal'."""
    cli_replicate, exits = stopping_env
    s = cli_replicate._Stopping(threading.Event(), None)
    s.install()
    with s._lock:
        _kill_self(TERM)
        time.sleep(0.3)  # (the watch thread reads it and waits for the lock)
        _fill_pipe(s._poke)
        _kill_self(TERM)
        time.sleep(0.2)
    _settle(s, exits, 1)
    s.finished()
    assert exits[:1] == ["a second signal"] and s.signals == 2, (exits, s.signals)


@pytest.mark.parametrize("when", ["before the wakeup fd", "before _poke"])
def test_a_signal_during_install_counts_once_and_a_second_ends_it(stopping_env, monkeypatch, when) -> None:  # noqa: F811
    cli_replicate, exits = stopping_env
    s = cli_replicate._Stopping(threading.Event(), None)
    real_pipe, real_set = os.pipe, signal.set_wakeup_fd

    def pipe() -> tuple[int, int]:
        _kill_self(TERM)
        return real_pipe()

    def set_fd(fd: int, **kw: object) -> int:
        previous = real_set(fd, **kw)
        _kill_self(TERM)  # (handled while install() goes on to start the watch thread: `_poke` not set yet)
        return previous

    with monkeypatch.context() as m:  # (undone alone: the fixture's `_hard_exit` stays recorded)
        m.setattr(*((os, "pipe", pipe) if when.endswith("fd") else (signal, "set_wakeup_fd", set_fd)))
        s.install()
    _settle(s, exits, 1)
    assert s.stop.is_set() and s.signals == 1 and exits == [], (s.signals, exits)
    _kill_self(TERM)
    _settle(s, exits, 1)
    s.finished()
    assert exits == ["a second signal"], exits


def test_fallback_a_second_signal_nested_in_the_handler_is_counted(stopping_env, monkeypatch) -> None:  # noqa: F811
    """No wakeup pipe (EMFILE): the handler's count is the only one. A second SIGTERM whose handler runs
    nested in the first's (Python handlers nest in the main thread) at a point where one can run: in its
    Thread.start(). (Not between the read and the write of `_seen["handler"] += 1`: in 3.11 no bytecode
    there checks for signals, so 'no lock' holds.)"""
    cli_replicate, exits = stopping_env
    real_set, real_start = signal.set_wakeup_fd, threading.Thread.start
    starts: list[int] = []

    def no_pipe(fd: int, *a: object, **kw: object) -> int:
        if "warn_on_full_buffer" in kw:
            raise OSError(24, "Too many open files")
        return real_set(fd, *a, **kw)

    def start(self: threading.Thread) -> None:
        starts.append(s._seen["handler"])
        if len(starts) == 1:
            signal.raise_signal(TERM)  # the second signal, handled right here
        real_start(self)

    s = cli_replicate._Stopping(threading.Event(), None)
    with monkeypatch.context() as m:
        m.setattr(signal, "set_wakeup_fd", no_pipe)
        s.install()
    assert s._poke == -1
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", start)
        _kill_self(TERM)
        _settle(s, exits, 1)
    s.finished()
    assert starts[:2] == [1, 2], starts
    assert exits == ["a second signal"] and s.signals == 2, (exits, dict(s._seen), s.signals)


def _stop_at_random(tmp: Path, i: int, delay: float) -> str | None:
    """A replicator in its poll loop, SIGTERM after ``delay``: None if it exits 0/1 within 20 s with its line."""
    src, url = tmp / f"s{i}.db", str(tmp / f"repo{i}")
    make_source(src, 20)
    proc = start_replicator(src, url, db="r", interval="200ms")
    try:
        wait_for_generation(url, "r", timeout=30, proc=proc)
        time.sleep(delay)
        began = time.monotonic()
        proc.send_signal(TERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            return f"#{i} (delay {delay:.3f}): no exit {time.monotonic() - began:.0f} s after SIGTERM"
        text = err.decode()
        if (proc.returncode, proc.returncode == 0 and "replicate r: stopped;" in text
                or proc.returncode == 1 and "dbre: replicate" in text) != (proc.returncode, True):
            return f"#{i} (delay {delay:.3f}): exit {proc.returncode}: {text!r}"
        return None
    finally:
        _reap(proc)


def test_sigterm_at_random_moments_of_the_poll_loop(tmp_path: Path) -> None:
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.4) for _ in range(18)]
    with ThreadPoolExecutor(3) as pool:
        bad = [r for r in pool.map(lambda a: _stop_at_random(tmp_path, *a), enumerate(delays)) if r]
    assert not bad, f"seed {seed}: {bad}"


SLOW_STOP = """
import time
import dbre.replicate.lease as m
_real = m.Lease.release
def _slow(self, *a, **k):  # a clean stop that takes 3 s, the main thread in Python code (handlers run)
    time.sleep(3)
    return _real(self, *a, **k)
m.Lease.release = _slow
"""


def test_real_burst_and_sigint_then_sigterm_exit_at_once(tmp_path: Path) -> None:
    """Signals 0.3 s apart (sent back to back, the kernel merges a pending SIGTERM with the next: one
    delivered), while the first one's clean stop is still running: 'a second signal', exit 1, at once."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_STOP)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)}
    for i, sigs in enumerate(((TERM,) * 5, (INT, TERM))):
        src, url = tmp_path / f"b{i}.db", str(tmp_path / f"repo{i}")
        make_source(src, 20)
        proc = start_replicator(src, url, db="b", interval="200ms", env=env)
        try:
            wait_for_generation(url, "b", timeout=30, proc=proc)
            began = time.monotonic()
            for s in sigs:
                proc.send_signal(s)
                time.sleep(0.3)  # (apart enough that a loaded machine delivers each; all within the 3 s stop)
            _, err = proc.communicate(timeout=10)
            took = time.monotonic() - began
            assert proc.returncode == 1 and "a second signal: exiting now" in err.decode(), (sigs, err)
            assert took < 2.9, (sigs, took)  # (before the 3 s clean stop could have ended it)
        finally:
            _reap(proc)
