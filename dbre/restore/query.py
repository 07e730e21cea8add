"""Read-only SQL on a past state of a database without restoring it: a SQLite VFS over the repository.

The state is chosen as `restore` chooses it (a snapshot, the newest at or before a time, or a
replicated point: a generation's base snapshot plus its transactions up to the time, exactly). The
database file SQLite sees is a `PageSource`: each page it reads is found through the snapshot's page
map (record -> pack, offset, length of a sealed batch of pages), and only the runs and batches a query
touches are fetched (ranged reads, several in flight when a query reads in file order), unsealed, kept
in a bounded LRU cache, and every page served is checked against its keyed hash. Replicated pages come
from the segments, checked against their hash chain (held in memory; past 256 MiB, in a temporary file
that never has a name). The connection is read-only and immutable (page 1 says rollback journal, so no
-wal or -shm is ever looked for), temp storage is in memory, and an authorizer refuses anything but
reading: nothing is written, beside the query or in the repository, but the repository's shared lock
(its object is gone when the query ends), held while the query runs so prune deletes nothing it reads.
"""

from __future__ import annotations

import bisect
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import apsw
import apsw.ext
import numpy as np

from dbre.errors import IntegrityError, UsageError
from dbre.replicate.segment import to_time
from dbre.repository.backup import BLOB_LOCATION, read_run
from dbre.repository.manifest import RECORD, Manifest, check_db_name, iso, micros
from dbre.repository.repo import Repository, pack_key
from dbre.repository.verify import blob_groups
from dbre.restore.connection import text_as_utf8
from dbre.restore.pitr import PitrPoint, checked_segments, find_point, segment_pages
from dbre.storage import NotFound, Store
from dbre.vfsfile import InProcessFile

CACHE_BYTES = 64 * 1024 * 1024  # unsealed page batches kept (LRU): ~32 batches of 2 MiB
OVERLAY_MEMORY = 256 * 1024 * 1024  # replicated pages held in memory; more go to an unnamed temporary file
RUNS_KEPT = 64  # page-map runs kept (LRU): 64 x 4096 records = 256 Ki pages, 1 GiB of 4 KiB pages, ~12 MB
READERS = 8  # ranged reads in flight at most
READ_AHEAD = 4  # batches fetched ahead once a query reads in file order
SCAN_GAP = 8  # a page read at most this far past the one before continues a scan
_ZERO_PACK = bytes(16)

# What a read-only query may do (SQLite's authorizer codes); everything else is refused. A pragma is
# allowed only to read: the first set without a value, the second with the table or index it looks at.
_ALLOWED = {apsw.SQLITE_SELECT, apsw.SQLITE_READ, apsw.SQLITE_FUNCTION, apsw.SQLITE_RECURSIVE}
_READ_PRAGMAS = {
    "application_id", "auto_vacuum", "collation_list", "compile_options", "data_version", "database_list",
    "encoding", "freelist_count", "function_list", "module_list", "page_count", "page_size", "pragma_list",
    "schema_version", "user_version",
}
_LOOK_PRAGMAS = {
    "foreign_key_check", "foreign_key_list", "index_info", "index_list", "index_xinfo", "integrity_check",
    "quick_check", "table_info", "table_list", "table_xinfo",
}


# -- what was read -------------------------------------------------------------------------------


@dataclass
class FetchStats:
    """What a query read from the store: requests (GETs and ranged GETs), distinct objects, bytes;
    and the pages SQLite was served."""

    requests: int = 0
    bytes: int = 0
    keys: set[str] = field(default_factory=set)
    pages_served: int = 0

    @property
    def objects(self) -> int:
        return len(self.keys)

    def describe(self) -> dict[str, int]:
        return {"objects": self.objects, "requests": self.requests, "bytes_read": self.bytes,
                "pages_served": self.pages_served}


class CountingStore:
    """Any ``Store``, counting what is read from it into ``stats`` (thread-safe); writes pass through."""

    def __init__(self, store: Store, stats: FetchStats) -> None:
        self.store = store
        self.url = store.url
        self.stats = stats
        self._mutex = threading.Lock()

    def _count(self, key: str, data: bytes) -> bytes:
        with self._mutex:
            self.stats.requests += 1
            self.stats.bytes += len(data)
            self.stats.keys.add(key)
        return data

    def get(self, key: str) -> bytes:
        return self._count(key, self.store.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._count(key, self.store.get_range(key, offset, length))

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.store.put(key, data, if_absent=if_absent)  # (the lock's own objects only)

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        return self.store.list(prefix, start_after=start_after, limit=limit)

    def modified(self, key: str) -> float:
        return self.store.modified(key)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)


