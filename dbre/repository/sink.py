"""The backup's page sink: dedups pages against the parent, seals new ones in batches, and writes
the page map and fast runs run by run as they complete, so memory follows the parent's page map
(46 bytes a page, in one buffer) and not the number of pages this backup sees."""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress
from operator import ne

import numpy as np
import xxhash

from dbre.errors import SourceError
from dbre.repository.entries import Entries
from dbre.repository.hashindex import NO_HASH, ParentIndex, SeenPages
from dbre.repository.manifest import RECORD, RUN_PAGES, RunRef
from dbre.repository.pack import PackWriter
from dbre.repository.repo import Repository
from dbre.sources.image import PageImage

BATCH_BYTES = 2 * 1024 * 1024  # pages are sealed in batches of this size (fewer GIL hand-overs than 1 MiB;
# 4 MiB kept more pages resident and made the tail of a small incremental longer; a table
# restore reads at most this much per page)
MAX_IN_FLIGHT = 3  # batches being sealed or waiting to be appended: bounds memory (their pages stay mapped)
RUNS_APART = 4 * 1024 * 1024  # a backup storing this much page data puts its runs in packs of their own
HELD_RUNS = 1024 * 1024  # (as does one with more than this of new runs: held in memory until then)
MAX_WAITING_RUNS = 8  # complete runs (~260 KB each) waiting for an open batch's location before it is sealed early
ZERO_LOCATION = bytes(16) + bytes(14)  # pack id, offset, length, slot of a page never written
FAST_HASH = xxhash.xxh3_128_digest  # the quick test of "unchanged at this place" (see Manifest.fast_runs)
LOST = bytes(RECORD.size)  # stands in for a parent record into a lost pack: its hash matches no page
# stands in for a parent record into a sparse pack (see backup._repack): the same all-zero hash, so the page
# is stored again, densely, in this backup's packs; told apart from LOST only for the stats
REPACK = bytes(16) + b"\xff" * (RECORD.size - 16)

Progress = Callable[[int, int], None]
_SIZE = RECORD.size


