"""Whole-database restore of one snapshot to a file: plan first, then apply atomically.

The file is written as a temp file beside the target (every page checked against its hash),
fsynced and renamed over the target: a crash or a full disk leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import DbreError, IntegrityError, RestoreError, UsageError
from dbre.repository.backup import load_fast_hashes
from dbre.repository.entries import Entries
from dbre.repository.fallback import primary_of, retrying
from dbre.repository.hashindex import NO_HASH
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.sink import FAST_HASH
from dbre.repository.verify import SnapshotBlob, check_locations, snapshot_blobs
from dbre.storage.base import WriteRefused
from dbre.units import human_bytes

log = logging.getLogger(__name__)
HOLD_WAIT_MS = 5000  # how long `--force` waits for the old database's other connections
READ_SPAN = 8 * 1024 * 1024  # blobs of one pack closer than this are fetched in one ranged read
FETCHERS = 4  # spans read (and their pages checked and written) at once: 32 MiB of spans in flight at most
SYNC_EVERY = 32 * 1024 * 1024  # bytes written between two background fdatasync calls
FRESH_SECONDS = 60.0  # an empty temp file this young may be a live restore's, between its creation and its flock

# format constants of the fast runs (docs/FORMAT.md, "Fast runs"): the xxh3-128 each page is checked
# against, and the all-zero entry of a page that has none (a lost or repacked marker's)

Progress = Callable[[int, int], None]


@dataclass
class RestorePlan:
    manifest: Manifest
    target: Path
    force: bool
    blobs: list[SnapshotBlob]  # in pack and offset order, each with arrays of its pages and slots
    zero_pages: int
    hashes: Entries  # what each page is checked against, 16 bytes a page in page order
    quick_check: bool = False  # ``hashes`` are the snapshot's xxh3 (fast runs), not the keyed hashes
    kept: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # pack -> (offset, bytes) read with its index
    only_empty: bool = False  # replace what is at the target only while it holds no database (--if-db-not-exists)
    safety: bool = False  # with force: snapshot the database being replaced first (on at the edges: CLI, Prefect)
    existed: bool = False  # a file was at the target when planned (what the restore replaces)
    # safety snapshots newer than ``manifest`` that the choice of the newest (at a time) passed over
    # (the states a recovery replaced), newest first: (id, taken_at)
    skipped_safety: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        return sum(b.length for b in self.blobs)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "snapshot": m.id,
            "db": m.db,
            "taken_at": m.taken_at,
            "target": str(self.target),
            "replaces_existing": self.existed,  # (as planned: after the restore, a file is always there)
            "pages": m.page_count,
            "page_size": m.page_size,
            "size": m.size,
            "packs": len({b.pack for b in self.blobs}),
            "bytes_to_read": self.bytes_to_read,
            "skipped_safety_snapshots": [{"snapshot": i, "taken_at": t} for i, t in self.skipped_safety],
        }


@dataclass
class RestoreResult:
    plan: RestorePlan
    seconds: float
    safety_snapshot: str | None = None  # the replaced database's snapshot (``safety_before_replace``)

    def summary(self) -> dict[str, Any]:
        return {**self.plan.describe(), "seconds": round(self.seconds, 3), "safety_snapshot": self.safety_snapshot}


def plan_restore(repo: Repository, db: str, target: str | os.PathLike[str], *, snapshot: str | None = None,
                 at: datetime | None = None, force: bool = False, only_empty: bool = False,
                 safety: bool = False) -> RestorePlan:
    """Check the options and work out every blob to read; touches nothing. ``only_empty`` (with
    ``force``): what is at the target is replaced only if it still holds no database at the rename
    (`is_empty_database`; --if-db-not-exists over an empty file). ``safety`` (with ``force``): snapshot
    a database found there first (`safety_before_replace`): what the CLI and the Prefect restore ask
    for (a user's file); off by default, for a caller's own scratch files."""
    if snapshot and at:
        raise UsageError("--snapshot and --at were both given", "pass one of them")
    path = check_target(target, force)
    return retrying(repo, lambda: _plan(repo, db, path, snapshot, at, force, only_empty, safety))


def _plan(repo: Repository, db: str, path: Path, snapshot: str | None, at: datetime | None, force: bool,
          only_empty: bool, safety: bool) -> RestorePlan:
    skipped: list[Manifest] = []
    manifest = repo.find_snapshot(db, snapshot, at, skipped)
    # pages never written (zero) restore as the sparse file's zeros; then the structure `dbre verify`
    # checks: every pack listed, present, its index authentic and holding each page where the page
    # map says (one ranged read of each pack's tail; of a small pack's used blobs and tail, kept).
    # Each page is then checked as it is written: against its xxh3 in the snapshot's fast runs
    # (authenticated like every run, checked against its keyed hash as a whole) when it has them
    # — a tenth of the keyed hash's cost — else against its keyed hash. They are fetched meanwhile
    kept: dict[str, tuple[int, bytes]] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbre-fast") as side:
        fast_runs = side.submit(load_fast_hashes, repo, manifest)
        try:
            pages = snapshot_blobs(repo, manifest)
            check_locations(repo, manifest, pages, kept)
        except BaseException:
            fast_runs.cancel()
            raise
        fast = fast_runs.result()
    if fast is not None and (len(fast) != manifest.page_count or fast.size != 16 or _lacks_hash(fast, pages.blobs)):
        fast = None  # (none, unreadable, or one missing for a stored page: the keyed hash checks them all)
    blobs = sorted(pages.blobs, key=lambda b: (b.pack, b.offset))
    return RestorePlan(manifest, path, force, blobs, pages.zero, fast if fast is not None else pages.hashes,
                       quick_check=fast is not None, kept=kept, only_empty=only_empty,
                       safety=safety, existed=path.exists(),
                       skipped_safety=[(m.id, m.taken_at) for m in skipped])


def check_target(target: str | os.PathLike[str], force: bool) -> Path:
    """The target's absolute path, if a restore may write it: a file path in an existing folder,
    new, or (with ``force``) one no process uses (`check_not_in_use`, again just before the rename)."""
    path = Path(target).expanduser().absolute()
    if path.is_dir():
        raise UsageError(f"restore target {path} is a directory", "give a file path, e.g. --to restored.db")
    if str(target).endswith(("/", os.sep)):  # (Path drops it: `--to restored/` would become a file `restored`)
        raise UsageError(f"restore target {target} names a folder, which does not exist",
                         f"give a file path, e.g. --to {path}/restored.db (create the folder first)")
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        # (a FIFO would hang the first open, a device would get a -journal beside it: refused before any open)
        raise UsageError(f"restore target {path} is not a regular file ({_file_kind(st.st_mode)})",
                         "give the path of a database file, or a new one")
    if st is not None and stat.S_ISLNK(st.st_mode):
        pointed = _mode_through(path)  # (a link to a disk would get SQLite's first page written over it)
        if pointed is not None and not stat.S_ISREG(pointed):
            raise UsageError(f"restore target {path} is a symbolic link to {os.readlink(path)}, which is not a "
                             f"regular file ({_file_kind(pointed)})", "give the path of a database file, or a new one")
    if path.exists() and not force:
        raise UsageError(f"restore target {path} already exists", "choose a new path or pass --force")
    if not force and os.path.islink(path):  # (a volume not mounted yet: not a free name)
        raise UsageError(f"restore target {path} is a symlink to {os.readlink(path)}, which does not exist",
                         "mount or create what it names, remove the symlink, or pass --force to replace it")
    if force:
        check_not_in_use(path)  # (also with the file deleted while a process still uses its -wal and -shm)
    else:
        check_no_leftovers(path)
    if not path.parent.is_dir():
        if path.parent.exists():
            raise UsageError(f"restore target folder {path.parent} is a file, not a folder",
                             "give a path in an existing folder")
        raise UsageError(f"restore target folder {path.parent} does not exist", "create it first")
    return path


def _mode_through(path: Path) -> int | None:
    """The mode of what ``path`` names, through symbolic links; None when nothing is there."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def _still_a_file(target: Path) -> None:
    """Just before the old database is opened to be held: what the target names (through a link) is still
    a regular file, or nothing. Swapped meanwhile for a device or a FIFO, it is not opened nor written."""
    mode = _mode_through(target)
    if mode is not None and not stat.S_ISREG(mode):
        raise RestoreError(f"restore to {target}: it is no longer a regular file ({_file_kind(mode)})",
                           "nothing was changed; check who changed it, then give the path of a database file")


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a file")


def _lacks_hash(fast: Entries, blobs: list[SnapshotBlob]) -> bool:
    """Whether a stored page has no xxh3 in ``fast`` (NO_HASH: a lost or repacked marker's)."""
    buf = fast.buf
    if NO_HASH not in buf:  # (16 zero bytes anywhere: the aligned check below decides)
        return False
    return any(buf[i * 16 : i * 16 + 16] == NO_HASH for b in blobs for i in b.pages)


def _spans(blobs: list[SnapshotBlob]) -> list[list[SnapshotBlob]]:
    """Group blobs into ranged reads: same pack, near each other, at most READ_SPAN long."""
    spans: list[list[SnapshotBlob]] = []
    for b in blobs:
        if spans:
            cur = spans[-1]
            first, last = cur[0], cur[-1]
            if (b.pack == first.pack and b.offset >= last.offset + last.length
                    and b.offset + b.length - first.offset <= READ_SPAN
                    and b.offset - (last.offset + last.length) < 256 * 1024):
                cur.append(b)
                continue
        spans.append([b])
    return spans


def apply_restore(repo: Repository, plan: RestorePlan, progress: Progress | None = None) -> RestoreResult:
    """Write the snapshot to a temp file beside the target, check every page, then rename; under
    a shared lock, so no prune deletes a pack while its pages are read."""
    # (into the primary itself when reading through offsite copies: see dbre/repository/fallback.py)
    safety = safety_before_replace(primary_of(repo), plan.manifest.db, plan.target, plan.force and plan.safety,
                                   plan.manifest.size)
    plans = [plan]

    def attempt() -> RestoreResult:
        # after a damaged object was routed to an offsite copy: the same snapshot planned again
        p = plans.pop() if plans else replan(repo, plan)
        return _write_restore(repo, p, progress)

    with repo.read_lock(f"restore {plan.manifest.db}"), said_safety(safety):
        started = time.perf_counter()
        result = retrying(repo, attempt)
        result.seconds = time.perf_counter() - started  # (every attempt: one more per object read from a copy)
    result.safety_snapshot = safety
    return result


@contextlib.contextmanager
def said_safety(safety: str | None) -> Iterator[None]:
    """A restore that fails after its safety snapshot was taken says so (the snapshot stays, kept 7 days)."""
    try:
        yield
    except DbreError as err:
        if safety is None:
            raise
        raise type(err)(f"{err.message} (the safety snapshot {safety} of the database there was taken first; "
                        "it stays, kept 7 days)", err.hint) from err


def replan(repo: Repository, plan: RestorePlan) -> RestorePlan:
    """``plan`` worked out again (its snapshot, target and options), every object read and checked anew."""
    again = plan_restore(repo, plan.manifest.db, plan.target, snapshot=plan.manifest.id, force=plan.force,
                         only_empty=plan.only_empty, safety=plan.safety)
    again.existed = plan.existed
    return again


def safety_before_replace(repo: Repository, db: str, target: Path, wanted: bool, size: int | None = None) -> str | None:
    """With ``wanted`` (restore --force) and a database at ``target``: snapshot it into ``repo`` under
    ``db``, tagged safety (kept 7 days, skipped by the default choices of restore and drill), before
    anything is written, and return its id: a wrong --at or --snapshot over the live database then
    loses nothing. The target was found unused at the plan (`check_not_in_use`), so the snapshot holds
    what gets replaced. None when nothing there holds a database. A snapshot that fails (a read-only
    repository, a damaged database) refuses the restore, the hint naming the way round."""
    if not wanted or not target.exists():
        return None  # (nothing there: nothing to snapshot)
    _still_a_file(target)  # (swapped for a FIFO or a device since the plan: never opened)
    if is_empty_database(target):
        return None  # (no database: nothing to snapshot)
    if not _sqlite_header(target):
        # (an SQLCipher database, another program's file, a mistyped --to: no snapshot can hold it, and
        # replacing it silently would lose it)
        raise RestoreError(f"restore to {target}: the file there is not an SQLite database, so no safety "
                           "snapshot can keep it", "nothing was changed; move it aside first, or pass "
                           "--no-safety-snapshot to replace it without one")
    _check_folder_takes_files(target)  # (a restore that cannot write there must not add a snapshot first)
    if size is not None:
        _check_free_space(target, size)  # (nor one that cannot fit: a disk full is found before the snapshot)
    from dbre.restore.table import safety_snapshot

    try:
        return safety_snapshot(repo, db, target, f"restore --force over {target}")
    except (DbreError, apsw.Error) as err:  # (SQLite's own errors: a damaged database)
        inner = err.__cause__ if isinstance(err.__cause__, DbreError) else err  # (what the backup said)
        why = inner.message if isinstance(inner, DbreError) else f"{type(err).__name__}: {err}"
        if isinstance(inner, WriteRefused):
            why = f"the repository refuses writes: {why}"
        raise RestoreError(f"restore to {target}: the safety snapshot of the database there failed ({why})",
                           "nothing was changed; restore to another path and swap it in, or pass "
                           "--no-safety-snapshot to replace it without one") from None


def _check_free_space(target: Path, size: int) -> None:
    """The target's file system has room for a ``size``-byte file beside the one it replaces."""
    try:
        vfs = os.statvfs(target.parent)
    except OSError:
        return  # (the write says why)
    if not vfs.f_blocks:
        return  # (some FUSE and network mounts report zeros: unknown, the write says if it is full)
    free = vfs.f_bavail * vfs.f_frsize
    if free < size:
        raise RestoreError(f"restore to {target}: disk full ({size} bytes needed, {free} free)",
                           "free space or restore to another disk; nothing was changed")


def _check_folder_takes_files(target: Path) -> None:
    """The target's folder accepts a new file (where the restore writes its temp file): tried, not
    judged from mode bits (root, ACLs, a read-only mount)."""
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    except OSError as err:
        raise RestoreError(f"restore to {target}: cannot create a file there ({err.strerror})",
                           "check the folder's permissions; nothing was changed") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # (another restore's clean-up beside it may have taken it)
        os.unlink(name)


def open_temp_beside(target: Path) -> tuple[Path, int]:
    """A new temp file beside ``target`` (named so that the next restore removes it if this one dies),
    open for writing and flocked. The flock is held until the rename: a restore that finds such a
    file unlocked knows its writer is dead. A flock, not a POSIX lock: closing another descriptor of
    the file never drops it, and SQLite's POSIX locks on the target do not see it. Taken before the
    file grows (see _remove_leftovers)."""
    tmp = target.parent / f"{_temp_prefix(target)}{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as err:
        raise RestoreError(f"restore to {target}: cannot create a file there ({err.strerror})",
                           "check the folder's permissions") from err
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


def _write_restore(repo: Repository, plan: RestorePlan, progress: Progress | None) -> RestoreResult:
    started = time.perf_counter()
    m = plan.manifest
    ps = m.page_size
    _remove_leftovers(plan.target)
    tmp, fd = open_temp_beside(plan.target)
    total = plan.bytes_to_read
    done = 0
    closed = False

    def release() -> None:
        nonlocal closed
        if not closed:
            closed = True
            os.close(fd)

    if m.mode is not None:
        os.fchmod(fd, m.mode)  # the source's own mode, whatever the umask (None: 0644 minus umask)
    page_hash = FAST_HASH if plan.quick_check else repo.page_hash
    expected = plan.hashes.buf
    try:
        os.ftruncate(fd, m.size)

        def fetch(span: list[SnapshotBlob]) -> tuple[int, int]:
            first, last = span[0], span[-1]
            written = 0
            at, kept = plan.kept.get(first.pack, (0, b""))
            if at <= first.offset and last.offset + last.length <= at + len(kept):
                data = kept[first.offset - at : last.offset + last.length - at]  # read with the pack's index
            else:
                data = repo.store.get_range(f"packs/{first.pack[:2]}/{first.pack}", first.offset,
                                            last.offset + last.length - first.offset)
            for b in span:
                rel = b.offset - first.offset
                piece = data[rel : rel + b.length]
                if len(piece) != b.length:
                    raise IntegrityError(f"packs/{b.pack}: truncated at {b.offset}")
                # (no name holds the batch after its write: a worker keeps one opened batch at a time)
                where = f"packs/{b.pack}@{b.offset}"
                _write_blob(fd, b, memoryview(repo.sealer.unseal(piece, "page-batch", where=where)), ps, page_hash,
                            expected)
                written += len(b.pages) * ps
            return len(data), written

        spans = _spans(plan.blobs)
        # written pages are flushed to disk in the background as the restore goes (fdatasync
        # every SYNC_EVERY bytes), so the final fsync finds little left to write
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbre-sync")
        syncing: Future[None] | None = None
        unsynced = 0
        try:
            with ThreadPoolExecutor(max_workers=FETCHERS, thread_name_prefix="dbre-restore") as pool:
                # bounded window of spans in flight keeps memory at a few spans
                window = FETCHERS
                futures = [pool.submit(fetch, s) for s in spans[:window]]
                nxt = window
                while futures:
                    read, written = futures.pop(0).result()
                    done += read
                    unsynced += written
                    if unsynced >= SYNC_EVERY and (syncing is None or syncing.done()):
                        if syncing is not None:
                            syncing.result()
                        syncing, unsynced = syncer.submit(os.fdatasync, fd), 0
                    if progress:
                        progress(min(done, total), total)
                    if nxt < len(spans):
                        futures.append(pool.submit(fetch, spans[nxt]))
                        nxt += 1
            if syncing is not None:
                syncing.result()
        finally:
            syncer.shutdown(wait=True)
        os.fsync(fd)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        release()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise RestoreError(f"restore to {plan.target}: disk full ({m.size} bytes needed)",
                               "free space or restore to another disk; the target was not touched") from None
        if isinstance(err, OSError):
            raise RestoreError(f"restore to {plan.target}: {err.strerror}") from err
        raise
    try:
        _replace(tmp, plan.target, plan.force, release, only_empty=plan.only_empty)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        release()
    return RestoreResult(plan, time.perf_counter() - started)


def _write_blob(fd: int, b: SnapshotBlob, raw: memoryview, ps: int, page_hash: Callable[[Any], bytes],
                expected: bytes | bytearray) -> None:
    """Check each page ``b`` takes from its opened batch ``raw`` against its hash in ``expected``
    and write it at its place; pages consecutive both in the batch and in the file go in one write."""
    pages, slots = b.pages, b.slots
    n = len(pages)
    if not n:
        return
    first, slot = pages[0], slots[0]
    if pages[-1] - first == n - 1 and slots == array("H", range(slot, slot + n)):  # (what a full backup writes)
        got = b"".join([page_hash(raw[s * ps : (s + 1) * ps]) for s in range(slot, slot + n)])
        if got == expected[first * 16 : (first + n) * 16]:
            os.pwrite(fd, raw[slot * ps : (slot + n) * ps], first * ps)
            return
    start = 0
    for k in range(n):
        index, slot = pages[k], slots[k]
        if page_hash(raw[slot * ps : (slot + 1) * ps]) != expected[index * 16 : index * 16 + 16]:
            raise IntegrityError(f"packs/{b.pack}@{b.offset}: page {index + 1} does not match its hash")
        if k + 1 == n or pages[k + 1] != index + 1 or slots[k + 1] != slot + 1:
            os.pwrite(fd, raw[slots[start] * ps : (slot + 1) * ps], pages[start] * ps)
            start = k + 1


def _crash_point(name: str) -> None:
    """Nothing; the crash tests replace it to kill -9 the process at each dangerous instant."""


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.dbre-restore-"


def pitr_scratch_name(target: Path, token: str) -> str:
    """The scratch copy a ``restore --at`` builds beside ``target`` (flocked while it lives)."""
    return f".{target.name}.dbre-pitr-{token}"


def follow_scratch_name(target: Path, token: str) -> str:
    """The scratch copy a ``restore --follow`` builds beside ``target`` before placing it."""
    return f".{target.name}.dbre-follow-{token}"


def _remove_leftovers(target: Path) -> list[str]:
    """Remove the temp files that killed restores to ``target`` left beside it; returns their names.

    A live restore holds an exclusive flock on its temp file until the rename, so one this run can
    flock (non-blocking) has no writer. A restore creates its file empty and flocks it before it
    grows, so an empty file younger than ``FRESH_SECONDS`` may be one whose flock is a moment away:
    it is left alone (a killed one goes at a later restore). A ``restore --at``'s scratch copy
    (`pitr_scratch_name`) and its base restore's own temp file beside it are removed the same way, and
    so is a ``restore --follow``'s (`follow_scratch_name`, flocked until its placement) with theirs."""
    scratch = re.escape(pitr_scratch_name(target, "")) + r"[0-9a-f]{8}"
    # a follower's scratch copy (`follow_scratch_name`), with its restore --at scratch and base temp file
    follow = (rf"\.{re.escape(target.name)}\.dbre-follow-[0-9a-f]{{8}}"
              r"|\.\.{1,2}" + re.escape(target.name) + r"\.dbre-follow-[0-9a-f]{8}\.dbre-pitr-[0-9a-f]{8}"
              r"(?:\.dbre-restore-[0-9a-f]{8})?")
    pattern = re.compile(rf"{re.escape(_temp_prefix(target))}[0-9a-f]{{8}}|{scratch}"
                         rf"|\.{scratch}\.dbre-restore-[0-9a-f]{{8}}|{follow}")
    try:
        names = sorted(e.name for e in os.scandir(target.parent) if pattern.fullmatch(e.name))
    except OSError:
        return []
    removed = []
    for name in names:
        path = target.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, or not this user's to read: left alone
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live restore is writing it
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size == 0 and time.time() - st.st_mtime < FRESH_SECONDS):
                continue
            try:
                if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                    continue  # replaced since it was opened
                os.unlink(path)
            except OSError:
                continue
            removed.append(f"{name} ({human_bytes(st.st_size)})")
        finally:
            os.close(fd)
    if removed:
        log.warning("restore to %s: removed %d temp file(s) left by a killed restore: %s",
                    target, len(removed), ", ".join(removed))
    return removed


