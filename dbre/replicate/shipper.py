"""The replicator: ship every committed transaction of a live WAL database into segments, one per interval.

How no frame is lost (Litestream's method, read in its db.go, made exact by SQLite's own locks):
- The replicator holds a read transaction on the source between ships. While it is held, no
  checkpoint copies frames past its read mark into the file and no writer restarts the WAL past
  frames it has not read (a restart needs every reader off read marks 1..N-1, and a reader on
  mark 0 blocks every backfill, so a WAL restarted under it held nothing unread).
- Pacing: ``interval`` is the most a commit should wait to be durable. Pending commits are shipped
  when the oldest of them has waited the interval less the time shipping takes now (from the decision
  to the durable segment: swap, queue, seal and put; ``upload_seconds``, following a rise at once and a
  fall slowly) and a poll, so a slow store makes segments come sooner
  rather than later and a fast one lets them carry more commits (fewer requests for the same lag);
  the first commit after a quiet spell (none shipped for an interval) goes at once. While a segment
  waits behind the one being uploaded, no early one is cut: a store slower than the budget gets
  larger segments, not a growing queue (the interval still ships at least once per interval).
- When it ships it *swaps*: with the write lock taken for a moment by a second
  connection (``BEGIN IMMEDIATE``: no commit can land), it reads the last commits, ends its read
  transaction and begins a new one at the newest commit, then lets writers go. Once the WAL is
  over ``CHECKPOINT_FRAMES`` frames it also runs a PASSIVE checkpoint in that moment, so its new
  read transaction sits on read mark 0 and the application's next write can restart the WAL:
  the WAL stays bounded while the replicator runs.
- An application's FULL/RESTART/TRUNCATE checkpoint holds the write lock and waits for readers.
  The replicator sees it (another process holds both the write and the checkpoint lock of the
  -shm file, ``F_GETLK``), reads every committed frame (none can be added while the checkpoint
  holds the write lock), steps aside, and begins its next read transaction as soon as the
  checkpoint has backfilled the WAL (on read mark 0, which the checkpoint does not wait for). A
  WAL restarted in that moment is followed only when its salt moved by exactly one restart.
Observation: the wal-index header in -shm (136 bytes) is read every ``POLL_SECONDS``; when its
frame count moves, the new frames are read and each new transaction is stamped with the time of
that read (after the commit, at most one poll plus the read later). Segments are sealed and put by
an uploader thread in order, so a slow store never delays the polling.

Locks: the replicator holds the shared repository lock only while it starts a generation (at
start-up, and for each base snapshot: the backup, the catch-up segments of the old generation, the
new base object and the lease naming the new generation), so forget and prune run between bases.
The segments in between are kept from prune by the lease (``dbre.replicate.lease``). While an
exclusive lock (prune) holds the repository, a periodic base is put off (``LOCK_RETRY_SECONDS``)
and shipping goes on in the current generation; a generation that must start (none yet, or
continuity lost) waits, its read transaction ended, refreshing the lease.

Stopping (``stop`` set: the CLI's SIGINT/SIGTERM): the next polling round swaps, ships what is
committed and waits for the uploader; no base snapshot starts for a periodic generation any more
(one under way is cut short at its next run of pages: the pending commits go into the current
generation). What cannot be shipped then is not waited for past ``SHUTDOWN_SECONDS`` after the
stop was seen: a generation that must start and finds the repository locked (prune) or the
source's write lock busy is not tried again, a base it needs is cut short at the deadline, and an
uploader still putting segments then is left behind (as by kill -9: every put is whole or absent,
the lease and the lock objects go stale). Those raise ``StoppedUnshipped`` (exit 1, one line that
says what is not in the repository), never a clean return.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import IntegrityError, LockedError, RepositoryError, SourceError
from dbre.replicate.lease import Lease
from dbre.replicate.segment import (
    Generation,
    Segment,
    Transaction,
    WalPos,
    base_state,
    chain_step,
    check_contiguous,
    list_generations,
    new_generation_id,
    open_segment,
    read_base,
    write_base,
    write_segment,
)
from dbre.replicate.wal import ContinuityLost, WalTail
from dbre.repository.backup import backup
from dbre.repository.immutable import ensure_base_locked
from dbre.repository.lock import Lock
from dbre.repository.manifest import check_db_name, iso
from dbre.repository.repo import Repository
from dbre.restore.full import open_by, process_name
from dbre.sources.image import NoImage
from dbre.sources.local import LocalFileSource, _poll_busy, keep_wal
from dbre.sources.pins import Pin
from dbre.storage import NotFound

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # wal-index header reads: observation precision is this plus one read
WRITE_WAIT = 0.25  # a swap waits this long for the write lock, then tries again next round
YIELD_WAIT = 2.0  # the longest the replicator waits for an application's checkpoint to backfill
CHECKPOINT_FRAMES = 1000  # a WAL this long gets a PASSIVE checkpoint in the swap (SQLite's own default)
MAX_SEGMENT_BYTES = 64 * 1024 * 1024  # pending pages past this are shipped before the interval ends
VACUUM_SHARE = 0.5  # a transaction writing this share of the pages (and VACUUM_MIN_PAGES) starts a generation
VACUUM_MIN_PAGES = 64
STALL_SECONDS = 10.0  # the WAL failing its checks this long in a row stops the replicator
LOCK_RETRY_SECONDS = float(os.environ.get("DBRE_REPLICATE_LOCK_RETRY", "5"))  # a base put off by prune: retried
# a generation this long gets a fresh base snapshot (an incremental backup): a restore then reads at
# most this many segments after its base (~7 min of constant writes at the default interval)
GENERATION_SEGMENTS = int(os.environ.get("DBRE_REPLICATE_GENERATION_SEGMENTS", "600"))  # (tests set it low)
BUSY_BASES = 10  # base snapshots in a row without a WAL position (a busy source) before replicate gives up
# once stop is seen, the longest the replicator keeps trying to ship (a base a new generation needs,
# the segments queued for the store); then it gives up, saying what is not shipped (StoppedUnshipped)
SHUTDOWN_SECONDS = 10.0
STOP_RECORD_SECONDS = 2.0  # the longest a clean stop waits for its record (Lease.stopped) before it lets go


@dataclass
class ReplicateStats:
    """What a run did, and the longest moments it held the application's write lock."""

    segments: int = 0
    transactions: int = 0
    bytes: int = 0
    generations: list[str] = field(default_factory=list)
    swaps: int = 0
    yields: int = 0
    checkpoints: int = 0
    max_swap_ms: float = 0.0
    max_poll_gap_ms: float = 0.0


