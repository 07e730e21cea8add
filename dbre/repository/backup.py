"""The backup engine: stream one consistent snapshot's pages into packs, deduplicated by content.

Pages come from one read transaction on the source, by one of two paths: the direct path
(`dbre.sources.image`) maps the file and its WAL and serves exactly that transaction's pages
in bulk; the fallback copies through SQLite's backup API into an in-process VFS (`_SinkVFS`),
where every page arrives in ``xWrite`` with no temp file (used when the direct path's checks do
not pass, e.g. a database that is not a plain file here). Each page is hashed; pages the parent
snapshot already has are referenced, new ones are batched, sealed (zstd, checksum or AES-GCM) on
worker threads and appended to packs. The manifest is written last, with a conditional put:
until then the snapshot does not exist.
"""

from __future__ import annotations

import gc
import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress, repeat
from operator import eq, itemgetter, ne
from typing import Any

import apsw
import xxhash

from dbre.errors import IntegrityError, SourceError
from dbre.repository.lock import Lock
from dbre.repository.manifest import (
    RECORD,
    RUN_PAGES,
    Manifest,
    RunRef,
    TableStats,
    check_db_name,
    iso,
    new_snapshot_id,
    now_utc,
)
from dbre.repository.pack import PackWriter, read_index_tail
from dbre.repository.repo import TOOL, Repository
from dbre.repository.tables import table_stats
from dbre.sources.base import Source
from dbre.sources.image import ImageSession, PageImage
from dbre.storage import NotFound

log = logging.getLogger(__name__)

BATCH_BYTES = 2 * 1024 * 1024  # pages are sealed in batches of this size (fewer GIL hand-overs than 1 MiB;
# 4 MiB kept more pages resident and made the tail of a small incremental longer; a table
# restore reads at most this much per page)
MAX_IN_FLIGHT = 3  # batches being sealed or waiting to be appended: bounds memory (their pages stay mapped)
ZERO_LOCATION = bytes(16) + bytes(14)  # pack id, offset, length, slot of a page never written
CHECKSUM_AUTO_BYTES = 256 * 1024 * 1024  # table checksums by default up to this database size
RUN_READERS = 4  # page-map runs fetched at once (a run is one ranged GET of ~20-200 KB)
RUNS_IN_FLIGHT = 8  # runs fetched ahead of the one being used: bounds memory, keeps order
PARENT_CHECKERS = 16  # the parent's pack tails read at once (one small ranged GET each)
LOST = bytes(RECORD.size)  # stands in for a parent record into a lost pack: its hash matches no page
# stands in for a parent record into a sparse pack (see _repack): the same all-zero hash, so the page is
# stored again, densely, in this backup's packs; told apart from LOST only for the stats
REPACK = bytes(16) + b"\xff" * (RECORD.size - 16)
REPACK_BELOW = 0.6  # a parent pack whose page slots the parent uses less than this share of is re-stored
REPACK_BUDGET = 0.25  # at most this share of the parent's pages re-stored per backup for repacking
SMALL_PACK_SLOTS = 1024  # a pack of fewer page slots is small (a full 32 MiB pack of 4 KiB pages holds ~8000)
SMALL_PACKS_MAX = 16  # more small packs under one snapshot than this: the smallest are merged

Progress = Callable[[int, int], None]


@dataclass
class BackupResult:
    manifest: Manifest
    pages_added: int
    bytes_added: int
    seconds: float

    @property
    def chain_note(self) -> str | None:
        """What the backup did about a parent it could not fully reuse (None: nothing to say)."""
        st = self.manifest.stats
        notes = []
        if st.get("skipped_manifests"):
            n = len(st["skipped_manifests"])
            notes.append(f"{n} newer snapshot manifest{'s' if n > 1 else ''} could not be read "
                         f"({', '.join(st['skipped_manifests'])}): run `dbre verify`")
        chain = self._chain_note(st)
        return "; ".join([*notes, chain] if chain else notes) or None

    @staticmethod
    def _chain_note(st: dict[str, Any]) -> str | None:
        missing, repaired = st.get("missing_packs") or [], st.get("repaired_pages", 0)
        if st.get("full"):
            why = st["full"]
            return "full backup (asked): every page stored again" if why == "asked" else \
                f"parent not reused ({why}): every page stored again"
        if missing:
            n = len(missing)
            return f"parent referenced {n} missing or damaged pack{'s' if n > 1 else ''}: {repaired} pages stored again"
        return None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "id": m.id,
            "db": m.db,
            "taken_at": m.taken_at,
            "parent": m.parent,
            "pages": m.page_count,
            "page_size": m.page_size,
            "size": m.size,
            "pages_added": self.pages_added,
            "bytes_added": self.bytes_added,
            "seconds": round(self.seconds, 3),
            "repaired_pages": m.stats.get("repaired_pages", 0),
            "missing_packs": m.stats.get("missing_packs", []),
            "note": self.chain_note,
        }