def _replace(tmp: Path, target: Path, force: bool, release_tmp: Callable[[], None] = lambda: None, *,
             only_empty: bool = False) -> None:
    """Rename the restored file over ``target`` so that a crash at any instant leaves the complete
    old database or the complete new one, never the old file without its WAL nor the new file
    beside the old WAL (SQLite would replay the old frames into it).

    The old database is held still first (``_hold_still``: an exclusive lock, and every WAL frame
    copied into the file, so its file alone is complete) and taken out of WAL mode (`_leave_wal`: a
    process that opens it meanwhile then fails loudly instead of writing into the new file's -wal);
    then its -wal, -shm and -journal go, then the new file is renamed over it, and only then is the
    lock let go. A 0-byte file with nothing in a -wal beside it is not held (it has nothing to keep,
    and holding it would write an empty database into it). With ``only_empty`` the old file is
    replaced only if it still holds no database: looked at again, under the hold when there is one
    (a database written into it while the restore ran is refused, untouched). A symlinked target's
    old database is not renamed over (the link is): it is put back in WAL mode after.
    """
    if not force:
        _place_new(tmp, target, release_tmp)
        return
    # a process holding it would go on writing to the replaced file; one holding only the -wal and -shm
    # of a database deleted under it would lose the commits they hold when they are removed below
    check_not_in_use(target)
    if only_empty and not is_empty_database(target):
        _written_meanwhile(target)
    link = os.path.islink(target)
    _still_a_file(target)
    held = _hold_still(target, nofollow=not link) if target.exists() and not _nothing_to_keep(target) else None
    was_wal = renamed = False
    try:
        _crash_point("held")
        if held is not None:
            check_not_in_use(target, holding=True)  # (one that opened it since the first look)
            if only_empty and not _holds_no_database(held):
                _written_meanwhile(target)
            was_wal = _leave_wal(held, target)
        for suffix in ("-wal", "-shm", "-journal"):
            Path(str(target) + suffix).unlink(missing_ok=True)
        _crash_point("cleared")
        # the temp file's flock goes now, not after the rename: closing a descriptor of the new
        # target would drop any POSIX lock this process's SQLite connections take on it. (Another
        # restore to this target cleaning up in the microseconds until the rename would make this
        # one fail, the target untouched.)
        release_tmp()
        os.replace(tmp, target)
        renamed = True
        _crash_point("renamed")
        _sync_dir(target.parent)
    finally:
        if held is not None:
            if was_wal and (not renamed or link):
                _back_to_wal(held, target)  # (refused or failed, or only a link to it replaced: left as it was)
            held.close()  # checkpoint-on-close is off, no journal file is open: closing removes no file by name