# -- the state and its pages ---------------------------------------------------------------------


class PageOverlay:
    """The replicated pages of a state (page number from 1 -> bytes, the newest version of each): in
    memory up to ``memory`` bytes, the rest in a temporary file that has no name (created unlinked,
    gone when closed), so a point late in a busy generation does not hold every changed page in RAM."""

    def __init__(self, memory: int | None = None) -> None:
        self.memory = OVERLAY_MEMORY if memory is None else memory
        self._pages: dict[int, bytes] = {}
        self._held = 0
        self._spilled: dict[int, tuple[int, int]] = {}  # page number -> (offset, length) in the file
        self._file: Any = None
        self._end = 0

    def __len__(self) -> int:
        return len(self._pages) + len(self._spilled)

    def update(self, pages: dict[int, bytes]) -> None:
        for pgno, data in pages.items():
            old = self._pages.pop(pgno, None)
            if old is not None:
                self._held -= len(old)
            if self._held + len(data) <= self.memory:
                self._pages[pgno] = data
                self._held += len(data)
                self._spilled.pop(pgno, None)
                continue
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="dbre-sql-")  # (O_TMPFILE: never a name on disk)
            os.pwrite(self._file.fileno(), data, self._end)
            self._spilled[pgno] = (self._end, len(data))
            self._end += len(data)

    def get(self, pgno: int) -> bytes | None:
        data = self._pages.get(pgno)
        if data is not None:
            return data
        where = self._spilled.get(pgno)
        if where is None:
            return None
        return os.pread(self._file.fileno(), where[1], where[0])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class QueryState:
    """The database state a query reads: a snapshot, or a replicated point (its base snapshot and
    the pages of its transactions up to the limit)."""

    db: str
    manifest: Manifest
    point: PitrPoint | None = None
    overlay: PageOverlay = field(default_factory=lambda: PageOverlay())  # the replicated pages
    page_count: int = 0
    transactions: int = 0
    last_txid: int | None = None
    last_committed: str | None = None

    @property
    def size(self) -> int:
        return self.page_count * self.manifest.page_size

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"db": self.db, "snapshot": self.manifest.id, "taken_at": self.manifest.taken_at,
                               "pages": self.page_count, "page_size": self.manifest.page_size, "size": self.size}
        if self.point is not None:
            out.update(generation=self.point.generation.id, segments=len(self.point.segments),
                       transactions=self.transactions, last_txid=self.last_txid,
                       last_committed=self.last_committed)
        return out

    def label(self) -> str:
        m = self.manifest
        if self.point is None:
            return f"{self.db} at snapshot {m.id} (taken {m.taken_at})"
        return (f"{self.db} at snapshot {m.id} + {self.transactions} replicated transactions (last txid "
                f"{self.last_txid}, " + (f"committed {self.last_committed})" if self.last_committed
                                         else "no transaction after the base)"))


def choose_state(repo: Repository, db: str, *, snapshot: str | None = None, at: datetime | None = None,
                 txid: int | None = None) -> QueryState:
    """The state `dbre restore` would restore with the same options: ``snapshot`` (an id prefix, or
    "latest": the newest snapshot), else the replicated state at ``at`` or up to ``txid`` (with neither:
    the newest replicated state) when segments hold it better than a snapshot, else the newest snapshot
    at or before ``at``. Replicated pages are read and chain-checked here (into ``state.overlay``: the
    caller closes it)."""
    if sum(x is not None for x in (snapshot or None, at, txid)) > 1:
        raise UsageError("more than one of --snapshot, --at and --txid was given", "pass one of them")
    check_db_name(db)
    if snapshot:
        m = repo.find_snapshot(db, None if snapshot == "latest" else snapshot)
        return QueryState(db, m, page_count=m.page_count)
    point = find_point(repo, db, at=at, txid=txid)
    if point is None:
        m = repo.find_snapshot(db, at=at)
        return QueryState(db, m, page_count=m.page_count)
    state = QueryState(db, point.base, point, page_count=point.base.page_count)
    limit = micros(at) if at is not None else None
    try:
        for seg in checked_segments(repo, point.generation, point.segments):
            found = segment_pages(seg, point.base.page_size, limit, txid)
            if found is None:
                continue
            pages, applied, last = found
            state.overlay.update(pages)
            state.page_count, state.last_txid = last.page_count, last.txid
            state.last_committed = iso(to_time(last.observed_us))
            state.transactions += applied
    except BaseException:
        state.overlay.close()
        raise
    if state.last_txid is None:
        state.last_txid = point.generation.base_txid
    return state