def read_run(repo: Repository, manifest: Manifest, run: RunRef, size: int = RECORD.size) -> bytes:
    """One run of ``size``-byte entries per page (a page-map run, or a fast run of 16-byte
    hashes), checked: sealed under its name, its length, and its hash."""
    raw = repo.read_blob(run.pack, run.offset, run.length, f"run {run.hash}")
    if len(raw) != run.pages * size:
        raise IntegrityError(f"snapshot {manifest.id}: page-map run {run.hash[:12]} "
                             f"(packs/{run.pack}@{run.offset}) has the wrong length")
    if repo.page_hash(raw).hex() != run.hash:
        raise IntegrityError(f"snapshot {manifest.id}: page-map run {run.hash[:12]} "
                             f"(packs/{run.pack}@{run.offset}) does not match its hash",
                             "run `dbre verify --read-data` to find damage")
    return raw


def _run_bytes(repo: Repository, manifest: Manifest, runs: list[RunRef] | None = None,
               size: int = RECORD.size) -> Iterator[bytes]:
    """The snapshot's runs (page map by default) in order, fetched ``RUN_READERS`` at a time, at
    most ``RUNS_IN_FLIGHT`` ahead."""
    runs = manifest.runs if runs is None else runs
    if len(runs) <= 1:
        for run in runs:
            yield read_run(repo, manifest, run, size)
        return
    pool = ThreadPoolExecutor(max_workers=RUN_READERS, thread_name_prefix="dbre-runs")
    try:
        ahead = [pool.submit(read_run, repo, manifest, run, size) for run in runs[:RUNS_IN_FLIGHT]]
        for nxt in range(RUNS_IN_FLIGHT, len(runs) + RUNS_IN_FLIGHT):
            raw = ahead.pop(0).result()
            if nxt < len(runs):
                ahead.append(pool.submit(read_run, repo, manifest, runs[nxt], size))
            yield raw
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_records(repo: Repository, manifest: Manifest) -> list[bytes]:
    """The page records of a snapshot, in page order (each RECORD.size bytes)."""
    out: list[bytes] = []
    size = RECORD.size
    for raw in _run_bytes(repo, manifest):
        out += [raw[i : i + size] for i in range(0, len(raw), size)]
    return out


def iter_records(repo: Repository, manifest: Manifest) -> Iterator[tuple[bytes, bytes, int, int, int]]:
    """The page records of a snapshot, unpacked: (hash, pack id, offset, length, slot) per page."""
    for raw in _run_bytes(repo, manifest):
        yield from RECORD.iter_unpack(raw)


FAST_HASH = xxhash.xxh3_128_digest  # the quick test of "unchanged at this place" (see Manifest.fast_runs)
NO_HASH = bytes(16)  # the hash of the LOST and REPACK markers: never reused as unchanged
_BLOB = struct.Struct("<16sQI")  # the blob part of a record: pack id, offset, length