def is_empty_database(target: Path) -> bool:
    """Whether the regular file at ``target`` (through a symlink) holds no database: 0 bytes, or one
    page whose schema is empty (what a WAL application leaves by merely connecting, or a restore's
    hold that failed before this fix), with no WAL frame beside it. Reads the header only: no SQLite
    connection (closing one can checkpoint and remove -wal/-shm); never call it while this process
    holds SQLite locks on the file (closing a descriptor drops them)."""
    try:
        if not target.is_file():
            return False
        real = os.path.realpath(target)
        wal = Path(real + "-wal")
        if wal.exists() and wal.stat().st_size > 32:  # (a header alone holds no frame)
            return False
        size = target.stat().st_size
        if size == 0:
            return True
        with open(real, "rb") as f:
            head = f.read(105)
    except OSError:
        return False
    if len(head) < 105 or head[:16] != b"SQLite format 3\0":
        return False
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    # page 1 is a table b-tree leaf (0x0D) with no cell: sqlite_schema holds nothing
    return size == page_size and head[100] == 0x0D and int.from_bytes(head[103:105], "big") == 0


def _sqlite_header(target: Path) -> bool:
    """Whether the file at ``target`` starts as an SQLite database does (read without SQLite)."""
    try:
        with open(os.path.realpath(target), "rb") as f:
            return f.read(16) == b"SQLite format 3\0"
    except OSError:
        return True  # (unreadable: the snapshot says why)


