"""The per-database replication lease: one replicator per database, by conditional put.

A lease is ``leases/<db>/<epoch 016x>`` (plain JSON: host, pid, boot id, pid namespace, created;
``generation``, below; ``wal``, the WAL position the replicator stands at with nothing unshipped
when no segment ends there, see ``Lease.followed``).
Taking it: list the database's leases; if any of them is live (every one is judged, not only the
newest epoch's: a stale lease planted above a live one hides nothing), refuse; else write the newest
epoch + 1 with a conditional put — of two replicators racing for the same epoch exactly one wins. Every
``REFRESH_SECONDS`` the holder renews it as a repository lock is refreshed, by the store's clock
(three HEADs and a PUT): its own object must still be there (a lease that is gone — superseded by a
takeover, whose replicator may since have released its own — is never written again), no newer
epoch may exist, and, once rewritten, the object's new time of last write must be less than
``STALE_SECONDS - CLOCK_MARGIN_SECONDS`` after the one other hosts saw (a host paused with its clocks
stopped sees the pause only there); any of these marks the lease lost (``LockLostError``: nothing
more is shipped, the replicator exits 1; restarted, it takes a new lease, as any start does).
Before each segment it ships, ``verify`` makes no request, unless the replicator's polling loop
found a round late by more than ``SUSPECT_SECONDS`` on the boot or the wall clock (this process was
stopped): then it renews the lease first. It refuses when a renewal found the lease lost, or when
the last successful one began more than ``STALE_SECONDS - SAFETY_SECONDS`` ago on the boot clock
or on the wall clock (a paused VM's boot clock stops, its wall clock is stepped forward on resume):
a replicator that was paused or cut off and may have lost its lease to another stops instead of
interleaving. A pause that none of this host's clocks saw is found at the next periodic renewal,
at most ``REFRESH_SECONDS`` of this host's time after it resumes. Staleness is judged like the
repository's locks (`dbre.repository.lock`): by the store's clock (the object's last write against
the store's current time learnt from this run's own lock), or at once when the holder is a dead
process of this very host, boot and pid namespace (a replicator restarted after kill -9 resumes at
once).

The lease also names the generation its holder ships into (``generation``, written before the
replicator lets go of the repository lock it took for that generation's base): prune never deletes
the generation a live lease names (``live_generation``), and forget keeps its base snapshot. The
replicator holds no repository lock between bases; this lease, refreshed and verified as above, is
what keeps prune off the segments it is writing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dbre.errors import LockedError
from dbre.repository.lock import Lock, LockInfo, LockLostError, boottime, this_process
from dbre.storage import AlreadyExists, NotFound, Store
from dbre.storage.base import LOCK_CAP, get_capped

log = logging.getLogger(__name__)

STALE_SECONDS = 120.0  # a lease not rewritten for this long (store's clock) may be taken over
REFRESH_SECONDS = 20.0  # a HEAD and a PUT this often, idle or not
SUSPECT_SECONDS = 1.0  # a polling round this late: the process was stopped; renew before shipping
SAFETY_SECONDS = 60.0  # no segment is shipped when the last good refresh is older than STALE - SAFETY
CLOCK_MARGIN_SECONDS = 10.0  # a renewal this close to STALE by the store's clock is lost: another host's
# estimate of the store's time (its own lock's last write, 1 s resolution on S3, plus its elapsed time) may run ahead


def _epochs(store: Store, db: str) -> list[int]:
    out = []
    for key in store.list(f"leases/{db}/"):
        try:
            out.append(int(key.rsplit("/", 1)[1], 16))
        except ValueError:
            continue
    return sorted(out)


def lease_keys(store: Store, db: str) -> list[str]:
    """The keys of ``db``'s leases, oldest epoch first: only names that are epochs (``_epochs``), never
    the clean stop's record (``stopped_key``) nor anything else planted beside them."""
    return [f"leases/{db}/{epoch:016x}" for epoch in _epochs(store, db)]


def stopped_key(db: str) -> str:
    """Where a replicator's clean stop records its last WAL position (``Lease.stopped``); not an epoch
    (not hex), so no lease listing takes it for a lease."""
    return f"leases/{db}/stopped"


