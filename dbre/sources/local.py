"""A local SQLite/libSQL file as a backup source (WAL or rollback-journal mode)."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import SourceError
from dbre.sources.pins import Pin
from dbre.units import human_bytes

_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT = 10.0  # seconds to wait for a lock before the backup gives up


def _poll_busy(timeout: float) -> Callable[[int], bool]:
    """A busy handler that retries every millisecond until ``timeout``.

    SQLite's own busy timeout backs off to 100 ms sleeps; in rollback-journal mode a writer that
    commits back to back holds PENDING/EXCLUSIVE nearly all the time, so a reader polling every
    100 ms can starve for seconds (measured: up to 6 s, and a failure at 10 s). Polling every
    millisecond finds the gap between two commits at once.
    """
    deadline = 0.0

    def handler(tries: int) -> bool:
        nonlocal deadline
        now = time.monotonic()
        if tries == 0:
            deadline = now + timeout
        if now >= deadline:
            return False
        time.sleep(0.001)
        return True

    return handler


class LocalFileSource:
    """A database file on this machine. Readers never block writers in WAL mode; in rollback
    mode the backup holds a shared lock for one pass over the file (writers wait, then go on).

    The source is not written: every connection is opened with checkpoint-on-close off (see
    ``keep_wal``), and the header is read through a ``Pin`` (see ``dbre.sources.pins``). A file
    that cannot be opened for writing (``chattr +i``, a read-only mount or folder) is read
    through SQLite's read-only fallback, or, when its WAL holds no frames, as ``immutable=1``,
    which leaves no -wal or -shm beside it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.name = self.path.stem

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path)}

    def file_mode(self) -> int | None:
        """The file's permission bits (``st_mode & 0o7777``): a restore gives them back."""
        try:
            return self.path.stat().st_mode & 0o7777
        except OSError:
            return None

    def _pin(self) -> Pin:
        if not self.path.exists():
            wal = Path(f"{self.path}-wal")
            try:
                held = wal.stat().st_size if wal.is_file() else 0
            except OSError:
                held = 0
            if held:  # its commits may live only there now
                raise SourceError(
                    f"source {self.path}: no such file, but its WAL {wal.name} ({human_bytes(held)}) is there: "
                    "the database file was moved or deleted",
                    f"put the database file back beside it; do not delete {wal.name}: commits may be only there")
            raise SourceError(f"source {self.path}: no such file", "check the path to the database")
        if not self.path.is_file():
            raise SourceError(f"source {self.path}: not a file", "give the path of a database file")
        try:
            return Pin(self.path)
        except OSError as err:
            raise SourceError(f"source {self.path}: {err.strerror}", "check the file's permissions") from err

    def _check(self, pin: Pin) -> None:
        try:
            head = os.pread(pin.fd(), 16, 0)  # through the pin: closing a descriptor drops locks
        except OSError as err:
            raise SourceError(f"source {self.path}: {err.strerror}", "check the file's permissions") from err
        if head != _MAGIC and not (head == b"" and self.path.stat().st_size == 0):
            raise SourceError(
                f"source {self.path}: not a SQLite database", "give the path of a SQLite or libSQL file"
            )

    def check(self) -> None:
        with self._pin() as pin:
            self._check(pin)

    @contextmanager
    def connect(self) -> Iterator[apsw.Connection]:
        pin = self._pin()  # before the connection, released after it: see dbre.sources.pins
        try:
            self._check(pin)
            wal = Path(str(self.path) + "-wal")
            wal_existed = wal.exists()
            conn = self._open(pin, wal)
            try:
                yield conn
            finally:
                _close(conn, wal, wal_existed)
        finally:
            pin.release()

    def _open(self, pin: Pin, wal: Path) -> apsw.Connection:
        path = str(self.path)
        try:
            # read-write open (not READONLY) so a WAL database can use its -shm; we never write
            conn = keep_wal(apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE))
        except apsw.Error as err:
            raise SourceError(f"source {self.path}: cannot open ({err})", "check the file") from err
        if conn.readonly("main") and _frozen(pin, self.path) and _wal_size(wal) == 0:
            # nobody can change this file and no WAL frame adds to it: the file is the database.
            # A read-only connection would leave an empty -wal and a -shm beside it; immutable=1
            # reads the file alone and creates nothing.
            conn.close()
            uri = self.path.as_uri() + "?immutable=1"
            try:
                conn = keep_wal(apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI))
                conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            except apsw.Error as err:
                conn.close()
                raise SourceError(f"source {self.path}: cannot read the read-only file ({err})",
                                  "check the file") from err
        conn.set_busy_handler(_poll_busy(BUSY_TIMEOUT))
        return conn


def keep_wal(conn: apsw.Connection) -> apsw.Connection:
    """Turn checkpoint-on-close off on ``conn``: when it is the last connection to a WAL database,
    closing it would copy the WAL into the file and delete -wal and -shm (writing the source, and
    forcing a new generation on a Litestream beside it). Every connection dbre opens to read
    someone's database goes through here."""
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    return conn


def _close(conn: apsw.Connection, wal: Path, wal_existed: bool) -> None:
    """Close a source connection. A -wal that dbre's own open created and that is still empty
    is removed with its -shm, by SQLite itself and only when no other connection has the database
    open: checkpoint-on-close is turned back on for that case only, and an empty WAL gives the
    checkpoint nothing to write."""
    try:
        if not wal_existed and not conn.readonly("main") and _wal_size(wal) == 0:
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0)
    except apsw.Error:
        pass
    conn.close()


def _wal_size(wal: Path) -> int:
    try:
        return wal.stat().st_size
    except FileNotFoundError:
        return 0


_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10


def _frozen(pin: Pin, path: Path) -> bool:
    """No process can change the file: it is immutable (``chattr +i``), on a read-only mount, or
    in a folder nobody here can create a journal or WAL in (so no writer can commit)."""
    try:
        flags = struct.unpack("i", fcntl.ioctl(pin.fd(), _FS_IOC_GETFLAGS, bytes(4)))[0]
        if flags & _FS_IMMUTABLE_FL:
            return True
    except OSError:
        pass  # a filesystem without inode flags
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(path.parent, os.W_OK)
