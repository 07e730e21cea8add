"""Per-table row counts and content checksums, computed inside SQLite in large chunks.

A table's checksum is xxh3-128 over its rows in rowid (or primary-key) order, each row the
``quote()`` of its stored columns joined by 0x1f, rows joined by 0x1e. The same data gives the
same checksum whatever the page layout, so a restored copy can be compared with the manifest.
A backup may take a table's count and checksum from its parent snapshot instead (``Prior``):
only when every page of the table's b-tree is byte-identical to the parent's at the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any

import apsw
import xxhash

_CHUNK = 4096  # rows hashed per update: one bytes.join instead of two updates a row

# What a manifest's table checksums mean (``stats.checksum_version``). 2: a WITHOUT ROWID table read
# ORDER BY its primary key with its collations. Manifests without the field (version None) were
# written before it: their WITHOUT ROWID tables were read in whatever order SQLite scanned them
# (the key, or a covering index): ``scan_order_matches`` checks those. Rowid tables: the same in both.
CHECKSUM_VERSION = 2


def qident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def user_tables(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Ordinary and shadow tables of the main schema (not views, not virtual tables)."""
    rows = conn.execute(
        "SELECT name, type, wr FROM pragma_table_list WHERE schema='main' AND type IN ('table','shadow') "
        "AND name NOT IN ('sqlite_schema','sqlite_master','sqlite_temp_master') ORDER BY name"
    ).fetchall()
    return [{"name": r[0], "type": r[1], "without_rowid": bool(r[2])} for r in rows]


@dataclass
class Prior:
    """What a parent snapshot recorded of a table, and how to tell that none of its pages changed.

    ``rows``/``checksum``: the parent's; ``schema``: the parent's sqlite_schema row of the table
    (type, name, tbl_name, sql); ``root``: its root page in the parent; ``unchanged(pageno)``: the
    page (1-based) holds exactly the bytes it held in the parent."""

    rows: int
    checksum: str | None
    schema: dict[str, Any]
    root: int
    unchanged: Callable[[int], bool]


def table_stats(conn: apsw.Connection, with_checksums: bool,
                prior: Callable[[str], Prior | None] | None = None,
                reused: list[str] | None = None) -> dict[str, tuple[int, str | None]]:
    """Row count and checksum (None without ``with_checksums``) of every user table. With
    ``prior`` and ``with_checksums``, a table that ``reusable`` accepts keeps its parent's values
    (not read again; its name is appended to ``reused``). Row counts alone are always counted:
    ``count(*)`` reads the smallest index, cheaper than the walk that ``reusable`` makes."""
    out: dict[str, tuple[int, str | None]] = {}
    schema = _schema_rows(conn) if prior is not None and with_checksums else {}
    for t in user_tables(conn):
        name = t["name"]
        p = prior(name) if prior is not None and with_checksums else None
        if p is not None and p.checksum is not None and reusable(conn, schema.get(name), p):
            out[name] = (p.rows, p.checksum)
            if reused is not None:
                reused.append(name)
        elif with_checksums:
            out[name] = table_checksum(conn, name, t["without_rowid"])
        else:
            (n,) = conn.execute(f"SELECT count(*) FROM {qident(name)}").fetchone()  # type: ignore[misc]
            out[name] = (int(n), None)
    return out


def _schema_rows(conn: apsw.Connection) -> dict[str, dict[str, Any]]:
    return {r[1]: {"type": r[0], "name": r[1], "tbl_name": r[2], "sql": r[3], "rootpage": r[4]}
            for r in conn.execute("SELECT type, name, tbl_name, sql, rootpage FROM sqlite_schema WHERE type='table'")}


def reusable(conn: apsw.Connection, now: dict[str, Any] | None, prior: Prior) -> bool:
    """Whether a table's count and checksum are its parent's: the same schema row (type, name,
    tbl_name, sql: the columns, their defaults, the key order), the same root page, and every
    page of its b-tree now (interior, leaf and overflow, as SQLite's dbstat walks it from the
    root) byte-identical to the parent's at that place. Then the parent's tree, walked from the
    same root, is page for page the same tree: the same rows. Anything unknown: False."""
    if now is None or not isinstance(prior.root, int) or now["rootpage"] != prior.root or prior.root < 1:
        return False
    if any(now[k] != prior.schema.get(k) for k in ("type", "name", "tbl_name", "sql")):
        return False
    pages = 0
    try:
        for pageno in table_pages(conn, now["name"]):
            if not prior.unchanged(pageno):
                return False
            pages += 1
    except apsw.Error:
        return False  # (an SQLite built without dbstat: every table is read)
    return pages > 0


