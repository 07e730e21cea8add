"""The part every in-process SQLite file dbre serves through an apsw VFS shares: no locks, no syncs, no file
controls (one process, one connection, nothing on disk). Subclasses read and write (`xRead`, `xWrite`,
`xFileSize`, `xTruncate`)."""

from __future__ import annotations


class InProcessFile:
    """A VFS file that never locks, syncs or answers a file control; 4 KiB sectors."""

    def xSync(self, flags: int) -> None:
        pass

    def xClose(self) -> None:
        pass

    def xLock(self, level: int) -> None:
        pass

    def xUnlock(self, level: int) -> None:
        pass

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return 4096

    def xDeviceCharacteristics(self) -> int:
        return 0
