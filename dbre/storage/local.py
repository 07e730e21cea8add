"""A store in a local directory: each key a file, every write temp-file + fsync + rename."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from dbre.errors import IntegrityError, UsageError
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
        from dbre.storage.base import ReadRefused

        return ReadRefused(f"{op} {key}: {err.strerror}", "check the repository's permissions")
    if err.errno in (errno.EMFILE, errno.ENFILE):  # (a retry meets the same limit: the operator raises it)
        return PermanentError(f"{op} {key}: {err.strerror}",
                              "raise the open-file limit (`ulimit -n`, or LimitNOFILE= in a systemd unit), or run "
                              "fewer backups at once in this process")
    if err.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY):
        return TransientError(f"{op} {key}: {err.strerror}")
    if op in ("put", "replace"):  # (e.g. a --repo under /proc: its folders cannot be made)
        return PermanentError(f"{op} {key}: {err.strerror or err}",
                              "check the repository path (--repo): a folder this user can create and write")
    return PermanentError(f"{op} {key}: {err.strerror or err}")


class LocalStore:
    """Objects as files under ``root``. Safe against kill -9: a file appears only by rename.

    No symbolic link below ``root`` is ever followed (``root`` itself may be one: the operator's
    choice). Every operation opens the folders on a key's path one at a time, each relative to the
    one above with ``O_NOFOLLOW`` (``openat``), and then works on the name inside the last one, so
    a folder swapped for a link even mid-run (``.tmp`` or ``locks`` pointed at someone's files) can
    make dbre delete, list or write nothing outside the repository: it is refused with one line
    naming it (``PermanentError``). Reads refuse links too, although every object is authenticated:
    a link can point a read at a FIFO or a device (a hang), or at a file this user may read and the
    writer of the repository may not, and refusing costs nothing (the same ``O_NOFOLLOW`` opens).
    An object that is a link or not a regular file (a FIFO, a socket) fails at once as a damaged
    object, ``IntegrityError`` naming its key (``verify`` reports it, a fallback reads the copy);
    it is opened with ``O_NONBLOCK`` and checked with ``fstat`` before a byte is read. ``list``
    refuses a link it meets under the prefix (skipping it would hide keys: prune would judge packs
    unused), and lists other non-regular files as keys, so verify names them and prune can delete
    them. A file where a folder belongs (``locks``, ``.tmp``) is one line naming it.
    """

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

    def _folder(self, folder: str, op: str, key: str, *, create: bool = False) -> int:
        """A descriptor of ``folder`` ("a/b" below the root, "" for the root), each part opened
        relative to the one above with ``O_NOFOLLOW``; with ``create``, missing parts are made.
        Raises ``FileNotFoundError`` if a part is missing (or the root is not a folder) without
        ``create``, ``PermanentError`` naming a part that is a link or not a folder."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such folder", str(self.root)) from None
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = folder.split("/") if folder else []
            for i, part in enumerate(parts):
                for attempt in (0, 1):
                    try:
                        sub = os.open(part, _DIR, dir_fd=fd)
                        break
                    except FileNotFoundError:
                        if not create or attempt:
                            raise
                        try:
                            os.mkdir(part, dir_fd=fd)
                            os.fsync(fd)  # (its name in the parent survives a power loss before the object's)
                        except FileExistsError:
                            pass
                    except OSError as err:
                        if err.errno in (errno.ELOOP, errno.ENOTDIR):
                            raise _not_a_folder(fd, part, "/".join(parts[: i + 1]), op, key) from None
                        raise
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_object(self, op: str, key: str, *, write: bool = False) -> tuple[int, os.stat_result]:
        """A descriptor of ``key``'s file and its ``fstat``, never through a link and never blocking
        (a FIFO). ``NotFound`` if absent (or a folder), ``IntegrityError`` if not a regular file."""
        folder, _, name = key.rpartition("/")
        self._path(key)
        try:
            dfd = self._folder(folder, op, key)
        except FileNotFoundError:
            raise NotFound(f"{op} {key}: not found") from None
        except OSError as err:
            raise _os_error(op, key, err) from err
        try:
            try:
                fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _OBJECT, dir_fd=dfd)
            except OSError as err:
                if not write or err.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                    raise
                # a read-only file or file system, a FUSE mount that will not: read only
                fd = os.open(name, os.O_RDONLY | _OBJECT, dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"{op} {key}: not found") from None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENXIO):  # a link (O_NOFOLLOW), a socket
                raise _not_an_object(dfd, name, key) from None
            raise _os_error(op, key, err) from err
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):  # a folder is not an object
                raise NotFound(f"{op} {key}: not found")
            raise _damaged(key, _kind(st.st_mode))
        return fd, st

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
        `config` the repository's own user cannot read. A link or a FIFO under ``key`` is refused
        as by ``get``."""
        path = self._path(key)
        while True:
            fd, held = self._open_object("replace", key, write=True)
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
                    now = self._lstat("replace", key)
                except FileNotFoundError:
                    raise NotFound(f"replace {key}: not found") from None
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

    def _lstat(self, op: str, key: str) -> os.stat_result:
        """The ``lstat`` of ``key`` (not following a link); ``FileNotFoundError`` if it or a folder is absent."""
        folder, _, name = key.rpartition("/")
        self._path(key)
        dfd = self._folder(folder, op, key)
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)

    def get(self, key: str) -> bytes:
        fd, st = self._open_object("get", key)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as err:
            raise _os_error("get", key, err) from err
        finally:
            os.close(fd)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fd, st = self._open_object("get", key)
        try:
            # never allocate past the end: a capped read (get_capped) asks for cap + 1 bytes
            return os.pread(fd, min(length, max(0, st.st_size - offset)), offset)
        except OSError as err:
            raise _os_error("get", key, err) from err
        finally:
            os.close(fd)

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        keys = self._walk(prefix)
        if start_after is None and limit is None:
            yield from keys
            return
        ordered = sorted(k for k in keys if start_after is None or k > start_after)
        yield from ordered[:limit] if limit is not None else ordered

    def _walk(self, prefix: str) -> Iterator[str]:
        # walk only the deepest folder the prefix names, and below it only folders the prefix admits
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise PermanentError(f"invalid prefix {prefix!r}")
        folder, _, _ = prefix.rpartition("/")
        if folder == _TMP or folder.startswith(_TMP + "/"):
            return  # temp files are never keys
        try:
            fd = self._folder(folder, "list", prefix or "/")
        except FileNotFoundError:
            return
        except OSError as err:
            raise _os_error("list", prefix or "/", err) from err
        try:
            yield from self._scan(fd, folder, prefix)
        finally:
            os.close(fd)

    def _scan(self, fd: int, rel: str, prefix: str) -> Iterator[str]:
        """The keys in the folder ``fd`` (``rel`` below the root) and below it that start with ``prefix``."""
        try:
            with os.scandir(fd) as it:
                entries = list(it)
        except OSError as err:
            # a folder that cannot be read must not list as empty: prune would conclude from it
            raise _os_error("list", prefix or "/", err) from err
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            if not key.startswith(prefix) or key == _TMP:
                continue
            try:
                if entry.is_symlink():
                    raise _link_listed(fd, entry.name, key, prefix)
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the folder was read
            if not is_dir:
                yield key  # a FIFO, a socket too: an object, damaged (get and verify say so)
                continue
            try:
                sub = os.open(entry.name, _DIR, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link since the folder was read
                    raise _link_listed(fd, entry.name, key, prefix) from None
                raise _os_error("list", prefix or "/", err) from err
            try:
                yield from self._scan(sub, key, prefix)
            finally:
                os.close(sub)

    def modified(self, key: str) -> float:
        try:
            st = self._lstat("stat", key)
        except FileNotFoundError:
            raise NotFound(f"stat {key}: not found") from None
        except OSError as err:
            raise _os_error("stat", key, err) from err
        if stat.S_ISLNK(st.st_mode):
            raise _damaged(key, "symbolic link")
        return st.st_mtime

    def delete(self, key: str) -> None:
        """Remove ``key``'s name; a link there is removed itself, never what it points at."""
        folder, _, name = key.rpartition("/")
        self._path(key)
        try:
            dfd = self._folder(folder, "delete", key)
        except FileNotFoundError:
            return
        except OSError as err:
            raise _os_error("delete", key, err) from err
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error("delete", key, err) from err
        finally:
            os.close(dfd)

    def exists(self, key: str) -> bool:
        """Whether something other than a folder is there: a link or a FIFO too (``get`` then refuses it)."""
        try:
            st = self._lstat("stat", key)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise _os_error("stat", key, err) from err
        return not stat.S_ISDIR(st.st_mode)

    def open_upload(self, key: str) -> LocalUpload:
        return LocalUpload(self, key)

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files left by writers killed mid-put, untouched for ``older_than``
        seconds (a pack still being written by a live backup is touched at every blob);
        returns how many. Only regular files go: dbre writes nothing else in ``.tmp``, so a
        folder, link or FIFO found there is someone else's and left alone (a link is never
        followed; ``.tmp`` itself a link or a file is refused, see the class)."""
        try:
            fd = self._folder(_TMP, "delete", _TMP + "/")
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise _os_error("delete", _TMP + "/", err) from err
        count = 0
        try:
            now = time.time()  # the mtimes are this file system's clock, as is this
            with os.scandir(fd) as it:
                entries = list(it)
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or (older_than and now - st.st_mtime < older_than):
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                count += 1
        except OSError as err:
            raise _os_error("delete", _TMP + "/", err) from err
        finally:
            os.close(fd)
        return count


class LocalUpload:
    """A temp file in ``.tmp`` that grows with each write and is renamed into place at commit.

    Every ``WRITEBACK_EVERY`` bytes the kernel is asked to start writing the file out
    (``posix_fadvise(DONTNEED)`` starts write-back without waiting for it), so the fsync at
    commit finds little left to write. Crash safety is that of ``put``: the key appears only by
    the rename (or link) of a complete, fsynced file. The temp file is made, renamed and removed
    through a descriptor of ``.tmp`` opened without following links, and the key's folder is
    opened the same way (``LocalStore``).
    """

    WRITEBACK_EVERY = 4 * 1024 * 1024

    def __init__(self, store: LocalStore, key: str) -> None:
        self.store = store
        self.key = key
        self.path = store._path(key)
        self.tmp = store.root / _TMP / secrets.token_hex(8)
        self._dir: int | None = None  # .tmp, while the temp file may exist
        self._fd: int | None = None
        self._size = 0
        self._flushed = 0
        self._failed = False  # after an error or abort, nothing more is written or committed

    def _open(self) -> int:
        if self._failed:
            raise PermanentError(f"put {self.key}: the upload failed or was aborted")
        if self._fd is None:
            try:
                if self._dir is None:
                    self._dir = self.store._folder(_TMP, "put", self.key, create=True)
                self._fd = os.open(self.tmp.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                                   dir_fd=self._dir)
            except OSError as err:
                self._close_dir()  # no temp file was made
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
        tmp_dir = self._dir
        assert tmp_dir is not None
        folder, _, name = self.key.rpartition("/")
        try:
            os.fsync(fd)
            written = os.fstat(fd)
            self._fd = None  # (cleared first: a close that fails is not closed again by abort)
            os.close(fd)
            dest = self.store._folder(folder, "put", self.key, create=True)
            try:
                if if_absent:
                    # link() fails if the name exists: an atomic create-if-absent on POSIX; never through
                    # a link put in the temp file's place (linkat without AT_SYMLINK_FOLLOW)
                    try:
                        os.link(self.tmp.name, name, src_dir_fd=tmp_dir, dst_dir_fd=dest, follow_symlinks=False)
                    except FileExistsError:
                        raise AlreadyExists(f"put {self.key}: already exists") from None
                    finally:
                        with contextlib.suppress(FileNotFoundError):  # the temp name goes, linked or not
                            os.unlink(self.tmp.name, dir_fd=tmp_dir)
                    placed = os.stat(name, dir_fd=dest, follow_symlinks=False)
                    if (placed.st_dev, placed.st_ino) != (written.st_dev, written.st_ino):
                        # someone swapped the temp file for another file or a link while it was written: the
                        # key this link just made is not what this run wrote, so it goes again (no other run
                        # can have made it: link() refuses an existing name)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=dest)
                        raise IntegrityError(f"put {self.key}: its temp file in .tmp was replaced while written "
                                             "(planted?); nothing was stored", "check who else writes the "
                                             "repository's folder, then run it again")
                else:
                    # (rename never follows a link; two runs may put the same key at once, as two copies of
                    # one pack do, so the name is not checked against this run's file here)
                    os.replace(self.tmp.name, name, src_dir_fd=tmp_dir, dst_dir_fd=dest)
                os.fsync(dest)
            finally:
                os.close(dest)
        except OSError as err:
            gone = err.errno == errno.ENOENT and not _there(self.tmp.name, tmp_dir)
            self.abort()
            if gone:
                raise PermanentError(
                    f"put {self.key}: its temp file in .tmp was removed while this run was writing it"
                    " (a prune with a short --grace beside a paused or slow run?); nothing was stored",
                    "run it again; keep prune's --grace above the longest pause a writer may see",
                ) from err
            raise _os_error("put", self.key, err) from err
        except BaseException:
            self.abort()
            raise
        self._close_dir()

    def abort(self) -> None:
        self._failed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp.name, dir_fd=self._dir)
            self._close_dir()

    def _close_dir(self) -> None:
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OBJECT = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO opens at once, and fstat refuses it


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _link_target(dir_fd: int, name: str) -> str:
    try:
        return repr(os.readlink(name, dir_fd=dir_fd)[:200])
    except OSError:
        return "?"


def _not_a_folder(dir_fd: int, name: str, rel: str, op: str, key: str) -> PermanentError:
    """The error for ``rel`` (``name`` in ``dir_fd``), which should be a folder and is not."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return PermanentError(f"{op} {key}: repository folder {rel} is a symbolic link (to "
                              f"{_link_target(dir_fd, name)}): dbre does not follow links inside a repository, "
                              "and nothing went through it",
                              "replace the link with a real folder holding what it points at")
    return PermanentError(f"{op} {key}: {rel} in the repository is a {_kind(mode)} where a folder belongs, "
                          "and nothing went through it", f"move {rel} out of the way; dbre makes the folder again")


def _not_an_object(dir_fd: int, name: str, key: str) -> IntegrityError:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return _damaged(key, f"symbolic link (to {_link_target(dir_fd, name)})")
    return _damaged(key, _kind(mode))


def _damaged(key: str, kind: str) -> IntegrityError:
    if kind.startswith("symbolic link"):
        return IntegrityError(f"{key}: a {kind}, not an object: dbre does not follow links inside a repository "
                              "and read nothing through it",
                              "replace the link with the file it points at, or remove it")
    return IntegrityError(f"{key}: a {kind}, not a regular file as every object is (planted or damaged); "
                          "nothing was read from it", "remove it, or restore it from the offsite copy")


def _link_listed(dir_fd: int, name: str, key: str, prefix: str) -> PermanentError:
    return PermanentError(f"list {prefix or '/'}: {key} in the repository is a symbolic link (to "
                          f"{_link_target(dir_fd, name)}): dbre does not follow links inside a repository",
                          "replace it with the folder or file it points at, or remove it")


def _there(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