class PageSource:
    """The pages of one database state, fetched from the repository as they are asked for.

    A page comes from the replicated overlay, else through the snapshot's page map: its run is
    fetched (checked against its hash, kept in an LRU of ``RUNS_KEPT``), then the sealed batch its
    record points at (one ranged read, unsealed, kept in an LRU of ``cache_bytes``), and the page is
    checked against its keyed hash before it is served. When a query misses batches in file order,
    the next ``READ_AHEAD`` batches are fetched meanwhile (``READERS`` reads in flight at most)."""

    def __init__(self, repo: Repository, state: QueryState, stats: FetchStats, *,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.repo = repo
        self.state = state
        self.manifest = state.manifest
        self.page_size = state.manifest.page_size
        self.page_count = state.page_count
        self.stats = stats
        self.cache_bytes = cache_bytes
        self._zero = bytes(self.page_size)
        starts, n = [], 0
        for run in self.manifest.runs:
            starts.append(n)
            n += run.pages
        if n != self.manifest.page_count:
            raise IntegrityError(f"snapshot {self.manifest.id}: page map has {n} pages, manifest says "
                                 f"{self.manifest.page_count}")
        self._run_starts = starts
        self._mutex = threading.Lock()
        self._runs: OrderedDict[int, bytes] = OrderedDict()
        self._batches: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._held = 0
        self._pending: dict[Any, Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="dbre-query")
        self._last_page = -SCAN_GAP - 1  # the page read before (from the page map; none yet)
        self._streak = 0
        self._batch_pages = 1  # the most pages a batch fetched so far held
        self._ahead: set[tuple[str, int, int]] = set()  # batches a read-ahead asked for, not reached yet
        self._orders: dict[int, tuple[list[int], list[tuple[str, int, int]]]] = {}  # see _blob_order

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def settle(self) -> None:
        """Stop every read in flight (a read-ahead the last statement started) and wait for the running ones
        to end: after it, nothing reads the repository until SQLite asks for a page again."""
        with self._mutex:
            pool, self._pool = self._pool, ThreadPoolExecutor(READERS, thread_name_prefix="dbre-query")
        pool.shutdown(wait=True, cancel_futures=True)
        with self._mutex:  # (a cancelled read is started again if its pages are asked for)
            for key in [k for k, fut in self._pending.items() if fut.cancelled()]:
                del self._pending[key]

    # -- reads as SQLite asks ------------------------------------------------------------------

    def read(self, amount: int, offset: int) -> bytes:
        """``amount`` bytes at ``offset`` of the database file (fewer past its end). Page 1's header
        says rollback journal (bytes 18-19 = 1): SQLite then never looks for a -wal or -shm."""
        ps = self.page_size
        first, last = offset // ps, (offset + amount - 1) // ps
        parts = [self.page(p) for p in range(first, min(last, self.page_count - 1) + 1)]
        data = b"".join(parts)[offset - first * ps : offset - first * ps + amount]
        if first == 0 and offset < 20 and data:
            head = bytearray(data)
            for at in (18, 19):
                if offset <= at < offset + len(head):
                    head[at - offset] = 1
            data = bytes(head)
        return data

    def page(self, index: int) -> bytes:
        """Page ``index`` (from 0), checked."""
        with self._mutex:
            self.stats.pages_served += 1
        replicated = self.state.overlay.get(index + 1)
        if replicated is not None:
            return replicated  # (checked against the segment's hash chain when it was opened)
        if index >= self.manifest.page_count:
            return self._zero
        digest, pack, offset, length, slot = self._record(index)
        if pack == _ZERO_PACK and length == 0:
            return self._zero  # a page SQLite never writes (the lock-byte page)
        key = (pack.hex(), offset, length)
        batch = self._batch(key, index)
        ps = self.page_size
        data = batch[slot * ps : (slot + 1) * ps]
        if len(data) != ps or self.repo.page_hash(data) != digest:
            raise IntegrityError(f"{pack_key(key[0])}@{offset}: page {index + 1} of snapshot {self.manifest.id} "
                                 "does not match its hash", "run `dbre verify --read-data`")
        return data

    # -- the page map ----------------------------------------------------------------------------

    def _record(self, index: int) -> tuple[bytes, bytes, int, int, int]:
        at = bisect.bisect_right(self._run_starts, index) - 1
        raw = self._run(at)
        i = index - self._run_starts[at]
        return RECORD.unpack_from(raw, i * RECORD.size)  # type: ignore[return-value]

    def _run(self, at: int, wait: bool = True) -> bytes:
        """Run ``at`` of the page map; without ``wait``, b"" unless it is at hand (its fetch is started)."""
        with self._mutex:
            raw = self._runs.get(at)
            if raw is not None:
                self._runs.move_to_end(at)
                return raw
            fut = self._pending.get(("run", at))
            if fut is None:
                fut = self._pending[("run", at)] = self._pool.submit(self._fetch_run, at)
        if not wait and (not fut.done() or fut.exception() is not None):
            return b""  # (a failed read ahead is not the query's error: the query reads it again if it needs it)
        return fut.result()

    def _fetch_run(self, at: int) -> bytes:
        try:
            run = self.manifest.runs[at]
            raw = self._missing_as_damage(run.pack, lambda: read_run(self.repo, self.manifest, run))
        except BaseException:
            with self._mutex:
                self._pending.pop(("run", at), None)
            raise
        with self._mutex:
            self._runs[at] = raw
            while len(self._runs) > RUNS_KEPT:
                self._runs.popitem(last=False)
            self._pending.pop(("run", at), None)
        return raw

    # -- page batches ----------------------------------------------------------------------------

    def _batch(self, key: tuple[str, int, int], index: int) -> bytes:
        with self._mutex:
            raw = self._batches.get(key)
            # a batch a read-ahead brought: the scan goes on, and the window of batches ahead slides
            streaming = key in self._ahead
            self._ahead.discard(key)
            if raw is not None:
                self._batches.move_to_end(key)
            else:
                fut = self._start(key)
                # in file order: a miss a few pages past the page read before it (what a scan of a table
                # or an index does, leaf after leaf); two such misses in a row start the read-ahead, the
                # few pages a point query reads down a b-tree, far apart, never do
                self._streak = self._streak + 1 if 0 < index - self._last_page <= SCAN_GAP else 0
            self._last_page = index
            ahead = streaming or (raw is None and self._streak >= 2)
        if ahead:
            self._read_ahead(index, key)
        return raw if raw is not None else fut.result()

    def _start(self, key: tuple[str, int, int]) -> Future[bytes]:
        """The fetch of a batch, started if it is not under way (call with the mutex held)."""
        fut = self._pending.get(key)
        if fut is None:
            fut = self._pending[key] = self._pool.submit(self._fetch_batch, key)
        return fut

    def _fetch_batch(self, key: tuple[str, int, int]) -> bytes:
        pack, offset, length = key
        try:
            raw = self._missing_as_damage(pack, lambda: self.repo.read_blob(pack, offset, length, "page-batch"))
        except BaseException:
            with self._mutex:
                self._pending.pop(key, None)
            raise
        with self._mutex:
            self._batches[key] = raw
            self._batch_pages = max(self._batch_pages, len(raw) // self.page_size)
            self._held += len(raw)
            while self._held > self.cache_bytes and len(self._batches) > 1:
                _, old = self._batches.popitem(last=False)
                self._held -= len(old)
            self._pending.pop(key, None)
        return raw

    def _missing_as_damage(self, pack: str, read: Callable[[], bytes]) -> bytes:
        """A pack that is gone is damage to the repository: said as verify says it, not as a store error."""
        try:
            return read()
        except NotFound:
            raise IntegrityError(f"{pack_key(pack)}: missing (snapshot {self.manifest.id} of {self.state.db} needs "
                                 "it)", "run `dbre verify`; restore the pack from the offsite copy") from None

    def _read_ahead(self, index: int, current: tuple[str, int, int]) -> None:
        """Have the ``READ_AHEAD`` batches that come after page ``index`` in file order (by their first
        page) fetched: those not held or under way are started. From the runs at hand only: a run that
        is not is fetched meanwhile, and the scan's next batch reads ahead from it."""
        wanted: list[tuple[str, int, int]] = []
        at = bisect.bisect_right(self._run_starts, index) - 1
        after = index - self._run_starts[at]
        while len(wanted) < READ_AHEAD and at < len(self._run_starts):
            order = self._blob_order(at)
            if order is None:
                break
            firsts, keys = order
            wanted += [k for k in keys[bisect.bisect_right(firsts, after):] if k != current][: READ_AHEAD - len(wanted)]
            at, after = at + 1, -1
        with self._mutex:
            if len(self._ahead) > 4 * READ_AHEAD:
                self._ahead.clear()  # (a scan that stopped: its marks go)
            for key in wanted:
                self._ahead.add(key)
                if key not in self._batches:
                    self._start(key)

    def _blob_order(self, at: int) -> tuple[list[int], list[tuple[str, int, int]]] | None:
        """The batches run ``at`` points into, in the order of their first page (that page's index in
        the run, and the batch); None while the run is not at hand (its fetch is started)."""
        order = self._orders.get(at)
        if order is None:
            raw = self._run(at, wait=False)
            if not raw:
                return None
            groups, _ = blob_groups(np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD.size))
            firsts, keys = [], []
            for where, pages in groups:
                pack, offset, length = BLOB_LOCATION.unpack(where)
                firsts.append(int(pages[0]))
                keys.append((pack.hex(), offset, length))
            order = self._orders[at] = (firsts, keys)
        return order


# -- SQLite over a PageSource --------------------------------------------------------------------


class _StateFile(InProcessFile):
    """The database file SQLite reads: a `PageSource`; it never writes, locks or syncs."""

    def __init__(self, source: PageSource) -> None:
        self.source = source

    def xRead(self, amount: int, offset: int) -> bytes:
        return self.source.read(amount, offset)

    def xWrite(self, data: bytes, offset: int) -> None:
        raise apsw.ReadOnlyError("the database of a query is read-only")

    def xFileSize(self) -> int:
        return self.source.page_count * self.source.page_size

    def xTruncate(self, newsize: int) -> None:
        raise apsw.ReadOnlyError("the database of a query is read-only")

    def xDeviceCharacteristics(self) -> int:
        return apsw.SQLITE_IOCAP_IMMUTABLE  # the file never changes: no locks, no journal looked for


class _StateVFS(apsw.VFS):
    """A VFS whose one database file is a `PageSource`; no other file can be opened (journals, WAL)."""

    def __init__(self, source: PageSource) -> None:
        self.source = source
        self.vfs_name = f"dbre-query-{secrets.token_hex(6)}"
        super().__init__(self.vfs_name, "")

    def xOpen(self, name: object, flags: list[int]) -> _StateFile:  # type: ignore[override]
        if flags[0] & apsw.SQLITE_OPEN_MAIN_DB:
            # (a query opens it once; a row repair also attaches it, read-only, to the live connection)
            return _StateFile(self.source)
        # (temp storage is in memory; ATTACH is refused by the authorizer before it gets here)
        raise apsw.CantOpenError("a query opens no file but its database")

    def xAccess(self, pathname: str, flags: int) -> bool:
        return False

    def xDelete(self, filename: str, syncdir: bool) -> None:
        raise apsw.ReadOnlyError("a query deletes nothing")

    def xFullPathname(self, name: str) -> str:
        return name


def _authorizer(refused: list[str]) -> Callable[..., int]:
    """SQLite's authorizer for a read-only query: reads, functions and pragmas that only read;
    what it refuses is appended to ``refused`` (for the message)."""

    def authorize(op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None) -> int:
        if op in _ALLOWED and not (op == apsw.SQLITE_FUNCTION and (p2 or "").lower() == "load_extension"):
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_PRAGMA:
            name = (p1 or "").lower()
            if (name in _READ_PRAGMAS and p2 is None) or name in _LOOK_PRAGMAS:
                return apsw.SQLITE_OK
            refused.append(f"PRAGMA {name}" + (f" = {p2}" if p2 is not None else ""))
        else:
            what = str(apsw.mapping_authorizer_function.get(op, op)).removeprefix("SQLITE_")
            refused.append(" ".join(w for w in (what, p1) if w))
        return apsw.SQLITE_DENY

    return authorize


@contextmanager
def open_state(repo: Repository, state: QueryState, stats: FetchStats, *,
               cache_bytes: int = CACHE_BYTES) -> Iterator[tuple[apsw.Connection, list[str]]]:
    """A read-only connection to ``state`` (and the list the authorizer appends refusals to)."""
    source = PageSource(repo, state, stats, cache_bytes=cache_bytes)
    vfs = _StateVFS(source)
    conn: apsw.Connection | None = None
    try:
        conn = apsw.Connection(f"file:{state.db}.db?immutable=1",
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI, vfs=vfs.vfs_name)
        conn.execute("PRAGMA temp_store=MEMORY")  # (sorts and temp b-trees: no temp file)
        conn.execute("PRAGMA query_only=1")
        refused: list[str] = []
        conn.authorizer = _authorizer(refused)
        yield conn, refused
    finally:
        if conn is not None:
            conn.close()
        vfs.unregister()
        source.close()


# -- one query -----------------------------------------------------------------------------------


@dataclass
class QueryResult:
    """The answer of one query, the state it was asked of, and what reading it cost."""

    state: QueryState
    columns: list[str]
    rows: list[tuple[Any, ...]]  # (empty when they went to a sink as they came)
    row_count: int
    stats: FetchStats
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {**self.state.describe(), **self.stats.describe(), "rows": self.row_count,
                "seconds": round(self.seconds, 3)}


_WRITE_HINT = "to change the database, restore it with `dbre restore` and change the copy"


def check_statement(conn: apsw.Connection, refused: list[str], sql: str) -> list[str]:
    """Prepare ``sql`` under the read-only authorizer and return its column names; UsageError for a
    statement that is not SQL, not one statement, or not read-only (nothing has run)."""
    refused.clear()
    try:
        info = apsw.ext.query_info(conn, sql)
    except apsw.AuthError:
        what = refused[0] if refused else "a statement that writes"
        raise UsageError(f"sql: refused: {what}: dbre sql only reads", _WRITE_HINT) from None
    except apsw.SQLError as err:
        raise UsageError(f"sql: {err}", "check the statement; `SELECT name FROM sqlite_schema` lists the tables"
                         ) from None
    rest = (info.query_remaining or "").strip().strip(";").strip()
    if rest:
        raise UsageError("sql: more than one statement was given", "run one statement at a time")
    if not info.has_vdbe:
        raise UsageError("sql: no statement was given", 'give one, e.g. "SELECT count(*) FROM sqlite_schema"')
    if not info.is_readonly:
        raise UsageError(f"sql: refused: {sql.strip().split()[0].upper()} writes: dbre sql only reads", _WRITE_HINT)
    return [d[0] for d in info.description]


@dataclass
class QuerySession:
    """A read-only connection to a chosen state, and what reading it has cost so far."""

    conn: apsw.Connection
    refused: list[str]  # what the authorizer refused (for the message)
    state: QueryState
    stats: FetchStats


@contextmanager
def open_query(repo: Repository, db: str, *, snapshot: str | None = None, at: datetime | None = None,
               txid: int | None = None, cache_bytes: int = CACHE_BYTES,
               operation: str = "sql") -> Iterator[QuerySession]:
    """A read-only connection to the state of ``db`` that `restore` would restore with the same
    ``snapshot`` / ``at`` / ``txid``, under the repository's shared lock (held until the block ends; none, with a
    warning, where the repository refuses writes: ``Repository.read_lock``); every read is counted in the
    session's ``stats``. ``operation`` names the run in its lock ("sql", "export")."""
    stats = FetchStats()
    counted = Repository(CountingStore(repo.store, stats), repo.config, repo.sealer, repo.raw_config)
    with counted.read_lock(f"{operation} {db}"):
        state = choose_state(counted, db, snapshot=snapshot, at=at, txid=txid)
        try:
            with open_state(counted, state, stats, cache_bytes=cache_bytes) as (conn, refused):
                yield QuerySession(conn, refused, state, stats)
        finally:
            state.overlay.close()


class PastState:
    """A state of a database held open to be read in place across several calls (a row repair's plan,
    then its apply): the repository's shared lock, the chosen state and its `PageSource` stay until
    ``close()``. ``connect()`` gives a read-only connection to it; ``uri`` names it for an ATTACH on
    another connection opened with SQLITE_OPEN_URI (read-only and immutable: SQLite writes, locks and
    journals nothing for it). Every read is counted in ``stats``; a damaged or missing page raises
    IntegrityError from the statement that reads it. ``lock``: the shared lock held (a caller about to
    write elsewhere from what it reads checks it is still live: ``lock.check_alive``, which an
    ``UnlockedRead`` refuses: a repository that refused the lock would refuse the audit record too)."""

    def __init__(self, repo: Repository, db: str, operation: str, *, snapshot: str | None = None,
                 at: datetime | None = None, txid: int | None = None, cache_bytes: int = CACHE_BYTES) -> None:
        self.stats = FetchStats()
        self.closed = False
        counted = Repository(CountingStore(repo.store, self.stats), repo.config, repo.sealer, repo.raw_config)
        with ExitStack() as stack:
            # (the repository's own: a fallback's too)
            self.lock = stack.enter_context(repo.read_lock(f"{operation} {db}"))
            self.state = choose_state(counted, db, snapshot=snapshot, at=at, txid=txid)
            stack.callback(self.state.overlay.close)
            self.source = PageSource(counted, self.state, self.stats, cache_bytes=cache_bytes)
            stack.callback(self.source.close)
            self._vfs = _StateVFS(self.source)
            stack.callback(self._vfs.unregister)
            self._held = stack.pop_all()

    @property
    def manifest(self) -> Manifest:
        return self.state.manifest

    @property
    def uri(self) -> str:
        return f"file:{quote(self.state.db)}.db?vfs={self._vfs.vfs_name}&immutable=1&mode=ro"

    def connect(self) -> apsw.Connection:
        """A read-only connection to the state (temp storage in memory, query_only); the caller closes it
        before ``close()``."""
        conn = apsw.Connection(self.uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA query_only=1")
        return conn

    def close(self) -> None:
        """Let the state go: its VFS, reader threads, replicated pages, and the shared lock."""
        if not self.closed:
            self.closed = True
            self._held.close()


def query(repo: Repository, db: str, sql: str, *, snapshot: str | None = None, at: datetime | None = None,
          txid: int | None = None, bindings: Any = None, cache_bytes: int = CACHE_BYTES,
          sink: Callable[[list[str], tuple[Any, ...]], None] | None = None) -> QueryResult:
    """Answer ``sql`` (one read-only statement) against the state of ``db`` that `restore` would
    restore with the same ``snapshot`` / ``at`` / ``txid``, reading only what the query touches, under the
    repository's shared lock. Bad or writing SQL raises UsageError before any row is read. With
    ``sink``, each row goes to ``sink(columns, row)`` as it comes and none is kept (a result larger
    than memory)."""
    started = time.perf_counter()
    rows: list[tuple[Any, ...]] = []
    count = 0
    with open_query(repo, db, snapshot=snapshot, at=at, txid=txid, cache_bytes=cache_bytes) as session:
        columns = check_statement(session.conn, session.refused, sql)
        try:
            with text_as_utf8("sql"):
                for row in session.conn.execute(sql, bindings):
                    count += 1
                    if sink is None:
                        rows.append(row)
                    else:
                        sink(columns, row)
        except apsw.BindingsError:
            raise UsageError("sql: the statement has parameters (?, :name) and none were given",
                             "write the values into the statement") from None
        except (apsw.SQLError, apsw.AuthError, apsw.ReadOnlyError, apsw.MismatchError, apsw.RangeError,
                apsw.TooBigError) as err:
            raise UsageError(f"sql: {err}", "check the statement") from None
    return QueryResult(session.state, columns, rows, count, session.stats, time.perf_counter() - started)
