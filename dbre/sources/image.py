"""Read one committed transaction's pages straight from a SQLite file and its WAL (the fast backup path).

SQLite's backup API hands a copy over one page at a time through a VFS callback: 6-7 s per GiB
here, most of it per-page overhead. This module instead maps the database file read-only (and, in
WAL mode, reads the pages the WAL holds newer copies of) and serves the pages of exactly the
transaction that the caller's read transaction sees, for the engine to hash in bulk. The WAL is
read, never mapped: a file truncated by something other than SQLite (`: > app.db-wal`) would kill
a process touching its map past the new end (SIGBUS); a read comes back short, and the backup
stops with one line. The caller still holds its read transaction for
the whole copy; that read transaction is what keeps the mapped bytes stable:

Rollback-journal mode. The read transaction holds a SHARED lock, and no writer changes the
database file while any SHARED lock is held. The first ``page_count`` pages of the file are the
snapshot.

WAL mode. The snapshot is the database file overlaid with the newest copy of each page among
WAL frames ``1..mxFrame``. To learn ``mxFrame`` exactly, a second connection takes the write lock
(``BEGIN IMMEDIATE``, so no commit can land), the caller's read transaction starts, the wal-index
header is read from the -shm file, and the frame headers are indexed; then the write lock is
released (writers waited for a few milliseconds). While the read transaction stays open:
- no checkpoint copies frames past its read mark into the database file, and every frame it may
  copy is part of the snapshot (and overlaid from the WAL anyway);
- the WAL is not restarted (its frames are not overwritten) because the reader holds a read-mark
  slot >= 1 whenever the WAL has frames not yet checkpointed; when every frame is already
  checkpointed (``nBackfill == mxFrame``) the file alone is the snapshot and the WAL is not read.
Every precondition is checked (wal-index header copies and checksum, WAL magic, page size, salts,
the last frame's checksum against the wal-index, the commit frame's page count against the
reader's); when one fails, or the write lock cannot be had within ``LOCK_WAIT`` seconds, the
caller gets ``None`` and uses the backup API instead, which is slower but needs none of this.

POSIX file locks belong to the process, and closing *any* descriptor of a file drops all of the
process's locks on it, including those of the caller's SQLite connection (its read lock on the
-shm file, its shared lock on the database file) and of any other backup of the same database
on another thread. So every descriptor is taken through a ``dbre.sources.pins.Pin``: it stays
open until ``ImageSession.close`` (which the caller runs after its connection is closed) and,
beyond that, until no other pin of the same database is left in the process.
"""

from __future__ import annotations

import mmap
import os
import struct
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import apsw

from dbre.errors import SourceError
from dbre.sources.filemap import FileMap
from dbre.sources.pins import Pin

LOCK_WAIT = 2.0  # seconds to wait for the write lock before falling back to the backup API
_WAL_READ = 4 * 1024 * 1024  # bytes of WAL frames read at a time while indexing them
KEEP_MAPPED = 256 * 1024 * 1024  # a database up to this size stays mapped whole (dropping costs ~1 ms per 16 MiB)
WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_VERSION = 3007000
_WAL_HDR = struct.Struct(">IIIIII")  # magic, version, page size, checkpoint seq, salt-1, salt-2
_FRAME_HDR = struct.Struct(">II8sII")  # page number, db size after commit (0 if not a commit), salts, checksum
_INDEX_HDR = struct.Struct("=IIIBBHII2I8s2I")  # iVersion .. aCksum: the wal-index header (native order)


class NoImage(Exception):
    """A precondition of the direct read does not hold; the caller uses the backup API."""