def _nothing_to_keep(target: Path) -> bool:
    """A 0-byte regular file with no WAL frame beside it: replaced without being held."""
    try:
        return target.is_file() and target.stat().st_size == 0 and is_empty_database(target)
    except OSError:
        return False


def _holds_no_database(held: apsw.Connection) -> bool:
    """Under the hold (through its connection: no descriptor of ours is opened or closed), whether the
    old database still holds nothing: no schema, at most one page."""
    return (int(held.execute("SELECT count(*) FROM sqlite_schema").get) == 0
            and int(held.execute("PRAGMA page_count").get) <= 1)


def _written_meanwhile(target: Path) -> None:
    raise UsageError(f"restore target {target} holds a database now: it was written while restoring",
                     "nothing was replaced; run the restore again (--if-db-not-exists then leaves it alone)")


def _leave_wal(held: apsw.Connection, target: Path) -> bool:
    """Switch the held old database (its WAL already checkpointed) out of WAL mode before the rename;
    whether it was in WAL mode.

    Why: a process that opens the old file after the second look waits on our exclusive lock, and
    gets it on the old inode once we let go after the rename. Were the old file still in WAL mode, it
    would read its header, open ``<target>-wal`` and -shm *by name* (the new file's) and commit the old
    database's pages there: the new database silently mixed with the old one. In rollback mode
    (header bytes 18-19 = 1, written here by SQLite's own journal_mode change under our lock, crash-
    safe: the WAL is checkpointed and removed first) that process writes through the descriptor it
    holds and SQLite finds the file renamed over (SQLITE_READONLY_DBMOVED): its commit fails loudly,
    as a rollback-mode database's late writer already does. Then journal_mode=MEMORY: the held
    connection keeps no -journal open, so closing it after the rename deletes no file by the target's
    name (in exclusive locking mode a DELETE-mode connection would delete ``<target>-journal`` at close,
    the new database's if it has one by then). The old file only changes mode: all its content stays; if
    the rename does not happen, `_back_to_wal` puts WAL mode back (a kill -9 in between leaves it
    complete in rollback mode; an application asking for WAL at open switches it back)."""
    was_wal = str(held.execute("PRAGMA journal_mode").get).lower() == "wal"
    try:
        if was_wal:
            held.execute("PRAGMA journal_mode=DELETE")  # (checkpoints what is left and deletes the -wal)
        held.execute("PRAGMA journal_mode=MEMORY")
    except apsw.Error as err:
        if was_wal:
            _back_to_wal(held, target)
        raise RestoreError(f"restore to {target}: the old database could not be taken out of WAL mode "
                           f"({type(err).__name__})", "stop the application using it, or restore to another "
                           "path; nothing was changed") from None
    return was_wal


