"""Packs: many sealed blobs in one object, with a sealed index of their contents at the end.

Layout: blob* | sealed index | u32 index length | b"DBREPK01". The index lists each blob's
kind (b"d" page batch, b"r" page-map run), offset, length and content hashes, so a pack can be
checked on its own (`dbre verify --read-data`).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from dbre.errors import IntegrityError
from dbre.repository.crypto import Sealer
from dbre.repository.entries import Entries
from dbre.repository.repo import pack_key
from dbre.storage import Store
from dbre.storage.base import Upload, open_upload
from dbre.units import human_bytes

MAGIC = b"DBREPK01"
PACK_TARGET = 32 * 1024 * 1024
# page slots (index hashes) per pack: its index stays under TAIL_READ (one request), however well its
# pages compress (32 MiB of sealed batches of 512-byte pages that compress 8x would list 500,000)
PACK_SLOTS = 60_000
_ENTRY = struct.Struct("<cQII")  # kind, offset, length, number of hashes that follow
_TAIL = struct.Struct("<I8s")


@dataclass
class BlobInfo:
    kind: bytes
    offset: int
    length: int
    hashes: list[bytes] | Entries  # read back from an index: 16-byte entries in one buffer


def encode_index(blobs: list[BlobInfo]) -> bytes:
    parts = []
    for b in blobs:
        parts.append(_ENTRY.pack(b.kind, b.offset, b.length, len(b.hashes)))
        parts.append(bytes(b.hashes.buf) if isinstance(b.hashes, Entries) else b"".join(b.hashes))
    return b"".join(parts)


def decode_index(raw: bytes) -> list[BlobInfo]:
    """The blobs of an opened index; each blob's hashes stay in one buffer (no object per page)."""
    out, pos = [], 0
    while pos < len(raw):
        kind, offset, length, n = _ENTRY.unpack_from(raw, pos)
        pos += _ENTRY.size
        hashes = raw[pos : pos + 16 * n]
        if len(hashes) != 16 * n:
            raise struct.error("index entry runs past the end of the index")
        pos += 16 * n
        out.append(BlobInfo(kind, offset, length, Entries(hashes, 16)))
    return out


def read_pack_index(data: bytes, sealer: Sealer, key: str) -> list[BlobInfo]:
    """The index of a whole pack held in memory; IntegrityError if the pack is damaged."""
    if len(data) < _TAIL.size or data[-8:] != MAGIC:
        raise IntegrityError(f"{key}: not a pack or truncated (bad trailer)")
    (n, _) = _TAIL.unpack_from(data, len(data) - _TAIL.size)
    start = len(data) - _TAIL.size - n
    if start < 0:
        raise IntegrityError(f"{key}: truncated (index length past start)")
    name = index_name(key.rsplit("/", 1)[1])
    return decode_index(sealer.unseal(data[start : len(data) - _TAIL.size], name, where=f"{key} index"))


def index_name(pack_id: str) -> str:
    """The name a pack's index is sealed under: it opens only at the end of that pack."""
    return f"packs/{pack_id} index"


TAIL_READ = 1024 * 1024  # one ranged read holds the index of any pack of up to ~250 MiB of 4 KiB pages
MAX_INDEX = 8 * 1024 * 1024  # 16 bytes a page + 17 a blob: a ~32 MiB pack's index is < 1.2 MiB even of 512-byte pages
MAX_PACK = 1024 * 1024 * 1024  # packs are ~32 MiB; a larger object under packs/ was planted or damaged
_OVERSIZE_HINT = "remove it, or restore it from the offsite copy; `dbre verify` names the snapshots it breaks"


def read_index_tail(store: Store, sealer: Sealer, pack_id: str, known_end: int = 0) -> list[BlobInfo]:
    """The index of a stored pack, reading only its tail: from ``known_end`` (the end of the last
    blob the caller knows of; the index follows the blobs) to the end of the pack, in ranged reads
    of ``TAIL_READ`` bytes (one for a pack whose referenced blobs end near its index). Memory stays
    under ``MAX_INDEX`` plus one read, and a pack longer than ``MAX_PACK`` is refused with one more
    request, before it is read. Raises NotFound if the pack is absent, IntegrityError if it is
    oversized, its trailer or index is damaged, or a blob it lists reaches into the index."""
    return read_pack_tail(store, sealer, pack_id, known_end).blobs


@dataclass
class PackTail:
    """A pack's index, and the bytes read before it: ``data`` holds the pack from ``start`` to the
    start of its index when one read got them all (else it is empty)."""

    blobs: list[BlobInfo]
    start: int
    data: bytes


