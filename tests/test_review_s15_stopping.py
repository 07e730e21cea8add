"""Review of dd62815 (`_Stopping`: the signals counted by a watch thread on the wakeup fd).

Subprocess tests run `dbre replicate` as the other shutdown tests do; two drive `_Stopping` in this
process (main thread), with a signal delivered during install() or after finished(). Every test here
failed on the first version; the fixes: `_hard_exit` writes its line from a thread of its own, straight
to fd 2, and exits after 1 s whatever stderr does; an RLock; the watch thread kept to the end of the
process; and the signals received taken as the larger of the Python handler's and the pipe's counts,
never their sum (blocking the signals across install(), the review's proposal, does not do it: a
signal sent to the process is then taken by another thread, whose C handler still writes the pipe
and trips the Python handler; the in-process tests here run with such threads about).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.replication import dbre_cmd, make_source, stuck_in_c_shim, wait_for_generation
from tests.test_replicate_shutdown import PROMPT


def _start(src: Path, url: str, shim: Path, *, env: dict[str, str], stdout: object, stderr: object,
           quiet: bool = True) -> subprocess.Popen[bytes]:
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(dbre_cmd("replicate", str(src), "--repo", url, "--db", "c", "--interval", "200ms",
                                     *(["-q"] if quiet else [])),
                            stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONPATH": path, **env})


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _two_signals(proc: subprocess.Popen[bytes], gap: float, timeout: float) -> tuple[int | None, float]:
    """SIGTERM, another ``gap`` seconds later; (the exit code or None, seconds from the first signal)."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    proc.send_signal(signal.SIGTERM)
    return _wait_exit(proc, timeout), time.monotonic() - began


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _fill_pipe(w: int) -> None:
    """Fill the pipe whose write end is ``w``, through an open file description of our own (O_NONBLOCK on
    ``w`` itself would be the child's too)."""
    filler = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for size in (4096, 1):
            while True:
                try:
                    os.write(filler, b"x" * size)
                except BlockingIOError:
                    break
    finally:
        os.close(filler)


def test_hard_stop_holds_when_stderr_is_a_broken_pipe(tmp_path: Path) -> None:
    """The log reader is gone (stderr a pipe with no reader: EPIPE). The main thread is stuck in one C call
    when SIGTERM comes, then a second SIGTERM. `_hard_exit`'s print raises BrokenPipeError in the watch
    thread (and in the timer thread at the bound): the thread dies before os._exit, nothing counts any
    more signals, and the process never exits."""
    src, url, shim, stick = tmp_path / "c.db", str(tmp_path / "repo"), tmp_path / "shim", tmp_path / "stick"
    make_source(src, 50)
    stuck_in_c_shim(shim, "dbre.replicate.wal", "WalTail", "replaced", stick)
    proc = _start(src, url, shim, env={"DBRE_REPLICATE_HARD_STOP": "3"},
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        proc.stderr.close()  # (the reader died)
        wait_for_generation(url, "c", timeout=60)
        assert proc.poll() is None
        stick.touch()
        time.sleep(1.0)
        code, took = _two_signals(proc, 1.0, 3.0 + PROMPT)
        assert code == 1, f"no exit {took:.1f} s after two SIGTERMs (hard bound 3 s): {code}"
    finally:
        _kill(proc)


def test_hard_stop_holds_when_the_log_pipe_is_full(tmp_path: Path) -> None:
    """`dbre replicate ... 2>&1 | tee log` with tee stalled (a stalled disk; journald stalled): the pipe
    fills, the next `shipped` line blocks in write(2), a C call. SIGTERM: the watch thread sets the stop
    and starts the timer, but `_hard_exit` prints to the same full pipe first, so os._exit never runs."""
    src, url, shim = tmp_path / "c.db", str(tmp_path / "repo"), tmp_path / "shim"
    make_source(src, 50)
    shim.mkdir()
    r, w = os.pipe()
    proc = _start(src, url, shim, env={"DBRE_REPLICATE_HARD_STOP": "3"}, stdout=w, stderr=w, quiet=False)
    try:
        wait_for_generation(url, "c", timeout=60)
        assert proc.poll() is None
        _fill_pipe(w)  # (the reader has stalled)
        c = sqlite3.connect(src, isolation_level=None)
        for i in range(5):  # a commit or two: its `shipped` line blocks
            c.execute("UPDATE counter SET n = ?", (1000 + i,))
            time.sleep(0.3)
        c.close()
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = _wait_exit(proc, 3.0 + PROMPT)
        assert code == 1, f"no exit {time.monotonic() - began:.1f} s after SIGTERM (hard bound 3 s): {code}"
    finally:
        _kill(proc)
        os.close(w)
        os.close(r)


FALLBACK = """
import errno, signal, threading, time

_set = signal.set_wakeup_fd

def _no_wakeup(fd, *args, **kwargs):  # the pipe for the wakeup fd cannot be had (EMFILE): the Python handler counts
    if "warn_on_full_buffer" in kwargs:
        raise OSError(errno.EMFILE, "Too many open files")
    return _set(fd, *args, **kwargs)

signal.set_wakeup_fd = _no_wakeup

_init = threading.Timer.__init__

def _slow_init(self, interval, function, args=None, kwargs=None):  # widens the window while the first signal is counted
    if args and "still stopping" in str(args[0]):
        time.sleep(1.0)
    _init(self, interval, function, args, kwargs)

threading.Timer.__init__ = _slow_init
"""


def test_fallback_second_signal_inside_on_signal(tmp_path: Path) -> None:
    """No wakeup fd (install() falls back to the Python handler). A second signal while the handler for the
    first is still counting it (holding `_lock`: nested Python handlers run in the same main thread)
    blocks forever on the non-reentrant lock, before the timer exists. Before dd62815 (no lock) the nested
    handler exited at once ('a second signal')."""
    src, url, shim = tmp_path / "c.db", str(tmp_path / "repo"), tmp_path / "shim"
    make_source(src, 50)
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FALLBACK)
    proc = _start(src, url, shim, env={"DBRE_REPLICATE_HARD_STOP": "3"}, stdout=subprocess.DEVNULL,
                  stderr=subprocess.PIPE)
    try:
        wait_for_generation(url, "c", timeout=60, proc=proc)
        code, took = _two_signals(proc, 0.4, 3.0 + PROMPT)
        assert code == 1, f"no exit {took:.1f} s after two SIGTERMs: {code}"
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "a second signal: exiting now" in err, err
    finally:
        _kill(proc)