def _read(store: Store, key: str) -> LockInfo | None:
    """The lease at ``key`` with its time of last write (store's clock); None when it is gone. A
    damaged record counts as a lease of an unknown replicator, live (naming the newest generation)
    until stale."""
    try:
        raw = get_capped(store, key, LOCK_CAP, "lease")
        modified = store.modified(key)
    except NotFound:
        return None  # released or superseded meanwhile
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError
    except ValueError:
        record = {"op": "?"}
    return LockInfo(key, record, modified)


def live_leases(store: Store, db: str, store_now: float, epochs: list[int] | None = None) -> list[LockInfo]:
    """Every lease of ``db`` (of ``epochs``, if listed already) still live by the store's clock
    ``store_now``, whatever its epoch: a stale lease above a live one (one planted by someone with
    write access, say) never hides it."""
    out = []
    for epoch in _epochs(store, db) if epochs is None else epochs:
        info = _read(store, f"leases/{db}/{epoch:016x}")
        if info is not None and not info.stale(store_now, STALE_SECONDS):
            out.append(info)
    return out


def live_generation(store: Store, db: str, store_now: float) -> str | None:
    """The generation the live lease of ``db`` names: None when no lease is live (by the store's
    clock ``store_now``, as a takeover judges it), "" when the live lease names none (a replicator
    still starting, under the repository lock, or one of an older dbre: the newest generation).
    Every lease listed is judged, not only the newest epoch's; when live leases name different
    generations (only a forged one can, beside the real replicator's), "": the newest, which is the
    one a real replicator ships into (only a replicator starts generations)."""
    names = set()
    for info in live_leases(store, db, store_now):
        gen = info.record.get("generation")
        names.add(gen if isinstance(gen, str) else "")
    if not names:
        return None
    return names.pop() if len(names) == 1 else ""


