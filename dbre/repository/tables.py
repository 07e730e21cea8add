"""Per-table row counts and content checksums, computed inside SQLite in large chunks.

A table's checksum is xxh3-128 over its rows in rowid (or primary-key) order, each row the
``quote()`` of its stored columns joined by 0x1f, rows joined by 0x1e. The same data gives the
same checksum whatever the page layout, so a restored copy can be compared with the manifest.
"""

from __future__ import annotations

from typing import Any

import apsw
import xxhash


def qident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def user_tables(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Ordinary and shadow tables of the main schema (not views, not virtual tables)."""
    rows = conn.execute(
        "SELECT name, type, wr FROM pragma_table_list WHERE schema='main' AND type IN ('table','shadow') "
        "AND name NOT IN ('sqlite_schema','sqlite_master','sqlite_temp_master') ORDER BY name"
    ).fetchall()
    return [{"name": r[0], "type": r[1], "without_rowid": bool(r[2])} for r in rows]


def table_stats(conn: apsw.Connection, with_checksums: bool) -> dict[str, tuple[int, str | None]]:
    out: dict[str, tuple[int, str | None]] = {}
    for t in user_tables(conn):
        name = t["name"]
        if with_checksums:
            out[name] = table_checksum(conn, name, t["without_rowid"])
        else:
            (n,) = conn.execute(f"SELECT count(*) FROM {qident(name)}").fetchone()  # type: ignore[misc]
            out[name] = (int(n), None)
    return out


def table_checksum(conn: apsw.Connection, name: str, without_rowid: bool) -> tuple[int, str]:
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({qident(name)})")]
    expr = "||x'1f'||".join(f"quote({qident(c)})" for c in cols) or "''"
    order = "" if without_rowid else " ORDER BY rowid"  # WITHOUT ROWID tables scan in key order
    try:
        return _checksum(conn, f"SELECT {expr} FROM {qident(name)}{order}")
    except UnicodeDecodeError:
        # TEXT that is not valid UTF-8 (SQLite stores what it is given): the same bytes, read as a
        # BLOB (for valid text in a UTF-8 database these are the bytes hashed above: equal checksums)
        return _checksum(conn, f"SELECT CAST({expr} AS BLOB) FROM {qident(name)}{order}")


def _checksum(conn: apsw.Connection, query: str) -> tuple[int, str]:
    h = xxhash.xxh3_128()
    total = 0
    for (row,) in conn.execute(query):
        h.update(_bytes(row))
        h.update(b"\x1e")
        total += 1
    return total, h.hexdigest()


def _bytes(v: object) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, bytes):
        return v
    return str(v).encode()
