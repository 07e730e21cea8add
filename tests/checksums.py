"""Helpers of the table-checksum tests: a from-scratch computation on a file, what a manifest recorded,
one statement run on a file, a backup / change / backup round checked against both, and a counter of
keyed page hashes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import apsw

from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.tables import table_stats
from dbre.sources.local import LocalFileSource


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


def backup_change_backup(repo_dir: Path, src: Path, sql: str, *args: object) -> tuple[Manifest, Manifest]:
    """Back ``src`` up as "db", run ``sql`` on it, back it up again: each snapshot records what a
    from-scratch computation gives, and the change changed it. Returns both snapshots."""
    repo = Repository.open_or_init(str(repo_dir))
    first = backup(repo, LocalFileSource(src), "db").manifest
    assert recorded(first) == fresh_stats(src)
    run_sql(src, sql, *args)
    second = backup(repo, LocalFileSource(src), "db").manifest
    assert recorded(second) == fresh_stats(src) != recorded(first)
    return first, second


class CountingHash:
    """Counts calls of a repository's keyed page hash (the function backup uses per page)."""

    def __init__(self, repo: Repository) -> None:
        self.inner = repo.page_hash
        self.calls = 0

    def __call__(self, data: bytes | memoryview) -> bytes:
        self.calls += 1
        return self.inner(data)
