"""A store in a local directory: each key a file, every write temp-file + fsync + rename."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from dbre.errors import UsageError
from dbre.storage.base import AlreadyExists, Conflict, NotFound, PermanentError, StorageError, TransientError

REPLACE_LOCK_WAIT = 30.0  # seconds a conditional replace waits for another's lock on the same file
_TMP = ".tmp"  # temp files live here, never under a key's own folder, so list() never sees them


def _os_error(op: str, key: str, err: OSError) -> StorageError:
    """The store error for ``err``: a write refused for good (disk full, read-only, not permitted) is
    ``WriteRefused``, which read-only operations survive by reading without a lock."""
    from dbre.storage.base import WriteRefused

    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return WriteRefused(f"{op} {key}: disk full ({err.strerror})", "free space on the repository disk",
                            cause="disk full")
    if err.errno == errno.EROFS:
        return WriteRefused(f"{op} {key}: {err.strerror}", "check the repository's permissions and mount",
                            cause="read-only file system")
    if err.errno in (errno.EACCES, errno.EPERM) and op in ("put", "replace", "delete"):
        return WriteRefused(f"{op} {key}: {err.strerror}", "check the repository's permissions",
                            cause="permission denied")
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermanentError(f"{op} {key}: {err.strerror}", "check the repository's permissions")
    if err.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY):
        return TransientError(f"{op} {key}: {err.strerror}")
    return PermanentError(f"{op} {key}: {err.strerror or err}")


class LocalStore:
    """Objects as files under ``root``. Safe against kill -9: a file appears only by rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if "\x00" in os.fspath(root):
            raise UsageError(f"repository path {os.fspath(root)!r} holds a NUL character",
                             "check the --repo value (or the policy's repositories)")
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise PermanentError(f"invalid key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        upload = LocalUpload(self, key)
        upload.write(data)
        upload.commit(if_absent=if_absent)

    def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
        """Write ``data`` under ``key`` only if it holds exactly ``expected`` (``ReplacingStore``):
        under an exclusive flock of the key's file, compare, then temp file + fsync + rename.

        The flock is taken on the file the name points at; a replace that waited while another one
        renamed a new file over the name finds its inode gone and locks the new file instead, whose
        bytes then differ: ``Conflict``. Readers take no lock: the rename makes the swap atomic.
        The file is opened for writing when it may be (NFS grants an exclusive flock only then),
        else read only (a file made read-only). The new file keeps the old one's mode, and its owner
        and group when this process may give them (root): a `sudo dbre key passwd` must not leave a
        `config` the repository's own user cannot read."""
        path = self._path(key)
        while True:
            try:
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    raise
                except OSError:  # read-only file or file system, a FUSE mount that will not: read only
                    fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise NotFound(f"replace {key}: not found") from None
            except OSError as err:
                raise _os_error("replace", key, err) from err
            try:
                try:
                    _lock_within(fd, key, path)
                except OSError as err:
                    if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL):
                        raise PermanentError(f"replace {key}: this file system cannot lock the file "
                                             f"({err.strerror}); nothing was written",
                                             "on NFS, enable locking (lockd, or mount with local_lock=flock on "
                                             "the one host that writes the repository)") from err
                    raise
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    raise NotFound(f"replace {key}: not found") from None
                held = os.fstat(fd)
                if (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                    continue  # renamed over while this waited: lock the file there now
                current = os.pread(fd, min(held.st_size, len(expected) + 1), 0)
                if current != expected:
                    raise Conflict(f"replace {key}: it changed since it was read (another run wrote it); "
                                   "nothing was written", "read it again and retry")
                upload = LocalUpload(self, key)
                upload.write(data)
                _same_mode_and_owner(upload, held, key)
                upload.commit()  # fsync, rename over the name, fsync of the folder
                return
            except OSError as err:
                raise _os_error("replace", key, err) from err
            finally:
                os.close(fd)  # (releases the flock)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"get {key}: not found") from None
        except IsADirectoryError:
            raise NotFound(f"get {key}: not found") from None
        except OSError as err:
            raise _os_error("get", key, err) from err

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                # never allocate past the end: a capped read (get_capped) asks for cap + 1 bytes
                size = os.fstat(f.fileno()).st_size
                return os.pread(f.fileno(), min(length, max(0, size - offset)), offset)
        except (FileNotFoundError, IsADirectoryError):  # as get(): a folder is not an object
            raise NotFound(f"get {key}: not found") from None
        except OSError as err:
            raise _os_error("get", key, err) from err

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        keys = self._walk(prefix)
        if start_after is None and limit is None:
            yield from keys
            return
        ordered = sorted(k for k in keys if start_after is None or k > start_after)
        yield from ordered[:limit] if limit is not None else ordered

    def _walk(self, prefix: str) -> Iterator[str]:
        base = self.root
        # walk only the deepest folder the prefix names
        folder, _, _ = prefix.rpartition("/")
        start = base / folder if folder else base
        if not start.is_dir():
            return

        def fail(err: OSError) -> None:
            # a folder that cannot be read must not list as empty: prune would conclude from it
            raise _os_error("list", prefix or "/", err) from err

        for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
            rel = os.path.relpath(dirpath, base)
            if rel == _TMP or rel.startswith(_TMP + os.sep):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if not (rel == "." and d == _TMP)]
            for name in filenames:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    yield key

    def modified(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise NotFound(f"stat {key}: not found") from None
        except OSError as err:
            raise _os_error("stat", key, err) from err

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error("delete", key, err) from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open_upload(self, key: str) -> LocalUpload:
        return LocalUpload(self, key)

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files left by writers killed mid-put, untouched for ``older_than``
        seconds (a pack still being written by a live backup is touched at every blob);
        returns how many."""
        tmpdir = self.root / _TMP
        count = 0
        if tmpdir.is_dir():
            now = time.time()  # the mtimes are this file system's clock, as is this
            for f in tmpdir.iterdir():
                try:
                    if older_than and now - f.stat().st_mtime < older_than:
                        continue
                except FileNotFoundError:
                    continue
                f.unlink(missing_ok=True)
                count += 1
        return count


class LocalUpload:
    """A temp file in ``.tmp`` that grows with each write and is renamed into place at commit.

    Every ``WRITEBACK_EVERY`` bytes the kernel is asked to start writing the file out
    (``posix_fadvise(DONTNEED)`` starts write-back without waiting for it), so the fsync at
    commit finds little left to write. Crash safety is that of ``put``: the key appears only by
    the rename (or link) of a complete, fsynced file.
    """

    WRITEBACK_EVERY = 4 * 1024 * 1024

    def __init__(self, store: LocalStore, key: str) -> None:
        self.store = store
        self.key = key
        self.path = store._path(key)
        self.tmp = store.root / _TMP / secrets.token_hex(8)
        self._fd: int | None = None
        self._size = 0
        self._flushed = 0
        self._failed = False  # after an error or abort, nothing more is written or committed

    def _open(self) -> int:
        if self._failed:
            raise PermanentError(f"put {self.key}: the upload failed or was aborted")
        if self._fd is None:
            try:
                self.tmp.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as err:
                raise _os_error("put", self.key, err) from err
        return self._fd

    def write(self, data: bytes) -> None:
        fd = self._open()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._size += len(data)
            if self._size - self._flushed >= self.WRITEBACK_EVERY:
                os.posix_fadvise(fd, self._flushed, self._size - self._flushed, os.POSIX_FADV_DONTNEED)
                self._flushed = self._size
        except OSError as err:
            self.abort()
            raise _os_error("put", self.key, err) from err

    def commit(self, *, if_absent: bool = False) -> None:
        """Make the file appear under its key; with ``if_absent``, only if the key is free
        (else ``AlreadyExists``, and nothing is written)."""
        fd = self._open()
        try:
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if if_absent:
                # link() fails if the name exists: an atomic create-if-absent on POSIX
                try:
                    os.link(self.tmp, self.path)
                except FileExistsError:
                    raise AlreadyExists(f"put {self.key}: already exists") from None
                finally:
                    self.tmp.unlink(missing_ok=True)  # the temp name goes, linked or not
            else:
                os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as err:
            self.abort()
            if err.errno == errno.ENOENT and not self.tmp.exists():
                raise PermanentError(
                    f"put {self.key}: its temp file in .tmp was removed while this run was writing it"
                    " (a prune with a short --grace beside a paused or slow run?); nothing was stored",
                    "run it again; keep prune's --grace above the longest pause a writer may see",
                ) from err
            raise _os_error("put", self.key, err) from err

    def abort(self) -> None:
        self._failed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _same_mode_and_owner(upload: LocalUpload, old: os.stat_result, key: str) -> None:
    """Give ``upload``'s temp file the mode of the file it replaces, and its owner and group where allowed."""
    fd = upload._open()
    try:
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
        mine = os.fstat(fd)
        if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:  # not root: the file stays ours, in the old group if we are in it
                try:
                    os.fchown(fd, -1, old.st_gid)
                except PermissionError:
                    pass
    except OSError as err:
        upload.abort()
        raise _os_error("replace", key, err) from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_within(fd: int, key: str, path: Path) -> None:
    """An exclusive flock of ``fd``, waited for at most ``REPLACE_LOCK_WAIT`` seconds: the holder
    keeps it for milliseconds (compare and write), so a longer wait is a holder paused or stuck
    (a stopped process, a VM paused, a lost NFS lock), which one line names instead of a hang."""
    deadline = time.monotonic() + REPLACE_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TransientError(f"replace {key}: another process has held its lock for "
                                     f"{REPLACE_LOCK_WAIT:.0f} s (a paused or stuck run); nothing was written",
                                     f"find it (fuser -v {path}), let it finish or stop it, then retry") from None
            time.sleep(0.05)
