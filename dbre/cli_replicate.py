"""The `dbre replicate` command: continuous WAL shipping of one database, in the foreground.

A remote libSQL source (``libsql://``, ``http(s)://``, ``ws(s)://``) is replicated through an embedded
replica synced every interval (`dbre.replicate.remote`); the token comes from LIBSQL_AUTH_TOKEN /
TURSO_AUTH_TOKEN (or the policy's ``auth_token: env:VAR``).

Registered on the main app by dbre/cli.py. SIGINT and SIGTERM ship what is committed and exit 0;
any failure prints one line and exits non-zero (1; 2 for bad input).

Stopping is bounded. After the signal, the replicator ships for at most ``SHUTDOWN_SECONDS`` (10 s:
the last segments, a base a new generation needs); what it cannot ship by then — a generation that
must start while prune holds the repository lock or an application holds the source's write lock,
a store that does not take the last segments — it does not wait for: one line on stderr says what
is not in the repository, exit 1 (the SIGTERM contract not met is a failure: a supervisor must not
read it as "everything shipped"). Should the process still be running ``HARD_STOP_SECONDS`` (15 s)
after the signal (a request or a read that does not return), or on a second signal, it exits at
once, exit 1, with one line: the repository is then left as after kill -9 (every object in it
whole; the lease and the lock objects go stale, a replicator restarted on this host takes them over
at once). Both hold while the main thread is stuck in one call, and the line never waits on a
stalled log (see ``_Stopping`` and ``_hard_exit``). A remote source adds its last sync (up to 30 s) to both bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import KeyFileOpt, PolicyOpt, _key, _policy, _run, _token, app
from dbre.errors import UsageError
from dbre.secrets import Secret

# a signal: the process exits as it stands this much later (the shipper's SHUTDOWN_SECONDS + 5 s; tests set it low)
HARD_STOP_SECONDS = float(os.environ.get("DBRE_REPLICATE_HARD_STOP", "15"))
log = logging.getLogger(__name__)
LOCAL_INTERVAL = "750ms"  # a commit durable within about this: p99 lag under 1 s at 1000 commits/s (README)
REMOTE_INTERVAL = "500ms"  # an embedded replica's sync period: the sync itself adds to the lag

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_interval(text: str) -> float:
    """``1s``, ``500ms``, ``2m`` or a number of seconds, between 0.05 s and 1 h."""
    m = _DURATION.match(text)
    if m is None:
        raise UsageError(f"--interval {text!r} is not a duration", "e.g. 1s, 500ms, 2m")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    if not 0.05 <= value <= 3600:
        raise UsageError(f"--interval {text!r} is out of range", "use 50ms to 1h")
    return value


@app.command()
def replicate(
    source: Annotated[str | None, typer.Argument(help="The SQLite/libSQL database file (WAL mode), or a libsql:// "
                                                 "or http(s):// URL (token from LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN), "
                                                 "to replicate (none with --policy).")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix "
                                             "(default with --policy: its primary).")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database name in the repository.")] = None,
    interval: Annotated[str | None, typer.Option(
        "--interval", metavar="DURATION",
        help="The most a commit waits to be shipped (default 750ms): pending commits go when the oldest has "
        "waited this long less the time an upload takes, the first after a quiet spell at once. A remote "
        "source: how often its embedded replica syncs (default 500ms); each sync's commits ship at once.")] = None,
    key_file: KeyFileOpt = None,
    policy: PolicyOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final line.")] = False,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="A remote source's embedded replica lives "
                                                   "here (default: one per URL under ~/.cache/dbre/replicate); "
                                                   "keep it between runs.")] = None,
    accept_new_source: Annotated[bool, typer.Option(
        "--accept-new-source", help="The database moved here: its bases join the chain of snapshots "
        "taken where it was (else refused, exit 2).")] = False,
) -> None:
    """Ship every committed transaction continuously (segments), for `restore --at` to the commit.
    With --policy: every database marked `replicate: true`, one thread each, in one process.
    A remote libSQL source: through an embedded replica (--state-dir) synced every interval."""

    def go() -> None:
        from dbre.replicate.remote import LAST_SYNC_TIMEOUT, RemoteReplicator
        from dbre.replicate.shipper import Replicator
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.sources.local import LocalFileSource
        from dbre.sources.remote import RemoteLibsqlSource

        pol = _policy(policy)
        local_s, remote_s = parse_interval(interval or LOCAL_INTERVAL), parse_interval(interval or REMOTE_INTERVAL)
        # (source, name, token): a source is a local path or a remote URL
        chosen: list[tuple[str, str, Secret | None]]
        if pol is not None and source is None:
            if db is not None:
                raise UsageError("--db with --policy", "the policy names the databases (`replicate: true`)")
            marked = [d for d in pol.databases if d.replicate]
            if not marked:
                raise UsageError("the policy marks no database `replicate: true`", "add it to a database entry")
            spaced = [d.name for d in marked if d.namespace and _is_remote(d.source)]
            if spaced:
                raise UsageError(f"replicate: {', '.join(spaced)}: a sqld namespace cannot be replicated "
                                 "(an embedded replica reaches a namespace only by its own hostname)",
                                 "give the namespace's hostname as its source (<namespace>.<host>)")
            chosen = [(d.source, d.name, _policy_token(d.auth_token)) for d in marked]
        elif source is not None and db is not None:
            chosen = [(source, check_db_name(db), _token())]
        else:
            raise UsageError("replicate needs SOURCE and --db, or --policy", "e.g. dbre replicate app.db --db app")
        if state_dir is not None and not any(_is_remote(c[0]) for c in chosen):
            raise UsageError("--state-dir is for a remote source", "leave it out for a local database file")
        if state_dir is not None and sum(_is_remote(c[0]) for c in chosen) > 1:
            raise UsageError("--state-dir with several remote databases", "leave it out: each gets its own")
        url = repo or (pol.repositories.primary if pol else None)
        if not url:
            raise UsageError("no repository given", "pass --repo, or a --policy naming the primary repository")
        key = _key(key_file)
        if key is None and pol is not None and (ref := pol.repositories.encryption_key or "").startswith("env:"):
            key = Secret(os.environ[ref[4:]]) if os.environ.get(ref[4:]) else None
        for spec, _name, token in chosen:  # before a repository is created for nothing
            if _is_remote(spec):
                RemoteLibsqlSource(spec, token).check()  # the server answers and takes the token
            else:
                LocalFileSource(spec).check()
        stop = threading.Event()
        stopping = _Stopping(stop, HARD_STOP_SECONDS + (
            LAST_SYNC_TIMEOUT if any(_is_remote(c[0]) for c in chosen) else 0.0))
        stopping.install()
        repository = Repository.open_or_init(url, key)

        def shipped(key: str) -> None:
            if not quiet:
                print(f"shipped {key}", flush=True)

        results: dict[str, Any] = {}
        remotes: dict[str, RemoteReplicator] = {}

        def one(spec: str, name: str, token: Secret | None) -> None:
            try:
                if _is_remote(spec):
                    remotes[name] = RemoteReplicator(repository, spec, token, name, remote_s, state_dir,
                                                     accept_new_source=accept_new_source)
                    results[name] = remotes[name].run(stop, shipped)
                else:
                    results[name] = Replicator(repository, Path(spec), name, local_s,
                                               accept_new_source=accept_new_source).run(stop, shipped)
            except BaseException as err:  # noqa: BLE001 - reported below; the others stop too
                results[name] = err
                stop.set()

        if len(chosen) == 1:
            one(*chosen[0])
        else:
            threads = [threading.Thread(target=one, args=c, name=f"dbre-replicate-{c[1]}") for c in chosen]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):  # the main thread stays free for the signals
                for t in threads:
                    t.join(0.2)
        stopping.finished()  # (what is left is printing the outcome)
        failed = None
        for _spec, name, _tok in chosen:
            stats = results.get(name)
            if isinstance(stats, BaseException):
                failed = failed or stats
                continue
            if stats is None:
                continue
            print(f"replicate {name}: stopped; {stats.transactions} transactions in {stats.segments} segments "
                  f"({stats.bytes} bytes), generations {', '.join(stats.generations) or 'none'}; "
                  f"write lock held at most {stats.max_swap_ms:.1f} ms, {stats.yields} checkpoints yielded to, "
                  f"longest gap between two polls {stats.max_poll_gap_ms:.0f} ms",
                  file=sys.stderr, flush=True)
            if name in remotes:
                print(f"replicate {name}: {remotes[name].sync_stats.summary()} of {remotes[name].source.url}",
                      file=sys.stderr, flush=True)
        if failed is not None:
            raise failed

    _run(go)


class _Stopping:
    """SIGINT/SIGTERM: the first asks the replicators to stop (they ship what is committed, within
    their own bound); the process exits as it stands ``bound`` seconds later, or at a second signal.

    A Python signal handler runs only in the main thread, between bytecodes, and with one database the
    main thread is the replicator's: a call that does not return for a while (an SQLite busy wait, a
    write to a stalled log pipe) would hold back the stop request, the hard-stop timer and the second
    signal with it. So the signals are also counted by a watch thread reading the interpreter's wakeup
    fd, where Python's C handler writes each signal's number the moment it arrives, and kept to the end
    of the process. Each signal is seen by both (the Python handler late, or never while the main thread
    is stuck; the pipe only once the wakeup fd is set, not at all where none can be had): the number of
    signals received is the larger of the two counts, never their sum."""

    def __init__(self, stop: threading.Event, bound: float | None, command: str = "replicate") -> None:
        self.stop = stop
        self.bound = bound  # (None: no hard stop after the first signal; a second one still ends it)
        self.command = command
        self.signals = 0
        self.timer: threading.Timer | None = None
        self._lock = threading.RLock()
        self._seen = {"handler": 0, "pipe": 0}
        self._done = False
        self._exiting = False
        self._poke = -1  # the wakeup pipe's write end: the Python handler wakes the watch thread through it

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Take ``signals`` (from the main thread)."""
        for sig in signals:
            signal.signal(sig, self._python_handler)
        r = w = -1
        try:
            r, w = os.pipe()
            os.set_blocking(w, False)  # (the wakeup fd must not block the C handler)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (OSError, ValueError):  # (no pipe: too many open files; not the main thread)
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            return
        wanted = {int(sig) for sig in signals}
        threading.Thread(target=self._watch, args=(r, wanted), name="dbre-stop-watch", daemon=True).start()
        self._poke = w

    def _watch(self, fd: int, wanted: set[int]) -> None:
        while True:
            try:
                got = os.read(fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            for number in got:
                try:
                    if number in wanted:
                        self._count("pipe")
                    elif number == 0:  # (the Python handler's poke)
                        self._act()
                except Exception:  # noqa: BLE001 - (no thread for the timer): the next signal still counts
                    log.exception("replicate: handling a signal")

    def _python_handler(self, *_: object) -> None:
        """Count, and leave the acting to another thread. This runs in the main thread between any two
        bytecodes, also inside code holding a lock it would need: a handler that set the stop event itself
        deadlocked forever when the signal came while the main thread was inside that event's wait,
        re-taking its condition's lock (a replicator hung after SIGTERM, all threads waiting; seen in CI)."""
        self._seen["handler"] += 1  # (only this handler writes it: no lock)
        if self._poke >= 0:
            with contextlib.suppress(OSError):
                os.write(self._poke, b"\0")
                return
        threading.Thread(target=self._act, name="dbre-stop", daemon=True).start()

    def _count(self, source: str) -> None:
        with self._lock:
            self._seen[source] += 1
        self._act()

    def _act(self) -> None:
        """Act on the signals received so far (from a thread other than the interrupted main thread's code).
        A second signal ends the process at once, without waiting for the lock a first one's acting holds."""
        if max(self._seen.values()) > 1:
            self._second()
        with self._lock:
            received = max(self._seen.values())
            if received <= self.signals:
                return  # (the other side saw this one first)
            self.signals = received
            if received > 1:
                self._second()
            self.stop.set()
            if not self._done and self.bound is not None:
                self.timer = threading.Timer(self.bound, _hard_exit,
                                             args=(f"still stopping {self.bound:.0f} s after the signal",
                                                   self.command))
                self.timer.daemon = True
                self.timer.start()

    def _second(self) -> None:
        if not self._exiting:  # (once: a hard exit does not return)
            self._exiting = True
            _hard_exit("a second signal", self.command)

    def finished(self) -> None:
        """The replicators have returned: the outcome they reached is the one reported (no timer from
        now on; a second signal still ends the process at once)."""
        with self._lock:
            self._done = True
            if self.timer is not None:
                self.timer.cancel()


# what a hard exit leaves, by command
_LEFT = {
    "replicate": "without waiting for what was being shipped; the repository is consistent (as after kill -9: "
                 "commits not shipped yet are not in it) (run replicate again: it resumes)",
    "restore --follow": "without waiting for the apply in progress; the standby is consistent (as after kill -9: "
                        "SQLite rolls back a half-applied segment when the file is next opened) (start it "
                        "again, with --force: it restores the newest state over it)",
}


def _hard_exit(why: str, command: str = "replicate") -> None:
    """Exit 1 now, saying why on stderr if stderr takes it within a second: the line is written by a
    thread of its own, straight to fd 2, so a stalled or broken log pipe (or sys.stderr's lock, held
    by a main thread blocked in a write) never keeps the process alive."""
    line = f"dbre: {command}: {why}: exiting now, {_LEFT[command]}\n".encode()

    def say() -> None:
        with contextlib.suppress(OSError):
            os.write(2, line)

    try:
        t = threading.Thread(target=say, name="dbre-hard-exit", daemon=True)
        t.start()
        t.join(1.0)
    finally:
        os._exit(1)


def _is_remote(spec: str) -> bool:
    return spec.lower().startswith(("libsql://", "http://", "https://", "ws://", "wss://"))


def _policy_token(ref: str | None) -> Secret | None:
    """A policy database's ``auth_token: env:VAR``, else the environment's LIBSQL/TURSO token."""
    if ref and ref.startswith("env:") and os.environ.get(ref[4:]):
        return Secret(os.environ[ref[4:]])
    return _token()


def follow_standby(repo: str, db: str, to: Path, interval: str, force: bool, key: Any,
                   conflicts: list[str]) -> None:
    """`dbre restore --follow`: restore the newest replicated state to ``to``, then keep it current
    until SIGINT/SIGTERM (exit 0)."""
    from dbre.repository.manifest import check_db_name
    from dbre.repository.repo import Repository
    from dbre.restore.follow import Follower

    if conflicts:
        raise UsageError(f"--follow cannot be combined with {', '.join(conflicts)}",
                         "--follow always keeps the newest state")
    check_db_name(db)
    seconds = parse_interval(interval)
    target = to.expanduser().absolute()
    if target.exists() and not force:
        raise UsageError(f"restore target {target} already exists", "choose a new path or pass --force")
    stop = threading.Event()
    # the first signal: stop after the apply in progress, however long (a new generation's base is a whole
    # restore); a second one, even while the main thread is stuck in one call: exit 1 at once
    stopping = _Stopping(stop, None, "restore --follow")
    stopping.install()
    follower = Follower(Repository.open(repo, key), db, target, seconds, force=force)
    stats = follower.run(stop)
    stopping.finished()
    print(f"follow {db}: stopped at txid {stats.last_txid}; {stats.transactions} transactions from "
          f"{stats.segments} segments applied in place, {stats.restores} restores "
          f"(generations {', '.join(stats.generations)}), {stats.polls} polls", file=sys.stderr, flush=True)
