"""What the backup engine needs from a database to back up: a read-only SQLite connection."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import apsw


class Source(Protocol):
    """A database dbre can snapshot.

    ``name`` is the default database name in the repository; ``identity`` describes the source
    for the manifest and reports and never holds a secret. ``connect()`` yields an apsw
    connection to a SQLite database file that holds the data to back up; the engine opens a
    read transaction on it, so what it reads is exactly one committed transaction.
    Raises ``dbre.errors.SourceError`` with a hint when the database cannot be read.
    """

    name: str

    def identity(self) -> dict[str, Any]: ...

    def connect(self) -> AbstractContextManager[apsw.Connection]: ...