@dataclass
class PageImage:
    """The pages of one committed transaction: ``view(i)`` is page ``i + 1`` (a memoryview)."""

    page_size: int
    page_count: int
    overlay: dict[int, int] = field(default_factory=dict)  # page index -> byte offset of its WAL frame data
    _db: memoryview | None = None
    _wal: int | None = None  # the WAL's descriptor: overlaid pages are read from it (see _index_wal)
    _file_pages: int = 0  # pages of the snapshot that the database file holds
    _overlay_at: list[int] = field(default_factory=list)  # sorted keys of ``overlay``
    _map: FileMap | None = None  # the database file's map
    _dropped: int = 0  # bytes at the start of that map already let go
    _fd: int | None = None  # the database file's descriptor (``read_page``)

    def view(self, index: int) -> memoryview:
        """Page ``index + 1``, valid until ``close``."""
        ps = self.page_size
        off = self.overlay.get(index)
        if off is not None:
            return self._wal_page(off)
        assert self._db is not None
        return self._db[index * ps : index * ps + ps]

    def views(self, start: int, stop: int) -> list[memoryview]:
        """Pages ``start..stop-1`` (0-based) as views, valid until ``close`` (each page is in the
        file or the WAL: ``image`` refuses a snapshot where one is in neither)."""
        ps, db = self.page_size, self._db
        assert db is not None
        out = [db[off : off + ps] for off in range(start * ps, min(stop, self._file_pages) * ps, ps)]
        if self._overlay_at:
            lo, hi = bisect_left(self._overlay_at, start), bisect_left(self._overlay_at, stop)
            overlay = self.overlay
            for index in self._overlay_at[lo:hi]:
                off = overlay[index]
                if index - start < len(out):
                    out[index - start] = self._wal_page(off)
                elif index - start == len(out):
                    out.append(self._wal_page(off))
                else:
                    break
        if len(out) != stop - start:
            raise SourceError(f"backup: page {start + len(out) + 1} is in neither the database file nor the WAL")
        return out

    def read_page(self, index: int) -> memoryview:
        """Page ``index + 1`` read into memory of its own (``pread``), not through the map: pages read
        again in no order (the table checksums' leaves) would each map their neighbours too (the
        kernel's fault-around, 64 KiB), and the map of a 1 GiB file grew to 250 MB resident."""
        off = self.overlay.get(index)
        if off is not None:
            return self._wal_page(off)
        assert self._fd is not None
        page = os.pread(self._fd, self.page_size, index * self.page_size)
        if len(page) != self.page_size:
            raise SourceError(f"backup: page {index + 1} could not be read again (the file was cut short "
                              "by something other than SQLite); nothing was stored",
                              "find what truncates the database file, then back up again")
        return memoryview(page)

    def _wal_page(self, off: int) -> memoryview:
        assert self._wal is not None
        page = os.pread(self._wal, self.page_size, off)
        if len(page) != self.page_size:
            raise SourceError("backup: the WAL was truncated while the backup read it (by something other than "
                              "SQLite: a WAL is never cut under a reader); nothing was stored",
                              "find what truncates the -wal file, then back up again")
        return memoryview(page)

    def drop(self, stop: int) -> None:
        """Pages before ``stop`` are read: let their mapping go, so resident memory stays
        bounded whatever the database size (a page touched again is read again, unchanged)."""
        if self._db is None or self._map is None or self._file_pages * self.page_size <= KEEP_MAPPED:
            return
        end = min(stop, self._file_pages) * self.page_size // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._dropped:
            self._map.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end

    def close(self) -> None:
        """Release the page views (the maps themselves belong to the session)."""
        if self._db is not None:
            self._db.release()
        self._db = self._wal = self._fd = None
        self._map = None


def _outside_header(page: bytes) -> bytes:
    """Page 1 without the header fields the backup API rewrites (24-31, 40-43, 92-99)."""
    return page[:24] + page[32:40] + page[44:92] + page[100:]