class _ReplicaFile(LocalFileSource):
    """A local file read as any other, recorded as the source it mirrors (an embedded replica of a
    remote database): its snapshots join that database's chain, whoever takes them."""

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        super().__init__(path)
        self._identity = dict(identity)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)


class _Stopped(Exception):
    """Stop was asked while a generation could not start (why: ``args[0]``): nothing more can be shipped."""


class _BaseCut(Exception):
    """Raised through a base snapshot's progress callback: the stop came and that base is not waited for."""


class StoppedUnshipped(RepositoryError):
    """The replicator stopped (SIGINT/SIGTERM) without shipping every commit: a generation could not
    start in time (prune held the repository, the source's write lock stayed busy) or the store did
    not take the last segments within ``SHUTDOWN_SECONDS``. The repository is consistent (what is in
    it is whole); the commits it names are not in it until a replicator runs again."""


class _Uploader:
    """One thread that runs jobs (seal + put of segments, generation bases) strictly in order."""

    def __init__(self) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._left = False  # left behind (``drain`` timed out): no further job starts
        self._thread = threading.Thread(target=self._loop, name="dbre-replicate-upload", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self._error is None and not self._left:
                    job()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread by check()
                self._error = err
            finally:
                self._q.task_done()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self.check()
        self._q.put(job)

    def waiting(self) -> int:
        """Jobs submitted and not yet started (the one running is not counted)."""
        return self._q.qsize()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every job submitted (raising the first error); False when ``timeout`` seconds
        passed first: the uploader is then left behind (the job running goes on, no other starts)."""
        with self._q.all_tasks_done:
            if not self._q.all_tasks_done.wait_for(lambda: not self._q.unfinished_tasks, timeout):
                self._left = True
                return False
        self.check()
        return True

    def close(self) -> None:
        self._q.put(None)
        if not self._left:
            self._thread.join()


def _same(a: WalPos, b: WalPos) -> bool:
    return (a.salt, a.frame, a.cksum) == (b.salt, b.frame, b.cksum)


def _salt1(salt: bytes) -> int:
    return int.from_bytes(salt[:4], "big")


class Replicator:
    """Ships the WAL of the database at ``path`` into ``repo`` as database ``db``."""

    def __init__(self, repo: Repository, path: str | Path, db: str, interval: float = 0.75, *,
                 accept_new_source: bool = False, base_identity: dict[str, Any] | None = None) -> None:
        self.repo = repo
        self.accept_new_source = accept_new_source  # the bases' backups: ``db`` moved to ``path``
        # what the bases record as their source (the remote database an embedded replica at
        # ``path`` mirrors); None: the file itself
        self.base_identity = base_identity
        self.path = str(Path(path).expanduser().absolute())
        self.db = check_db_name(db)
        self.interval = interval
        # how long shipping takes: from the decision to ship (the swap, the queue, the chain steps, the seal and
        # the put) until the segment is durable; a moving average that follows a rise at once (uploader thread)
        self.upload_seconds = 0.0
        self._decided = 0.0  # monotonic: when the segments being submitted were decided on (polling thread)
        self._pending_since: float | None = None  # monotonic: the poll that read the oldest pending commit
        self.stats = ReplicateStats()
        self.tail: WalTail | None = None
        self._pin: Pin | None = None
        self.conn: apsw.Connection | None = None
        self.locker: apsw.Connection | None = None
        self.lease: Lease | None = None
        self._locks: list[Lock] = []  # repository locks held (one per generation being started)
        self._locks_mutex = threading.Lock()
        self._base_lock: Lock | None = None  # the one the next base snapshot is taken under
        self._want_base = ""  # why a new base is due (put off while prune holds the repository)
        self._base_after = 0.0  # monotonic: no new base attempt before this
        self._put_off = 0  # tries of the base due that a prune refused
        self._busy_bases = 0  # bases in a row the source's busy write lock left without a WAL position
        self._stop = threading.Event()
        self._stopped_at: float | None = None  # monotonic: when stop was first seen set
        self._durable: tuple[str, int] | None = None  # (generation, txid) of the last state this run made durable
        self.gen: Generation | None = None
        self.page_size = 0
        self.pos = WalPos(b"", 0)  # read up to here (the end of ``pending``)
        self.pending: list[Transaction] = []
        self.next_txid = 1
        self.restarts = "never"  # WAL restarts followed: "never" (not pinned yet), "one" (after a yield), "any"
        self._state = b""  # chain state after the last submitted transaction (uploader thread)
        self._shipped = WalPos(b"", 0)  # WAL end of the last submitted transaction
        self._last_obs = 0
        self._bad_since: float | None = None
        self._uploader: _Uploader | None = None
        self._gen_segments = 0  # segments in the current generation
        self._gen_born = float("-inf")  # monotonic start of the current generation (resumed: age unknown)
        self._calm_until = 0.0  # no second yield to the same checkpoint before this (monotonic)
        # (position, monotonic since): an emptied WAL the loop stands at with nothing pending; the lease
        # records it once it stood an interval (an application that truncates after every commit
        # would otherwise add a lease write, three HEADs and a PUT, in front of every segment)
        self._standing: tuple[WalPos, float] | None = None
        self._starting = False  # inside _new_generation: no generation starts from within it
        self.on_ship: Callable[[str], None] | None = None

    # -- the loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_ship: Callable[[str], None] | None = None) -> ReplicateStats:
        """Replicate until ``stop`` is set; then ship what is committed and return. What cannot be
        shipped within ``SHUTDOWN_SECONDS`` of the stop raises ``StoppedUnshipped`` (module doc, *Stopping*)."""
        self.on_ship = on_ship
        self._stop = stop
        self.repo.require_writable(f"replicate {self.db}")
        self._uploader = _Uploader()
        unshipped: list[str] = []
        left = drained = False
        try:
            try:
                lock = self._wait_for_lock()
                self.lease = Lease(self.repo.store, self.db, lock)  # (its store clock judges other leases)
                self.lease.acquire()
                self._open()
                try:
                    if self._resume():
                        assert self.gen is not None
                        self.lease.name(self.gen.id)  # before prune may run: it never deletes this generation
                        self._let_go(lock)
                    else:
                        self._new_generation(continued=False)  # under this lock
                    self._loop(stop)
                finally:
                    self._close()
            except _Stopped as err:
                unshipped.append(str(err))
            age = self._stop_age()
            if not self._uploader.drain(None if age is None else max(1.0, SHUTDOWN_SECONDS - age)):
                left = True
                unshipped.append(f"the store had not taken the last segments {SHUTDOWN_SECONDS:.0f} s after the stop")
            drained = not unshipped and not self.pending  # a clean stop: every commit read is durable
        finally:
            self._uploader.close()
            # left behind, a put may still be under way: the lease and the locks stay, as after kill -9
            # (they go stale; a replicator restarted on this host takes them over at once)
            if self.lease is not None and not left:
                # (not at salts of zeros: a wal-index rebuilt over an empty WAL reads so whatever the file holds)
                if drained and self.gen is not None and any(self.pos.salt):
                    age = self._stop_age() or 0.0
                    self.lease.stopped(self.gen.id, replace(self.pos, restart_next=False).to_json(),
                                       within=min(STOP_RECORD_SECONDS, max(0.0, SHUTDOWN_SECONDS - age)))
                self.lease.release()
            for held in list(self._locks) if not left else []:
                self._let_go(held)
        if unshipped:
            gen_txid = self._durable
            what = (f"commits after txid {gen_txid[1]} (generation {gen_txid[0]}) are not in the repository"
                    if gen_txid else "no commit read by this run is in the repository")
            raise StoppedUnshipped(f"replicate {self.db}: stopped before shipping every commit: "
                                   f"{'; '.join(unshipped)}; {what}", "run replicate again: it ships them")
        return self.stats

    def _stop_age(self) -> float | None:
        """Seconds since stop was first seen set (None while it is not)."""
        if not self._stop.is_set():
            return None
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return time.monotonic() - self._stopped_at

    # -- the repository lock (held only while a generation starts) ---------------------------------

    def _try_lock(self) -> Lock:
        """Take the shared repository lock (``LockedError`` while an exclusive one, prune, is live)."""
        lock = Lock(self.repo.store, f"replicate {self.db}")
        lock.acquire()
        with self._locks_mutex:
            self._locks.append(lock)
        return lock

    def _let_go(self, lock: Lock) -> None:
        """Release ``lock`` once (from the uploader, after the generation it covered started, or at exit)."""
        with self._locks_mutex:
            if lock not in self._locks:
                return
            self._locks.remove(lock)
            if self._base_lock is lock:
                self._base_lock = None
        lock.release()

    def _wait_for_lock(self) -> Lock:
        """The shared repository lock for a generation that must start: while prune holds the
        repository, wait (no read transaction held, the lease refreshed); ``_Stopped`` on stop."""
        if self._base_lock is not None:
            return self._base_lock
        waited = 0.0
        while True:
            try:
                self._base_lock = self._try_lock()
                if waited:
                    log.warning("replicate %s: repository lock taken after %.0f s", self.db, waited)
                return self._base_lock
            except LockedError as err:
                if not waited and not self._stop.is_set():
                    log.warning("replicate %s: waiting to start a generation: %s", self.db, err.message)
                why = err.message
            if self.conn is not None:
                self._end_read()  # nothing to pin: the generation starts from a snapshot taken later
            began = time.monotonic()
            if self._stop.wait(LOCK_RETRY_SECONDS):
                raise _Stopped(f"a new generation could not start ({why})")
            waited += time.monotonic() - began
            if self.lease is not None and self._uploader is not None and self.lease.due():
                self._uploader.submit(self.lease.refresher())

    def _loop(self, stop: threading.Event) -> None:
        assert self.tail is not None and self._uploader is not None and self.lease is not None
        last_ship = time.monotonic()
        last_poll = time.monotonic()
        while True:
            stopping = stop.wait(POLL_SECONDS)
            if stopping:
                self._stop_age()  # (the shutdown budget counts from here)
            now = time.monotonic()
            self.stats.max_poll_gap_ms = max(self.stats.max_poll_gap_ms, (now - last_poll) * 1000)
            last_poll = now
            self.lease.tick()  # a late round (this process was stopped): the lease is renewed before a segment
            self._uploader.check()
            if self.tail.replaced():
                self._continuity_lost("the database file was replaced")
                continue
            try:
                self._poll()
                if now >= self._calm_until and self.tail.blocking_checkpoint():
                    self._yield()  # at once, not at the next ship: the checkpoint waits on this reader
                    self._calm_until = time.monotonic() + 0.05
                big = sum(t.size for t in self.pending) >= MAX_SEGMENT_BYTES
                if not self._want_base and self._lock_aged():  # (a quiet database too: its next commit is new)
                    self._want_base = "Object Lock: the generation is half a lock step old"
                if self.pending and (stopping or big or now - last_ship >= self.interval or self._due(now)):
                    self._decided = time.monotonic()
                    self._swap()
                    self._ship()
                    self._decided = 0.0  # (segments submitted elsewhere count from their submission)
                    last_ship = time.monotonic()
                elif self._want_base and not self.pending and not stopping and now >= self._base_after:
                    self._new_generation(continued=True, why=self._want_base)  # (put off by a prune: idle now)
            except ContinuityLost as err:
                self._continuity_lost(str(err))
                continue
            if self.pending or _same(self.pos, self._shipped):
                self._standing = None
            elif self._standing is None or not _same(self._standing[0], self.pos):
                self._standing = (self.pos, now)
            elif now - self._standing[1] >= self.interval:  # (an emptied WAL, restarted, idle since)
                self.lease.followed(replace(self.pos, restart_next=False).to_json())
            if self.lease.due():
                self._uploader.submit(self.lease.refresher())  # a store request: never on the polling thread
            if stopping:
                return

    def _due(self, now: float) -> bool:
        """Whether the oldest pending commit has waited long enough that shipping now keeps it within
        the interval (module doc, *Pacing*); never sooner than a quarter of the interval."""
        if self._pending_since is None:
            return False
        if self._uploader is not None and self._uploader.waiting():
            # a store slower than the budget: more, smaller segments would only queue behind each other
            # (one PUT each); wait for the uploader, so the commits meanwhile go into one larger segment
            return False
        budget = max(self.interval / 4, self.interval - self.upload_seconds - POLL_SECONDS)
        return now - self._pending_since >= budget

    # -- the source ------------------------------------------------------------------------------

    def _open(self) -> None:
        src = LocalFileSource(self.path)
        src.check()
        self._check_no_stale_wal()
        # the pin, before any connection and released after the last one closes: while it is held
        # no descriptor dbre opens on this database (the WAL tail's, a snapshot's maps) is closed,
        # so none can drop the POSIX locks of the connections below (see dbre.sources.pins)
        self._pin = Pin(self.path)
        self.tail = WalTail(self.path)
        try:
            self.conn = keep_wal(apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE))
            self.conn.set_busy_handler(_poll_busy(10.0))
            row = self.conn.execute("PRAGMA journal_mode").fetchone()
            mode = str(row[0] if row else "").lower()
            if mode != "wal":
                raise SourceError(f"replicate {self.db}: {self.path} is in {mode} journal mode, not WAL",
                                  "switch it once with `PRAGMA journal_mode=WAL`")
            self.locker = keep_wal(apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE))
            self._begin_read()
        except apsw.Error as err:
            self._close()
            raise SourceError(f"replicate {self.db}: cannot open {self.path} ({err})", "check the file") from err
        except BaseException:
            self._close()
            raise

    def _let_go_of_replaced(self) -> None:
        """The path names another file now (moved over it: a new inode): before anything opens that new file,
        the old database's -wal must not be left at the path with frames in it. This process kept it
        there (its read transaction holds it after the application closed), and the next opener of the
        new file would replay those frames into it (a malformed database). So: its last commits are read
        (through the pinned descriptors: they go with this generation), the read transaction ends, and a
        TRUNCATE checkpoint through the connection to the old file copies the frames into it (unlinked,
        or moved aside: then complete) and empties the -wal. (SQLite's own checkpoint-on-close does
        nothing for a moved database.) When the -wal at the path still holds frames of the old file
        (another process has it open), nothing opens the new file: one line says what to do."""
        assert self.tail is not None
        try:
            self._poll()
        except (ContinuityLost, SourceError):
            pass  # (a new generation starts anyway)
        if self.pending and self.gen is not None:
            self._ship()  # (before anything below can stop the run: the old file's last commits are kept)
        pinned = self.tail.files.fds.get("-wal")  # (never opened by path here: that would be the new file's)
        if pinned is not None:
            # another process with the old -wal open (the application reopened the new path and attached to
            # it, or a pool still holds the old file): a checkpoint now would move what it commits there into
            # the old file. Nothing is touched; one line says what to do.
            st = os.fstat(pinned)
            others = [pid for pid in open_by({(st.st_dev, st.st_ino): ("-wal", "")}) if pid != os.getpid()]
            if others:
                raise self._stale_wal(others[0], "was replaced")
        if self.conn is not None:
            try:
                self._end_read()
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except apsw.Error:
                pass  # (judged below by what is left at the path)
        if pinned is None:
            return  # (the old -wal was never read: none of its frames is known to be there)
        try:
            here, old = os.stat(self.path + "-wal"), os.fstat(pinned)
        except OSError:
            return  # (no -wal at the path: nothing stale)
        if here.st_size and (here.st_dev, here.st_ino) == (old.st_dev, old.st_ino):
            raise self._stale_wal(None, "was replaced")

    def _stale_wal(self, pid: int | None, what: str) -> SourceError:
        """The one line for a -wal at the path that belongs to another database file than the one there."""
        who = f" (process {pid}{process_name(pid)})" if pid is not None else ""
        return SourceError(f"replicate {self.db}: {self.path} {what} while the -wal beside it belongs to the old "
                           f"database, held by another process{who}: SQLite would mix its frames into the file",
                           f"stop every process that has {self.path} open, move {self.path}-wal and "
                           f"{self.path}-shm aside, then start replicate again")

    def _check_no_stale_wal(self) -> None:
        """Before the first connection: a -wal at the path held open by a process that does not have the file
        at the path open is another database's (a file was moved over it while that process kept the old one
        open); opening the file beside it would mix the two. (A SQLite connection keeps its database file
        open as long as its -wal.)"""
        try:
            wal, db = os.stat(self.path + "-wal"), os.stat(self.path)
        except OSError:
            return
        if not wal.st_size:
            return
        holders = open_by({(wal.st_dev, wal.st_ino): ("-wal", "")})
        with_db = open_by({(db.st_dev, db.st_ino): ("", "")})
        stale = [pid for pid in holders if pid != os.getpid() and pid not in with_db]
        if stale:
            raise self._stale_wal(stale[0], "is not the file its -wal was written for")

    def _close(self) -> None:
        for conn in (self.locker, self.conn):
            if conn is not None:
                try:
                    conn.close()
                except apsw.Error:
                    pass
        self.conn = self.locker = None
        if self.tail is not None:
            self.tail.close()  # after the connections: see dbre.sources.pins
            self.tail = None
        if self._pin is not None:
            self._pin.release()
            self._pin = None

    def _begin_read(self) -> None:
        assert self.conn is not None
        self.conn.execute("BEGIN")
        self.conn.execute("PRAGMA page_count").fetchall()  # starts the read transaction

    def _end_read(self) -> None:
        assert self.conn is not None
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    # -- reading the WAL -------------------------------------------------------------------------

    def _observed(self) -> int:
        self._last_obs = max(self._last_obs, time.time_ns() // 1000)
        return self._last_obs

    def _poll(self) -> None:
        """Read the transactions committed since ``pos``, stamped with the time of this read."""
        assert self.tail is not None
        try:
            st = self.tail.index()
            if st.salt == self.pos.salt and st.mx_frame == self.pos.frame and st.frame_cksum == self.pos.cksum:
                self._bad_since = None
                return
            restart_ok = self.restarts == "any" or (
                self.restarts == "one" and _salt1(st.salt) == (_salt1(self.pos.salt) + 1) % 2**32)
            tail = self.tail.read(self.pos, self.page_size, restart_ok=restart_ok, next_txid=self.next_txid,
                                  observed_us=self._observed(), st=st)
        except (NoImage, OSError) as err:
            # a wal-index caught mid-update passes at the next poll; one that stays bad stops the run
            now = time.monotonic()
            self._bad_since = self._bad_since or now
            if now - self._bad_since > STALL_SECONDS:
                raise SourceError(f"replicate {self.db}: the WAL of {self.path} fails its checks ({err})",
                                  "check the database; restart replicate to begin a new generation") from None
            return
        self._bad_since = None
        if tail.transactions and not self.pending:
            self._pending_since = time.monotonic()
        self.pending.extend(tail.transactions)
        self.next_txid += len(tail.transactions)
        self.pos = tail.end
        self.restarts = "any"  # the read transaction held since then pins everything after ``pos``

    def _write_lock(self) -> bool:
        """Take the write lock on the second connection; False when busy (or a checkpoint waits on us)."""
        assert self.locker is not None and self.tail is not None
        deadline = time.monotonic() + WRITE_WAIT
        tail = self.tail

        def busy(tries: int) -> bool:
            if time.monotonic() > deadline or (tries >= 3 and tail.blocking_checkpoint()):
                return False
            time.sleep(0.001)
            self._poll()  # commits keep landing while we wait: stamp them now, not after
            return True

        self.locker.set_busy_handler(busy)
        try:
            self.locker.execute("BEGIN IMMEDIATE")
            return True
        except apsw.BusyError:
            return False

    def _swap(self) -> None:
        """Read the last commits and move the read transaction to the newest one, under the write lock.
        A long WAL is checkpointed in two steps: the bulk after a first swap, outside the write lock,
        then what came meanwhile, inside a second one (so writers wait for little)."""
        assert self.tail is not None and self.conn is not None
        st = self.tail.index()
        if st.mx_frame >= CHECKPOINT_FRAMES and st.backfilled < st.mx_frame and self._swap_once(False):
            assert self.locker is not None  # (no transaction open on it now; the reader's is)
            self.locker.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # up to our new read mark
            self._swap_once(True)
        else:
            self._swap_once(False)

    def _swap_once(self, checkpoint: bool) -> bool:
        assert self.locker is not None and self.conn is not None and self.tail is not None
        started = time.perf_counter()
        if not self._write_lock():
            if self.tail.blocking_checkpoint():
                self._yield()
            return False  # (else writers keep it busy: the next round tries again; nothing is lost meanwhile)
        try:
            self._poll()  # no commit can land now: these are all of them
            self._end_read()
            st = self.tail.index()
            if checkpoint and st.backfilled < st.mx_frame:
                # so the new read transaction sits on mark 0 and the next write can restart the WAL
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.stats.checkpoints += 1
            self._begin_read()
            st = self.tail.index()
            if (st.backfilled == st.mx_frame and (st.salt, st.mx_frame) == (self.pos.salt, self.pos.frame)
                    and not self.tail.foreign_readers()):
                self.pos = replace(self.pos, restart_next=True)
        finally:
            self.locker.execute("ROLLBACK")
        self.stats.swaps += 1
        self.stats.max_swap_ms = max(self.stats.max_swap_ms, (time.perf_counter() - started) * 1000)
        return True

    def _yield(self) -> None:
        """Step aside for an application's blocking checkpoint (see the module doc)."""
        assert self.tail is not None
        self._poll()  # the checkpoint holds the write lock: every commit is read now
        self._end_read()
        deadline = time.monotonic() + YIELD_WAIT
        while time.monotonic() < deadline:
            st = self.tail.index()
            if st.salt != self.pos.salt or st.backfilled >= st.mx_frame or not self.tail.blocking_checkpoint():
                break
            time.sleep(0.0005)
        self._begin_read()
        self.restarts = "one"
        self.stats.yields += 1
        self._poll()

    # -- shipping --------------------------------------------------------------------------------

    def _ship(self, txs: list[Transaction] | None = None) -> None:
        """Hand the pending transactions (or ``txs``) to the uploader as segments of the current generation."""
        assert self._uploader is not None and self.gen is not None
        if txs is None:
            txs, self.pending = self.pending, []
            self._pending_since = None
        while txs:
            size, n = 0, 0
            while n < len(txs) and (n == 0 or size + txs[n].size <= MAX_SEGMENT_BYTES):
                size += txs[n].size
                n += 1
            batch, txs = txs[:n], txs[n:]
            self._submit_segment(self.gen, batch)
            self._gen_segments += 1
            if self._starting:
                continue
            if self._gen_segments >= GENERATION_SEGMENTS:
                self._want_base = self._want_base or f"{self._gen_segments} segments since the last base"
            if self._lock_aged():
                self._want_base = self._want_base or "Object Lock: the generation is half a lock step old"
            if any(len(t.pages) >= max(VACUUM_MIN_PAGES, VACUUM_SHARE * t.page_count) for t in batch):
                # (VACUUM, or a rewrite as large): a fresh base keeps later restores from replaying it
                self._want_base = "a transaction rewrote most of the database"
            if self._want_base and time.monotonic() >= self._base_after and not self._stop.is_set():
                self.pending = txs + self.pending
                if txs and self._pending_since is None:
                    self._pending_since = time.monotonic()
                self._new_generation(continued=True, why=self._want_base)
                return

    def _lock_aged(self) -> bool:
        """Under Object Lock, whether the generation is half a step old: it is replaced then (idle or
        after its next segment), so every state of it is at most a step younger than its base snapshot
        while a base takes under half a step (FORMAT.md, *Object Lock*, Replication)."""
        lock = self.repo.object_lock
        return lock is not None and time.monotonic() - self._gen_born >= lock.step / 2

    def _submit_segment(self, gen: Generation, txs: list[Transaction]) -> None:
        assert self._uploader is not None and self.tail is not None
        end = txs[-1].end or self._shipped
        if self.pos.restart_next and _same(end, self.pos):
            end = self.pos  # this segment ends where the swap left the WAL wholly backfilled
        start, self._shipped = self._shipped, end
        file_id = self.tail.file_id()
        decided = self._decided or time.monotonic()

        def job() -> None:
            assert self.lease is not None
            state = self._state
            for tx in txs:
                state = chain_step(self.repo.page_hash, state, tx)
            seg = Segment(self.db, gen.id, gen.page_size, self._state, state, start, end, file_id, txs)
            what = f"replicate {self.db}: segment {txs[0].txid}-{txs[-1].txid}"
            # no store request here: the lease refreshes (their own period) find a lost lease; this
            # only refuses when they stopped succeeding in time. The lease, not a repository lock,
            # keeps prune off this generation (it never deletes the one a live lease names)
            self.lease.verify(what)
            key, size = write_segment(self.repo, seg)
            took = time.monotonic() - decided
            # a rise counts at once (the lag budget must hold at p99), a fall slowly
            self.upload_seconds = max(took, 0.8 * self.upload_seconds + 0.2 * took)
            self._state = state
            self._durable = (gen.id, txs[-1].txid)
            self.stats.segments += 1
            self.stats.transactions += len(txs)
            self.stats.bytes += size
            if self.on_ship:
                self.on_ship(key)

        self._uploader.submit(job)

    # -- generations -----------------------------------------------------------------------------

    def _resume(self) -> bool:
        """Continue the newest generation where its last segment ends, if the WAL still continues
        from there (same file, same WAL salts, the same frame at that place)."""
        assert self.tail is not None
        gens = list_generations(self.repo, self.db)
        if not gens:
            return False
        gen_id = next(reversed(gens))
        listed = gens[gen_id]
        # observation times never go back, even when this host's clock is behind the last run's:
        # the counter starts from the newest time stored (a restore at T applies a prefix)
        self._last_obs = max(self._last_obs, int(gen_id[:16], 16), *(n.last_us for n in listed))
        try:
            base = read_base(self.repo, self.db, gen_id)
            names = check_contiguous(self.db, base, listed)
            if names:
                last = open_segment(self.repo, names[-1], None)
                end, state, txid, file_id = last.wal_end, last.state_after, names[-1].last, last.file_id
            else:
                end, state, txid, file_id = base.wal, bytes.fromhex(base.state), base.base_txid, base.file_id
        except (IntegrityError, NotFound) as err:
            # a lost or damaged object: that generation cannot be continued, but replication must
            # not stay down for it; `dbre verify` reports it, restores before the damage still work
            log.warning("replicate %s: generation %s cannot be continued (%s): a new generation starts",
                        self.db, gen_id, err.message)
            self.next_txid = max((n.last for ns in gens.values() for n in ns), default=0) + 2  # never reused
            return False
        self.next_txid = txid + 1
        why = None
        if file_id != self.tail.file_id():
            why = "the database file is not the one replicated before (replaced or restored over)"
        else:
            self.gen, self.page_size, self.pos, self._shipped, self._state = base, base.page_size, end, end, state
            # frames after ``end`` were not pinned while no replicator ran: a restart since is followed
            # only when the WAL was wholly backfilled there (the restart came at that very frame)
            self.restarts = "one" if end.restart_next else "never"
            try:
                self._poll()
            except ContinuityLost as err:
                why = str(err)
        if why is not None:
            log.warning("replicate %s: %s: a new generation starts", self.db, why)
            self.gen, self.pending, self._pending_since = None, [], None
            self.next_txid += 1  # the new base is a state of its own, not the old generation's last
            return False
        self.stats.generations.append(base.id)
        self._gen_segments = len(names)
        self._durable = (base.id, txid)
        return True

    def _continuity_lost(self, why: str) -> None:
        """Ship what was read, then start a new generation from a fresh snapshot."""
        log.warning("replicate %s: %s: a new generation starts", self.db, why)
        if self.tail is not None and self.tail.replaced():
            self._want_base = ""  # (a new generation follows at once: no ship may start one on the old file)
            self._let_go_of_replaced()
        if self.pending:
            self._ship()
        assert self._uploader is not None
        self._uploader.drain()
        if self.tail is not None and self.tail.replaced():
            self._close()
            self._open()
        self.gen = None
        self.next_txid += 1
        self._new_generation(continued=False)

    def _new_generation(self, *, continued: bool, why: str = "") -> None:
        """Take a fresh snapshot (polling on meanwhile, so observation times stay exact) and start a
        generation at its WAL position. ``continued``: the current generation has every transaction
        up to here, and gets the ones up to the snapshot too, so it ends exactly where the new one
        starts."""
        assert self.tail is not None and self._uploader is not None
        while True:
            if not continued:
                self._wait_for_lock()  # (the read transaction ended while it waits)
                # everything from here on is pinned by the read transaction, which began before the snapshot
                self._end_read()
                self._begin_read()
                st = self.tail.index()
                self.pending, self._pending_since = [], None
                self.pos = self._shipped = WalPos(st.salt, st.mx_frame, st.frame_cksum)
                self.page_size = st.page_size if st.mx_frame else self._page_size()
                self.restarts = "any"
            done: dict[str, object] = {}
            worker = threading.Thread(target=self._take_base, args=(done, continued), name="dbre-replicate-snapshot",
                                      daemon=True)
            born = time.monotonic()  # before the snapshot's time: the generation's age is never under-counted
            worker.start()
            while worker.is_alive():
                worker.join(POLL_SECONDS)
                self._stop_age()  # (a base cut short at the deadline counts from the stop)
                if self.lease is not None:
                    self.lease.tick()
                    if self.lease.due():  # a base of a large database takes minutes: the lease stays renewed
                        self._uploader.submit(self.lease.refresher())
                self._poll()
            lock = self._base_lock
            if "result" in done and not done["result"].manifest.stats.get("wal"):  # type: ignore[attr-defined]
                # the application kept the write lock past the base's wait: the snapshot fell back to
                # SQLite's backup API, which knows no WAL position to start a generation at. Tried
                # again (another snapshot: an incremental, cheap) up to BUSY_BASES times in a row
                self._busy_bases += 1
                if self._busy_bases >= BUSY_BASES:
                    if lock is not None:
                        self._let_go(lock)
                    raise SourceError(f"replicate {self.db}: the source's write lock stayed busy through "
                                      f"{self._busy_bases} base snapshots in a row (their WAL position is unknown)",
                                      "give the replicator a moment without writers, then run it again")
                done = {"locked": f"the source's write lock stayed busy during the base snapshot "
                                  f"(try {self._busy_bases} of {BUSY_BASES})"}
            elif "result" in done:
                self._busy_bases = 0
            if "result" in done and lock is not None:
                break
            if lock is not None:
                self._let_go(lock)
            if "error" in done:
                raise done["error"]  # type: ignore[misc]
            if continued and "cut" in done:
                return  # stopping: the pending commits go into the current generation, no base is needed for them
            if continued:
                # the current generation stays exact: ship on in it, try again later
                self._base_after = time.monotonic() + LOCK_RETRY_SECONDS
                self._put_off += 1
                if self._put_off == 1:
                    log.warning("replicate %s: new base put off (%s): %s; retried every %.0f s", self.db, why,
                                done["locked"], LOCK_RETRY_SECONDS)
                return
            if self._stop.is_set():  # not tried again: the next run takes the base
                cause = done.get("cut") or getattr(done["locked"], "message", done["locked"])
                raise _Stopped(f"a new generation could not start ({cause})")
            log.warning("replicate %s: %s: retrying", self.db, done["locked"])
        if self._put_off:
            log.warning("replicate %s: new base taken after %d tries", self.db, self._put_off + 1)
        self._want_base, self._put_off = "", 0
        manifest = done["result"].manifest  # type: ignore[attr-defined]
        snap = WalPos.from_json(manifest.stats["wal"])  # (a base without one was tried again above)
        self._poll()
        before, after = self._split(snap)
        if continued and before:
            self._starting = True
            try:
                self._ship(before)
            finally:
                self._starting = False
        base_txid = before[-1].txid if before else self.next_txid - len(after) - 1
        if self.page_size and manifest.page_size != self.page_size:
            raise ContinuityLost("the page size changed")  # (impossible while pinned in WAL mode)
        self.page_size = manifest.page_size
        gen_id = new_generation_id(manifest.time)
        state = base_state(self.repo.page_hash, self.db, gen_id, manifest, base_txid)
        gen = Generation(self.db, gen_id, manifest.id, self.repo.manifest_key(manifest), manifest.taken_at,
                         base_txid, manifest.page_size, snap, self.tail.file_id(), state.hex(),
                         iso(manifest.time))

        def start() -> None:
            assert self.lease is not None
            # the generation's commit: never after the lock stopped being refreshed (a paused host;
            # another may have pruned meanwhile), as a backup's manifest (which this lock also covered)
            lock.check_alive(f"replicate {self.db}: generation {gen_id}", consequence="the generation was not started",
                             hint="restart replicate: it takes a new base")
            # its states are up to a step younger than the base snapshot: what it needs, locked that long too
            ensure_base_locked(self.repo, manifest)
            write_base(self.repo, gen)
            self._state = state
            self._durable = (gen_id, base_txid)
            self.lease.name(gen_id)  # before the lock goes: prune never deletes the generation it names
            self._let_go(lock)

        self._uploader.submit(start)
        self._base_lock = None  # the start job lets it go; a later generation takes its own
        self.gen, self._shipped, self.pending, self._gen_segments = gen, snap, after, 0
        self._gen_born = born
        self.stats.generations.append(gen_id)
        log.info("replicate %s: generation %s from snapshot %s%s", self.db, gen_id, manifest.id,
                 f" ({why})" if why else "")

    def _take_base(self, done: dict[str, object], continued: bool) -> None:
        """The worker thread of ``_new_generation``: the repository lock (one try, unless held), then
        the base snapshot; the outcome in ``done`` ("result", "locked", "cut" or "error")."""
        try:
            if self._base_lock is None:
                self._base_lock = self._try_lock()  # a periodic base: one try
            # the direct path: its maps go through mmap(2) with no duplicate descriptor
            # (dbre.sources.filemap), and every descriptor it opens is shared under this run's
            # pin, closed only after our connections: the reader keeps its locks throughout
            source = LocalFileSource(self.path) if self.base_identity is None \
                else _ReplicaFile(self.path, self.base_identity)
            done["result"] = backup(self.repo, source, self.db, accept_new_source=self.accept_new_source,
                                    progress=self._cut_when_stopped(continued))
        except _BaseCut:
            done["cut"] = f"its base snapshot was not done {SHUTDOWN_SECONDS:.0f} s after the stop"
        except LockedError as err:  # prune holds the repository (or was taking it just then)
            done["locked"] = err
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            done["error"] = err

    def _cut_when_stopped(self, continued: bool) -> Callable[[int, int], None]:
        """A base snapshot's progress callback: once stop is seen, a periodic base (``continued``: not
        needed to ship) is cut short at its next run of pages, one a new generation needs at
        ``SHUTDOWN_SECONDS``; the backup then removes what it wrote and stores no manifest."""

        def progress(done: int, total: int) -> None:
            age = self._stop_age()
            if age is not None and (continued or age >= SHUTDOWN_SECONDS):
                raise _BaseCut

        return progress

    def _page_size(self) -> int:
        assert self.conn is not None
        row = self.conn.execute("PRAGMA page_size").fetchone()
        return int(row[0]) if row else 0

    def _split(self, snap: WalPos) -> tuple[list[Transaction], list[Transaction]]:
        """The pending transactions the snapshot holds, and those after it: it ends where the last
        shipped one did, at the end of one read here, or (an emptied, restarted WAL) at new salts."""
        if _same(snap, self._shipped):
            return [], list(self.pending)
        for i, tx in enumerate(self.pending):
            if tx.end is not None and _same(tx.end, snap):
                return self.pending[: i + 1], self.pending[i + 1 :]
        if snap.frame == 0 and snap.salt != self._shipped.salt:
            idx = next((i for i, t in enumerate(self.pending) if t.end is not None and t.end.salt == snap.salt),
                       len(self.pending))
            return self.pending[:idx], self.pending[idx:]
        raise ContinuityLost(f"the snapshot ends at WAL frame {snap.frame}, which is not a commit read here")
