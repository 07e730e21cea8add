"""Read-only maps of source files that hold no descriptor, so unmapping never drops a POSIX lock.

CPython's ``mmap.mmap(fd, ...)`` keeps a ``dup()`` of ``fd`` (Python 3.13 adds ``trackfd=False``;
this project runs on 3.11), and closing that duplicate drops every POSIX lock the process holds on
the file: a WAL-mode connection's shared lock on the database file (another thread's, a
replicator's), after which the application's last connection deletes -wal and -shm under it.
``FileMap`` calls mmap(2) through ctypes instead: the kernel's mapping keeps the file open by
itself, no descriptor is duplicated, and munmap(2) runs when the last view of the map is gone
(a finalizer on the buffer every view refers to), so a view can never outlive its memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import weakref

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_FAILED = ctypes.c_void_p(-1).value


def _unmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


class FileMap:
    """``length`` bytes of the file open as ``fd``, shared and read-only; ``view()`` is the memory."""

    def __init__(self, fd: int, length: int) -> None:
        if length <= 0:
            raise ValueError("cannot map an empty file")
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr, self.length = addr, length
        self._buf = (ctypes.c_char * length).from_address(addr)
        done = weakref.finalize(self._buf, _unmap, addr, length)  # when no view (nor this map) refers to it
        done.atexit = False  # (at exit a daemon thread may still read it: the process's end unmaps it)

    def view(self) -> memoryview:
        return memoryview(self._buf).cast("B")

    def madvise(self, advice: int, start: int = 0, length: int | None = None) -> None:
        """Advise the kernel about bytes ``start..start+length`` (``start`` page-aligned)."""
        length = self.length - start if length is None else length
        if length > 0:
            _libc.madvise(self.addr + start, length, advice)  # (advice only: a failure changes nothing)

    def __len__(self) -> int:
        return self.length