class Lease:
    """This run's lease on replicating ``db``. ``acquire`` once, ``refresh`` when ``due``, ``verify``
    before each commit."""

    def __init__(self, store: Store, db: str, lock: Lock) -> None:
        self.store = store
        self.db = db
        self.lock = lock  # the repository lock: its store clock judges staleness
        self.epoch = -1
        self.record = {"op": f"replicate {db}", **this_process(),
                       "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._written = 0.0  # boottime() when the last refresh was scheduled
        self._ok = (0.0, 0.0)  # (boottime(), time.time()) when the last successful write began
        self._lost = False
        self._why = ""  # what a renewal found when it lost the lease
        self._tick: tuple[float, float] | None = None  # (boottime(), time.time()) of the polling loop's last round
        self._suspect = False  # the polling loop saw a gap: renew before the next segment
        # ``wal`` (see ``followed``): the newest position the polling loop followed, and the one every
        # segment submitted before it is durable for (set by its renewal, in the uploader, in order):
        # only the latter is ever written, whichever write comes first (verify's, name's)
        self._following: dict[str, Any] | None = None
        self._wal: dict[str, Any] | None = None

    def key(self, epoch: int | None = None) -> str:
        return f"leases/{self.db}/{(self.epoch if epoch is None else epoch):016x}"

    def acquire(self) -> None:
        """Take the lease: refuse (``LockedError``) while any lease of the database is live, whatever
        its epoch; else write the epoch above the newest listed (conditional put) and delete the others."""
        epochs = _epochs(self.store, self.db)
        newest = epochs[-1] if epochs else -1
        live = live_leases(self.store, self.db, self.lock.store_now(), epochs)
        if live:
            raise LockedError(
                f"database {self.db} is already being replicated by {live[-1].describe()}",
                "stop that replicator first; one replicator per database",
            )
        self.epoch = newest + 1
        try:
            self.store.put(self.key(), json.dumps(self.record).encode(), if_absent=True)
        except AlreadyExists:
            raise LockedError(f"database {self.db}: another replicator took the lease at this very moment",
                              "stop that replicator first; one replicator per database") from None
        self._written = boottime()
        self._ok = (boottime(), time.time())
        for old in epochs:
            self.store.delete(self.key(old))

    def due(self) -> bool:
        """Time to rewrite the lease; the caller then runs ``refresh`` (off its polling thread)."""
        if boottime() - self._written >= REFRESH_SECONDS:
            self._written = boottime()
            return True
        return False

    def followed(self, wal: dict[str, Any]) -> None:
        """The replicator has submitted every transaction it read and now stands at WAL position
        ``wal`` without a segment ending there (the WAL restarted with no frame, as after a TRUNCATE
        checkpoint): the lease records it (``wal``) at once, by the renewal submitted next (``refresher``),
        so `dbre status` can tell an idle source from one with unshipped commits. Polling thread."""
        if self._following != wal:
            self._following = wal
            self._written = boottime() - REFRESH_SECONDS  # due now

    def refresher(self) -> Callable[[], None]:
        """``refresh``, for the ordered uploader: it runs after every segment submitted before it, so
        the position followed when it was submitted is written from then on (and by no write before:
        ``verify``'s renewal inside an earlier segment's job, ``name`` in an earlier start job). The
        rest of the record is written as it is then (``generation``: the one named last)."""
        wal = self._following

        def job() -> None:
            if wal is not None:
                self._wal = wal
            self.refresh()

        return job

    def refresh(self) -> None:
        """Renew the lease (see ``_renew``: three HEADs and a PUT). A lease found gone, taken over,
        or gone unwritten too long by the store's clock marks the lease lost and raises
        ``LockLostError``; any other failure is logged, and only ages the lease (``verify`` judges
        the age)."""
        began = (boottime(), time.time())
        try:
            self._renew("replicate")
        except LockLostError as err:
            self._lost, self._why = True, err.message.split(": ", 1)[-1]
            raise
        except Exception as err:  # noqa: BLE001 - retried at the next refresh; verify stops shipping in time
            log.warning("lease %s: refresh failed: %s", self.key(), err)
            return
        self._ok = began
        self._suspect = False

    def name(self, generation: str) -> None:
        """Name the generation this replicator now ships into, at once (a renewal; raises on
        failure: the caller still holds the repository lock, so prune has not seen it yet)."""
        self.record["generation"] = generation
        began = (boottime(), time.time())
        try:
            self._renew("replicate")
        except LockLostError as err:
            self._lost, self._why = True, err.message.split(": ", 1)[-1]
            raise
        self._ok = began

    def _renew(self, what: str) -> None:
        """Rewrite the lease as Lock.refresh judges a lock, by the store's clock, never by this
        host's: the lease object must still exist (one HEAD: a lease that is gone, superseded by a
        takeover then released, is never written again), no newer epoch may exist (one HEAD), then
        the rewrite (one PUT) and its time by the store's clock (one HEAD): when more than
        ``STALE_SECONDS - CLOCK_MARGIN_SECONDS`` passed between the write other hosts saw and this one
        (this host was paused with its clocks, or its requests hung), another replicator may have
        judged the lease stale: it is deleted again and ``LockLostError`` raised. A shorter gap (a
        store brownout of a minute, a refresh retried) loses nothing: no other host can have judged
        the lease stale, so the lease is kept."""
        key = self.key()
        try:
            seen = self.store.modified(key)  # what every other host judges by
        except NotFound:
            raise LockLostError(f"{what}: the lease of {self.db} is gone (another replicator took it over "
                                "while this one was paused or cut off, or it was removed); it is not written "
                                "again", "nothing more is shipped by this one; restart replicate") from None
        self.check(what)
        record = self.record if self._wal is None else self.record | {"wal": self._wal}
        self.store.put(key, json.dumps(record | {"time": time.time()}).encode())
        gap = self.store.modified(key) - seen
        if gap > STALE_SECONDS - CLOCK_MARGIN_SECONDS:
            try:
                self.store.delete(key)
            except Exception as err:  # noqa: BLE001 - it goes stale; the loss is what matters
                log.warning("lease %s: could not remove it (%s)", key, err)
            raise LockLostError(f"{what}: by the store's clock the lease of {self.db} went {gap:.0f} s without "
                                f"a write (this host was paused or its requests hung), past what another host "
                                f"tolerates ({STALE_SECONDS - CLOCK_MARGIN_SECONDS:.0f} s): another replicator may "
                                "have taken it over", "nothing more is shipped by this one; restart replicate")

    def check(self, what: str) -> None:
        """Raise ``LockLostError`` if another replicator has taken the lease since (one HEAD)."""
        if self.store.exists(self.key(self.epoch + 1)):
            raise LockLostError(f"{what}: another replicator took over the lease of {self.db} (this one was "
                                "paused or cut off past the stale limit)", "nothing more is shipped by this one")

    def tick(self) -> None:
        """The replicator's polling loop, each round (no request): a round that comes more than
        ``SUSPECT_SECONDS`` after the previous one on the boot or the wall clock means this process
        was stopped (SIGSTOP, a paused VM whose wall clock was stepped on resume, starvation): the
        next ``verify`` renews the lease before anything ships."""
        now = (boottime(), time.time())
        if self._tick is not None and self._since(self._tick, now) > SUSPECT_SECONDS:
            self._suspect = True
        self._tick = now

    @staticmethod
    def _since(then: tuple[float, float], now: tuple[float, float]) -> float:
        return max(now[0] - then[0], now[1] - then[1])

    def age(self) -> float:
        """Seconds since the last successful write of the lease began: the larger of the boot clock's
        and the wall clock's count."""
        boot, wall = self._ok
        return max(boottime() - boot, time.time() - wall)

    def verify(self, what: str) -> None:
        """Before each segment: raise ``LockLostError`` when a renewal found the lease lost, or when
        the last successful one is too old for another host not to take it. No request, unless the
        polling loop was stopped since its last round (``tick``): then a renewal first."""
        if not self._lost and self._tick is not None and (
                self._suspect or self._since(self._tick, (boottime(), time.time())) > SUSPECT_SECONDS):
            # this process was stopped since the polling loop last ran: the store's clock, not this
            # host's, says whether the lease outlived it (one renewal; a lost lease raises here)
            self._tick = (boottime(), time.time())
            self.refresh()
        if self._lost:
            raise LockLostError(f"{what}: {self._why}", "nothing more is shipped by this one; restart replicate")
        age = self.age()
        if age > STALE_SECONDS - SAFETY_SECONDS:
            raise LockLostError(f"{what}: the lease of {self.db} was last written {age:.0f} s ago, within "
                                f"{SAFETY_SECONDS:.0f} s of its stale limit ({STALE_SECONDS:.0f} s): another "
                                "replicator may take it over", "check the store's reachability; restart replicate")

    def stopped(self, generation: str, wal: dict[str, Any], within: float) -> None:
        """A clean stop, every transaction read shipped and durable, at WAL position ``wal`` of
        ``generation``: ``leases/<db>/stopped`` records it (before ``release``), so `dbre status` still
        tells an idle source from unshipped commits when the WAL restarted empty after the last segment
        and the lease that recorded it is gone (``metrics._followed``). Nothing is written by a holder
        whose lease was found lost (another replicator may have shipped past it). Never raises, and
        waits at most ``within`` seconds (the rest of the stop's budget: a store slow right then must
        not push a clean stop past the CLI's hard stop); a put still under way then completes or not,
        whole either way. A record missing only makes status judge the lag by the segments and the
        heartbeat."""
        if self._lost:
            return
        record = {"generation": generation, "wal": wal,
                  "stopped": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}

        def put() -> None:
            try:
                self.store.put(stopped_key(self.db), json.dumps(record).encode())
            except Exception as err:  # noqa: BLE001 - the stop itself went well
                log.warning("lease %s: could not record the stop (%s)", stopped_key(self.db), err)

        writer = threading.Thread(target=put, name=f"dbre-stopped-{self.db}", daemon=True)
        writer.start()
        writer.join(max(0.0, within))
        if writer.is_alive():
            log.warning("lease %s: the store had not taken the stop's record after %.1f s; left to finish",
                        stopped_key(self.db), within)

    def release(self) -> None:
        if self.epoch >= 0:
            try:
                self.store.delete(self.key())
            except Exception as err:  # noqa: BLE001 - it goes stale; never hide the run's own outcome
                log.warning("lease %s: could not remove it (%s)", self.key(), err)