# -- in this process: one SIGTERM at an unlucky instant is counted twice ------------------------------------


@pytest.fixture
def stopping_env(monkeypatch: pytest.MonkeyPatch):
    from dbre import cli_replicate

    assert threading.current_thread() is threading.main_thread()
    exits: list[str] = []
    monkeypatch.setattr(cli_replicate, "_hard_exit", lambda why, command="replicate": exits.append(why))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)
    yield cli_replicate, exits
    for s, h in saved.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(previous)


def _settle(stopping: object, exits: list[str], want: int) -> None:
    deadline = time.monotonic() + 3
    while len(exits) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # (whatever else the watch thread reads)


def test_one_sigterm_after_finished_counts_once_and_a_second_still_exits(stopping_env) -> None:
    """The first version gave the wakeup fd back in finished() and let the Python handler count again: a
    SIGTERM between the two was counted twice ('a second signal' for one signal). Now the watch thread
    stays to the end: one SIGTERM after finished() counts once (no timer: the stop is over), and a
    second one still ends the process at once."""
    cli_replicate, exits = stopping_env
    stopping = cli_replicate._Stopping(threading.Event(), 60.0)
    stopping.install()
    stopping.finished()
    os.kill(os.getpid(), signal.SIGTERM)
    _settle(stopping, exits, 1)
    assert stopping.signals == 1 and exits == [] and stopping.timer is None, (stopping.signals, exits)
    os.kill(os.getpid(), signal.SIGTERM)
    _settle(stopping, exits, 1)
    assert stopping.signals == 2 and exits == ["a second signal"], (stopping.signals, exits)


def test_one_sigterm_during_install_is_not_a_second_signal(stopping_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """install(): a SIGTERM just after set_wakeup_fd stored the fd is written to the watch pipe and run by
    the Python handler: the first version counted both ('a second signal' at start-up)."""
    cli_replicate, exits = stopping_env
    stopping = cli_replicate._Stopping(threading.Event(), 60.0)
    real = signal.set_wakeup_fd

    def arrives_now(fd: int, *a: object, **k: object) -> int:
        previous = real(fd, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return previous

    monkeypatch.setattr(signal, "set_wakeup_fd", arrives_now)
    stopping.install()
    monkeypatch.setattr(signal, "set_wakeup_fd", real)
    _settle(stopping, exits, 1)
    try:
        assert stopping.signals == 1 and exits == [], (stopping.signals, exits)
    finally:
        stopping._done = True
        if stopping.timer is not None:
            stopping.timer.cancel()
        stopping.finished()


def test_second_signal_while_the_summary_blocks_on_a_stalled_stderr(tmp_path: Path) -> None:
    """A clean stop whose summary line cannot be written (stderr a pipe whose reader stalled, full). After
    finished() the watch thread is gone and the timer cancelled, and the main thread is in write(2): no
    Python handler runs, so a second SIGTERM (or Ctrl-C) does nothing and the process hangs until SIGKILL."""
    src, url = tmp_path / "c.db", str(tmp_path / "repo")
    make_source(src, 50)
    r, w = os.pipe()
    proc = subprocess.Popen(dbre_cmd("replicate", str(src), "--repo", url, "--db", "c", "--interval", "200ms", "-q"),
                            stdout=subprocess.DEVNULL, stderr=w,
                            env={**os.environ, "DBRE_REPLICATE_HARD_STOP": "3"})
    try:
        wait_for_generation(url, "c", timeout=60)
        assert proc.poll() is None
        _fill_pipe(w)
        proc.send_signal(signal.SIGTERM)
        time.sleep(2.0)  # (a clean stop is well under a second: it is now writing the summary)
        assert proc.poll() is None
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = _wait_exit(proc, PROMPT)
        assert code == 1, f"no exit {time.monotonic() - began:.1f} s after the second SIGTERM: {code}"
    finally:
        _kill(proc)
        os.close(w)
        os.close(r)
