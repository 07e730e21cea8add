"""Repository verification: every snapshot's manifest, page map and pack indexes; optionally every byte.

What verify checks is what a restore checks, so the two agree (docs/FORMAT.md, "Verify"):
- structure (always; reads manifests, runs and the tail of each pack): every manifest opens and
  passes its checks; every page-map run authenticates, has its length and matches its hash; every
  pack a record or run points into is listed by the manifest, exists, and its index authenticates;
  the index lists each run (kind "r", its hash) and each record's blob (kind "d", its offset and
  length) with the record's page hash at the record's slot. `check_locations` is this check for
  one snapshot, and restore runs it before writing anything.
- data (``read_data``): every blob of those packs read and unsealed, every page hashed and compared
  with the index (so with every record that points at it), every run hashed.
Every problem names the snapshots whose restore it makes fail ("db/id").
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dbre.errors import IntegrityError, RepositoryError
from dbre.repository.backup import _BLOB, _run_bytes, read_run
from dbre.repository.entries import Entries
from dbre.repository.manifest import RECORD, Manifest, RunRef
from dbre.repository.pack import BlobInfo, read_pack_tail
from dbre.repository.repo import Repository, pack_key
from dbre.repository.tables import PAGE_SUM
from dbre.storage import NotFound
from dbre.storage.base import ReadRefused

Progress = Callable[[int, int], None]
Index = dict[int, BlobInfo]  # a pack's index: blob offset -> blob
READERS = 16  # pack tails and runs read at once (small ranged GETs: latency-bound, not bandwidth-bound)
READ_SPAN = 16 * 1024 * 1024  # --read-data reads a pack's blobs in ranges of at most this many bytes
MAX_BLOB = 64 * 1024 * 1024  # a blob is a batch of ~2 MiB of pages or a run of ~190 KB: a larger one is not read


@dataclass
class Problem:
    object: str
    detail: str
    snapshots: list[str] = field(default_factory=list)  # "db/id" of every snapshot it breaks


@dataclass
class VerifyReport:
    snapshots: int = 0
    packs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged(self) -> set[str]:
        """Every snapshot ("db/id") some problem breaks: exactly those a restore refuses."""
        return {s for p in self.problems for s in p.snapshots}

    def add(self, obj: str, detail: str, snapshots: Iterable[str]) -> None:
        names = sorted(set(snapshots))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self.problems.append(Problem(obj, f"{detail} (breaks {shown or 'no snapshot'})", names))

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "packs_read": self.packs_read,
            "bytes_read": self.bytes_read,
            "damaged_snapshots": sorted(self.damaged),
            "problems": [{"object": p.object, "detail": p.detail, "snapshots": p.snapshots} for p in self.problems],
        }


# -- the structure check of one location, shared by verify and restore ---------------------------


def run_mismatch(index: Index, run: RunRef) -> str | None:
    """Why the pack index does not list ``run`` where the manifest says it is (None: it does)."""
    b = index.get(run.offset)
    if b is None or b.kind != b"r" or b.length != run.length:
        return f"no page-map run at offset {run.offset} length {run.length} in the pack's index"
    if not b.hashes or b.hashes[0].hex() != run.hash:
        return f"the pack's index lists another run at offset {run.offset}"
    return None


def record_mismatch(index: Index, offset: int, length: int, slot: int, page: bytes) -> str | None:
    """Why the pack index does not hold page hash ``page`` at ``slot`` of the page batch at
    ``offset`` (None: it does)."""
    b = index.get(offset)
    if b is None or b.kind != b"d" or b.length != length:
        return f"no page batch at offset {offset} length {length} in the pack's index"
    if slot >= len(b.hashes) or b.hashes[slot] != page:
        return f"the pack's index has another page at offset {offset} slot {slot}"
    return None


def _read_index(repo: Repository, pack: str, start: int) -> tuple[Index | RepositoryError, bytes]:
    """One pack's index, read from ``start`` (the end of the last blob known in it, or the first
    blob wanted: then those bytes come back too, see ``read_pack_tail``) to the end of the pack; a
    missing or damaged pack gives its error. A failure to read (a store error other than
    not-found) raises: nothing is concluded from it."""
    try:
        tail = read_pack_tail(repo.store, repo.sealer, pack, start)
    except NotFound:
        return IntegrityError(f"{pack_key(pack)}: missing", "run `dbre backup` (it stores the lost pages "
                              "again) and `dbre verify`"), b""
    except IntegrityError as err:
        return err, b""
    except ReadRefused as err:  # (this object only: the store answers; a store-wide failure still raises)
        return _unreadable(pack_key(pack), err), b""
    return {b.offset: b for b in tail.blobs}, tail.data


def _unreadable(key: str, err: ReadRefused) -> IntegrityError:
    """A pack the store refuses to give (a file mode, an object ACL: ``ReadRefused``) while it answers:
    reported like damage, so verify goes on and names every such object (and a restore with --fallback
    takes it from the copy); a transient or store-wide failure (credentials, bucket, TLS, I/O) still
    raises, concluding nothing."""
    return IntegrityError(f"{key}: cannot be read ({err.message})", err.hint or "check its permissions")


def load_indexes(repo: Repository, ends: dict[str, int]) -> dict[str, Index | RepositoryError]:
    """Each pack's index (``_read_index`` from ``ends[pack]``), ``READERS`` at a time, all held at
    once (compactly: 16 bytes per page slot)."""
    return {pack: index for pack, index, _ in each_index(repo, ends)}


def each_index(repo: Repository, starts: dict[str, int]) -> Iterator[tuple[str, Index | RepositoryError, bytes]]:
    """Each pack's index and the bytes before it (``_read_index`` from ``starts[pack]``), in the
    order of ``starts``, ``READERS`` read at once and at most twice that held: memory stays at a
    few indexes however many packs there are."""
    packs = list(starts)
    window = 2 * READERS
    if len(packs) <= 1:
        for p in packs:
            yield (p, *_read_index(repo, p, starts[p]))
        return
    pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="dbre-index")
    try:
        ahead = [pool.submit(_read_index, repo, p, starts[p]) for p in packs[:window]]
        for i, p in enumerate(packs):
            got = ahead.pop(0).result()
            if i + window < len(packs):
                nxt = packs[i + window]
                ahead.append(pool.submit(_read_index, repo, nxt, starts[nxt]))
            yield (p, *got)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(slots=True)
class SnapshotBlob:
    """One page batch a snapshot's page map points into, and the pages it takes from it: page
    numbers (0-based, ascending) and their slots in the batch, as compact arrays."""

    pack: str
    offset: int
    length: int
    pages: array[int] = field(default_factory=lambda: array("I"))
    slots: array[int] = field(default_factory=lambda: array("H"))


@dataclass
class SnapshotPages:
    """Where every page of a snapshot lies, without a Python object per page: its blobs (each
    with arrays of its pages and slots) and the keyed hash of every page in one buffer (16 bytes a
    page, in page order; zeros for a page never written)."""

    blobs: list[SnapshotBlob]
    hashes: Entries
    zero: int  # pages never written (no location): they restore as zeros

    def hash_of(self, page: int) -> bytes:
        return self.hashes.buf[page * 16 : (page + 1) * 16]  # type: ignore[return-value]


def blob_groups(rows: np.ndarray) -> tuple[list[tuple[bytes, np.ndarray]], int]:
    """The blobs one run's records (``rows``: n x 46 bytes) point into, in the order of their first
    record: (pack id + offset + length as 28 bytes, the indexes of its records, ascending); and how
    many records are pages never written (see backup.ZERO_LOCATION), which point nowhere."""
    written = np.flatnonzero(rows[:, 16:32].any(axis=1) | rows[:, 40:44].any(axis=1))
    if not len(written):
        return [], len(rows)
    where = np.ascontiguousarray(rows[written, 16:44]).view(f"V{_BLOB.size}").ravel()
    keys, first, inverse = np.unique(where, return_index=True, return_inverse=True)
    order = written[np.argsort(inverse, kind="stable")]  # each blob's records together, in order
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(keys)))])
    return ([(keys[u].tobytes(), order[bounds[u] : bounds[u + 1]]) for u in np.argsort(first, kind="stable").tolist()],
            len(rows) - len(written))


def snapshot_blobs(repo: Repository, manifest: Manifest) -> SnapshotPages:
    """The blobs a snapshot's page map points into, each with its pages; IntegrityError when the
    page map's length is not the manifest's. A blob is one (pack, offset, length): a record that
    names another length for a known offset makes a blob of its own, which the index check refuses.
    Grouped run by run with numpy (no Python step per page); blobs in the order of their first page."""
    blobs: dict[bytes, SnapshotBlob] = {}
    hashes = bytearray(16 * manifest.page_count)
    zero = n = 0
    for raw in _run_bytes(repo, manifest):
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD.size)
        k = len(rows)
        if n + k > manifest.page_count:
            raise IntegrityError(f"snapshot {manifest.id}: page map has more pages than the manifest's "
                                 f"{manifest.page_count}")
        hashes[16 * n : 16 * (n + k)] = rows[:, :16].tobytes()
        groups, never = blob_groups(rows)
        zero += never
        slots = np.ascontiguousarray(rows[:, 44:46]).view("<u2").ravel()
        for key, at in groups:
            blob = blobs.get(key)
            if blob is None:
                pack, off, length = _BLOB.unpack(key)
                blob = blobs[key] = SnapshotBlob(pack.hex(), off, length)
            blob.pages.frombytes((at + n).astype("<u4").tobytes())
            blob.slots.frombytes(slots[at].tobytes())
        n += k
    if n != manifest.page_count:
        raise IntegrityError(f"snapshot {manifest.id}: page map has {n} pages, manifest says {manifest.page_count}")
    return SnapshotPages(list(blobs.values()), Entries(hashes, 16), zero)


def check_structure(repo: Repository, manifest: Manifest) -> SnapshotPages:
    """Raise unless one snapshot's structure holds, as restore checks it before writing (verify's
    structure check): its runs read back, and every pack they point into is listed, present, and
    its index holds each page where the page map says. Page batches are not read. Returns the
    snapshot's pages (``snapshot_blobs``)."""
    pages = snapshot_blobs(repo, manifest)
    check_locations(repo, manifest, pages)
    return pages