def table_pages(conn: apsw.Connection, name: str) -> Iterator[int]:
    """The page numbers of a table's b-tree (root first, then interior, leaf and overflow pages),
    read by SQLite's dbstat in the connection's transaction; stopping early stops the walk."""
    cur = conn.execute("SELECT pageno FROM dbstat('main') WHERE name = ?", (name,))
    try:
        for (pageno,) in cur:
            yield int(pageno)
    finally:
        cur.close()


def table_checksum(conn: apsw.Connection, name: str, without_rowid: bool, scan: str | None = None) -> tuple[int, str]:
    """Row count and checksum of one table (``CHECKSUM_VERSION``). ``scan``: what follows the
    table's name in the query instead of the defined order (``scan_order_matches``)."""
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({qident(name)})")]
    order = scan if scan is not None else _key_order(conn, name) if without_rowid else " ORDER BY rowid"
    quoted = [f"quote({qident(c)})" for c in cols]
    if str(conn.execute("PRAGMA encoding").fetchone()[0]).upper() == "UTF-8":  # type: ignore[index]
        # the row's bytes straight from SQLite (no str in between: the bytes the text path below hashes,
        # for valid and invalid UTF-8 alike), joined by concat_ws (|| copies the row once per column)
        row = f"concat_ws(x'1f', {', '.join(quoted)})" if quoted else "''"
        return _checksum_bytes(conn, f"SELECT CAST({row} || x'1e' AS BLOB) FROM {qident(name)}{order}")
    expr = "||x'1f'||".join(quoted) or "''"
    try:
        return _checksum(conn, f"SELECT {expr} FROM {qident(name)}{order}")
    except UnicodeDecodeError:
        # TEXT that is not valid UTF-8 (SQLite stores what it is given): the same bytes, read as a
        # BLOB (for valid text in a UTF-8 database these are the bytes hashed above: equal checksums)
        return _checksum(conn, f"SELECT CAST({expr} AS BLOB) FROM {qident(name)}{order}")


def scan_order_matches(conn: apsw.Connection, name: str, want: str) -> bool:
    """Whether a WITHOUT ROWID table's checksum in a manifest without ``stats.checksum_version``
    is this table's: those were read with no ORDER BY, so in the order SQLite chose to scan it
    (its key, or a covering secondary index). Tried: the same query (the same plan on the same
    schema and statistics), then each order SQLite could have chosen (the key b-tree, each index);
    one equal is the same rows in the same order. Every order not possible here (a partial index,
    a collation not registered) is skipped."""
    # (not NOT INDEXED: on a WITHOUT ROWID table SQLite still scans a covering index then)
    for scan in ("", _key_order(conn, name), *(f" INDEXED BY {qident(r[1])}" for r in
                                                conn.execute(f"PRAGMA index_list({qident(name)})") if r[3] != "pk")):
        try:
            if table_checksum(conn, name, True, scan)[1] == want:
                return True
        except apsw.Error:
            continue
    return False


def _key_order(conn: apsw.Connection, name: str) -> str:
    """ORDER BY a WITHOUT ROWID table's primary key, column by column with its collation and
    direction: without it SQLite may scan a covering secondary index instead (rows in that index's
    order), and the checksum would depend on which indexes exist, not only on the data."""
    pk = [r[1] for r in conn.execute(f"PRAGMA index_list({qident(name)})") if r[3] == "pk"]
    if not pk:
        return ""
    keys = [f"{qident(r[2])} COLLATE {qident(r[4])}{' DESC' if r[3] else ''}"
            for r in conn.execute(f"PRAGMA index_xinfo({qident(pk[0])})") if r[5] and r[2] is not None]
    return " ORDER BY " + ", ".join(keys) if keys else ""


def _checksum_bytes(conn: apsw.Connection, query: str) -> tuple[int, str]:
    h = xxhash.xxh3_128()
    total = 0
    cur = conn.execute(query)
    first = itemgetter(0)
    while rows := list(islice(cur, _CHUNK)):
        h.update(b"".join(map(first, rows)))
        total += len(rows)
    return total, h.hexdigest()


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
