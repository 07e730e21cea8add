"""The storage protocol: seven operations on named blobs, streamed uploads, and the errors backends map to.

A key is a relative, slash-separated path such as ``packs/ab/ab12...``. Backends know files,
never snapshots or packs: the repository layer gives keys their meaning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dbre.errors import IntegrityError, RepositoryError
from dbre.units import human_bytes


class StorageError(RepositoryError):
    """A store operation failed. Subclasses say whether a retry can help."""


class NotFound(StorageError):
    """The key does not exist."""


class AlreadyExists(StorageError):
    """A conditional put found the key already present; nothing was written."""


class Conflict(StorageError):
    """A conditional replace found the key no longer holding what the caller read; nothing was written."""


class TransientError(StorageError):
    """A failure that may pass: network, throttling, a 5xx. Safe to retry."""


class PermanentError(StorageError):
    """A failure a retry will not fix: denied, no such bucket, disk full, bad request."""


class WriteRefused(PermanentError):
    """The store refuses writes: a read-only file system or mount, permission denied, a full disk or
    quota; on S3, AccessDenied (a 403) on a put or delete. Reads may still work: the read-only
    operations go on without a lock (``Repository.read_lock``), nothing that writes does.
    ``cause`` names it in a few words ("read-only file system", "disk full", "access denied")."""

    def __init__(self, message: str, hint: str = "", cause: str = "writes refused") -> None:
        super().__init__(message, hint)
        self.cause = cause


class ReadRefused(PermanentError):
    """The store refuses to give this object (its permissions: a local file's mode, EACCES/EPERM on a
    read; on S3 AccessDenied on a get) while the store itself answers: ``verify`` reports such an
    object and goes on. A store-wide failure (credentials rejected, no bucket, TLS, I/O) is not one."""


class ObjectLocked(PermanentError):
    """The object's version is under an Object Lock retention that is still in force."""


@dataclass(frozen=True)
class Retention:
    """An Object Lock retention: ``mode`` "GOVERNANCE" or "COMPLIANCE", ``until`` in seconds since the epoch."""

    mode: str
    until: float


@dataclass(frozen=True)
class ObjectVersion:
    """One version of a key in a versioned bucket; ``delete_marker`` versions have no content."""

    key: str
    version_id: str
    delete_marker: bool
    modified: float


@runtime_checkable
class LockingStore(Protocol):
    """A store that can keep objects immutable (S3 Object Lock); only `S3Store` implements it.

    Contracts (tests/test_object_lock.py, on moto with Object Lock enabled):
    - ``lock_enabled`` says whether the bucket has Object Lock enabled (one request).
    - ``set_default_retention(mode, seconds, exempt)``: from then on every ``put`` of a key that
      does not start with one of ``exempt`` is written with ``mode`` and a retain-until of the
      local time + ``seconds``; ``written_until(key)`` returns that retain-until for keys this
      store object put (None if unknown).
    - ``retention(key, version_id=None)`` returns the retention of the current (or given)
      version, None if it has none; ``NotFound`` if absent (or the current version is a delete marker).
    - ``extend_retention(key, mode, until)`` sets the current version's retain-until to ``until``;
      callers never ask for less than the object has (S3 refuses a shorter compliance retention).
    - ``versions(prefix)`` yields every version and delete marker under ``prefix``, for each key
      newest first (S3's ListObjectVersions order).
    - ``get_version(key, version_id, offset=0, length=None)`` reads one version (a range of it);
      ``NotFound`` if that version is gone.
    No call ever sends x-amz-bypass-governance-retention.
    """

    url: str

    def lock_enabled(self) -> bool: ...

    def set_default_retention(self, mode: str, seconds: float, exempt: tuple[str, ...]) -> None: ...

    def written_until(self, key: str) -> float | None: ...

    def retention(self, key: str, version_id: str | None = None) -> Retention | None: ...

    def extend_retention(self, key: str, mode: str, until: float) -> None: ...

    def versions(self, prefix: str = "") -> Iterator[ObjectVersion]: ...

    def get_version(self, key: str, version_id: str, offset: int = 0, length: int | None = None) -> bytes: ...