KEEP_SPAN = 512 * 1024  # a pack whose blobs a snapshot uses lie within this is read with its index in one request
KEEP_BYTES = 16 * 1024 * 1024  # at most this many such bytes are kept for the restore that asked


def check_locations(repo: Repository, manifest: Manifest, pages: SnapshotPages,
                    keep: dict[str, tuple[int, bytes]] | None = None) -> None:
    """Raise IntegrityError unless the structure of one snapshot holds (verify's check): every pack
    its runs and blobs point into is listed by the manifest, exists, and its index lists each run
    and each page where it is said to be. Pack indexes are read ``READERS`` at a time and each is
    checked and dropped as it arrives, so memory does not follow the number of packs.

    With ``keep``, a pack whose blobs used here lie within ``KEEP_SPAN`` is read from its first
    such blob, so the one request that brings its index brings them too: ``keep[pack]`` = (offset,
    bytes), up to ``KEEP_BYTES`` in all (a restore of a snapshot spread over many small packs then
    makes one request per pack, not two). Those bytes are not checked here: the reader unseals
    each blob and checks its pages."""
    ends: dict[str, int] = defaultdict(int)
    firsts: dict[str, int] = {}
    by_pack: dict[str, list[SnapshotBlob]] = defaultdict(list)
    for b in pages.blobs:
        ends[b.pack] = max(ends[b.pack], b.offset + b.length)
        firsts[b.pack] = min(firsts.get(b.pack, b.offset), b.offset)
        by_pack[b.pack].append(b)
    runs_in: dict[str, list[RunRef]] = defaultdict(list)
    for run in manifest.runs:
        ends[run.pack] = max(ends[run.pack], run.offset + run.length)
        runs_in[run.pack].append(run)
    listed = set(manifest.packs)
    for pack in ends:
        if pack not in listed:
            raise IntegrityError(f"snapshot {manifest.id}: page map points into {pack_key(pack)}, "
                                 "which the manifest does not list", "run `dbre verify`")
    starts = dict(ends)
    budget = KEEP_BYTES if keep is not None else 0
    for pack, first in firsts.items():
        if ends[pack] - first <= min(KEEP_SPAN, budget):
            starts[pack] = first
            budget -= ends[pack] - first
    for pack, index, data in each_index(repo, starts):
        if isinstance(index, RepositoryError):
            raise index
        for run in runs_in[pack]:
            why = run_mismatch(index, run)
            if why:
                raise IntegrityError(f"{pack_key(run.pack)}: {why}", "run `dbre verify`")
        for blob in by_pack[pack]:
            check_blob_pages(index, blob, pages, manifest)
        if keep is not None and starts[pack] < ends[pack] and len(data) >= ends[pack] - starts[pack]:
            keep[pack] = (starts[pack], data[: ends[pack] - starts[pack]])


