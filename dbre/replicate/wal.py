"""Read the transactions committed to a live WAL after a known position (the replicator's tail).

Built on `dbre.sources.image`: the wal-index header is read and checked exactly as a backup reads
it (both copies equal, its checksum), and the frames it counts as committed (``1..mxFrame``) are
read from the -wal file, each checked for the WAL's salts, the last one's checksum against the
wal-index. The caller holds a read transaction that keeps those frames in place (see
`dbre.replicate.shipper`). A commit frame (non-zero "database size after commit") ends a
transaction; a page written twice in one transaction keeps its newest frame.

Also here: whether another process is running a blocking checkpoint (it holds both the WAL write
lock and the checkpoint lock of the -shm file), found with ``F_GETLK``, which never takes a lock.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from dataclasses import dataclass

from dbre.replicate.segment import Transaction, WalPos
from dbre.sources.image import _FRAME_HDR, _WAL_HDR, WAL_MAGIC, NoImage, _Files, _read_wal_index, _WalState

SHM_LOCKS = 120  # byte offset of SQLite's wal-index locks in -shm (UNIX_SHM_BASE)
WRITE_LOCK, CKPT_LOCK, READ_LOCKS, READERS = 0, 1, 3, 5  # lock slots; READ_LOCK(i) is READ_LOCKS + i
READ_CHUNK = 1024  # frames read per pread


class ContinuityLost(Exception):
    """The WAL no longer continues from the position: frames may be gone (a new generation is due)."""


@dataclass
class Tail:
    """What one read of the WAL found: whole transactions after the position, and the new position."""

    transactions: list[Transaction]
    end: WalPos
    restarted: bool  # the WAL was restarted (new salts) between the old position and these frames


class WalTail:
    """The WAL of one database, read through image.py's pinned descriptors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files = _Files(path)
        self.files.fd("")  # the pin first, before any connection: see dbre.sources.pins

    def close(self) -> None:
        self.files.close()

    def index(self) -> _WalState:
        """The wal-index header, retried briefly when caught mid-update by a writer."""
        for attempt in range(50):
            try:
                return _read_wal_index(self.files)
            except NoImage:
                if attempt == 49:
                    raise
                time.sleep(0.0005)
        raise AssertionError("unreachable")

    def file_id(self) -> str:
        st = os.fstat(self.files.fd(""))
        return f"{st.st_dev}:{st.st_ino}"

    def replaced(self) -> bool:
        """The path now names another file than the one this tail pinned (replaced, restored over)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return f"{st.st_dev}:{st.st_ino}" != self.file_id()

    def position(self) -> WalPos:
        st = self.index()
        return WalPos(st.salt, st.mx_frame, st.frame_cksum)

    def read(self, pos: WalPos, page_size: int, *, restart_ok: bool, next_txid: int,
             observed_us: int, st: _WalState | None = None) -> Tail:
        """The transactions committed after ``pos``. A WAL restarted since ``pos`` is followed only
        when ``restart_ok`` (the caller's read transaction made sure nothing was lost); otherwise,
        and whenever the WAL does not continue from ``pos``, ``ContinuityLost``."""
        st = st or self.index()
        if st.salt != pos.salt:
            if not restart_ok:
                raise ContinuityLost("the WAL was restarted since the last shipped position")
            txs = self._frames(WalPos(st.salt, 0), st, page_size, next_txid, observed_us)
            return Tail(txs, WalPos(st.salt, st.mx_frame, st.frame_cksum), True)
        if st.mx_frame < pos.frame:
            raise ContinuityLost(f"the WAL holds {st.mx_frame} frames, fewer than the {pos.frame} shipped")
        if st.mx_frame == pos.frame:
            if pos.frame and st.frame_cksum != pos.cksum:
                raise ContinuityLost("the WAL's last frame is not the shipped one")
            return Tail([], pos, False)
        if pos.frame and self._frame_header(pos.frame, page_size)[3:5] != pos.cksum:
            raise ContinuityLost(f"WAL frame {pos.frame} is not the one shipped")
        txs = self._frames(pos, st, page_size, next_txid, observed_us)
        return Tail(txs, WalPos(st.salt, st.mx_frame, st.frame_cksum), False)

    def _frame_header(self, n: int, page_size: int) -> tuple[int, int, bytes, int, int]:
        raw = self.files.read("-wal", 24, 32 + (n - 1) * (24 + page_size))
        if len(raw) != 24:
            raise ContinuityLost(f"WAL frame {n} is missing")
        return _FRAME_HDR.unpack(raw)  # type: ignore[return-value]

    def _frames(self, pos: WalPos, st: _WalState, ps: int, txid: int, observed_us: int) -> list[Transaction]:
        """Frames ``pos.frame+1 .. st.mx_frame`` as transactions; every one checked as image.py does."""
        if st.mx_frame == 0:
            return []
        if st.page_size != ps:
            raise ContinuityLost(f"the WAL's page size is {st.page_size}, the generation's {ps}")
        head = self.files.read("-wal", 32, 0)
        if len(head) != 32:
            raise NoImage("WAL header missing")
        magic, version, wal_ps, _seq, _s1, _s2 = _WAL_HDR.unpack_from(head)
        if magic not in WAL_MAGIC or wal_ps != ps or head[16:24] != st.salt:
            raise NoImage("WAL header does not match the wal-index")
        frame = 24 + ps
        out: list[Transaction] = []
        pages: dict[int, bytes] = {}
        last: tuple[int, int, bytes, int, int] = (0, 0, b"", 0, 0)
        n = pos.frame
        while n < st.mx_frame:
            count = min(READ_CHUNK, st.mx_frame - n)
            raw = self.files.read("-wal", count * frame, 32 + n * frame)
            if len(raw) != count * frame:
                raise NoImage("WAL shorter than the wal-index says")
            view = memoryview(raw)
            for i in range(count):
                off = i * frame
                last = _FRAME_HDR.unpack_from(raw, off)
                pgno, commit, salt = last[0], last[1], last[2]
                if salt != st.salt or pgno == 0:
                    raise NoImage(f"WAL frame {n + i + 1} is not of this WAL generation")
                pages[pgno] = bytes(view[off + 24 : off + frame])
                if commit:
                    kept = {p: d for p, d in pages.items() if p <= commit}  # a commit may shrink the file
                    end = WalPos(st.salt, n + i + 1, (last[3], last[4]))
                    out.append(Transaction(txid, observed_us, commit, kept, end))
                    txid += 1
                    pages = {}
            n += count
        if pages or not last[1] or (last[3], last[4]) != st.frame_cksum:
            raise NoImage("the last WAL frame is not the wal-index's commit")
        return out

    # -- other processes' locks ------------------------------------------------------------------

    def _holder(self, lock: int, n: int = 1) -> int:
        """The pid of another process holding one of wal-index locks ``lock..lock+n-1`` (0 if none)."""
        req = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, SHM_LOCKS + lock, n, 0) + bytes(4)
        try:
            res = fcntl.fcntl(self.files.fd("-shm"), fcntl.F_GETLK, req)
        except (OSError, NoImage):
            return 0
        l_type, _, _, _, pid = struct.unpack_from("hhqqi", res)
        return 0 if l_type == fcntl.F_UNLCK else pid

    def blocking_checkpoint(self) -> bool:
        """Another process holds both the write lock and the checkpoint lock: a FULL, RESTART or
        TRUNCATE checkpoint, which may be waiting for this process's read transaction to end.
        (No commit can land while it holds the write lock.)"""
        writer = self._holder(WRITE_LOCK)
        return writer != 0 and writer == self._holder(CKPT_LOCK)

    def foreign_readers(self) -> bool:
        """Another process holds a read mark other than 0 (its reader keeps the WAL from restarting)."""
        return self._holder(READ_LOCKS + 1, READERS - 1) != 0