def column(buf: bytes | bytearray, size: int, start: int, width: int) -> np.ndarray:
    """Bytes ``start:start+width`` of every ``size``-byte record in ``buf``, as a numpy view (no
    copy). Its values compare and sort as bytes; read one back with ``value`` (numpy drops
    trailing zero bytes)."""
    if not len(buf):
        return np.empty(0, dtype=f"S{width}")  # (numpy refuses an offset into an empty buffer)
    return np.ndarray((len(buf) // size,), dtype=f"S{width}", buffer=buf, offset=start, strides=(size,))


def value(item: bytes, width: int) -> bytes:
    return bytes(item).ljust(width, b"\0")


def stretches(col: np.ndarray, chunk: int = 1 << 16) -> Iterator[tuple[bytes, int, int]]:
    """(value, start, stop) for each stretch of equal consecutive values of ``col``: a page map
    points into few blobs and packs in long stretches, so this costs a few bytes a page, compared
    ``chunk`` records at a time (numpy copies the strings it compares), not a sort."""
    n = len(col)
    bounds = [0]
    for lo in range(1, n, chunk):
        hi = min(n, lo + chunk)
        bounds += (np.flatnonzero(col[lo:hi] != col[lo - 1 : hi - 1]) + lo).tolist()
    bounds.append(n)
    for start, stop in zip(bounds, bounds[1:], strict=False):
        if stop > start:
            yield col[start], start, stop


@dataclass
class _Run:
    """One run of the new page map while it is being filled: records (46 bytes a page) and xxh3s."""

    first: int  # index of its first page
    records: bytearray
    fast: bytearray
    seen: bytearray  # 1 per page taken
    taken: int = 0
    pending_at: list[int] = field(default_factory=list)  # pages waiting for their batch's location: index in the run
    pending_where: list[int] = field(default_factory=list)  # and where: batch << 16 | slot
    need: int = -1  # the newest page batch its pending pages wait for (batches are placed in order)
    need_cold: int = 0  # the newest cold batch (numbered -1, -2, ...; 0: none)


class PageSink:
    """Receives pages from the backup, dedups them against the parent, batches the new ones.

    Each page is first hashed with xxh3 (fast); where that equals the parent's at the same page
    number, the page is unchanged and keeps the parent's record without paying for the keyed
    hash. Every other page gets the keyed hash, which alone decides identity across places and
    snapshots (dedup by hash), so a page crafted to collide with another never takes its place.
    With ``keyed_same`` (a direct backup with table checksums on and a parent) every page gets the
    keyed hash, and a page is unchanged only when that equals the parent's record too: the table
    checksums' partial sums, kept now or by the next backup, then rest on the keyed hash, not on xxh3.
    A run of the page map (and of the fast hashes) is stored as soon as all its pages are in and
    the batches holding its new pages are placed; one identical to the parent's at the same place
    is reused (unless its pack is in ``avoid_runs`` / ``avoid_fast``).
    """

    def __init__(self, repo: Repository, writer: PackWriter, parent: Entries | None, page_size: int,
                 page_count: int, progress: Progress | None, parent_fast: Entries | None = None, *,
                 parent_runs: Sequence[RunRef] = (), parent_fast_runs: Sequence[RunRef] | None = None,
                 avoid_runs: Collection[str] = (), avoid_fast: Collection[str] = ()) -> None:
        self.repo = repo
        self.sealer = repo.sealer
        self.page_hash = repo.page_hash
        self.writer = writer
        self.parent = parent if parent is not None and len(parent) else None
        self.parent_fast = parent_fast if parent_fast is not None and parent is not None \
            and len(parent_fast) == len(parent) else None
        self.parent_index: ParentIndex | None = None
        self.page_size = page_size
        self.page_count = page_count
        self.progress = progress
        self.parent_runs = list(parent_runs) if self.parent is not None else []
        # the parent's fast runs are reused only when they were read back whole (never a damaged one)
        self.parent_fast_runs = list(parent_fast_runs or ()) if self.parent_fast is not None else []
        self.avoid_runs, self.avoid_fast = set(avoid_runs), set(avoid_fast)
        nruns = -(-page_count // RUN_PAGES)
        self.runs: list[RunRef | None] = [None] * nruns
        self.fast_runs: list[RunRef | None] = [None] * nruns
        self.sum_runs: list[RunRef | None] = []  # (store_sums: the table checksums' page sums)
        self.sums: tuple[bytes | bytearray, int, list[RunRef]] | None = None
        # 1 where a page fed by ``feed`` has the parent's xxh3 at its place (unchanged), else 0
        self.same = bytearray(page_count)
        self.stored = bytearray(nruns)  # 1: the run is stored (or held, see _store_run)
        self.run_writer: PackWriter | None = None  # runs' own packs
        self.held: list[tuple[bytes, str, int, list[RunRef | None], int]] = []  # sealed runs not yet placed
        self.held_bytes = 0
        self.data_bytes = 0  # sealed page batches written so far
        self.open: dict[int, _Run] = {}
        self.packs: set[bytes] = set()  # packs the page map points into
        self.new_pages = SeenPages()
        self.batch: list[bytes | memoryview] = []
        self.batch_hashes: list[bytes] = []
        self.batch_no = 0
        self.batch_cap = max(1, BATCH_BYTES // page_size)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbre-seal")
        self.in_flight: list[tuple[int, list[bytes], Future[bytes], int]] = []  # .., first page index
        self.batch_first = 0  # index of the first page of the open batch that is a view of the mapped file
        self.batch_views = True  # the open batch holds views of the mapped file (else copies)
        self.locations: dict[int, bytes] = {}
        self.pages_seen = 0
        self.buffered: list[bytes] = []  # pages of the fallback path not yet taken (from index buffered_at)
        self.buffered_at = 0
        # pages stored again for repacking (parent record REPACK) go to packs of their own: they
        # stayed unchanged while their old pack emptied, so packs of them stay dense for longer
        self.store = repo.store
        self.cold: list[bytes | memoryview] = []  # copies: a batch of scattered pages holds no mapping
        self.cold_hashes: list[bytes] = []
        self.cold_no = -1  # their batches are numbered -1, -2, ...
        self.cold_writer: PackWriter | None = None
        self.cold_packs: list[str] = []
        # keyed: a page is unchanged only when its keyed hash is the parent's record too, not its
        # xxh3 alone (set by a direct backup with table checksums and a parent)
        self.keyed_same = False

    # -- pages in --------------------------------------------------------------------------

    def page(self, offset: int, data: bytes) -> None:
        """One page written by the backup API at byte ``offset`` (the fallback path)."""
        ps = self.page_size
        index = offset // ps
        if len(data) != ps or index * ps != offset:
            raise SourceError(f"backup: unexpected write of {len(data)} bytes at {offset}")
        if index >= self.page_count:
            return
        if self.buffered and (index != self.buffered_at + len(self.buffered) or not index % RUN_PAGES
                              or len(self.buffered) * self.page_size >= BATCH_BYTES):
            self._flush_buffered()
        if not self.buffered:
            self.buffered_at = index
        self.buffered.append(data)

    def _flush_buffered(self) -> None:
        """The pages the backup API wrote since the last call (consecutive, within one run, at
        most BATCH_BYTES), as one chunk: lookups by hash are per chunk, not per page."""
        if not self.buffered:
            return
        start, pages = self.buffered_at, self.buffered
        self.buffered = []
        run = self._run(start // RUN_PAGES)
        j = start - run.first
        run.fast[16 * j : 16 * (j + len(pages))] = b"".join(map(FAST_HASH, pages))
        self.take(start, list(map(self.page_hash, pages)), pages)
        if self.progress is not None:
            self.progress(self.pages_seen, self.page_count)

    def feed(self, image: PageImage) -> None:
        """Every page of a direct image, in order (the fast path: one run at a time)."""
        collect = gc.isenabled()
        gc.disable()  # a GiB is ~260k short-lived page views: the cyclic GC would scan for nothing
        try:
            for start in range(0, image.page_count, RUN_PAGES):
                stop = min(image.page_count, start + RUN_PAGES)
                if stop == image.page_count:
                    # smaller batches at the end: both threads share the last compressions
                    # instead of one sealing a whole batch while the backup waits for it
                    self.batch_cap = max(16, self.batch_cap // 4)
                views = image.views(start, stop)
                hashes, todo = self._keyed(start, list(map(FAST_HASH, views)), views)
                self.take(start, hashes, views, todo)
                del views
                # pages no batch still has to read: their mapping can go
                image.drop(min([start, *(f[3] for f in self.in_flight),
                                *([self.batch_first] if self.batch and self.batch_views else [])]))
                if self.progress is not None:
                    self.progress(stop, self.page_count)
        finally:
            if collect:
                gc.enable()

    def add(self, index: int, data: bytes) -> None:
        """One page, on its own (page 1 of the fallback path, after the others)."""
        self._flush_buffered()
        run = self._run(index // RUN_PAGES)
        j = index - run.first
        run.fast[16 * j : 16 * (j + 1)] = FAST_HASH(data)
        self.take(index, [self.page_hash(data)], [data])
        if self.progress is not None and not self.pages_seen & 4095:
            self.progress(self.pages_seen, self.page_count)

    def _parent_hashes(self, start: int, stop: int) -> list[bytes]:
        buf = self.parent.buf if self.parent is not None else b""
        return [bytes(buf[i : i + 16]) for i in range(start * _SIZE, stop * _SIZE, _SIZE)]

    def _keyed(self, start: int, fast: list[bytes],
               pages: Sequence[bytes | memoryview]) -> tuple[list[bytes], list[int] | None]:
        """The keyed hashes of pages ``start..`` (one run) that may differ from the parent's at
        their place, and which those are (None: all of them): a page whose xxh3 equals the
        parent's there is unchanged and needs neither. Records the xxh3s in the run. ``pages[j]``
        is page ``start + j``."""
        m = len(fast)
        run = self._run(start // RUN_PAGES)
        joined = b"".join(fast)
        keyed = self.page_hash
        run.fast[: 16 * m] = joined
        pf, parent = self.parent_fast, self.parent
        stop = min(start + m, len(pf) if pf is not None else 0)
        if pf is None or parent is None or stop <= start:
            return list(map(keyed, pages)), None
        # numpy comparisons over the run; Python only for the pages that changed (and the
        # parent's markers, whose hash is all zeros)
        k = stop - start
        now = np.frombuffer(joined, dtype="<u8", count=2 * k).reshape(k, 2)
        before = np.frombuffer(pf.buf, dtype="<u8", count=2 * k, offset=16 * start).reshape(k, 2)
        marks = np.ndarray((k, 2), dtype="<u8", buffer=parent.buf, offset=start * _SIZE, strides=(_SIZE, 8))
        differ = (now != before).any(axis=1)
        if self.keyed_same:
            # every page gets the keyed hash: one whose xxh3 was kept while its bytes changed (a
            # crafted collision) differs from the parent's record and is stored like any change
            hashes = list(map(keyed, pages))
            mine = np.frombuffer(b"".join(hashes[:k]), dtype="<u8", count=2 * k).reshape(k, 2)
            differ |= (mine != marks).any(axis=1)
        self.same[start:stop] = (~differ).view(np.uint8).tobytes()
        todo = np.flatnonzero(differ | ~marks.any(axis=1)).tolist()
        todo += range(k, m)  # pages past the parent's end
        if self.keyed_same:
            return hashes, todo
        hashes = [NO_HASH] * m  # (only the entries in todo are read)
        for j in todo:
            hashes[j] = keyed(pages[j])
        return hashes, todo

    def _run(self, r: int) -> _Run:
        run = self.open.get(r)
        if run is None:
            if self.stored[r]:  # (the backup API writes each page once: never a state)
                raise SourceError(f"backup: page {r * RUN_PAGES + 1}.. written again after its run was stored")
            first = r * RUN_PAGES
            n = min(RUN_PAGES, self.page_count - first)
            records = bytearray(n * _SIZE)
            if self.parent is not None:
                span = self.parent.buf[first * _SIZE : (first + n) * _SIZE]
                records[: len(span)] = span
            run = self.open[r] = _Run(first, records, bytearray(16 * n), bytearray(n))
        return run

    def take(self, start: int, hashes: list[bytes], pages: Sequence[bytes | memoryview],
             maybe: list[int] | None = None) -> None:
        """Pages ``start .. start+len(hashes)-1`` (within one run) by their hashes: reference or batch
        each one; ``pages[j]`` is page ``start + j`` (read only if it has to be stored). ``maybe``:
        the only pages that can differ from the parent's at their place (the others keep its
        record, and their entry in ``hashes`` is not read); None: any of them."""
        m = len(hashes)
        self.pages_seen += m
        run = self._run(start // RUN_PAGES)
        off = start - run.first
        parent = self.parent
        np_ = len(parent) if parent is not None else 0
        if run.seen.count(1, off, off + m) == 0:
            run.taken += m
            run.seen[off : off + m] = b"\x01" * m
        else:  # a page written again (never seen from SQLite, but then the last write wins)
            again = {off + j for j in range(m) if run.seen[off + j]}
            for k in again:  # back to the parent's record, and no longer waiting for a batch
                i = run.first + k
                run.records[k * _SIZE : (k + 1) * _SIZE] = parent.buf[i * _SIZE : (i + 1) * _SIZE] \
                    if parent is not None and i < np_ else bytes(_SIZE)
            kept = [(k, w) for k, w in zip(run.pending_at, run.pending_where, strict=True) if k not in again]
            run.pending_at, run.pending_where = [k for k, _ in kept], [w for _, w in kept]
            run.taken += m - len(again)
            run.seen[off : off + m] = b"\x01" * m
            maybe = None  # (compare every page with the parent's)
        todo: list[int]
        if maybe is not None:
            buf = parent.buf if parent is not None else b""
            todo = [j for j in maybe
                    if start + j >= np_ or buf[(start + j) * _SIZE : (start + j) * _SIZE + 16] != hashes[j]]
        elif start + m <= np_:
            todo = list(compress(range(m), map(ne, hashes, self._parent_hashes(start, start + m))))
        else:
            todo = list(range(m))
        records, cap = run.records, self.batch_cap
        if todo and parent is not None:
            if self.parent_index is None:
                self.parent_index = ParentIndex(parent)
            moved = self.parent_index.find([hashes[j] for j in todo])
            rest = [j for j, mv in zip(todo, moved, strict=True) if mv is None]
            for j, mv in zip(todo, moved, strict=True):
                if mv is not None:  # unchanged, or moved from another place in the file
                    records[(off + j) * _SIZE : (off + j + 1) * _SIZE] = mv
        else:
            rest = todo
        if not rest:
            self._emit_ready()
            return
        rest_hashes = [hashes[j] for j in rest]
        seen = self.new_pages
        recent = seen.recent
        pend_at, pend_where = run.pending_at, run.pending_where
        first_pending = len(pend_where)
        for j, h, where in zip(rest, rest_hashes, seen.find(rest_hashes), strict=True):
            if where is None:
                where = recent.get(h)
            if where is None:  # new content (a page repeated in this snapshot is stored once)
                index = start + j
                seen.count += 1
                if index < np_ and parent is not None \
                        and parent.buf[index * _SIZE : (index + 1) * _SIZE] == REPACK:
                    where = recent[h] = (self.cold_no << 16) | len(self.cold_hashes)
                    self.cold.append(bytes(pages[j]))
                    self.cold_hashes.append(h)
                    if len(self.cold_hashes) >= cap:
                        self._submit(cold=True)
                else:
                    batch_hashes = self.batch_hashes
                    where = recent[h] = (self.batch_no << 16) | len(batch_hashes)
                    if not batch_hashes:
                        self.batch_first, self.batch_views = index, True
                    data = pages[j]
                    if self.batch_views and index - self.batch_first > 4 * len(batch_hashes) + 64:
                        # a sparse batch (an incremental's scattered changes) holds copies, so the
                        # mapping of the pages between them can go (resident memory stays flat)
                        self.batch = [bytes(b) for b in self.batch]
                        self.batch_views = False
                    self.batch.append(data if self.batch_views else bytes(data))
                    batch_hashes.append(h)
                    if len(batch_hashes) >= cap:
                        self._submit()
            pend_at.append(off + j)
            pend_where.append(where)
        # the new records' hashes (their locations follow in _store, once their batches are placed)
        rows = np.frombuffer(records, dtype=np.uint8).reshape(-1, _SIZE)
        rows[np.add(rest, off), :16] = np.frombuffer(b"".join(rest_hashes), dtype=np.uint8).reshape(-1, 16)
        del rows
        nos = np.array(pend_where[first_pending:], dtype=np.int64) >> 16
        if (nos >= 0).any():
            run.need = max(run.need, int(nos.max()))
        if (nos < 0).any():
            run.need_cold = min(run.need_cold, int(nos.min()))
        seen.settle()
        self._emit_ready()

    @property
    def pages_added(self) -> int:
        return len(self.new_pages)

    @property
    def cold_bytes(self) -> int:
        return self.cold_writer.bytes_written if self.cold_writer is not None else 0

    # -- batches ---------------------------------------------------------------------------

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
        self.in_flight.append((self.batch_no, self.batch_hashes, fut,
                               self.batch_first if self.batch_views else self.page_count))
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
            sealed = fut.result()
            self.data_bytes += len(sealed)
            pack_id, off, length = writer.add(b"d", sealed, hashes)
            self.locations[no] = bytes.fromhex(pack_id) + off.to_bytes(8, "little") + length.to_bytes(4, "little")

    # -- runs out --------------------------------------------------------------------------

    def _emit_ready(self, final: bool = False) -> None:
        """Store every run whose pages are all in and whose new pages' batches are placed; when
        too many wait for the open batches, seal those early (memory stays a few runs)."""
        ready = [r for r, run in self.open.items() if final or run.taken == len(run.seen)]
        waiting = [r for r in ready if not self._placed(self.open[r])]
        if len(waiting) > MAX_WAITING_RUNS or (final and waiting):
            self._submit()
            self._submit(cold=True)
            self._drain(0)
        for r in ready:
            run = self.open[r]
            if self._placed(run):
                del self.open[r]
                self._store(r, run)

    def _placed(self, run: _Run) -> bool:
        locations = self.locations
        return (run.need < 0 or run.need in locations) and (run.need_cold == 0 or run.need_cold in locations)

    def _store(self, r: int, run: _Run) -> None:
        records = run.records
        if run.pending_at:  # the new pages' locations, now that their batches are placed
            where = np.array(run.pending_where, dtype=np.int64)
            nos, inverse = np.unique(where >> 16, return_inverse=True)
            places = np.frombuffer(b"".join(self.locations[int(no)] for no in nos), dtype=np.uint8).reshape(-1, 28)
            rows = np.frombuffer(records, dtype=np.uint8).reshape(-1, _SIZE)
            at = np.array(run.pending_at, dtype=np.int64)
            rows[at, 16:44] = places[inverse]
            rows[at, 44:46] = (where & 0xFFFF).astype("<u2").view(np.uint8).reshape(-1, 2)
            del rows
        if run.taken < len(run.seen):  # pages SQLite never writes (the lock-byte page past 1 GiB)
            zero = self.page_hash(bytes(self.page_size)) + ZERO_LOCATION
            for j in range(len(run.seen)):
                if not run.seen[j]:
                    records[j * _SIZE : (j + 1) * _SIZE] = zero
                    run.fast[16 * j : 16 * (j + 1)] = NO_HASH
        raw = bytes(records)
        if np.any(column(raw, _SIZE, 0, 16) == NO_HASH):  # a parent marker (LOST, REPACK) left: a bug, never stored
            raise SourceError(f"backup: run {r} of the page map still holds a marker record")
        self.packs.update(value(p, 16) for p, _, _ in stretches(column(raw, _SIZE, 16, 16)))
        self.stored[r] = 1
        self._store_run(raw, _SIZE, self.parent_runs, r, self.avoid_runs, self.runs)
        self._store_run(bytes(run.fast), 16, self.parent_fast_runs, r, self.avoid_fast, self.fast_runs)

    def _store_run(self, raw: bytes, size: int, parent_runs: list[RunRef], i: int, avoid: Collection[str],
                   out: list[RunRef | None]) -> None:
        """One run (kind "r", sealed as "run <hash>", addressed by its keyed hash like a page) into
        ``out[i]``; one identical to the parent's at the same place is reused unless its pack is in
        ``avoid``. New runs go to packs of their own (a run is reused by later snapshots while the
        pages beside it die, and a lost data pack must not take the page map with it), except in
        a backup that stores less than RUNS_APART of pages and HELD_RUNS of runs: there they join the
        last data pack (one object fewer), held back until the end decides."""
        h = self.page_hash(raw).hex()
        if i < len(parent_runs) and parent_runs[i].hash == h and parent_runs[i].pack not in avoid:
            out[i] = parent_runs[i]
            return
        sealed = self.sealer.seal(raw, f"run {h}")
        if self.run_writer is None and self.data_bytes < RUNS_APART and self.held_bytes < HELD_RUNS:
            self.held.append((sealed, h, len(raw) // size, out, i))
            self.held_bytes += len(sealed)
            return
        if self.run_writer is None:
            self.run_writer = PackWriter(self.store, self.sealer)
            self._place_held(self.run_writer)
        out[i] = self._place(self.run_writer, sealed, h, len(raw) // size)

    @staticmethod
    def _place(writer: PackWriter, sealed: bytes, h: str, pages: int) -> RunRef:
        pack_id, off, length = writer.add(b"r", sealed, [bytes.fromhex(h)])
        return RunRef(hash=h, pack=pack_id, offset=off, length=length, pages=pages)

    def _place_held(self, writer: PackWriter) -> None:
        for sealed, h, pages, out, i in self.held:
            out[i] = self._place(writer, sealed, h, pages)
        self.held, self.held_bytes = [], 0

    @property
    def run_packs(self) -> list[str]:
        return self.run_writer.packs if self.run_writer is not None else []

    @property
    def run_bytes(self) -> int:
        return self.run_writer.bytes_written if self.run_writer is not None else 0

    def store_sums(self, raw: bytes | bytearray, size: int, parent_runs: Sequence[RunRef]) -> None:
        """This snapshot's per-page partial sums of its table checksums (``size``-byte entries, one per
        page) as runs of RUN_PAGES pages beside the fast runs (``sum_runs``); a run identical to the
        parent's at the same place is reused (``parent_runs``: only when read back whole). Stored
        by ``finish``, after the page map's and fast runs."""
        if len(raw) != size * self.page_count:
            raise SourceError("backup: the page sums do not cover the database")  # (a bug, never a state)
        self.sums = (raw, size, list(parent_runs))  # (stored by finish, after the page map's runs)

    def finish(self) -> tuple[list[RunRef], list[RunRef]]:
        """Seal what is left and store the last runs: (page-map runs, fast runs), in page order."""
        self._flush_buffered()
        for r in range(len(self.runs)):
            if not self.stored[r] and r not in self.open:
                self._run(r)  # (a run no page reached: every page of it never written)
        self._emit_ready(final=True)
        if self.sums is not None:
            raw, size, parent_runs = self.sums
            self.sum_runs = [None] * len(self.runs)
            step = RUN_PAGES * size
            for r in range(len(self.runs)):
                self._store_run(bytes(raw[r * step : (r + 1) * step]), size, parent_runs, r, self.avoid_fast,
                                self.sum_runs)
        self.pool.shutdown()
        self._place_held(self.run_writer or self.writer)
        if self.run_writer is not None:
            self.run_writer.finish()
        if self.cold_writer is not None:
            self.cold_packs = self.cold_writer.finish()
        if any(r is None for r in self.runs) or any(r is None for r in self.fast_runs) \
                or any(r is None for r in self.sum_runs):
            raise SourceError("backup: a run of the page map was not stored")  # (a bug, never a state)
        return self.runs, self.fast_runs  # type: ignore[return-value]

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for writer in (self.cold_writer, self.run_writer):
            if writer is not None:
                writer.abort()