def check_blob_pages(index: Index, blob: SnapshotBlob, pages: SnapshotPages, manifest: Manifest) -> None:
    """Raise IntegrityError unless ``index`` lists ``blob`` with each of its pages' keyed hash at
    its slot. One comparison of two buffers for a blob whose pages and slots both follow each other
    (what a full backup writes); one numpy comparison of the gathered hashes otherwise."""
    b = index.get(blob.offset)
    n = len(blob.pages)
    bad: list[int] = list(range(n))  # the pages to explain (the first that fails is named)
    if b is not None and b.kind == b"d" and b.length == blob.length and isinstance(b.hashes, Entries) and n:
        first, slot = blob.pages[0], blob.slots[0]
        if (blob.pages[-1] - first == n - 1 and slot + n <= len(b.hashes)
                and blob.slots == array("H", range(slot, slot + n))):
            if pages.hashes.span(first, first + n) == b.hashes.span(slot, slot + n):
                return
        slots = np.frombuffer(blob.slots, dtype="<u2").astype(np.int64)
        listed = np.frombuffer(b.hashes.buf, dtype=np.uint8).reshape(-1, 16)
        wanted = np.frombuffer(pages.hashes.buf, dtype=np.uint8).reshape(-1, 16)
        inside = slots < len(listed)
        differs = ~inside
        at = np.flatnonzero(inside)
        differs[at] = (listed[slots[at]] != wanted[np.frombuffer(blob.pages, dtype="<u4")[at]]).any(axis=1)
        bad = np.flatnonzero(differs).tolist()
    for i in bad:
        page, slot = blob.pages[i], blob.slots[i]
        why = record_mismatch(index, blob.offset, blob.length, slot, pages.hash_of(page))
        if why:
            raise IntegrityError(f"{pack_key(blob.pack)}: {why} (page {page + 1} of snapshot {manifest.id})",
                                 "run `dbre verify`")
    if bad and b is not None and b.kind == b"d" and b.length == blob.length and isinstance(b.hashes, Entries):
        raise IntegrityError(f"{pack_key(blob.pack)}: the pack's index disagrees with snapshot {manifest.id} "
                             f"at offset {blob.offset}", "run `dbre verify`")  # (numpy and bytes disagree: never)


