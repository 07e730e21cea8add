"""The error types every layer of dbre raises, each carrying a hint for the user and an exit code."""

from __future__ import annotations


class DbreError(Exception):
    """Base error: `message` says what failed and why, `hint` what to do about it.

    The CLI prints ``message`` and ``hint`` on one line and exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # keep the hint across pickling (Prefect)
        return (self.__class__, (self.message, self.hint))


class UsageError(DbreError):
    """Bad input from the user: a wrong option, an unknown name, an unparseable time (exit 2)."""

    exit_code = 2


class SourceError(DbreError):
    """The database to back up cannot be read: missing, not SQLite, unreachable, refused."""


class RepositoryError(DbreError):
    """The repository is unusable: missing, damaged, a newer format, the wrong key."""


class LockedError(RepositoryError):
    """Another run holds a lock that conflicts with this one."""


class IntegrityError(RepositoryError):
    """Stored data does not match its checksum or is missing."""


class RestoreError(DbreError):
    """A restore could not complete; the target was left untouched."""