def _back_to_wal(held: apsw.Connection, target: Path) -> None:
    """Put the held old database (still at ``target``: not renamed over) back in WAL mode."""
    try:
        held.execute("PRAGMA journal_mode=WAL")
    except apsw.Error as err:
        log.warning("restore to %s: the old database was left in rollback journal mode, complete (%s); "
                    "`PRAGMA journal_mode=WAL` puts WAL back", target, err)


def _place_new(tmp: Path, target: Path, release_tmp: Callable[[], None]) -> None:
    """Without ``--force``: give the restored file its name only if nothing has it, even a file
    that appeared since the plan (a hard link fails when the name exists; a rename would replace
    it), and never beside a -wal or -journal left without its database (SQLite would replay it
    into the restored file)."""
    check_no_leftovers(target)
    _crash_point("held")  # (the same moment as in _replace: the temp file complete, not yet named)
    release_tmp()  # (see _replace)
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise UsageError(f"restore target {target} appeared while restoring",
                         "choose a new path or pass --force; nothing was written there") from None
    tmp.unlink()
    _crash_point("renamed")
    _sync_dir(target.parent)


def check_no_leftovers(target: Path) -> None:
    """Without ``--force``: refuse a ``target`` whose database is gone but whose -wal or -journal is
    still there (SQLite would replay it into the restored file)."""
    if target.exists():
        return
    for suffix in ("-wal", "-journal"):
        if os.path.lexists(str(target) + suffix):
            raise RestoreError(f"restore to {target}: {target.name}{suffix} is there without its database",
                               "move it away (SQLite would replay it into the restored file), or pass --force")