# -- verify -------------------------------------------------------------------------------------


RunKey = tuple[str, int, int, str, int]  # pack, offset, length, hash, pages
_FAST_NOTE = "no restore needs it: the next backup and restore hash every page with the keyed hash instead"
_SUM_NOTE = "no restore needs it: the next backup reads every table's rows for its checksums instead"


def _run_key(run: RunRef) -> RunKey:
    return (run.pack, run.offset, run.length, run.hash, run.pages)


def verify(repo: Repository, db: str | None = None, *, read_data: bool = False,
           progress: Progress | None = None, packs_filter: Callable[[str], bool] | None = None) -> VerifyReport:
    """Check the snapshots (of ``db``); with ``read_data`` read and check every pack they use.

    ``packs_filter(pack_id)`` limits ``read_data`` to the packs it accepts (a rotating subset, see
    ``dbre.validate.subset``); the structure is always checked in full. Under the repository's shared
    lock (``read_lock``): a prune waits for it, or is refused, instead of removing a pack it is about to
    read (a false "not found")."""
    with repo.read_lock("verify"):
        return _verify(repo, db, read_data=read_data, progress=progress, packs_filter=packs_filter)


def _verify(repo: Repository, db: str | None, *, read_data: bool, progress: Progress | None,
            packs_filter: Callable[[str], bool] | None) -> VerifyReport:
    report = VerifyReport()
    # 1. manifests; the runs they use, each read once however many snapshots share it
    users: dict[RunKey, set[str]] = defaultdict(set)
    by_run: dict[RunKey, tuple[RunRef, Manifest]] = {}
    # fast runs (xxh3 per page, read only by the next backup): damage breaks no restore, but is reported
    fast_users: dict[RunKey, set[str]] = defaultdict(set)
    by_fast: dict[RunKey, tuple[RunRef, Manifest]] = {}
    sum_users: dict[RunKey, set[str]] = defaultdict(set)  # (the table checksums' page sums: hints too)
    by_sum: dict[RunKey, tuple[RunRef, Manifest]] = {}
    listed_by: dict[str, set[str]] = {}  # snapshot -> the packs its manifest lists
    for ref in sorted(repo.list_snapshot_refs(db), key=lambda r: r.key):
        name = f"{ref.db}/{ref.id}"
        try:
            manifest = repo.load_ref(ref)
        except RepositoryError as err:
            report.add(ref.key, f"cannot read manifest: {err.message}", [name])
            continue
        report.snapshots += 1
        if sum(r.pages for r in manifest.runs) != manifest.page_count:
            report.add(ref.key, f"page map has {sum(r.pages for r in manifest.runs)} pages, "
                                f"manifest says {manifest.page_count}", [name])
        listed = listed_by[name] = set(manifest.packs)
        for run in manifest.runs:
            key = _run_key(run)
            users[key].add(name)
            by_run.setdefault(key, (run, manifest))
            if run.pack not in listed:
                report.add(ref.key, f"page-map run in {pack_key(run.pack)}, which the manifest does not list", [name])
        if manifest.fast_runs and sum(r.pages for r in manifest.fast_runs) != manifest.page_count:
            report.add(ref.key, f"fast runs cover {sum(r.pages for r in manifest.fast_runs)} pages, manifest says "
                                f"{manifest.page_count} ({_FAST_NOTE})", [])
        # the hints (fast runs, page sums): a problem there breaks no snapshot
        for hint_runs, hint_users, by_hint, what, note in (
                (manifest.fast_runs, fast_users, by_fast, "fast run", _FAST_NOTE),
                (manifest.sum_runs, sum_users, by_sum, "page-sum run", _SUM_NOTE)):
            for run in hint_runs:
                key = _run_key(run)
                hint_users[key].add(name)
                by_hint.setdefault(key, (run, manifest))
                if run.pack not in listed:
                    report.add(ref.key, f"{what} in {pack_key(run.pack)}, which the manifest does not list ({note})",
                               [])
    runs = _read_runs(repo, by_run, users, report)
    _read_runs(repo, by_fast, fast_users, report, size=16)
    _read_runs(repo, by_sum, sum_users, report, size=PAGE_SUM.size)

    # 2. which snapshots use each pack, how far into it; records outside their manifest's packs
    ends: dict[str, int] = defaultdict(int)
    pack_users: dict[str, set[str]] = defaultdict(set)
    for key in users:
        ends[key[0]] = max(ends[key[0]], key[1] + key[2])
        pack_users[key[0]] |= users[key]
    for key in (*fast_users, *sum_users):
        ends[key[0]] = max(ends[key[0]], key[1] + key[2])
    groups: dict[RunKey, list[tuple[bytes, np.ndarray]]] = {}
    for key, raw in runs.items():
        packs_here: dict[bytes, int] = {}
        groups[key] = blob_groups(np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD.size))[0]
        for where, _ in groups[key]:
            pack, off, length = _BLOB.unpack(where)
            if packs_here.get(pack, -1) < off + length:
                packs_here[pack] = off + length
        for pack_b, end in packs_here.items():
            pack = pack_b.hex()
            ends[pack] = max(ends[pack], end)
            pack_users[pack] |= users[key]
            outside = [n for n in users[key] if pack not in listed_by[n]]
            if outside:
                report.add(pack_key(pack), "page map points into this pack, which the manifest does not list", outside)
    report.packs = len(ends)

    # 3. every pack's index (its tail), every run and record against it
    indexes = load_indexes(repo, ends)
    for pack, idx in sorted(indexes.items()):
        if isinstance(idx, RepositoryError):
            report.add(pack_key(pack), idx.message.removeprefix(f"{pack_key(pack)}: "), pack_users[pack])
    for key in users:
        idx = indexes[key[0]]
        if isinstance(idx, dict):
            why = run_mismatch(idx, by_run[key][0])
            if why:
                report.add(pack_key(key[0]), why, users[key])
    for hint_users, by_hint, what, note in ((fast_users, by_fast, "fast run", _FAST_NOTE),
                                            (sum_users, by_sum, "page-sum run", _SUM_NOTE)):
        for key in hint_users:
            idx = indexes[key[0]]
            why = run_mismatch(idx, by_hint[key][0]) if isinstance(idx, dict) else None
            if why:
                report.add(pack_key(key[0]), f"{what}: {why} ({note}; used by "
                                             f"{', '.join(sorted(hint_users[key])[:3])})", [])
    for key, raw in runs.items():
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD.size)
        bad: dict[str, list[str]] = defaultdict(list)
        for where, at in groups[key]:
            pack_b, off, length = _BLOB.unpack(where)
            idx = indexes[pack_b.hex()]
            if isinstance(idx, dict):
                for i in _mismatched(idx, off, length, rows, at):
                    h, _, _, _, slot = RECORD.unpack(rows[i].tobytes())
                    why = record_mismatch(idx, off, length, slot, h)
                    if why:
                        bad[pack_b.hex()].append(f"record {i} of run {key[3][:12]}: {why}")
        for pack, whys in bad.items():
            more = f" and {len(whys) - 1} more" if len(whys) > 1 else ""
            report.add(pack_key(pack), whys[0] + more, users[key])

    # 4. every byte of the packs asked for
    if read_data:
        targets = sorted(p for p, idx in indexes.items()
                         if isinstance(idx, dict) and (packs_filter is None or packs_filter(p)))
        damaged: dict[tuple[str, int], set[int] | None] = {}  # (pack, blob offset) -> bad slots (None: all)
        for i, pack in enumerate(targets):
            _read_pack(repo, pack, indexes[pack], damaged, report)  # type: ignore[arg-type]
            if progress:
                progress(i + 1, len(targets))
        if damaged:
            _attribute(damaged, users, runs, report)
    return report


