"""Repository locks: shared and exclusive run locks, judged stale by the store's clock, never by two hosts'.

A lock is an object ``locks/<id>`` (plain JSON: op, exclusive, host, pid, boot id, pid namespace).
Backups, copies and restores share; forget and prune are exclusive. While a run holds its lock, a
thread refreshes it every ``REFRESH_SECONDS`` by writing a *new* lock object, checking that the
old one is still there, then deleting the old one: from the first write to the release, one of
the run's lock objects exists at every moment, and a lock removed by someone else
(`dbre unlock`) is noticed instead of silently written again. A run taking a lock lists the locks
again while a lock it listed vanished when read (a refresh replaced it by an object that listing
did not show), ``LISTINGS`` times at most, then refuses (``LockedError``): it never judges a
listing that may miss a live lock.

Staleness: another run's lock is stale when the store's own time of its last write
(``Store.modified``: S3 LastModified, a file's mtime) is more than ``STALE_SECONDS`` older than the
store's current time. The store's current time is learnt from the ``modified()`` of the lock this
run has just written, plus the time elapsed since on this host's ``CLOCK_BOOTTIME`` (which also
counts suspended time); both under-estimate it, so a lock is never judged stale early. The wall
clock field in a record is informational only. A same-host check by pid makes a lock stale at once
only when hostname, boot id and pid namespace all match (two containers with one hostname and
separate pid namespaces never judge each other's pids).

A writer knows when its last refresh succeeded. ``Lock.check_alive`` — called right before each
commit (a manifest put, a deletion) — refreshes the lock and raises ``LockLostError`` when, *by
the store's clock*, more than ``STALE_SECONDS - SAFETY_SECONDS`` passed between the write of the
object other hosts could see and this new write (a paused VM's own clocks, boot clock included,
stop while it is paused: only the store's clock sees the pause), when its last successful refresh
is that old on the boot clock, or when the lock object was removed: no run ever commits after
another host could have judged its lock stale and pruned. A refresh that finds such a gap marks
the lock lost instead of reviving it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dbre.errors import IntegrityError, LockedError, RepositoryError
from dbre.storage import NotFound, Store
from dbre.storage.base import LOCK_CAP, get_capped

log = logging.getLogger(__name__)

STALE_SECONDS = 600.0  # a lock not refreshed for this long, by the store's clock, is stale
REFRESH_SECONDS = 120.0  # a held lock is rewritten this often
SAFETY_SECONDS = 180.0  # a writer stops committing this long before its lock could be judged stale
LISTINGS = 5  # listings of the locks a run taking one reads while one listed vanishes, then refuses
RETRY_SECONDS = 0.0  # how long a run waits for a conflicting lock to go (set_retry; the CLI's --retry-lock)
STALL_ENV = "DBRE_TEST_STALL_LOCK_REFRESH"  # tests: refreshes of locks whose op starts with this hang


class LockLostError(RepositoryError):
    """This run's lock stopped being refreshed (or was removed): it must not commit anything."""


def boottime() -> float:
    """Seconds on a monotonic clock that keeps counting while the host is suspended."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """What a lock records about its holder, for the same-host pid check."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "pid": os.getpid()}


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass
class LockInfo:
    """Another run's lock as read from the store: its key, record, and time of last write (store's clock)."""

    key: str
    record: dict[str, Any]
    modified: float

    @property
    def exclusive(self) -> bool:
        return bool(self.record.get("exclusive"))

    def stale(self, store_now: float, stale_seconds: float | None = None) -> bool:
        limit = STALE_SECONDS if stale_seconds is None else stale_seconds
        if store_now - self.modified > limit:
            return True
        return self._holder_is_dead()

    def _holder_is_dead(self) -> bool:
        """True only when the holder is certainly a dead process of this very host, boot and pid namespace."""
        me = this_process()
        rec = self.record
        for field in ("host", "boot_id", "pid_ns"):
            if me[field] is None or rec.get(field) != me[field]:
                return False
        try:
            pid = int(rec.get("pid", 0))
        except (TypeError, ValueError):
            return False
        if pid <= 0 or pid == me["pid"]:
            return False  # our own pid is alive: only the store's clock can say
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        rec = self.record
        return (f"{rec.get('op', '?')} on {rec.get('host', '?')} (pid {rec.get('pid', '?')}, "
                f"since {rec.get('created', '?')})")


