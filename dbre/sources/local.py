"""A local SQLite/libSQL file as a backup source (WAL or rollback-journal mode)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import SourceError

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
    mode the backup holds a shared lock for one pass over the file (writers wait, then go on)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.name = self.path.stem

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path)}

    def check(self) -> None:
        if not self.path.exists():
            raise SourceError(f"source {self.path}: no such file", "check the path to the database")
        if not self.path.is_file():
            raise SourceError(f"source {self.path}: not a file", "give the path of a database file")
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError as err:
            raise SourceError(f"source {self.path}: {err.strerror}", "check the file's permissions") from err
        if head != _MAGIC and not (head == b"" and self.path.stat().st_size == 0):
            raise SourceError(
                f"source {self.path}: not a SQLite database", "give the path of a SQLite or libSQL file"
            )

    @contextmanager
    def connect(self) -> Iterator[apsw.Connection]:
        self.check()
        try:
            # read-write open (not READONLY) so a WAL database can use its -shm; we never write
            conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)
            conn.set_busy_handler(_poll_busy(BUSY_TIMEOUT))
        except apsw.Error as err:
            raise SourceError(f"source {self.path}: cannot open ({err})", "check the file") from err
        try:
            yield conn
        finally:
            conn.close()