def _mismatched(index: Index, offset: int, length: int, rows: np.ndarray, at: np.ndarray) -> list[int]:
    """The records ``rows[at]`` (all pointing at the blob ``offset``/``length``) whose page hash the
    index does not list at their slot: all of them when it lists no such blob."""
    b = index.get(offset)
    if b is None or b.kind != b"d" or b.length != length or not isinstance(b.hashes, Entries):
        return at.tolist()
    listed = np.frombuffer(b.hashes.buf, dtype=np.uint8).reshape(-1, 16)
    slots = np.ascontiguousarray(rows[at, 44:46]).view("<u2").ravel().astype(np.int64)
    inside = slots < len(listed)
    differs = ~inside
    ok = np.flatnonzero(inside)
    differs[ok] = (listed[slots[ok]] != rows[at[ok], :16]).any(axis=1)
    return at[differs].tolist()


def _read_runs(repo: Repository, by_run: dict[RunKey, tuple[RunRef, Manifest]], users: dict[RunKey, set[str]],
               report: VerifyReport, size: int = RECORD.size) -> dict[RunKey, bytes]:
    """Every run that reads back whole (sealed under its name, its length, its hash), by key. Fast
    runs (``size`` 16) are reported as breaking no snapshot: a backup that cannot read its parent's
    reads every page again."""

    def one(key: RunKey) -> bytes | RepositoryError:
        run, manifest = by_run[key]
        try:
            return read_run(repo, manifest, run, size)
        except NotFound:
            return IntegrityError(f"{pack_key(run.pack)} is missing")
        except IntegrityError as err:
            return err
        except ReadRefused as err:
            return _unreadable(pack_key(run.pack), err)

    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="dbre-runs") as pool:
        got = dict(zip(by_run, pool.map(one, by_run), strict=True))
    out = {}
    for key, raw in got.items():
        if isinstance(raw, RepositoryError) and size != RECORD.size:
            what, note = ("fast run", _FAST_NOTE) if size == 16 else ("page-sum run", _SUM_NOTE)
            report.add(f"{pack_key(key[0])}@{key[1]}", f"cannot read {what}: {raw.message} ({note}; used by "
                       f"{', '.join(sorted(users[key])[:3])})", [])
        elif isinstance(raw, RepositoryError):
            report.add(f"{pack_key(key[0])}@{key[1]}", f"cannot read page-map run: {raw.message}", users[key])
        else:
            out[key] = raw
    return out


