"""Replicate a remote libSQL database (sqld, Turso): an embedded replica synced every interval, its WAL shipped.

How it works, and why it is exact (checked against sqld 0.24 and libsql-experimental 0.0.55):
- The embedded replica (``libsql_experimental``, the same one `dbre.sources.remote` syncs for a
  backup) is a local SQLite file in WAL mode. A sync appends the server's new transactions to its
  WAL as ordinary frames, one local commit per server commit, so the `Replicator` tails that WAL
  exactly as a local database's: every synced transaction becomes one transaction of a segment.
- The sync runs in a child process that keeps one connection for the whole run
  (libsql_experimental holds the GIL for the whole of ``sync()``: in this process it would stop the
  replicator's polling); a thread here asks it to sync every ``interval`` (the next sync starts
  ``interval`` after the previous one started, at once when a sync took longer).
- The replicator's swap takes the replica's write lock for a moment; a sync that lands then fails
  with "database is locked" (libsql's injector waits about 100 ms) before it applies anything, and
  is tried again at once: the next sync continues from the frame the replica recorded. The
  replicator's PASSIVE checkpoints and the WAL restarts after them do not disturb the sync, and the
  injector's own PASSIVE autocheckpoints (at 1000 frames) stop at the replicator's read mark.
- A commit on the server is seen here only when a sync brings it: its stamp (``restore --at``) is
  when the replicator read it from the replica, and it is durable in the repository at the next
  ship. RPO: a commit waits up to one interval for the sync, the sync's own time, then the ship and
  the segment's put. The syncs pace the shipping here (commits arrive only with them), so the
  replicator is given a quarter of the interval: a sync's commits ship within about that, in one
  segment per sync that brought any (measured figures in docs/replication.md).
- SIGINT/SIGTERM: one last sync, then the replicator ships everything the replica holds and stops.
  Syncs failing for ``SYNC_STALL_SECONDS`` in a row (the server down, the network gone) stop the run
  with the cause (exit 1); a refused token stops it at once.

The replica and its ``-client_wal_index`` live in the state directory (``--state-dir``, default
``$DBRE_CACHE_DIR/replicate/<key>/``, one per URL), flocked for the run: keep it between runs, so a
restart syncs only what is new and the replicator continues its generation.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import apsw

from dbre.errors import SourceError
from dbre.replicate.shipper import ReplicateStats, Replicator
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from dbre.sources.local import keep_wal
from dbre.sources.pins import Pin
from dbre.sources.remote import RemoteLibsqlSource, default_cache_root

log = logging.getLogger(__name__)

# syncs failing this long in a row stop the run (a server restart or a network blip passes)
SYNC_STALL_SECONDS = float(os.environ.get("DBRE_REPLICATE_SYNC_STALL", "60"))
SYNC_TIMEOUT = 300.0  # one sync that takes longer stops the run (libsql has no timeout of its own)
LAST_SYNC_TIMEOUT = 30.0  # the sync at stop
LOCKED_RETRIES = 20  # a sync that met the replicator's write lock: tried again this many times...
LOCKED_WAIT = 0.02  # ...this long apart (a swap holds the lock 10-25 ms, at most 250 ms)

# The child: one libsql_experimental connection for the run; a line on stdin asks for a sync, a JSON
# line answers. The first stdin line is the request (path, URL, token): the token never goes on a
# command line. It ignores SIGINT/SIGTERM (a Ctrl-C or systemd's stop reaches the whole group): it
# ends when its stdin closes (our stop, or this process killed), so a sync is never cut in the middle
# by our own stop, and without closing its connection (see the last line).
_SYNC_LOOP_CHILD = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
req = json.loads(sys.stdin.readline())
try:
    import libsql_experimental
    conn = libsql_experimental.connect(req["path"], sync_url=req["url"], auth_token=req["token"])
    out = {"ok": True}
except Exception as err:
    conn, out = None, {"ok": False, "error": str(err), "type": type(err).__name__}
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
if conn is not None:
    for _line in sys.stdin:
        started = time.time()
        try:
            conn.sync()
            out = {"ok": True}
        except Exception as err:
            out = {"ok": False, "error": str(err), "type": type(err).__name__}
        out["started"], out["seconds"] = started, time.time() - started
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
os._exit(0)  # the connection is never closed: its close, the last one, would checkpoint the WAL away
"""


def default_state_dir(source: RemoteLibsqlSource) -> Path:
    """``$DBRE_CACHE_DIR/replicate/<key>``: one per server URL (and namespace), apart from the backup
    cache (a backup of the same server never waits for a replicator that runs for months)."""
    return default_cache_root() / "replicate" / source.cache_key