class _PageSink:
    """Receives pages from the backup, dedups them against the parent, batches the new ones.

    Each page is first hashed with xxh3 (fast); where that equals the parent's at the same page
    number, the page is unchanged and keeps the parent's record without paying for the keyed
    hash. Every other page gets the keyed hash, which alone decides identity across places and
    snapshots (dedup by hash), so a page crafted to collide with another never takes its place.
    """

    def __init__(self, repo: Repository, writer: PackWriter, parent: list[bytes], page_size: int,
                 page_count: int, progress: Progress | None, parent_fast: list[bytes] | None = None) -> None:
        self.sealer = repo.sealer
        self.page_hash = repo.page_hash
        self.writer = writer
        self.parent = parent
        self.parent_hashes = list(map(itemgetter(slice(0, 16)), parent))
        self.parent_fast = parent_fast if parent_fast is not None and len(parent_fast) == len(parent) else None
        self.fast = bytearray(16 * page_count)  # this snapshot's xxh3 per page (zeros: never written)
        self.parent_by_hash: dict[bytes, bytes] | None = None
        self.page_size = page_size
        self.page_count = page_count
        self.progress = progress
        self.records: list[bytes | tuple[bytes, int, int] | None] = [None] * page_count
        self.new_pages: dict[bytes, tuple[int, int]] = {}
        self.batch: list[bytes | memoryview] = []
        self.batch_hashes: list[bytes] = []
        self.batch_no = 0
        self.batch_cap = max(1, BATCH_BYTES // page_size)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbre-seal")
        self.in_flight: list[tuple[int, list[bytes], Future[bytes], int]] = []  # .., first page index
        self.batch_first = 0  # index of the first page of the open batch
        self.locations: dict[int, bytes] = {}
        self.pages_seen = 0
        self.new_at: list[int] = []  # indexes whose record is (hash, batch, slot) until finish
        # pages stored again for repacking (parent record REPACK) go to packs of their own: they
        # stayed unchanged while their old pack emptied, so packs of them stay dense for longer
        self.store = repo.store
        self.cold: list[bytes | memoryview] = []  # copies: a batch of scattered pages holds no mapping
        self.cold_hashes: list[bytes] = []
        self.cold_no = -1  # their batches are numbered -1, -2, ...
        self.cold_writer: PackWriter | None = None
        self.cold_packs: list[str] = []

    def page(self, offset: int, data: bytes) -> None:
        """One page written by the backup API at byte ``offset`` (the fallback path)."""
        ps = self.page_size
        index = offset // ps
        if len(data) != ps or index * ps != offset:
            raise SourceError(f"backup: unexpected write of {len(data)} bytes at {offset}")
        if index < self.page_count:
            self.add(index, data)

    def feed(self, image: PageImage, chunk: int = 4096) -> None:
        """Every page of a direct image, in order (the fast path: hashed a chunk at a time)."""
        collect = gc.isenabled()
        gc.disable()  # a GiB is ~260k short-lived page views: the cyclic GC would scan for nothing
        try:
            for start in range(0, image.page_count, chunk):
                stop = min(image.page_count, start + chunk)
                if stop == image.page_count:
                    # smaller batches at the end: both threads share the last compressions
                    # instead of one sealing a whole batch while the backup waits for it
                    self.batch_cap = max(16, self.batch_cap // 4)
                fast = image.hashes(start, stop, FAST_HASH)
                self.take(start, self._keyed(start, fast, image.view), image.view)
                # pages no batch still has to read: their mapping can go
                image.drop(min([start, *(f[3] for f in self.in_flight), *([self.batch_first] if self.batch else [])]))
                if self.progress is not None:
                    self.progress(stop, self.page_count)
        finally:
            if collect:
                gc.enable()

    def _keyed(self, start: int, fast: list[bytes], view: Callable[[int], bytes | memoryview]) -> list[bytes]:
        """The keyed hashes of pages ``start..``: the parent's where xxh3 says unchanged, else computed."""
        m = len(fast)
        joined = b"".join(fast)
        keyed = self.page_hash
        if len(joined) != 16 * m:  # (a page the image could not hash): both hashes from the bytes themselves
            pages = [view(start + j) for j in range(m)]
            self.fast[16 * start : 16 * (start + m)] = b"".join(map(FAST_HASH, pages))
            return list(map(keyed, pages))
        self.fast[16 * start : 16 * (start + m)] = joined
        pf, ph = self.parent_fast, self.parent_hashes
        stop = min(start + m, len(ph))
        if pf is None or stop <= start:
            return [keyed(view(start + j)) for j in range(m)]
        # C-level comparisons; Python only for the pages that changed (and the parent's markers)
        out = ph[start:stop] + [NO_HASH] * (start + m - stop)
        todo = set(compress(range(m), map(ne, fast, pf[start:stop])))
        todo.update(compress(range(stop - start), map(eq, out, repeat(NO_HASH, stop - start))))
        todo.update(range(stop - start, m))
        for j in todo:
            out[j] = keyed(view(start + j))
        return out

    def add(self, index: int, data: bytes) -> None:
        self.fast[16 * index : 16 * (index + 1)] = FAST_HASH(data)
        self.take(index, [self.page_hash(data)], lambda _: data)
        if self.progress is not None and not self.pages_seen & 4095:
            self.progress(self.pages_seen, self.page_count)

    def take(self, start: int, hashes: list[bytes], page: Callable[[int], bytes | memoryview]) -> None:
        """Pages ``start .. start+len(hashes)-1`` by their hashes: reference or batch each one;
        ``page(index)`` gives the bytes of a page that has to be stored."""
        stop = start + len(hashes)
        self.pages_seen += len(hashes)
        parent = self.parent
        todo: Iterable[int]
        if stop <= len(parent):
            # pages unchanged since the parent keep its records; only the others are looked at
            self.records[start:stop] = parent[start:stop]
            todo = compress(range(len(hashes)), map(ne, hashes, self.parent_hashes[start:stop]))
        else:
            todo = range(len(hashes))
        records, new_pages, new_at, cap = self.records, self.new_pages, self.new_at, self.batch_cap
        by_hash = self.parent_by_hash
        for j in todo:
            h = hashes[j]
            if parent:
                if by_hash is None:
                    by_hash = self.parent_by_hash = dict(zip(self.parent_hashes, parent, strict=True))
                    by_hash.pop(LOST[:16], None)  # a record into a lost pack is never reused
                moved = by_hash.get(h)
                if moved is not None:  # unchanged, or moved from another place in the file
                    records[start + j] = moved
                    continue
            where = new_pages.get(h)
            if where is None and start + j < len(parent) and parent[start + j] == REPACK:
                where = new_pages[h] = (self.cold_no, len(self.cold_hashes))
                self.cold.append(bytes(page(start + j)))
                self.cold_hashes.append(h)
                if len(self.cold_hashes) >= cap:
                    self._submit(cold=True)
            if where is None:  # new content (a page repeated in this snapshot is stored once)
                batch_hashes = self.batch_hashes
                where = new_pages[h] = (self.batch_no, len(batch_hashes))
                if not batch_hashes:
                    self.batch_first = start + j
                self.batch.append(page(start + j))
                batch_hashes.append(h)
                if len(batch_hashes) >= cap:
                    self._submit()
            records[start + j] = (h, where[0], where[1])
            new_at.append(start + j)

    @property
    def pages_added(self) -> int:
        return len(self.new_pages)

    @property
    def cold_bytes(self) -> int:
        return self.cold_writer.bytes_written if self.cold_writer is not None else 0

    def _submit(self, cold: bool = False) -> None:
        if cold:
            if self.cold_hashes:
                fut = self.pool.submit(self.sealer.seal_parts, self.cold, "page-batch")
                self.in_flight.append((self.cold_no, self.cold_hashes, fut, self.page_count))
                self.cold_no -= 1
                self.cold, self.cold_hashes = [], []
                self._drain(MAX_IN_FLIGHT)
            return
        if not self.batch_hashes:
            return
        fut = self.pool.submit(self.sealer.seal_parts, self.batch, "page-batch")  # pages are read by zstd, not copied
        self.in_flight.append((self.batch_no, self.batch_hashes, fut, self.batch_first))
        self.batch_no += 1
        self.batch = []
        self.batch_hashes = []
        self._drain(MAX_IN_FLIGHT)

    def _drain(self, keep: int) -> None:
        while len(self.in_flight) > keep or (self.in_flight and self.in_flight[0][2].done()):
            no, hashes, fut, _ = self.in_flight.pop(0)
            writer = self.writer
            if no < 0:
                if self.cold_writer is None:
                    self.cold_writer = PackWriter(self.store, self.sealer)
                writer = self.cold_writer
            pack_id, off, length = writer.add(b"d", fut.result(), hashes)
            self.locations[no] = bytes.fromhex(pack_id) + off.to_bytes(8, "little") + length.to_bytes(4, "little")

    def finish(self) -> list[bytes]:
        self._submit()
        self._submit(cold=True)
        self._drain(0)
        self.pool.shutdown()
        if self.cold_writer is not None:
            self.cold_packs = self.cold_writer.finish()
        records = self.records
        for i in self.new_at:
            rec = records[i]
            if isinstance(rec, tuple):  # (a later duplicate may have listed the index again)
                h, no, slot = rec
                records[i] = h + self.locations[no] + slot.to_bytes(2, "little")
        if None in records:
            # pages SQLite never writes (the lock-byte page of a database over 1 GiB)
            zero = self.page_hash(bytes(self.page_size)) + ZERO_LOCATION
            records = [zero if r is None else r for r in records]
        return records  # type: ignore[return-value]

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.cold_writer is not None:
            self.cold_writer.abort()


class _SinkFile:
    def __init__(self, sink: _PageSink | None) -> None:
        self.sink = sink
        self.size = 0
        self.first = b""  # page 1, the only page the pager may read back (to update the header)

    def xRead(self, amount: int, offset: int) -> bytes:
        return self.first[offset : offset + amount]

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.sink is not None and offset:  # page 1 comes from the source itself: see _copy_pages
            self.sink.page(offset, data)
        if offset == 0:
            self.first = data
        end = offset + len(data)
        if end > self.size:
            self.size = end

    def xFileSize(self) -> int:
        return self.size

    def xTruncate(self, newsize: int) -> None:
        self.size = newsize

    def xSync(self, flags: int) -> None:
        pass

    def xClose(self) -> None:
        pass

    def xLock(self, level: int) -> None:
        pass

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return 4096

    def xDeviceCharacteristics(self) -> int:
        return 0


class _SinkVFS(apsw.VFS):
    """A VFS whose main database file hands each written page to a sink; other files vanish."""

    def __init__(self, sink: _PageSink) -> None:
        self.sink = sink
        self.main: _SinkFile | None = None
        self.vfs_name = f"dbre-sink-{secrets.token_hex(6)}"
        super().__init__(self.vfs_name, "")

    def xOpen(self, name: object, flags: list[int]) -> _SinkFile:  # type: ignore[override]
        main = bool(flags[0] & apsw.SQLITE_OPEN_MAIN_DB)
        f = _SinkFile(self.sink if main else None)
        if main:
            self.main = f
        return f

    def xAccess(self, pathname: str, flags: int) -> bool:
        return False

    def xDelete(self, filename: str, syncdir: bool) -> None:
        pass

    def xFullPathname(self, name: str) -> str:
        return name


def _pragma(conn: apsw.Connection, name: str) -> Any:
    row = conn.execute(f"PRAGMA {name}").fetchone()
    return row[0] if row else None


CLOCK_TOLERANCE = 2.0  # seconds this host's clock may differ from the store's before the store's is used


def snapshot_time(lock: Lock) -> datetime:
    """When a snapshot is taken: this host's clock while it agrees with the store's, else the
    store's. The store's clock (``Lock.store_now``: the store's time of this run's newest lock
    write plus the boot-clock time since) is the one every host writing this repository shares,
    but on S3 it has one-second resolution, so while the two agree (NTP) the host's clock gives
    microsecond order between close backups; a host whose clock is off by more than
    ``CLOCK_TOLERANCE`` (plus that resolution) cannot reorder history (newest, parent, ``--at``,
    keep rules): its snapshots take the store's time. Never after the real moment: every commit
    before ``taken_at`` is in the snapshot."""
    host = now_utc()
    store = lock.store_now()  # under-estimates by at most the resolution (1 s) plus one request
    if -CLOCK_TOLERANCE <= host.timestamp() - store <= CLOCK_TOLERANCE + 1.0:
        return host
    log.warning("this host's clock is %.1f s off the repository store's: the snapshot takes the store's time",
                host.timestamp() - store)
    return datetime.fromtimestamp(store, UTC)


def backup(
    repo: Repository,
    source: Source,
    db: str | None = None,
    *,
    checksums: bool | None = None,
    progress: Progress | None = None,
    direct: bool = True,
    full: bool = False,
    replay: Manifest | None = None,
    repack: bool = True,
) -> BackupResult:
    """Take one snapshot of ``source`` into ``repo`` as database ``db`` (default: source.name).

    ``checksums``: record per-table content checksums (True), row counts only (False), or
    checksums when the database is at most ``CHECKSUM_AUTO_BYTES`` (None, the default): the
    checksum pass reads every row in Python, about 1 s per 100 MiB.
    ``direct``: read pages straight from the file and its WAL when the checks of
    `dbre.sources.image` pass (False: always through SQLite's backup API).
    ``full``: reuse nothing of the parent (every page stored again, in new packs): breaks the chain.
    ``replay``: the snapshot of another repository this one reproduces (`dbre migrate`): its time,
    source and file mode are kept, and ``stats.migrated_from`` names it.
    Without it, parent records that point into a missing or damaged pack are not reused either
    (see ``_parent_records``): those pages are stored again and counted in ``stats.repaired_pages``.
    ``repack``: also store again the pages the parent keeps in sparse packs (``_repack``), counted
    in ``stats.repacked_pages``, so prune can free those packs once older snapshots are forgotten.
    """
    db = check_db_name(db or source.name)
    started = time.perf_counter()
    repo.require_writable(f"backup {db}")
    with repo.lock(f"backup {db}") as lock:
        # a damaged manifest must not stop the next backup: the newest readable one is the parent
        # (format 2 reads one manifest, or one more per damaged newer one)
        skipped: list[tuple[str, str]] = []  # newer manifests that could not be read: said in the result
        parent_manifest = repo.newest_snapshot(db, damaged=skipped)
        # read the parent's page map before the read transaction: in rollback mode writers wait
        # records into lost packs are dropped (their pages are stored again); --full drops them all
        parent_records, chain = _parent_records(repo, parent_manifest, full, repack)
        with ExitStack() as stack:
            session = ImageSession(clock=lambda: snapshot_time(lock))  # looked up at call time (tests fake history)
            stack.callback(session.close)  # after the connection: see dbre.sources.image on POSIX locks
            conn = stack.enter_context(source.connect())
            try:
                session.begin(conn)  # the read transaction: everything below sees this one commit
                page_size, page_count = session.page_size, session.page_count
                same_size = parent_manifest is not None and parent_manifest.page_size == page_size
                parent = parent_records if same_size else []
                if checksums is None:
                    checksums = page_size * page_count <= CHECKSUM_AUTO_BYTES
                taken_at = session.started or snapshot_time(lock)  # taken just before BEGIN, never after
                schema = [
                    {"type": r[0], "name": r[1], "tbl_name": r[2], "sql": r[3]}
                    for r in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
                ]
                user_version = int(_pragma(conn, "user_version"))
                encoding = str(_pragma(conn, "encoding"))
                journal_mode = str(_pragma(conn, "journal_mode"))
                writer = PackWriter(repo.store, repo.sealer)
                parent_fast = load_fast_hashes(repo, parent_manifest) if parent else None
                sink = _PageSink(repo, writer, parent, page_size, page_count, progress, parent_fast)
                try:
                    image = session.image() if direct else None
                    if image is not None:
                        sink.feed(image)
                    else:
                        page_one = _copy_pages(conn, sink, session)
                    stats = table_stats(conn, checksums)
                    records = sink.finish()
                    # a sizeable pack of page data starts its fsync now, beside the unmapping and
                    # the page map below (which then goes to a small pack of its own)
                    writer.flush(min_bytes=4 * 1024 * 1024)
                    path = "direct" if image is not None else f"backup API ({session.reason or 'asked'})"
                    wal_pages = len(image.overlay) if image is not None else 0
                    page_one = "source" if image is not None else page_one
                except BaseException:
                    sink.abort()
                    writer.abort()
                    raise
            except apsw.Error as err:
                raise SourceError(f"backup of {db}: {err}", "check that the source is a healthy database") from err
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        try:
            runs = _write_runs(records, parent_manifest, parent, writer, repo, chain.repacked)
            # the parent's fast runs are reused only when they were read back whole (never a damaged one)
            fast_runs = _write_fast_runs(bytes(sink.fast), parent_manifest if sink.parent_fast is not None else None,
                                         writer, repo, {*chain.repacked, *chain.lost})  # never into a lost pack
            packs = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if progress:
            progress(page_count, page_count)
        referenced = set(map(itemgetter(slice(16, 32)), records))
        referenced.discard(bytes(16))
        all_packs = sorted({p.hex() for p in referenced} | {r.pack for r in runs} | {r.pack for r in fast_runs})
        manifest = Manifest(
            id=new_snapshot_id(),
            db=db,
            taken_at=replay.taken_at if replay else iso(taken_at),
            page_size=page_size,
            page_count=page_count,
            runs=runs,
            fast_runs=fast_runs,
            packs=all_packs,
            parent=parent_manifest.id if parent_manifest and chain.unused is None else None,
            tool=TOOL,
            source=replay.source if replay else source.identity(),
            schema=schema,
            tables={k: TableStats(rows=v[0], checksum=v[1]) for k, v in stats.items()},
            user_version=user_version,
            encoding=encoding,
            journal_mode=journal_mode,
            mode=replay.mode if replay else _file_mode(source),
        )
        seconds = time.perf_counter() - started
        manifest.stats = {
            "pages_added": sink.pages_added,
            "bytes_added": writer.bytes_written + sink.cold_bytes,
            "packs_added": len(packs) + len(sink.cold_packs),
            "seconds": round(seconds, 3),
            "read": path,  # how the pages were read (see dbre.sources.image)
            "wal_pages": wal_pages,  # pages taken from WAL frames, not the file (direct path)
            "page1": page_one,  # "source", or "rebuilt header" (backup API path: see ImageSession.page_one)
            "wal": session.wal_position(),  # where in the WAL this snapshot ends (for `dbre replicate`)
        }
        if replay is not None:
            manifest.stats["migrated_from"] = {"id": replay.id, "format": replay.format, "tool": replay.tool,
                                               "parent": replay.parent}
        if skipped:
            manifest.stats["skipped_manifests"] = [key for key, _ in skipped]
        if chain.unused is not None:
            manifest.stats["full"] = chain.unused  # nothing of the parent reused: "asked", or why
        if chain.lost:
            # pages whose parent record pointed into a lost pack, stored again (if still in the file)
            manifest.stats["missing_packs"] = chain.lost
            manifest.stats["repaired_pages"] = parent[:page_count].count(LOST) if parent else 0
        if chain.repacked and parent:
            # pages of the parent's sparse packs stored again (unless changed anyway): see _repack
            manifest.stats["repacked_packs"] = len(chain.repacked)
            manifest.stats["repacked_pages"] = parent[:page_count].count(REPACK)
        # never commit after the lock stopped being refreshed: another host may have pruned meanwhile
        lock.check_alive(f"backup of {db}", hint="run the backup again")
        repo.write_manifest(manifest)
    # bytes_added counts packs (pages and page-map runs), as the manifest's stats do; the manifest
    # itself (a few hundred bytes) is not counted, so `backup --json` and `snapshots` agree
    return BackupResult(manifest, sink.pages_added, writer.bytes_written + sink.cold_bytes, seconds)


@dataclass
class ParentCheck:
    """What of the parent a backup may reuse."""

    lost: list[str]  # packs the parent needs that are missing (or, when checked, damaged)
    unused: str | None = None  # why nothing of the parent is reused: "asked" (--full), or the cause
    repacked: set[str] = field(default_factory=set)  # sparse packs whose pages (some or all) are stored again


def _parent_records(repo: Repository, parent: Manifest | None, full: bool,
                    repack: bool = True) -> tuple[list[bytes], ParentCheck]:
    """The parent's page records to dedup against, each record into a lost pack replaced by LOST
    (whose hash matches no page, so the page is stored again), and with ``repack`` each record into
    a sparse pack chosen by ``_repack`` replaced by REPACK. Nothing is reused with ``full``, or
    when the parent's page map cannot be read or lies in a lost pack. A store error other than
    not-found raises: nothing is concluded from a failed read or listing."""
    if parent is None:
        return [], ParentCheck([])
    if full:
        return [], ParentCheck([], "asked")
    try:
        records = load_records(repo, parent)
    except (IntegrityError, NotFound) as err:
        return [], ParentCheck([], f"its page map cannot be read: {err.message}")
    lost, slots = _lost_packs(repo, parent, records)
    if any(run.pack in lost for run in parent.runs):
        return [], ParentCheck(sorted(lost), "its page map is in a missing or damaged pack")
    if lost:
        gone = {bytes.fromhex(p) for p in lost}
        pack_of = itemgetter(slice(16, 32))
        records = [LOST if pack_of(r) in gone else r for r in records]
    repacked = _repack(records, slots) if repack else set()
    return records, ParentCheck(sorted(lost), repacked=repacked)


def _repack(records: list[bytes], slots: dict[str, int]) -> set[str]:
    """Replace by REPACK, in place, the records into the parent's sparse packs, so their pages are
    stored again densely and prune frees those packs once no kept snapshot uses them.

    A pack is sparse when the page slots the parent's records use in it (distinct blob and slot)
    are fewer than ``REPACK_BELOW`` of the page slots its index lists (``slots``). Sparsest first,
    at most ``REPACK_BUDGET`` of the parent's pages per backup (so an incremental's cost still
    follows change); a pack that does not fit is done in part, in page order, and is sparser still
    at the next backup.

    Pack spread is handled the same way: when the parent's pages lie in more than
    ``SMALL_PACKS_MAX`` small packs (fewer than ``SMALL_PACK_SLOTS`` page slots: what small
    incrementals leave behind, fully live, never sparse), the pages of the smallest are merged into
    a new pack until half that many small packs are left, so the packs a restore and the next
    backup's parent check read stay bounded whatever the history. Returns the packs touched."""
    # (counted with C-level maps: a Python loop per page cost 0.2 s per GiB of every incremental)
    refs = Counter(map(itemgetter(slice(16, 32)), records))  # pack -> records
    small = sorted((slots[p.hex()], p) for p in refs if 0 < slots.get(p.hex(), 0) < SMALL_PACK_SLOTS)
    merge = [p for _, p in small[: len(small) - SMALL_PACKS_MAX // 2]] if len(small) > SMALL_PACKS_MAX else []
    if not merge and not any(n < REPACK_BELOW * slots.get(p.hex(), 0) for p, n in refs.items()):
        return set()  # distinct slots never outnumber records: no pack can be sparse
    live = Counter(map(itemgetter(slice(0, 16)), set(map(itemgetter(slice(16, 46)), records))))  # distinct slots
    sparse = sorted((live[p] / slots[p.hex()], p) for p in live
                    if slots.get(p.hex()) and live[p] < REPACK_BELOW * slots[p.hex()])
    chosen = {p for _, p in sparse}
    sparse += [(1.0, p) for p in merge if p not in chosen]  # after the sparse ones, smallest first
    left = int(REPACK_BUDGET * len(records))
    take: dict[bytes, int] = {}
    for _, pack in sparse:
        if left <= 0:
            break
        take[pack] = min(refs[pack], left)
        left -= take[pack]
    if not take:
        return set()
    for i, r in enumerate(records):
        pack = r[16:32]
        if take.get(pack):
            records[i] = REPACK
            take[pack] -= 1
    return {p.hex() for p in take}


def _lost_packs(repo: Repository, parent: Manifest, records: list[bytes]) -> tuple[set[str], dict[str, int]]:
    """The parent's packs that are missing or whose index does not authenticate, and the number
    of page slots (pages of its 'd' blobs) the index of each other one lists: each pack's tail
    is read, concurrently (about the cost of asking whether it exists, and it checks the index).
    The cost follows the parent's packs, never the repository's: no listing of packs/."""
    packs = set(parent.packs) | {run.pack for run in parent.runs}
    ends = dict.fromkeys(packs, 0)
    for pack, off, length in map(_BLOB.unpack, set(map(itemgetter(slice(16, 44)), records))):  # distinct blobs
        p = pack.hex()
        if p in ends and off + length > ends[p]:
            ends[p] = off + length
    for run in parent.runs:
        ends[run.pack] = max(ends[run.pack], run.offset + run.length)

    def page_slots(pack: str) -> int | None:
        try:
            blobs = read_index_tail(repo.store, repo.sealer, pack, ends[pack])
        except (NotFound, IntegrityError):
            return None  # lost
        return sum(len(b.hashes) for b in blobs if b.kind == b"d")  # any other store error raises

    with ThreadPoolExecutor(max_workers=max(1, min(PARENT_CHECKERS, len(ends))),
                            thread_name_prefix="dbre-parent") as pool:
        found = dict(zip(ends, pool.map(page_slots, ends), strict=True))
    return {p for p, n in found.items() if n is None}, {p: n for p, n in found.items() if n is not None}


def _copy_pages(conn: apsw.Connection, sink: _PageSink, session: ImageSession) -> str:
    """Copy the read transaction through the backup API; page 1 is the source's own (the backup
    API rewrites its header): returns how it was taken (see ``ImageSession.page_one``)."""
    vfs = _SinkVFS(sink)
    try:
        dest = apsw.Connection(f"dbre-sink-{secrets.token_hex(4)}.db", vfs=vfs.vfs_name)
        try:
            dest.execute("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384")
            with dest.backup("main", conn, "main") as b:
                # one step: a stepped backup restarts whenever another connection writes
                b.step(-1)
        finally:
            dest.close()
    finally:
        vfs.unregister()
    if sink.page_count == 0:
        return "source"
    copied = vfs.main.first if vfs.main is not None else b""
    if len(copied) != sink.page_size:
        raise SourceError("backup: the backup API wrote no page 1")
    page, how = session.page_one(copied)
    sink.add(0, page)
    return how


def _file_mode(source: Source) -> int | None:
    file_mode = getattr(source, "file_mode", None)  # a local file's permission bits; None elsewhere
    return file_mode() if callable(file_mode) else None


def load_fast_hashes(repo: Repository, parent: Manifest | None) -> list[bytes] | None:
    """A snapshot's xxh3 per page from its fast runs (None when it has none or they cannot be
    read: then every page gets the keyed hash — in the next backup, as in a first one; in a
    restore, as its check). Each run is checked like a page-map run."""
    if parent is None or not parent.fast_runs:
        return None
    out: list[bytes] = []
    try:
        for raw in _run_bytes(repo, parent, parent.fast_runs, 16):
            out += [raw[i : i + 16] for i in range(0, len(raw), 16)]
    except (IntegrityError, NotFound) as err:
        log.warning("snapshot %s: %s; every page gets the keyed hash", parent.id, err.message)
        return None
    return out if len(out) == parent.page_count else None


def _write_fast_runs(fast: bytes, parent: Manifest | None, writer: PackWriter, repo: Repository,
                     avoid: Collection[str] = ()) -> list[RunRef]:
    """This snapshot's xxh3 per page, in runs of RUN_PAGES stored like page-map runs."""
    step = 16 * RUN_PAGES
    return _store_runs([fast[i : i + step] for i in range(0, len(fast), step)], 16,
                       parent.fast_runs if parent is not None else [], writer, repo, avoid)


def _write_runs(records: list[bytes], parent_manifest: Manifest | None, parent: list[bytes],
                writer: PackWriter, repo: Repository, repacked: Collection[str] = ()) -> list[RunRef]:
    """Group records into runs; a run identical to the parent's at the same place is reused,
    unless it lies in a pack being repacked (which it would keep from being pruned)."""
    return _store_runs([b"".join(records[i : i + RUN_PAGES]) for i in range(0, len(records), RUN_PAGES)],
                       RECORD.size, parent_manifest.runs if parent_manifest and parent else [], writer, repo, repacked)


def _store_runs(raws: list[bytes], size: int, parent_runs: list[RunRef], writer: PackWriter, repo: Repository,
                avoid: Collection[str]) -> list[RunRef]:
    """Store runs (kind "r", sealed as "run <hash>", addressed by their keyed hash like a page); a
    run identical to the parent's at the same place is reused unless its pack is in ``avoid``
    (being repacked, or lost)."""
    runs: list[RunRef] = []
    for i, raw in enumerate(raws):
        h = repo.page_hash(raw).hex()
        if i < len(parent_runs) and parent_runs[i].hash == h and parent_runs[i].pack not in avoid:
            runs.append(parent_runs[i])
            continue
        pack_id, off, length = writer.add(b"r", repo.sealer.seal(raw, f"run {h}"), [bytes.fromhex(h)])
        runs.append(RunRef(hash=h, pack=pack_id, offset=off, length=length, pages=len(raw) // size))
    return runs
