"""Process-wide descriptors of source files: closing one never drops another reader's POSIX locks.

POSIX (fcntl) locks belong to the process, and closing *any* descriptor of a file drops every
lock the process holds on that file, whichever thread or SQLite connection took it. SQLite's
unix VFS knows this and shares descriptors among its own connections; the descriptors dbre opens
itself (to read the header, to map the file and its WAL, to read the wal-index in -shm) must be
just as careful, because the fleet flow backs up several databases, sometimes one database
twice, on threads of one process: one backup closing its descriptor of the -shm file would drop
the other's read mark, and a checkpoint could then overwrite pages it is still reading.

A ``Pin`` on a database joins a process-wide entry keyed by the database file's
``(st_dev, st_ino)``. Every descriptor opened through any pin of that database (of the file, its
-wal or its -shm) stays open until the last pin is released, and a pin is taken before a dbre
connection opens the database and released only after it is closed. So no descriptor of a
database is closed while a dbre connection to it may hold a lock.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_entries: dict[tuple[int, int], _Entry] = {}


class _Entry:
    def __init__(self) -> None:
        self.refs = 0
        self.by_file: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of an opened file -> its descriptor
        self.fds: list[int] = []  # every descriptor opened, closed with the last pin


class Pin:
    """Holds a database's shared descriptors open; ``release()`` exactly once (or use ``with``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        st = os.stat(self.path)  # OSError when the file cannot be reached
        self.key = (st.st_dev, st.st_ino)
        with _lock:
            entry = _entries.get(self.key)
            if entry is None:
                entry = _entries[self.key] = _Entry()
            entry.refs += 1
        self._entry: _Entry | None = entry

    def fd(self, suffix: str = "") -> int:
        """A read-only descriptor of ``path + suffix``, shared by every pin of this database and
        valid until the last one is released. Raises OSError when the file cannot be opened."""
        name = self.path + suffix
        with _lock:
            entry = self._entry
            if entry is None:
                raise ValueError("pin already released")
            try:
                st = os.stat(name)
                fd = entry.by_file.get((st.st_dev, st.st_ino))
            except FileNotFoundError:
                fd = None
            if fd is not None:
                return fd
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            entry.fds.append(fd)  # never closed before the last pin goes, even if a duplicate
            st = os.fstat(fd)
            return entry.by_file.setdefault((st.st_dev, st.st_ino), fd)

    def release(self) -> None:
        """Give up this pin; the last one closes the database's descriptors."""
        with _lock:
            entry, self._entry = self._entry, None
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs:
                return
            if _entries.get(self.key) is entry:
                del _entries[self.key]
            fds, entry.fds, entry.by_file = entry.fds, [], {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_descriptors() -> int:
    """How many descriptors the pins of this process hold (for tests)."""
    with _lock:
        return sum(len(e.fds) for e in _entries.values())