def read_pack_tail(store: Store, sealer: Sealer, pack_id: str, start: int = 0) -> PackTail:
    """``read_index_tail`` from ``start``, keeping the blob bytes of the first read: a caller that
    starts at the first blob it needs gets those blobs and the index in one request when they lie
    within ``TAIL_READ`` of the end of the pack. The blobs are not checked here (their reader
    unseals each one)."""
    key = pack_key(pack_id)
    keep = MAX_INDEX + _TAIL.size  # only the index and trailer matter: older bytes are dropped
    buf, pos = bytearray(), start
    while True:
        chunk = store.get_range(key, pos, TAIL_READ)
        buf += chunk
        pos += len(chunk)
        if len(chunk) < TAIL_READ:
            break
        # more than one read: the caller's blobs end far from the index, or the object is huge
        first = pos == start + TAIL_READ
        if pos > MAX_PACK or (first and store.get_range(key, MAX_PACK, 1)):
            raise IntegrityError(f"{key}: object is larger than {human_bytes(MAX_PACK)} (a pack never is: "
                                 "planted or damaged)", _OVERSIZE_HINT)
        if len(buf) > keep:
            del buf[: len(buf) - keep]
    whole = pos - start == len(buf)  # every byte from ``start`` is still in hand
    tail = bytes(buf)
    del buf
    (n, magic) = _TAIL.unpack_from(tail, len(tail) - _TAIL.size) if len(tail) >= _TAIL.size else (0, b"")
    if magic == MAGIC and n > MAX_INDEX:  # the trailer is the pack's own, whatever ``start`` was
        raise IntegrityError(f"{key}: index is larger than {human_bytes(MAX_INDEX)} (a pack's index never is: "
                             "planted or damaged)", _OVERSIZE_HINT)
    try:
        blobs = read_pack_index(tail, sealer, key)  # checks the trailer and authenticates the index
    except struct.error:
        raise IntegrityError(f"{key}: index is malformed") from None
    except IntegrityError:
        if start:
            # no index after the caller's blobs (one of them may reach past it): read the whole pack
            return PackTail(read_pack_tail(store, sealer, pack_id, 0).blobs, start, b"")
        raise
    index_start = pos - _TAIL.size - _TAIL.unpack_from(tail, len(tail) - _TAIL.size)[0]
    if any(b.offset + b.length > index_start for b in blobs):
        raise IntegrityError(f"{key}: index lists a blob past the start of the index")
    return PackTail(blobs, start, tail[: index_start - start] if whole and index_start > start else b"")


class PackWriter:
    """Appends sealed blobs to the current pack and uploads full packs in the background.

    ``add`` returns (pack id, offset, length) at once; the pack becomes durable only after
    ``finish`` returns. Packs are named by random ids and never overwritten, so a crash leaves
    at worst an unreferenced pack (removed by prune), never a damaged snapshot.
    """

    def __init__(
        self, store: Store, sealer: Sealer, target: int = PACK_TARGET, on_upload: Callable[[int], None] | None = None
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.target = target
        self.on_upload = on_upload
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbre-upload")
        self._pending: list[tuple[Future[None], Upload]] = []  # pack commits, oldest first
        self.packs: list[str] = []
        self.bytes_written = 0
        self._new()

    def _new(self) -> None:
        self._id = secrets.token_hex(16)
        self._upload: Upload | None = None  # opened with the pack's first blob
        self._size = 0
        self._slots = 0
        self._blobs: list[BlobInfo] = []

    def add(self, kind: bytes, sealed: bytes, hashes: list[bytes]) -> tuple[str, int, int]:
        if self._blobs and self._slots + len(hashes) > PACK_SLOTS:
            self._flush()
        self._slots += len(hashes)
        offset = self._size
        if self._upload is None:
            self._upload = open_upload(self.store, pack_key(self._id))
        self._upload.write(sealed)
        self._size += len(sealed)
        self._blobs.append(BlobInfo(kind, offset, len(sealed), hashes))
        where = (self._id, offset, len(sealed))
        if self._size >= self.target:
            self._flush()
        return where

    def flush(self, min_bytes: int = 0) -> None:
        """Close the current pack now (if it holds ``min_bytes`` or more) and start its upload;
        later blobs go to a new pack."""
        if self._size >= min_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._blobs:
            return
        index = self.sealer.seal(encode_index(self._blobs), index_name(self._id))
        upload, pack_id = self._upload, self._id
        assert upload is not None
        upload.write(index)
        upload.write(_TAIL.pack(len(index), MAGIC))
        self.packs.append(pack_id)
        self.bytes_written += self._size + len(index) + _TAIL.size
        # at most two uploads in flight: memory stays bounded by a few packs. A finished upload
        # is checked before it leaves the list, so its error is raised here, never lost
        while True:
            for f, _ in self._pending:
                if f.done():
                    f.result()
            self._pending = [(f, u) for f, u in self._pending if not f.done()]
            if len(self._pending) < 2:
                break
            self._pending[0][0].result()
        self._pending.append((self._pool.submit(self._commit, upload, self._size + len(index) + _TAIL.size), upload))
        self._new()

    def _commit(self, upload: Upload, size: int) -> None:
        upload.commit()  # the pack appears under its name complete, or not at all
        if self.on_upload:
            self.on_upload(size)

    def finish(self) -> list[str]:
        """Upload the last pack and wait for every upload; re-raises the first upload error."""
        try:
            self._flush()
            for f, _ in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)
        return self.packs

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for future, upload in self._pending:
            if future.cancelled():
                upload.abort()  # its temp file goes; a committed pack stays for prune
        if self._upload is not None:
            self._upload.abort()
            self._upload = None
