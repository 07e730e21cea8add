"""Fixed-width entries (page records, page hashes) held in one buffer: no Python object per page.

A page map of a 8 GiB database has 2 million records; as a list of `bytes` each costs ~80 bytes
of object header and pointer on top of its 46 bytes. `Entries` keeps them in one `bytes` or
`bytearray` and makes a `bytes` only for the entry asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import overload


class Entries:
    """A sequence of ``size``-byte entries stored back to back in ``buf``."""

    __slots__ = ("buf", "size")

    def __init__(self, buf: bytes | bytearray, size: int) -> None:
        if size <= 0 or len(buf) % size:
            raise ValueError(f"a buffer of {len(buf)} bytes is not a whole number of {size}-byte entries")
        self.buf = buf
        self.size = size

    def __len__(self) -> int:
        return len(self.buf) // self.size

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        size = self.size
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("Entries slices take no step")
            buf = self.buf
            return [bytes(buf[i : i + size]) for i in range(start * size, stop * size, size)]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("entry index out of range")
        return bytes(self.buf[index * size : (index + 1) * size])

    def __setitem__(self, index: int, value: bytes) -> None:
        if len(value) != self.size:
            raise ValueError(f"an entry is {self.size} bytes, not {len(value)}")
        if not isinstance(self.buf, bytearray):
            raise TypeError("these entries are read-only")
        self.buf[index * self.size : (index + 1) * self.size] = value

    def __iter__(self) -> Iterator[bytes]:
        buf, size = self.buf, self.size
        for i in range(0, len(buf), size):
            yield bytes(buf[i : i + size])

    def span(self, start: int, stop: int) -> bytes:
        """Entries ``start`` to ``stop`` (exclusive) as one ``bytes``."""
        return bytes(self.buf[start * self.size : stop * self.size])

    def __eq__(self, other: object) -> bool:
        """Equal entries: same width, same bytes (a list of ``bytes`` compares entry by entry)."""
        if isinstance(other, Entries):
            return self.size == other.size and self.buf == other.buf
        if isinstance(other, list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=False))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable when its buffer is a bytearray

    def __repr__(self) -> str:
        return f"Entries({len(self)} x {self.size} bytes)"