def _read_pack(repo: Repository, pack: str, index: Index, damaged: dict[tuple[str, int], set[int] | None],
               report: VerifyReport) -> None:
    """Read every blob of one pack, in ranged reads of at most ``READ_SPAN`` bytes (memory stays at
    one span, whatever the pack's size), and check each against its index; damage goes to ``damaged``."""
    key = pack_key(pack)
    report.packs_read += 1
    page_hash = repo.page_hash
    spans: list[list[BlobInfo]] = []
    for b in sorted(index.values(), key=lambda b: b.offset):
        if b.length > MAX_BLOB:
            damaged[(pack, b.offset)] = None  # never written by dbre: not read
        elif spans and b.offset + b.length - spans[-1][0].offset <= READ_SPAN:
            spans[-1].append(b)
        else:
            spans.append([b])
    for span in spans:
        start = span[0].offset
        data = repo.store.get_range(key, start, max(b.offset + b.length for b in span) - start)  # a failure raises
        report.bytes_read += len(data)
        for b in span:
            _check_blob(repo, pack, b, data[b.offset - start : b.offset - start + b.length], page_hash, damaged)


def _check_blob(repo: Repository, pack: str, b: BlobInfo, sealed: bytes, page_hash: Callable[[bytes], bytes],
                damaged: dict[tuple[str, int], set[int] | None]) -> None:
    """Open one blob and compare its pages (or the run) with the index's hashes."""
    key = pack_key(pack)
    name = "page-batch" if b.kind == b"d" else f"run {b.hashes[0].hex() if b.hashes else ''}"
    try:
        raw = repo.sealer.unseal(sealed, name, where=f"{key}@{b.offset}")
    except IntegrityError:
        damaged[(pack, b.offset)] = None
        return
    if b.kind == b"r":
        if not b.hashes or page_hash(raw) != b.hashes[0]:
            damaged[(pack, b.offset)] = None
        return
    n = len(b.hashes)
    ps = len(raw) // n if n else 0
    if not n or ps * n != len(raw):
        damaged[(pack, b.offset)] = None
        return
    bad = {slot for slot, h in enumerate(b.hashes) if page_hash(raw[slot * ps : (slot + 1) * ps]) != h}
    if bad:
        damaged[(pack, b.offset)] = bad


def _attribute(damaged: dict[tuple[str, int], set[int] | None], users: dict[RunKey, set[str]],
               runs: dict[RunKey, bytes], report: VerifyReport) -> None:
    """One problem per damaged blob, naming the snapshots whose runs or records use it."""
    hit: dict[tuple[str, int], set[str]] = defaultdict(set)
    for key in users:
        if (key[0], key[1]) in damaged:
            hit[(key[0], key[1])] |= users[key]
    wanted = {bytes.fromhex(p) for p, _ in damaged}
    for key, raw in runs.items():
        for _, pack, off, _, slot in RECORD.iter_unpack(raw):
            if pack in wanted:
                where = (pack.hex(), off)
                if where in damaged:
                    slots = damaged[where]
                    if slots is None or slot in slots:
                        hit[where] |= users[key]
    for (pack, off), slots in sorted(damaged.items()):
        what = "does not authenticate or match its hash" if slots is None else \
            f"has {len(slots)} page(s) that do not match their hash (slots {sorted(slots)[:5]})"
        report.add(f"{pack_key(pack)}@{off}", f"blob {what}", hit.get((pack, off), ()))