def _sync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# SQLite's lock bytes (os_unix.c): in the database file PENDING, RESERVED, then the SHARED range;
# in -shm the WAL write lock, checkpoint, recover, five read marks, then DMS (held by every
# connection that has the WAL index open)
_PENDING = 0x40000000
_DB_WRITE = (_PENDING, 2)
_DB_SHARED = (_PENDING + 2, 510)
_SHM_WRITE, _SHM_READ, _SHM_OPEN = (120, 1), (123, 5), (128, 1)


def check_not_in_use(target: Path, *, holding: bool = False) -> None:
    """Refuse to replace ``target`` while any process uses it: raises RestoreError naming the process
    and what it holds (a write transaction, a read transaction, or just the file open).

    Nothing here opens a SQLite connection (closing one in WAL mode can checkpoint and delete -wal
    and -shm), and this process's own POSIX locks are never dropped: if it has the files open
    itself, that alone refuses, before any descriptor is opened here (closing one would drop them).
    Then the kernel is asked which locks others hold (``F_GETLK``: every process on this kernel,
    containers included) on SQLite's lock bytes of the database and its -shm, and every process
    whose descriptors /proc shows is checked for the files open without a lock (a rollback-mode
    connection between transactions). A process in another PID namespace holding no lock, or one
    on another host over a network filesystem, cannot be seen.

    ``holding``: this process holds the database's exclusive lock (`_hold_still`), so only other
    processes with the files open are looked for (no descriptor is opened: that would drop the lock)."""
    # through a symlink SQLite keeps -wal and -shm beside the file it resolves to: both places are looked at
    bases = dict.fromkeys((str(target), os.path.realpath(target)))
    files: dict[tuple[int, int], tuple[str, str]] = {}  # (dev, inode) -> (suffix, path)
    for base in bases:
        for suffix in ("", "-wal", "-shm"):
            try:
                st = os.stat(base + suffix)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.setdefault((st.st_dev, st.st_ino), (suffix, base + suffix))
    if not files:
        return
    holders = open_by(files)
    me = os.getpid()
    if holding:
        holders.pop(me, None)
    elif me in holders:
        raise RestoreError(f"restore to {target}: this process has it open ({target.name}{holders[me]})",
                           "close its connections first; nothing was changed")
    cause = None if holding else _lock_holder(target, files)
    if cause is None and holders:
        pid, suffix = next(iter(holders.items()))
        cause = f"process {pid}{process_name(pid)} has {target.name}{suffix} open"
    if cause is not None:
        raise RestoreError(f"restore to {target}: the database is in use: {cause}",
                           "stop the application using it, or restore to another path; nothing was changed")


