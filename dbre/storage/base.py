"""The storage protocol: six operations on named blobs, and the errors every backend maps to.

A key is a relative, slash-separated path such as ``packs/ab/ab12...``. Backends know files,
never snapshots or packs: the repository layer gives keys their meaning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from dbre.errors import RepositoryError


class StorageError(RepositoryError):
    """A store operation failed. Subclasses say whether a retry can help."""


class NotFound(StorageError):
    """The key does not exist."""


class AlreadyExists(StorageError):
    """A conditional put found the key already present; nothing was written."""


class TransientError(StorageError):
    """A failure that may pass: network, throttling, a 5xx. Safe to retry."""


class PermanentError(StorageError):
    """A failure a retry will not fix: denied, no such bucket, disk full, bad request."""


@runtime_checkable
class Store(Protocol):
    """A flat namespace of immutable-by-convention blobs.

    Contracts (checked by tests/test_storage_contract.py against every backend):
    - ``put`` is atomic: a reader sees the old object, or the complete new one, never a part.
      With ``if_absent=True`` it writes only if the key does not exist, else raises
      ``AlreadyExists``; of two racing conditional puts exactly one succeeds.
    - ``get`` returns the whole object or raises ``NotFound``.
    - ``get_range`` returns ``length`` bytes from ``offset`` (fewer only at the end of the
      object) or raises ``NotFound``.
    - ``list`` yields every key under ``prefix`` (a key prefix, not only a folder), in no
      particular order; keys being written (temp files) never appear.
    - ``delete`` removes a key; deleting a missing key is not an error.
    - ``exists`` says whether a key is present.
    All other failures raise ``TransientError`` or ``PermanentError``; no SDK exception escapes.
    """

    url: str

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...
