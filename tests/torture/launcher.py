"""A fork server for `dbre` runs that a trial kills: one interpreter imports dbre once, then forks a
real process per command, so a trial costs the command's work, not ~1 s of interpreter start-up.

Each run is an ordinary process running ``dbre.cli.main()`` with its own argv, environment, cwd,
stdout and stderr; the test holds a pidfd on it and kills it with SIGKILL like any other process.
The fork server ignores SIGCHLD (the kernel reaps its children); a run that ends by itself writes
its exit code to a status file first (to a temporary name, renamed into place: a SIGKILL between the
file's creation and its write once left it empty, and the kill was then taken for "finished first"),
so "ended without a status" means "killed".
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# The fork server: reads one JSON request a line, forks, answers "<pid>" a line. Its child resets
# what the server changed (SIGCHLD), takes the request's env, cwd and files, and runs the CLI.
_SERVER = r'''
import io, json, os, signal, sys, traceback
import dbre.cli  # every command module
import dbre.repository.backup, dbre.repository.copy, dbre.repository.verify, dbre.repository.retention  # noqa
import dbre.restore.full, dbre.restore.pitr, dbre.replicate.shipper, dbre.storage.s3  # noqa
import botocore.session, pydantic.fields, pydantic.types, typer.main  # noqa: lazily imported by a run
botocore.session.get_session().get_service_model("s3")  # the loader's JSON parsing, once
command = typer.main.get_command(dbre.cli.app)  # what `dbre.cli.main()` builds at each call
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        sys.stdout.write(f"{pid}\n"); sys.stdout.flush()
        continue
    code = 70
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        os.environ.clear(); os.environ.update(req["env"])
        os.chdir(req["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0); os.dup2(out, 1); os.dup2(err, 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.argv = ["dbre", *req["argv"]]
        try:
            command.main(args=req["argv"], prog_name="dbre")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush(); sys.stderr.flush()
            with open(req["status"] + ".tmp", "w") as f:  # renamed into place: a kill never leaves it empty
                f.write(str(code))
            os.rename(req["status"] + ".tmp", req["status"])
        finally:
            os._exit(code)
'''


class Run:
    """One `dbre` process the fork server started: wait for it, or kill it with SIGKILL."""

    def __init__(self, pid: int, argv: Sequence[str], stdout: Path, stderr: Path, status: Path) -> None:
        self.pid = pid
        self.argv = list(argv)
        self.stdout = stdout
        self.stderr = stderr
        self.status = status
        self.started = time.monotonic()
        self.killed = False  # a SIGKILL reached it before it had finished
        self.ended: float | None = None  # monotonic time its end was seen
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # it ended (and was reaped) already

    def __repr__(self) -> str:
        return f"Run({' '.join(self.argv)!r}, rc={self.returncode}, stderr={self.err()[-1500:]!r})"

    def running(self) -> bool:
        return self._pidfd is not None and not select.select([self._pidfd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        """True once the process has ended, False if it still runs after ``timeout`` seconds."""
        if self._pidfd is not None and not select.select([self._pidfd], [], [], timeout)[0]:
            return False
        self._close()
        self.ended = self.ended or time.monotonic()
        return True

    @property
    def seconds(self) -> float:
        """From its start to its end (or to now)."""
        return (self.ended or time.monotonic()) - self.started

    def kill(self) -> bool:
        """SIGKILL it now; True if it had not finished (no exit status written), i.e. the kill cut it."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(30)
        self.killed = self._written() is None
        return self.killed

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM it and wait for its exit code (SIGKILL and fail if it does not stop)."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return self.finish(timeout)

    def kill_after(self, delay: float) -> bool:
        """Let it run ``delay`` seconds from its start, then SIGKILL it; True if the kill cut it."""
        left = self.started + delay - time.monotonic()
        if left > 0 and self.wait(left):
            self._await_status()
            return False
        return self.kill()

    def _await_status(self, timeout: float = 5.0) -> None:
        """After an end seen on the pidfd, until its status file holds the exit code (it is written
        before the exit, but a loaded machine has been seen to answer the pidfd first)."""
        deadline = time.monotonic() + timeout
        while self.returncode is None and not self.killed and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        """Its exit code, -9 once killed, None while it runs."""
        code = self._written()
        if code is not None:
            return code
        return -9 if self.killed else None

    def _written(self) -> int | None:
        """The exit code its status file holds, None if it has none (yet)."""
        try:
            text = self.status.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip() else None

    def finish(self, timeout: float = 120) -> int:
        """Wait for the end; the exit code (a run still going after ``timeout`` is killed, and fails)."""
        if not self.wait(timeout):
            self.kill()
            raise AssertionError(f"{' '.join(self.argv)} still ran after {timeout} s: killed; {self.err()[-1500:]}")
        self._await_status()
        code = self.returncode
        return -1 if code is None else code

    def out(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else ""

    def err(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class Launcher:
    """The fork server process; ``start(argv, ...)`` returns a Run. ``close()`` kills what is left."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.count = 0
        self.runs: list[Run] = []
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(workdir / "launcher.log", "ab"),  # noqa: SIM115
                                     env=self.env, text=True, bufsize=1)

    def start(self, argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str | None] | None = None,
              cwd: Path | None = None, stdout: Path | None = None) -> Run:
        """Fork ``dbre ARGV``; its stdout goes to ``stdout`` (default: a file of its own), stderr beside it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.count += 1
        base = self.workdir / f"run-{self.count}"
        run_env = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                run_env.pop(k, None)
            else:
                run_env[k] = v
        args = [str(a) for a in argv]
        files = {"stdout": stdout or base.with_suffix(".out"), "stderr": base.with_suffix(".err"),
                 "status": base.with_suffix(".status")}
        for name, path in files.items():
            if name != "stdout" or stdout is None:
                path.unlink(missing_ok=True)
        req = {"argv": args, "env": run_env, "cwd": str(cwd or self.workdir), **{k: str(v) for k, v in files.items()}}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died: {(self.workdir / 'launcher.log').read_text()[-2000:]}")
        run = Run(int(line), args, files["stdout"], files["stderr"], files["status"])
        self.runs.append(run)
        self.runs = [r for r in self.runs if r.running()]
        return run

    def close(self) -> None:
        for run in self.runs:
            if run.running():
                run.kill()
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(10)
