"""Helpers of the table-checksum tests: a from-scratch computation on a file, what a manifest recorded,
one statement run on a file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import apsw

from dbre.repository.manifest import Manifest
from dbre.repository.tables import table_stats


def fresh_stats(path: Path) -> dict[str, tuple[int, str | None]]:
    """Every table's row count and checksum computed from scratch (no parent), in one read transaction."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.execute("BEGIN")
        return table_stats(conn, True)
    finally:
        conn.close()


def recorded(m: Manifest) -> dict[str, tuple[int, str | None]]:
    """What a snapshot recorded of each table: (rows, checksum)."""
    return {k: (v.rows, v.checksum) for k, v in m.tables.items()}


def run_sql(path: Path, sql: str, *args: object) -> None:
    """One statement on the file, committed."""
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()