@runtime_checkable
class ReplacingStore(Protocol):
    """A store that can replace an object only if it is unchanged: `LocalStore`, `S3Store`, `RetryingStore`.

    Contract (tests/test_key_passwd.py, on a local directory and on moto): ``replace(key, data,
    expected=old)`` writes ``data`` under ``key`` only if ``key`` holds exactly the bytes ``old``
    at that moment, atomically (a reader, or a kill -9 at any instant, sees ``old`` or ``data``
    whole, never a part and never neither); otherwise it raises ``Conflict`` and writes nothing
    (``NotFound`` if the key is absent). Of two replaces racing from the same ``old``, at most one
    succeeds. Local directory: an exclusive ``flock`` on the key's file (re-taken if the file was
    renamed over meanwhile), a byte comparison, then temp file + fsync + rename. S3: a GET of the
    object with its ETag, a byte comparison, then a single ``PutObject`` with ``If-Match: <ETag>``
    (AWS since 2024-11; moto; a server that ignores If-Match loses this guarantee, and callers read
    the key back). Only dbre's `config` is ever replaced (`dbre key passwd`); nothing else in a
    repository is written twice.
    """

    url: str

    def replace(self, key: str, data: bytes, *, expected: bytes) -> None: ...


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
      particular order; keys being written (temp files) never appear. With ``start_after`` or
      ``limit`` the keys come in ascending byte order, only those greater than ``start_after``,
      at most ``limit`` of them (S3's ListObjectsV2 StartAfter/MaxKeys: one request for the
      newest snapshot of a database, whatever its history). A listing that cannot be completed
      (a folder that cannot be read, a failed request) raises; it never ends early in silence.
    - ``modified`` returns the time of the key's last write by the *store's* clock (S3's
      LastModified, a file's mtime), in seconds since the epoch, or raises ``NotFound``. Lock
      staleness is judged by it, so two hosts' clocks never have to agree.
    - ``delete`` removes a key; deleting a missing key is not an error.
    - ``exists`` says whether a key is present.
    All other failures raise ``TransientError`` or ``PermanentError``; no SDK exception escapes. A
    write (``put``, ``delete``) the store refuses for good (read-only, permission denied, disk full,
    AccessDenied) raises ``WriteRefused``, a ``PermanentError``.
    """

    url: str

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]: ...

    def modified(self, key: str) -> float: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


# The most a whole-object read takes of each kind: dbre never writes one larger, so a larger one
# was planted (write access to the bucket, no key needed) or damaged; reading it whole first
# would exhaust memory before any check could refuse it.
LOCK_CAP = 64 * 1024
CONFIG_CAP = 64 * 1024
MANIFEST_CAP = 64 * 1024 * 1024  # a sealed manifest: ~1 MB for a 100 GiB database of 4 KiB pages
RECORD_CAP = 16 * 1024 * 1024


def get_capped(store: Store, key: str, cap: int, what: str,
               hint: str = "remove it, or restore it from the offsite copy") -> bytes:
    """The whole object ``key`` if it holds at most ``cap`` bytes; never reads more than ``cap + 1``.

    One ranged request on every backend (``get_range(key, 0, cap + 1)``). Raises ``NotFound`` if
    absent, ``IntegrityError`` naming the key if larger (a ``what`` never is that large)."""
    data = store.get_range(key, 0, cap + 1)
    if len(data) > cap:
        raise IntegrityError(
            f"{key}: object is larger than {human_bytes(cap)} (a {what} never is: planted or damaged)", hint)
    return data


class Upload(Protocol):
    """An object written in pieces that appears under its key only at ``commit``.

    Contract: before ``commit`` returns the key is absent to ``get``/``list``/``exists``
    (as with ``put``, a reader sees all of it or nothing); ``abort`` leaves nothing behind.
    """

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class BufferedUpload:
    """An upload for any store: the pieces wait in memory and go in one ``put`` at commit."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def commit(self) -> None:
        data = b"".join(self._parts)
        self._parts.clear()  # one copy in memory, not two
        self.store.put(self.key, data)

    def abort(self) -> None:
        self._parts.clear()


def open_upload(store: Store, key: str) -> Upload:
    """The store's own streaming upload when it has one (a local directory writes as it goes,
    so the final fsync finds little left), else a `BufferedUpload`."""
    opener = getattr(store, "open_upload", None)
    return opener(key) if opener is not None else BufferedUpload(store, key)