@dataclass
class SyncStats:
    """The syncs of a run: how many, how long, how many met the replicator's write lock."""

    syncs: int = 0
    failed: int = 0
    locked: int = 0
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.seconds:
            return f"{self.syncs} syncs"
        s = sorted(self.seconds)
        return (f"{self.syncs} syncs (median {statistics.median(s):.3f} s, longest {s[-1]:.3f} s), "
                f"{self.locked} retried after the write lock, {self.failed} failed")


class _SyncChild:
    """The child process that syncs the replica on request (see the module doc)."""

    def __init__(self, source: RemoteLibsqlSource) -> None:
        self.source = source
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = self.source.sync_env()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SYNC_LOOP_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=None if "RUST_LOG" in os.environ else subprocess.DEVNULL, text=True, env=env)
        except OSError as err:
            raise SourceError(f"source {self.source.url}: cannot start the sync process: {err.strerror}",
                              "check the Python installation") from None
        answer = self._ask(self.source.sync_request(), SYNC_TIMEOUT)
        if not answer.get("ok"):
            raise SourceError(f"source {self.source.url}: cannot open the embedded replica: "
                              f"{self.source.scrub(str(answer.get('error')))}", "check the state directory")

    def sync(self, timeout: float) -> dict[str, Any]:
        """One sync: ``{"ok": bool, "error": str, "started": t, "seconds": s}``; a child that ended
        (a panic in libsql) is started again first."""
        if self.proc is None or self.proc.poll() is not None:
            self.close(kill=True)
            self.start()
        return self._ask("sync", timeout)

    def _ask(self, line: str, timeout: float) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()),  # type: ignore[union-attr]
                                  name="dbre-replicate-sync-read", daemon=True)
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except OSError:
            pass  # (it died: the read below says so)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.close(kill=True)
            raise SourceError(f"source {self.source.url}: a replica sync did not finish within {timeout:g} s",
                              "check the network and the server")
        try:
            return dict(json.loads(out[0]))
        except (IndexError, ValueError):
            code = proc.poll()
            return {"ok": False, "error": f"the sync process ended (status {code})"}

    def close(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # it ends after the sync in progress
        except OSError:
            pass
        try:
            proc.wait(0 if kill else LAST_SYNC_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class RemoteReplicator:
    """Replicates the libSQL database at ``url`` into ``repo`` as ``db`` through an embedded
    replica in ``state_dir``, synced every ``interval`` and shipped by a `Replicator`."""

    def __init__(self, repo: Repository, url: str, token: Secret | None, db: str, interval: float = 0.5,
                 state_dir: Path | None = None, accept_new_source: bool = False) -> None:
        self.repo = repo
        self.interval = interval
        where = RemoteLibsqlSource(url, token)
        state = Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir(where)
        # the replica in the state directory: the backup cache is never touched
        self.source = RemoteLibsqlSource(url, token, replica_dir=state, sync_timeout=SYNC_TIMEOUT)
        # its bases record the remote database as their source (not the replica file): they join
        # the chain of `dbre backup URL` under the same name, and it theirs
        self.replicator = Replicator(repo, self.source.replica_path, db, interval / 4, base_identity=where.identity(),
                                     accept_new_source=accept_new_source)
        self.db = self.replicator.db
        self.sync_stats = SyncStats()
        self.on_sync: Callable[[dict[str, Any]], None] | None = None
        self._error: BaseException | None = None

    @property
    def state_dir(self) -> Path:
        return self.source.replica_dir

    def run(self, stop: threading.Event, on_ship: Callable[[str], None] | None = None) -> ReplicateStats:
        """Replicate until ``stop`` is set (then one last sync, and everything synced is shipped)."""
        with self._hold_state_dir(), ExitStack() as guards:
            # a connection of ours, open whenever libsql's is: the sync child's close is then never the
            # last one, which would checkpoint the WAL away and cost the next run a new generation
            guards.enter_context(self._guard())
            started = time.monotonic()
            try:
                self.source.sync_replica()  # creates the replica, or brings a kept one up to date
            except SourceError:
                raise
            except Exception as err:  # (the source's own "replica unavailable": its message is scrubbed)
                raise SourceError(f"replicate {self.db}: the first sync of {self.source.url} failed: {err}",
                                  "check the server's replication endpoint (sqld 0.24 or later, Turso)") from None
            log.info("replicate %s: replica of %s synced in %.2f s", self.db, self.source.url,
                     time.monotonic() - started)
            guards.enter_context(self._guard())  # (the file the sync made, or started over)
            child = _SyncChild(self.source)
            child.start()
            halt = threading.Event()  # stops the replicator: after the last sync, or on a sync failure
            syncer = threading.Thread(target=self._sync_loop, args=(child, stop, halt),
                                      name="dbre-replicate-sync", daemon=True)
            syncer.start()
            try:
                stats = self.replicator.run(halt, on_ship)
            finally:
                halt.set()
                syncer.join()
                child.close()
            if self._error is not None:
                raise self._error
            return stats

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the replica open (checkpoint-on-close off), when it exists."""
        path = self.source.replica_path
        if not path.exists():
            yield
            return
        # the pin first and released last: else the replicator closing its pinned descriptors of the
        # file would drop this connection's POSIX locks with its own (see dbre.sources.pins)
        with Pin(path):
            conn = keep_wal(apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE))
            try:
                conn.execute("PRAGMA schema_version").fetchall()  # (in WAL mode its shared lock stays held)
                yield
            finally:
                conn.close()

    def _hold_state_dir(self) -> Any:
        rdir = self.state_dir
        try:
            rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock: IO[str] = open(rdir / "lock", "a+")  # noqa: SIM115 - closed by the with in run()
        except OSError as err:
            raise SourceError(f"replicate {self.db}: cannot use the state directory {rdir}: {err.strerror}",
                              "check --state-dir and its permissions") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            lock.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise SourceError(f"replicate {self.db}: the state directory {rdir} is in use by another "
                                  "dbre replicate", "stop it, or give this one its own --state-dir") from None
            raise
        return lock

    def _sync_loop(self, child: _SyncChild, stop: threading.Event, halt: threading.Event) -> None:
        """Sync every interval until ``stop`` (then once more) or ``halt``; a fatal failure is kept
        for ``run`` and halts the replicator (which ships what the replica holds)."""
        failing_since: float | None = None
        next_at = time.monotonic()
        try:
            while not halt.is_set():
                if stop.wait(max(0.0, next_at - time.monotonic())):
                    result = self._sync(child, LAST_SYNC_TIMEOUT)
                    if not result.get("ok"):
                        log.warning("replicate %s: the last sync before stopping failed (%s): commits on the "
                                    "server since the sync before it are not shipped", self.db,
                                    self.source.scrub(str(result.get("error"))))
                    return
                next_at = time.monotonic() + self.interval
                result = self._sync(child, SYNC_TIMEOUT)
                if result.get("ok"):
                    if failing_since is not None:
                        log.warning("replicate %s: syncing again after %.0f s of failures", self.db,
                                    time.monotonic() - failing_since)
                    failing_since = None
                    continue
                msg = self.source.scrub(str(result.get("error")))
                refused = self.source.auth_failure(msg)
                if refused is not None:
                    raise refused
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("replicate %s: sync failed (%s); retrying every %.2g s", self.db, msg,
                                self.interval)
                if now - failing_since >= SYNC_STALL_SECONDS:
                    raise self._stalled(msg, now - failing_since)
        except BaseException as err:  # noqa: BLE001 - raised by run() once the replicator stopped
            self._error = err
        finally:
            halt.set()

    def _stalled(self, msg: str, seconds: float) -> SourceError:
        """The error that stops a run whose syncs kept failing: the cause as a backup would word it
        (a lost connection often reads "Timeout performing handshake": one request tells)."""
        failure = self.source.sync_failure(msg)
        if failure is None:
            try:
                self.source.check()
            except SourceError as err:
                failure = err
        if failure is None:
            failure = SourceError(f"source {self.source.url}: the replica sync fails: {msg}", "check the server's logs")
        return SourceError(f"replicate {self.db}: syncs failed for {seconds:.0f} s: {failure.message}", failure.hint)

    def _sync(self, child: _SyncChild, timeout: float) -> dict[str, Any]:
        """One sync, tried again while it meets the replicator's write lock."""
        for attempt in range(LOCKED_RETRIES + 1):
            result = child.sync(timeout)
            self.sync_stats.syncs += 1
            if result.get("ok"):
                self.sync_stats.seconds.append(float(result.get("seconds", 0.0)))
                if self.on_sync is not None:
                    self.on_sync(result)
                return result
            if "database is locked" not in str(result.get("error")) or attempt == LOCKED_RETRIES:
                self.sync_stats.failed += 1
                return result
            self.sync_stats.locked += 1
            time.sleep(LOCKED_WAIT)
        raise AssertionError("unreachable")