class _Files:
    """Descriptors (through a pin, see the module doc) and maps kept open until ``close``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pin: Pin | None = None
        self.fds: dict[str, int] = {}
        self.maps: list[FileMap] = []

    def fd(self, suffix: str) -> int:
        if suffix not in self.fds:
            try:
                if self.pin is None:
                    self.pin = Pin(self.path)
                self.fds[suffix] = self.pin.fd(suffix)
            except OSError as err:
                raise NoImage(f"cannot open {self.path + suffix} ({err.strerror})") from None
        return self.fds[suffix]

    def size(self, suffix: str) -> int:
        return os.fstat(self.fd(suffix)).st_size

    def read(self, suffix: str, length: int, offset: int = 0) -> bytes:
        return os.pread(self.fd(suffix), length, offset)

    def map(self, suffix: str, length: int) -> FileMap:
        """A read-only map that keeps no descriptor of its own (see dbre.sources.filemap)."""
        m = FileMap(self.fd(suffix), length)
        self.maps.append(m)
        m.madvise(mmap.MADV_SEQUENTIAL)
        return m

    def close(self) -> None:
        self.maps = []  # each map goes with its last page view; no descriptor is closed with it
        self.fds = {}
        pin, self.pin = self.pin, None
        if pin is not None:
            pin.release()


def _wal_checksum(data: bytes, native: bool) -> tuple[int, int]:
    """SQLite's WAL checksum over ``data`` (a multiple of 8 bytes)."""
    words = struct.unpack(("=" if native else ">") + f"{len(data) // 4}I", data)
    s1 = s2 = 0
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


@dataclass
class _WalState:
    mx_frame: int
    n_page: int
    backfilled: int
    salt: bytes
    frame_cksum: tuple[int, int]
    page_size: int


def _read_wal_index(files: _Files) -> _WalState:
    """The wal-index header and checkpoint info from the -shm file, checked as SQLite checks it."""
    raw = files.read("-shm", 136)
    if len(raw) < 136:
        raise NoImage("wal-index too short")
    if raw[0:48] != raw[48:96]:
        raise NoImage("wal-index header copies differ")
    (version, _unused, _change, is_init, _big_end, sz_page, mx_frame, n_page, ck1, ck2, salt,
     hck1, hck2) = _INDEX_HDR.unpack_from(raw, 0)
    if version != WAL_VERSION or not is_init:
        raise NoImage("wal-index not initialised or of another version")
    if _wal_checksum(raw[0:40], native=True) != (hck1, hck2):
        raise NoImage("wal-index header checksum mismatch")
    (backfilled,) = struct.unpack_from("=I", raw, 96)
    page_size = 65536 if sz_page == 1 else sz_page
    return _WalState(mx_frame, n_page, backfilled, salt, (ck1, ck2), page_size)


