"""`dbre restore --follow`: a read-only standby file kept current from replicated segments.

Start: the newest state of the newest generation is restored (a temp file renamed over the
target, as any restore). Then every ``interval``: one LIST of ``segments/<db>/`` starting after
the last applied segment's key (``start_after``: never a full listing) returns this generation's
new segments and, after them, the keys of any newer generation. New segments are fetched, checked
against the hash chain from the last applied one, and applied in place, one journaled write per
poll. A newer generation whose base is the state the standby holds (a periodic base, or the one
after a VACUUM that was shipped: the same file, taken at the WAL position where the last applied
transaction ended, the same txid and page count) is followed in place; any other is restored whole
to a temp file and renamed over the target.

Applying in place is rollback-safe, by SQLite's own protocol: the standby is kept in rollback
journal mode (header bytes 18-19 set to 1: readers need no -wal or -shm), the follower takes
SQLite's EXCLUSIVE lock (``BEGIN EXCLUSIVE`` on its connection: no reader is inside a read
transaction), writes the original content of every page it will overwrite to ``<target>-journal``
in SQLite's rollback journal format and fsyncs it, writes the new pages and the new size, fsyncs
the file, and deletes the journal (the commit). Page 1 gets a new file change counter, so readers
drop their caches. A crash in between leaves a hot journal that the next reader rolls back.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import apsw
import xxhash

from dbre.errors import DbreError, RestoreError
from dbre.replicate.segment import (
    Generation,
    SegmentName,
    WalPos,
    check_contiguous,
    list_generations,
    open_segment,
    parse_key,
    read_base,
)
from dbre.repository.backup import load_fast_hashes
from dbre.repository.hashindex import NO_HASH
from dbre.repository.manifest import Manifest, check_db_name
from dbre.repository.repo import Repository
from dbre.restore.full import _remove_leftovers, _replace, check_no_leftovers, check_not_in_use, follow_scratch_name
from dbre.restore.pitr import PitrPlan, apply_pitr, base_snapshot

log = logging.getLogger(__name__)

JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
SECTOR = 512
LOCK_WAIT = 30.0  # readers holding the standby this long in a row make the follower fail


@dataclass
class FollowStats:
    restores: int = 0
    segments: int = 0
    transactions: int = 0
    polls: int = 0
    last_txid: int = 0
    generations: list[str] = field(default_factory=list)
    continued: int = 0  # newer generations followed in place (a periodic base of the same history)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written: a short write (a disk filling) is an OSError."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left on device")
        view = view[n:]


def journal(pages: list[tuple[int, bytes]], page_size: int, old_count: int) -> bytes:
    """A SQLite rollback journal holding ``pages`` (original content), for a file of ``old_count``
    pages: header (magic, record count, checksum nonce, initial size, sector size, page size)
    padded to a sector, then per page: u32 page number, the page, u32 checksum."""
    nonce = secrets.randbits(32)
    head = JOURNAL_MAGIC + struct.pack(">IIIII", len(pages), nonce, old_count, SECTOR, page_size)
    out = [head.ljust(SECTOR, b"\0")]
    for pgno, data in pages:
        cksum = nonce
        i = page_size - 200
        while i > 0:
            cksum += data[i]
            i -= 200
        out.append(struct.pack(">I", pgno) + data + struct.pack(">I", cksum & 0xFFFFFFFF))
    return b"".join(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Standby:
    """The standby file, opened for in-place applies: a SQLite connection that takes its locks and
    one descriptor of our own, closed only after the connection (closing any descriptor of a file
    drops every POSIX lock of the process on it)."""

    def __init__(self, path: Path, page_size: int) -> None:
        self.path = path
        self.page_size = page_size
        self.fd = os.open(path, os.O_RDWR)
        try:
            self.conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.conn.close()
        os.close(self.fd)

    def apply(self, pages: dict[int, bytes], page_count: int) -> None:
        """Write ``pages`` and cut the file to ``page_count`` pages, rollback-safe (module doc)."""
        ps = self.page_size
        deadline = time.monotonic() + LOCK_WAIT

        def busy(_tries: int) -> bool:
            time.sleep(0.002)
            return time.monotonic() < deadline

        self.conn.set_busy_handler(busy)
        try:
            self.conn.execute("BEGIN EXCLUSIVE")
        except apsw.BusyError as err:
            raise RestoreError(f"follow {self.path}: readers held it for {LOCK_WAIT:.0f} s",
                               "shorten the readers' transactions") from err
        try:
            old_count = os.fstat(self.fd).st_size // ps
            first = bytearray(pages.get(1) or os.pread(self.fd, ps, 0))
            counter = (struct.unpack_from(">I", first, 24)[0] + 1) & 0xFFFFFFFF
            first[18:20] = b"\x01\x01"  # rollback journal mode: readers need no -wal/-shm
            struct.pack_into(">I", first, 24, counter)
            struct.pack_into(">I", first, 28, page_count)
            struct.pack_into(">I", first, 92, counter)  # version-valid-for: the in-header size holds
            writes = {**pages, 1: bytes(first)}
            originals = [(p, os.pread(self.fd, ps, (p - 1) * ps)) for p in sorted(writes) if p <= old_count]
            originals += [(p, os.pread(self.fd, ps, (p - 1) * ps)) for p in range(page_count + 1, old_count + 1)
                          if p not in writes]
            jpath = Path(str(self.path) + "-journal")
            jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(jfd, journal(originals, ps, old_count))
                os.fsync(jfd)
            except OSError as err:  # (a full disk: nothing of the standby was written yet)
                os.close(jfd)
                jpath.unlink(missing_ok=True)
                raise RestoreError(f"follow {self.path}: cannot write its rollback journal ({err.strerror or err}); "
                                   "the standby is unchanged", "free disk space and restart the follower") from err
            os.close(jfd)
            _fsync_dir(self.path)
            for pgno in sorted(writes):
                if pgno <= page_count:
                    os.pwrite(self.fd, writes[pgno], (pgno - 1) * ps)
            os.ftruncate(self.fd, page_count * ps)
            os.fsync(self.fd)
            jpath.unlink()  # the commit
            _fsync_dir(self.path)
        finally:
            self.conn.execute("COMMIT")


class Follower:
    """Keeps ``target`` current with the newest replicated state of ``db`` (see the module doc)."""

    def __init__(self, repo: Repository, db: str, target: str | os.PathLike[str], interval: float = 1.0,
                 force: bool = False) -> None:
        self.repo = repo
        self.db = check_db_name(db)
        self.target = Path(target).expanduser().absolute()
        self.interval = interval
        # replace what is at the target (as restore --force): a file there (the CLI lets one through only
        # with --force), or a lost database's -wal and -shm; never while a process uses them
        self.force = force
        self.stats = FollowStats()
        self.gen: Generation | None = None
        self.last_key = ""  # the last applied segment's key (or the generation's prefix)
        self.state = b""
        self.wal_end: WalPos | None = None  # where the last applied transaction ended in the source's WAL
        self.standby: Standby | None = None

    def run(self, stop: threading.Event, on_apply: object = None) -> FollowStats:
        try:
            # the first placement follows a plain restore's rules, looked at before the restore's work
            # (and again at the rename): refused while a process uses the file, its -wal or its -shm, and
            # without force never beside a -wal or -journal left without its database
            if self._replacing():
                check_not_in_use(self.target)
            else:
                check_no_leftovers(self.target)
            self._restore(None)
            while not stop.wait(self.interval):
                self.poll()
        finally:
            if self.standby is not None:
                self.standby.close()
                self.standby = None
        return self.stats

    def _replacing(self) -> bool:
        """Whether the first placement replaces what is at the target: only with ``force`` (without, the
        name must be free, as for a plain restore: a database that appeared there meanwhile is kept)."""
        return self.force

    def _restore(self, gen_id: str | None) -> None:
        """Restore the newest state of generation ``gen_id`` (default: the newest) over the target."""
        gens = list_generations(self.repo, self.db)
        if not gens:
            raise RestoreError(f"follow {self.db}: no replicated generation",
                               "run `dbre replicate` for this database first")
        gen_id = gen_id or next(reversed(gens))
        gen = read_base(self.repo, self.db, gen_id)
        names = check_contiguous(self.db, gen, gens[gen_id])
        _remove_leftovers(self.target)  # a killed follower's scratch copy: a whole database each
        scratch = self.target.parent / follow_scratch_name(self.target, secrets.token_hex(4))
        held: list[int] = []

        def release() -> None:  # (before the rename, as a restore lets its temp file go)
            while held:
                os.close(held.pop())

        try:
            result = apply_pitr(self.repo, PitrPlan(self.db, scratch, False, gen, base_snapshot(self.repo, gen),
                                                    names))
            held.append(os.open(scratch, os.O_RDWR))
            fcntl.flock(held[0], fcntl.LOCK_EX)  # until placed: no other restore's clean-up removes it
            head = bytearray(os.pread(held[0], 100, 0))
            head[18:20] = b"\x01\x01"  # rollback journal mode before any reader can see it
            os.pwrite(held[0], bytes(head), 0)
            os.fsync(held[0])
            if self.standby is not None:
                self.standby.close()
                self.standby = None
            if self.gen is None:
                # the first placement, as any restore places its file: what was there before this
                # follower is replaced only as restore --force replaces it (refused while in use; its
                # -wal, -shm and -journal never left beside the new file), else the name must be free
                _replace(scratch, self.target, self._replacing(), release)
            else:
                # a journal left by a crashed apply belongs to the file being replaced: never to the new one
                Path(str(self.target) + "-journal").unlink(missing_ok=True)
                release()
                os.replace(scratch, self.target)
                _fsync_dir(self.target)
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise
        finally:
            release()
        self.gen = gen
        last = open_segment(self.repo, names[-1], None) if names else None
        self.state = last.state_after if last is not None else bytes.fromhex(gen.state)
        self.wal_end = last.wal_end if last is not None else gen.wal
        # (the base key sorts after the segment keys, which start with txid digits: 0...)
        self.last_key = names[-1].key if names else f"segments/{self.db}/{gen.id}/"
        self.standby = Standby(self.target, gen.page_size)
        self.stats.restores += 1
        self.stats.generations.append(gen.id)
        self.stats.last_txid = result.last_txid
        log.info("follow %s: restored generation %s up to txid %d", self.db, gen.id, result.last_txid)

    def poll(self) -> None:
        """One LIST after the last applied key; apply this generation's new segments, or re-restore
        from a newer generation."""
        assert self.gen is not None and self.standby is not None
        self.stats.polls += 1
        mine: list[SegmentName] = []
        newer: str | None = None
        prefix = f"segments/{self.db}/"
        for key in self.repo.store.list(prefix, start_after=self.last_key, limit=1000):
            parts = key.split("/")
            if len(parts) != 4:
                continue
            if parts[2] == self.gen.id:
                name = parse_key(key)
                if name is not None:
                    mine.append(name)
            elif parts[2] > self.gen.id:
                newer = parts[2]
                break
        if mine:
            self._apply(sorted(mine, key=lambda n: n.first))
        if newer is not None and not self._continue(newer):
            self._restore(None)

    def _continue(self, gen_id: str) -> bool:
        """Follow generation ``gen_id`` in place when its base is the state the standby holds: a
        periodic base of the same history, taken where the last applied transaction ended (the same
        database file, the same WAL position: salts, frame and running checksum), the same txid, the
        same page size and page count, its base snapshot checked against the generation, and every
        page the standby holds equal to the base's. Anything else (continuity lost, another file, a
        standby that differs, a base object or snapshot missing or damaged) is restored whole."""
        assert self.gen is not None and self.standby is not None
        try:
            gen = read_base(self.repo, self.db, gen_id)
        except DbreError as err:
            log.warning("follow %s: generation %s: %s; restoring the newest generation whole", self.db, gen_id,
                        err.message)
            return False
        end = self.wal_end
        if (end is None or gen.file_id != self.gen.file_id or gen.page_size != self.gen.page_size
                or gen.base_txid != self.stats.last_txid
                or (gen.wal.salt, gen.wal.frame, gen.wal.cksum) != (end.salt, end.frame, end.cksum)):
            return False
        try:
            base = base_snapshot(self.repo, gen)  # (refuses a base that is not the generation's)
        except DbreError as err:  # (forget dropped it, or it is damaged: the newest is restored whole)
            log.warning("follow %s: generation %s: %s; restoring the newest generation whole", self.db, gen.id,
                        err.message)
            return False
        if base.page_count * gen.page_size != self.target.stat().st_size or not self._holds(base):
            return False
        self.gen = gen
        self.state = bytes.fromhex(gen.state)
        self.last_key = f"segments/{self.db}/{gen.id}/"
        self.stats.last_txid = gen.base_txid
        self.stats.generations.append(gen.id)
        self.stats.continued += 1
        log.info("follow %s: generation %s continues in place from txid %d", self.db, gen.id, gen.base_txid)
        return True

    def _holds(self, base: Manifest) -> bool:
        """Whether every page of the standby but page 1 (whose header the standby rewrites) is the
        base snapshot's, by its fast hash (xxh3 per page, from the base's fast runs): a standby
        written to by anything but this follower, or a page that rotted, is restored whole, never
        followed in place. A local read of the standby, no download."""
        fast = load_fast_hashes(self.repo, base)
        if fast is None:
            return False
        ps, n = base.page_size, base.page_count
        step = 4096
        with open(self.target, "rb") as f:
            for start in range(0, n, step):
                chunk = f.read(min(step, n - start) * ps)
                view = memoryview(chunk)
                for j in range(len(chunk) // ps):
                    i = start + j
                    want = fast[i]
                    if i and want != NO_HASH and xxhash.xxh3_128_digest(view[j * ps : (j + 1) * ps]) != want:
                        log.warning("follow %s: page %d of %s is not the base's: restoring whole", self.db, i + 1,
                                    self.target)
                        return False
        return True

    def _apply(self, names: list[SegmentName]) -> None:
        assert self.gen is not None and self.standby is not None
        expected = self.stats.last_txid + 1
        if names[0].first != expected:
            names = [n for n in names if n.first >= expected]
            if not names:
                return
        names = check_contiguous(self.db, replace(self.gen, base_txid=expected - 1), names)
        pages: dict[int, bytes] = {}
        page_count = 0
        state = self.state
        txs = 0
        for name in names:
            seg = open_segment(self.repo, name, state)  # every page against the chain
            state = seg.state_after
            for tx in seg.transactions:
                pages.update(tx.pages)
                page_count = tx.page_count
                txs += 1
        self.standby.apply({p: d for p, d in pages.items() if p <= page_count}, page_count)
        self.state = state
        self.wal_end = seg.wal_end
        self.last_key = names[-1].key
        self.stats.segments += len(names)
        self.stats.transactions += txs
        self.stats.last_txid = names[-1].last