def _lock_holder(target: Path, files: dict[tuple[int, int], tuple[str, str]]) -> str | None:
    """What the first process holding a SQLite lock on ``target`` holds, by ``F_GETLK``; None: no lock."""
    found: dict[str, int] = {}
    for suffix, path in files.values():
        if suffix == "-wal":
            continue  # (SQLite locks the database file and -shm, never -wal)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            ranges = ({"write": _SHM_WRITE, "read": _SHM_READ, "open": _SHM_OPEN, "lock": (0, 0)} if suffix
                      else {"write": _DB_WRITE, "shared": _DB_SHARED, "lock": (0, 0)})
            for what, (start, length) in ranges.items():
                probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
                try:
                    answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
                except OSError:
                    break  # (a filesystem without POSIX locks: SQLite cannot lock it either)
                l_type, _, _, _, pid = struct.unpack("hhqqi4x", answer)
                if l_type != fcntl.F_UNLCK:
                    found.setdefault(what, pid)
        finally:
            os.close(fd)  # (this process holds no lock on these files: checked before)
    wal_mode = "open" in found or "read" in found or "write" in found
    for what, label in (("write", "holds a write transaction"), ("read", "has a read transaction open"),
                        ("shared", "has it open in WAL mode" if wal_mode else "has a read transaction open"),
                        ("open", "has it open in WAL mode"), ("lock", "holds a lock on it")):
        if what in found:
            pid = found[what]
            who = f"process {pid}{process_name(pid)}" if pid > 0 else "a process not visible here"
            return f"{who} {label}"
    return None


