"""Test helper: a Store that passes every call to a real store, for wrappers that count or break one call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dbre.storage.base import Store


class PassThroughStore:
    """Every Store operation goes to ``inner`` unchanged; subclasses override the ones they watch."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:  # open_upload, clean_temp, root...
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        return self.inner.list(prefix, start_after=start_after, limit=limit)

    def modified(self, key: str) -> float:
        return self.inner.modified(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)