def _index_wal(files: _Files, st: _WalState, page_count: int) -> dict[int, int]:
    """Index the newest frame of each page among the WAL's first ``mxFrame`` frames (page index ->
    byte offset of its data). The WAL is read, not mapped: a map of a file someone truncates kills
    the process with SIGBUS when touched past the new end, where a read just comes back short."""
    ps = st.page_size
    frame = 24 + ps
    length = 32 + st.mx_frame * frame
    if files.size("-wal") < length:
        raise NoImage("WAL shorter than the wal-index says")
    head = files.read("-wal", 32)
    try:
        magic, version, wal_ps, _seq, _s1, _s2 = _WAL_HDR.unpack_from(head, 0)
    except struct.error:
        raise NoImage("WAL too short") from None
    if magic not in WAL_MAGIC or version != WAL_VERSION or wal_ps != ps:
        raise NoImage("WAL header does not match the wal-index")
    if head[16:24] != st.salt:
        raise NoImage("WAL salts do not match the wal-index")
    overlay: dict[int, int] = {}
    salt = st.salt
    unpack = _FRAME_HDR.unpack_from
    last: tuple[int, int, bytes, int, int] = (0, 0, b"", 0, 0)
    per_read = max(1, _WAL_READ // frame)  # frames per read: the headers are taken from whole frames
    for first in range(0, st.mx_frame, per_read):
        count = min(per_read, st.mx_frame - first)
        chunk = files.read("-wal", count * frame, 32 + first * frame)
        if len(chunk) < count * frame:
            raise NoImage("WAL shorter than the wal-index says (truncated while read)")
        for k in range(count):
            last = unpack(chunk, k * frame)
            pgno = last[0]
            if last[2] != salt or pgno == 0:
                raise NoImage(f"WAL frame {first + k + 1} is not of this WAL generation")
            if pgno <= page_count:
                overlay[pgno - 1] = 32 + (first + k) * frame + 24
    if last[1] != page_count or (last[3], last[4]) != st.frame_cksum:
        raise NoImage("the last WAL frame is not the reader's commit")
    return overlay


class ImageSession:
    """Start a read transaction on ``conn`` and, when the checks pass, a direct image of it.

    Use: ``s = ImageSession()``, open the connection, ``s.begin(conn)`` (the read transaction is
    now open; ``s.page_size`` and ``s.page_count`` are its own); ``image = s.image()`` (None: use
    the backup API); read the pages; end the read transaction, close the connection; ``s.close()``.
    """

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or (lambda: datetime.now(UTC))  # the backup passes the repository's clock
        self.conn: apsw.Connection | None = None
        self.path = ""
        self.reason = ""
        self._files = _Files("")
        self._image: PageImage | None = None
        self._locker: apsw.Connection | None = None
        self._wal: _WalState | None = None
        self.page_size = 0
        self.page_count = 0
        self.started: datetime | None = None  # when the read transaction began (taken just before it)
        self.wal_mode = False

    def _pragma(self, name: str) -> Any:
        assert self.conn is not None
        row = self.conn.execute(f"PRAGMA {name}").fetchone()
        return row[0] if row else None

    def begin(self, conn: apsw.Connection) -> None:
        """Open the read transaction on ``conn`` (and, in WAL mode, learn exactly where it ends)."""
        self.conn = conn
        self.path = conn.filename or ""
        if not (self.path and os.path.isfile(self.path)):
            self.path = ""
        self._files.path = self.path
        if self.path:
            try:
                self._files.fd("")  # the pin, before any lock of ours: see the module doc
            except NoImage as err:
                self.reason = str(err)
        wal = self.wal_mode = bool(self.path) and str(self._pragma("journal_mode")).lower() == "wal"
        if wal and conn.readonly("main"):
            # (a read-only file: no write lock to hold, so the WAL's end cannot be pinned down)
            self.reason = self.reason or "read-only connection to a WAL database"
        elif wal:
            self._lock_writers()
        try:
            # taken before the transaction starts, never after: every commit that returned before
            # this moment is in the snapshot, so `restore --at T` never misses one made before T
            self.started = self.clock()
            conn.execute("BEGIN")
            self.page_size = int(self._pragma("page_size"))
            self.page_count = int(self._pragma("page_count"))  # starts the read transaction
            if wal and self._locker is not None:
                try:
                    self._wal = _read_wal_index(self._files)
                except (NoImage, OSError) as err:
                    self.reason = str(err)
        finally:
            self._release_writers()

    def _lock_writers(self) -> None:
        from dbre.sources.local import _poll_busy

        try:
            locker = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE)
            locker.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)  # never the last one, but never write
        except apsw.Error as err:
            self.reason = f"cannot open a second connection ({err})"
            return
        try:
            locker.set_busy_handler(_poll_busy(LOCK_WAIT))
            locker.execute("BEGIN IMMEDIATE")
        except apsw.Error as err:
            self.reason = f"write lock not available ({type(err).__name__})"
            locker.close()
            return
        self._locker = locker

    def _release_writers(self) -> None:
        locker, self._locker = self._locker, None
        if locker is not None:
            try:
                locker.execute("ROLLBACK")
            finally:
                locker.close()

    def wal_position(self) -> dict[str, Any] | None:
        """Where in the WAL the read transaction ends, when ``begin`` learnt it under the write lock:
        WAL salts (hex), last committed frame, that frame's checksum and the frames already
        backfilled; None otherwise (rollback mode, write lock busy, wal-index failed its checks).
        `dbre replicate` ships the transactions after this position."""
        st = self._wal
        if st is None:
            return None
        return {"salt": st.salt.hex(), "frame": st.mx_frame, "cksum": list(st.frame_cksum),
                "backfilled": st.backfilled}

    def image(self) -> PageImage | None:
        """The direct image of the read transaction, or None (``reason`` says why)."""
        if not self.path or self.reason or self.page_count == 0:
            self.reason = self.reason or "not a database file on this machine"
            return None
        ps, count = self.page_size, self.page_count
        image = PageImage(ps, count)
        try:
            file_pages = self._files.size("") // ps
            st = self._wal
            if st is not None:
                if st.mx_frame > st.backfilled:
                    # (with no frames to read, the wal-index's page size may still be 0)
                    if st.page_size != ps:
                        raise NoImage("wal-index page size differs from the database's")
                    if st.n_page != count:
                        raise NoImage("wal-index page count differs from the reader's")
                    image.overlay = _index_wal(self._files, st, count)
                    image._wal = self._files.fd("-wal")
            missing = [i for i in range(file_pages, count) if i not in image.overlay]
            if missing:
                raise NoImage(f"page {missing[0] + 1} is neither in the file nor in the WAL")
            image._file_pages = min(file_pages, count)
            image._overlay_at = sorted(image.overlay)
            if image._file_pages == 0:
                raise NoImage("empty database file")
            image._map = self._files.map("", image._file_pages * ps)
            image._db = image._map.view()
            image._fd = self._files.fd("")
        except (NoImage, OSError, ValueError) as err:
            image.close()
            self.reason = str(err)
            return None
        self._image = image
        return image

    def page_one(self, copied: bytes) -> tuple[bytes, str]:
        """The snapshot's page 1 for the backup-API path, given the copy that path made.

        The backup API rewrites the copy's header as it commits: file change counter (offset 24),
        in-header page count (28), schema cookie (40), version-valid-for (92) and SQLite version
        (96). Inside the read transaction the source's own page 1 is read instead: from the file
        in rollback mode (the shared lock keeps it), and in WAL mode from the newest frame of page 1
        among frames ``1..mxFrame`` or else the file, when ``begin`` learnt ``mxFrame``. It must equal
        the copy outside those fields. Otherwise the copy is returned with the source's schema
        cookie put back, and 24, 92 and 96 stay the backup API's. Returns (page, how).
        """
        ps = self.page_size
        try:
            if not self.path:
                raise NoImage("not a file here")
            if self.wal_mode and self._wal is None:
                raise NoImage(self.reason or "WAL end unknown")
            st = self._wal
            page = self._files.read("", ps, 0)
            if st is not None and st.mx_frame > st.backfilled:
                frame = 24 + ps
                if st.page_size != ps or self._files.size("-wal") < 32 + st.mx_frame * frame:
                    raise NoImage("WAL does not match the wal-index")
                if self._files.read("-wal", 8, 16) != st.salt:
                    raise NoImage("WAL salts do not match the wal-index")
                for n in range(st.mx_frame - 1, -1, -1):  # read, not mapped: see _index_wal
                    off = 32 + n * frame
                    pgno, _, salt, _, _ = _FRAME_HDR.unpack_from(self._files.read("-wal", 24, off))
                    if salt != st.salt:
                        raise NoImage(f"WAL frame {n + 1} is not of this WAL generation")
                    if pgno == 1:
                        page = self._files.read("-wal", ps, off + 24)
                        break
            if len(page) != ps or _outside_header(page) != _outside_header(copied):
                raise NoImage("the source's page 1 differs from the copy")
            return page, "source"
        except (NoImage, OSError, ValueError, struct.error):
            assert self.conn is not None
            cookie = int(self._pragma("schema_version"))
            return copied[:40] + cookie.to_bytes(4, "big") + copied[44:], "rebuilt header"

    def close(self) -> None:
        """Release views, maps and descriptors: only after the caller's connection is closed."""
        self._release_writers()
        if self._image is not None:
            self._image.close()
            self._image = None
        self._files.close()