def list_locks(store: Store, vanished: list[str] | None = None) -> list[LockInfo]:
    """Every lock in the store with its time of last write. A listing that fails raises; a lock
    removed while being read is skipped (and its key put in ``vanished``, if given: a refresh
    replaces a lock object by a new one, which a listing made before it does not show); a record
    that is not JSON, or larger than ``LOCK_CAP`` (never read past it), counts as a shared lock of
    an unknown run (stale, like any other, once its object is old: `dbre unlock` then removes it)."""
    out = []
    for key in store.list("locks/"):
        try:
            try:
                raw = get_capped(store, key, LOCK_CAP, "lock record",
                                 "`dbre unlock` removes it once stale; until then it counts as a shared lock")
            except IntegrityError as err:
                log.warning("%s", err)
                raw = b""  # damaged: a shared lock until stale
            modified = store.modified(key)
        except NotFound:
            if vanished is not None:
                vanished.append(key)
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            record = {"op": "?", "exclusive": False}
        out.append(LockInfo(key, record, modified))
    return out


def read_locks(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """Every lock's key and record."""
    return [(info.key, info.record) for info in list_locks(store)]


class Lock:
    """A lock this run holds (``hold`` acquires and releases it). See the module docstring."""

    def __init__(self, store: Store, op: str, *, exclusive: bool = False) -> None:
        self.store = store
        self.op = op
        self.exclusive = exclusive
        # read at creation, so tests can shorten them for one lock
        self.stale_seconds = STALE_SECONDS
        self.refresh_seconds = REFRESH_SECONDS
        self.safety_seconds = SAFETY_SECONDS
        self.record: dict[str, Any] = {
            "op": op,
            "exclusive": exclusive,
            **this_process(),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "time": time.time(),  # informational: staleness is judged by the store's clock
        }
        self._key = ""
        self._last_ok = 0.0  # boottime() when the write of the newest lock object began
        self._clock: tuple[float, float] = (0.0, 0.0)  # (store time of that write, boottime() after it)
        self._lost = False
        self._gap = 0.0  # store-clock seconds between two writes of this lock, when that lost it
        self._released = False
        self._leftovers: list[str] = []  # lock objects a failed refresh could not delete
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lock({self.op!r}, exclusive={self.exclusive}, key={self._key!r})"

    @property
    def key(self) -> str:
        return self._key

    # -- the store's clock -----------------------------------------------------------------------

    def _write(self) -> tuple[str, float, tuple[float, float]]:
        """Write a new lock object; returns its key, when the write began, and the store-clock pair."""
        key = f"locks/{secrets.token_hex(8)}"
        self.record["time"] = time.time()
        began = boottime()
        self.store.put(key, json.dumps(self.record).encode(), if_absent=True)
        after = boottime()
        try:
            return key, began, (self.store.modified(key), after)
        except BaseException:
            try:
                self.store.delete(key)
            except RepositoryError as err:  # (the cause is the stat's error, raised below, not this cleanup's)
                log.warning("lock %s: could not remove it (%s); it goes stale in %.0f min", key, err,
                            self.stale_seconds / 60)
            raise

    def store_now(self) -> float:
        """The store's current time, never over-estimated: the store time of this lock's newest
        write plus the boot-clock time elapsed since that write returned."""
        stamp, at = self._clock
        return stamp + (boottime() - at)

    # -- acquire, refresh, release ---------------------------------------------------------------

    def acquire(self) -> None:
        """Write the lock, then look at every other one: a live conflicting lock raises ``LockedError``."""
        self._key, self._last_ok, self._clock = self._write()
        try:
            now = self.store_now()
            vanished = ["?"]
            for _ in range(LISTINGS):  # a lock refreshed while we read it: list again, its new object shows
                if not vanished:
                    break
                vanished = []
                others = list_locks(self.store, vanished)
            if vanished:  # a listing missing a lock that may be live must not be judged: refuse
                raise LockedError(
                    f"repository lock: {len(vanished)} lock(s) changed while listed, {LISTINGS} listings in a row "
                    "(another run refreshing or releasing its lock); the repository was not taken",
                    "run it again",
                )
            for other in others:
                if other.key == self._key or other.stale(now, self.stale_seconds):
                    continue
                if self.exclusive or other.exclusive:
                    raise LockedError(
                        f"repository is locked by {other.describe()}",
                        "wait for it to finish (or let this run wait: `dbre --retry-lock 5m ...`), "
                        "or run `dbre unlock` if that run is dead",
                    )
        except BaseException:
            try:
                self.store.delete(self._key)
            except Exception as err:  # noqa: BLE001 - the refusal (a live lock) is what the caller must see,
                # not a failure to clean up after it (credentials that may put but not delete): it goes stale
                log.warning("lock %s: could not remove it (%s); it goes stale in %s", self._key, err,
                            _span(self.stale_seconds))
            raise
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True, name="dbre-lock-refresh")
        self._thread.start()

    def _stalled(self) -> bool:
        prefix = os.environ.get(STALL_ENV)
        return bool(prefix) and self.op.startswith(prefix or "")

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            if self._stalled():
                self._stop.wait()  # as a hung request would, until the run ends
                return
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - a failed refresh only ages the lock; check_alive judges
                log.warning("lock %s: refresh failed: %s", self._key, err)
            if self._lost:
                return

    def refresh(self) -> None:
        """Write a new lock object, check the current one is still there, delete it. If it was
        removed, or if by the store's clock the current one had already aged past what another host
        tolerates (``stale_seconds - safety_seconds``: the run was paused, or its refreshes hung),
        the lock is lost (``check_alive`` raises) and the new object is deleted."""
        new_key, began, clock = self._write()
        with self._mutex:
            try:
                if self._lost or self._released:
                    self.store.delete(new_key)
                    return
                try:
                    seen = self.store.modified(self._key)  # what every other host judges by
                except NotFound:
                    self._lost = True
                    log.warning("lock %s was removed by someone else: %s must not commit", self._key, self.op)
                    self.store.delete(new_key)
                    return
                gap = clock[0] - seen
                if gap > self.stale_seconds - self.safety_seconds:
                    self._lost = True
                    self._gap = gap
                    log.warning("lock %s: %s passed by the store's clock since its last write: %s must not commit",
                                self._key, _span(gap), self.op)
                    self.store.delete(new_key)
                    return
            except BaseException:
                self._leftovers.append(new_key)
                raise
            old, self._key, self._last_ok, self._clock = self._key, new_key, began, clock
            try:
                self.store.delete(old)
            except Exception:  # noqa: BLE001 - an old lock object left behind goes stale; release retries
                self._leftovers.append(old)

    def release(self) -> None:
        """Stop and join the refresh thread, then remove the lock object(s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            self._released = True
            keys = [self._key, *self._leftovers] if self._key else list(self._leftovers)
        for key in keys:
            try:
                self.store.delete(key)
            except Exception as err:  # noqa: BLE001 - it goes stale; never hide the run's own outcome
                log.warning("lock %s: could not remove it (%s); it goes stale in %s", key, err,
                            _span(self.stale_seconds))

    # -- the writer's check ----------------------------------------------------------------------

    def age(self) -> float:
        """Seconds since the last successful write of this lock began (boot clock)."""
        return boottime() - self._last_ok

    def check_alive(self, what: str, *, consequence: str = "nothing was committed",
                    hint: str = "run it again", refresh: bool = True) -> None:
        """Raise ``LockLostError`` unless another host still certainly sees this lock as live.

        Called immediately before each commit. Checks that the last successful refresh began less
        than ``stale_seconds - safety_seconds`` ago on the boot clock (a hung refresh); then
        refreshes the lock (a new object, the old one checked and removed: see ``refresh``), which
        finds a removed lock and any such gap by the store's clock (a paused host, whose own
        clocks stopped). ``refresh=False`` (the replicator, before each segment: no store request)
        only judges what the refresh thread found: a lost lock, or a last refresh that old.
        """
        age = self.age()  # judged before the refresh below, which would reset it
        if (refresh and not self._lost and not self._released
                and age <= self.stale_seconds - self.safety_seconds):
            try:
                self.refresh()
            except LockLostError:
                raise
            except Exception as err:  # noqa: BLE001 - a refresh that fails now is judged by the age below
                log.warning("lock %s: refresh before commit failed: %s", self._key, err)
        if self._lost and self._gap:
            raise LockLostError(
                f"{what}: by the store's clock the repository lock went {_span(self._gap)} without a refresh "
                f"(this host was paused or its requests hung), past what another host tolerates "
                f"({_span(self.stale_seconds - self.safety_seconds)}); another host may have pruned — {consequence}",
                hint,
            )
        if self._lost:
            raise LockLostError(
                f"{what}: the repository lock was removed by another run (`dbre unlock`?); "
                f"another host may have pruned — {consequence}",
                hint,
            )
        limit = self.stale_seconds - self.safety_seconds
        if age > limit:
            how = (f"longer than the stale limit ({_span(self.stale_seconds)})" if age > self.stale_seconds
                   else f"within {_span(self.safety_seconds)} of the stale limit ({_span(self.stale_seconds)})")
            raise LockLostError(
                f"{what}: the repository lock was last refreshed {_span(age)} ago, {how}; "
                f"another host may have pruned — {consequence}",
                hint,
            )


def set_retry(seconds: float) -> None:
    """How long ``hold`` keeps trying while a conflicting lock is live (the CLI's ``--retry-lock``;
    0, the default, refuses at once, as restic does)."""
    global RETRY_SECONDS
    RETRY_SECONDS = max(0.0, seconds)


@contextmanager
def hold(store: Store, op: str, *, exclusive: bool = False) -> Iterator[Lock]:
    """Hold a lock for ``op`` while the block runs: ``with hold(store, "backup app") as lock:``.

    While another run's conflicting lock is live, tries again for ``RETRY_SECONDS`` (1 s, doubling
    to 15 s, with jitter); each failed try removed its own lock object before the wait."""
    deadline = time.monotonic() + RETRY_SECONDS
    pause, told = 1.0, False
    while True:
        lock = Lock(store, op, exclusive=exclusive)
        try:
            lock.acquire()
            break
        except LockedError as err:
            left = deadline - time.monotonic()
            if left <= 0:
                if RETRY_SECONDS:
                    err.message += f", still after waiting {RETRY_SECONDS:.0f} s"
                    err.hint = ("let it finish and run this again (or a longer --retry-lock), "
                                "or `dbre unlock` if it is dead")
                raise
            if not told:
                log.warning("dbre: %s: %s; waiting up to %.0f s for it", op, err.message, left)
                told = True
            time.sleep(min(left, pause * (0.75 + 0.5 * secrets.randbelow(1000) / 1000)))
            pause = min(pause * 2, 15.0)
    try:
        yield lock
    finally:
        lock.release()


def remove_locks(store: Store, *, all_locks: bool = False) -> int:
    """Remove stale locks (or every lock); returns how many were removed.

    The store's current time comes from a short-lived shared lock record written for the purpose
    (op "unlock"), so staleness is judged exactly as an acquiring run judges it.
    """
    probe = Lock(store, "unlock")
    key, probe._last_ok, probe._clock = probe._write()
    removed = 0
    try:
        now = probe.store_now()
        for other in list_locks(store):
            if other.key != key and (all_locks or other.stale(now, probe.stale_seconds)):
                store.delete(other.key)
                removed += 1
    finally:
        store.delete(key)
    return removed