def open_by(files: dict[tuple[int, int], tuple[str, str]]) -> dict[int, str]:
    """The processes /proc shows with one of ``files`` open (pid -> the file's suffix); those this
    user cannot inspect are skipped."""
    out: dict[int, str] = {}
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            entries = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    st = os.stat(e.path)
                except OSError:
                    continue
                found = files.get((st.st_dev, st.st_ino))
                if found is not None:
                    out.setdefault(pid, found[0])
                    break
    return out


def process_name(pid: int) -> str:
    try:
        return f" ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:
        return ""


def _hold_still(target: Path, nofollow: bool = False) -> apsw.Connection | None:
    """An exclusive lock on the old database, with its WAL checkpointed and truncated; None when
    the old file is not a database (it is then simply replaced). ``nofollow``: the target was no link
    when it was checked (`_still_a_file`), so one put there since is refused, not followed."""
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_NOFOLLOW if nofollow else 0)
    # (SQLite's NOFOLLOW refuses a link anywhere in the path: the folders are given resolved, a symlinked
    # folder being the operator's choice; only the last name must not have become a link)
    name = str(Path(os.path.realpath(target.parent)) / target.name) if nofollow else str(target)
    try:
        conn = apsw.Connection(name, flags=flags)
    except apsw.Error as err:  # (not readable and writable by this user: its users could not be seen either)
        raise RestoreError(f"restore to {target}: the old database could not be opened to hold it still ({err})",
                           "run the restore as the user that owns it, or restore to another path; "
                           "nothing was changed") from None
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    try:
        conn.set_busy_timeout(HOLD_WAIT_MS)
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")  # (a hot journal of the old database is rolled back here)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        conn.execute("COMMIT")  # the exclusive lock stays: locking_mode=EXCLUSIVE
        if str(conn.execute("PRAGMA journal_mode").get).lower() == "wal":
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").get
            wal = Path(str(target) + "-wal")
            if busy or frames != copied or (wal.exists() and wal.stat().st_size):
                raise RestoreError(f"restore to {target}: the old database's WAL could not be checkpointed",
                                   "stop the application using it, or restore to another path")
    except (apsw.NotADBError, apsw.CorruptError):
        conn.close()
        return None
    except apsw.BusyError:
        conn.close()
        check_not_in_use(target)  # names the process that kept it past the wait (this one holds nothing now)
        raise RestoreError(f"restore to {target}: the database there is in use",
                           "stop the application using it, or restore to another path") from None
    except apsw.Error as err:  # (e.g. a -wal or -shm SQLite refuses to open: a symlink, another user's)
        conn.close()
        raise RestoreError(f"restore to {target}: the old database could not be held still ({err})",
                           f"check that {target.name}-wal and {target.name}-shm are its own regular files, "
                           "or restore to another path; nothing was changed") from None
    except BaseException:
        conn.close()
        raise
    return conn
