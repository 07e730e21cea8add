"""Per-table row counts and content checksums, computed inside SQLite in large chunks.

A table's checksum (``CHECKSUM_VERSION`` 3) is the sum, lane by lane modulo 2**64, of the
xxh3-128 of each row read as two little-endian 64-bit lanes; a row is the ``quote()`` of its
stored columns joined by 0x1f. The same rows give the same checksum whatever the page layout
and whatever order they are read in (a multiset hash), so a restored copy, another provider's
restore or a VACUUMed file can be compared with the manifest, and a sum can be updated page by
page: a backup that has this snapshot's per-leaf partial sums (``PageSums``) re-reads only the
rows of leaf pages that changed. Versions 2 and None (older snapshots) hashed the rows in key
order; ``table_checksum(..., version=2)`` still computes them, for validating those snapshots.
A backup may take a whole table's count and checksum from its parent snapshot instead
(``Prior``): only when every page of the table's b-tree is byte-identical to the parent's at
the same place.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter
from typing import Any

import apsw
import numpy as np
import xxhash

_CHUNK = 4096  # rows hashed per update: one bytes.join instead of two updates a row

# What a manifest's table checksums mean (``stats.checksum_version``). 3: the sum of the rows' hashes
# (see the module's docstring). 2: xxh3-128 over the rows in key order, a WITHOUT ROWID table read
# ORDER BY its primary key with its collations. Manifests without the field (version None) were
# written before it: their WITHOUT ROWID tables were read in whatever order SQLite scanned them
# (the key, or a covering index): ``scan_order_matches`` checks those. Rowid tables: as in 2.
CHECKSUM_VERSION = 3

# A snapshot's per-page partial sums (``stats.checksum_pages``): one entry per page of the database,
# the root page of the rowid table whose leaf the page is (0: none) and the sum of the hashes of the
# rows stored on that leaf (their overflow pages included), as two little-endian 64-bit lanes.
PAGE_SUM = struct.Struct("<I16s")
_ENTRY = np.dtype([("root", "<u4"), ("sum", "<u8", (2,))])  # PAGE_SUM, for numpy


def sqlite_engine() -> str:
    """The SQLite computing checksums here (version and platform), as ``stats.checksum_basis.sqlite``
    records it: ``quote()`` of a REAL is not the same text in every SQLite (3.40.1 gives
    0.1/3 as 3.33333333333333314829e-01 where 3.54.1 gives 0.33333333333333332)."""
    return f"{apsw.sqlite_lib_version()} {sys.platform}"


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
    page (1-based) holds exactly the bytes it held in the parent, by a test no one can collide (a
    backup passes its sink's keyed-hash marks: ``PageSink.keyed_same``)."""

    rows: int
    checksum: str | None
    schema: dict[str, Any]
    root: int
    unchanged: Callable[[int], bool]
    # the parent's PAGE_SUM entries, page order (None: the parent has none); per page of this
    # snapshot, 1 where ``unchanged`` holds (the same test, all at once; None: ask ``unchanged``)
    sums: bytes | bytearray | None = None
    same: bytes | bytearray | None = None


@dataclass
class PageSums:
    """Where a backup writes this snapshot's per-page partial sums (``PAGE_SUM`` entries, page
    order) and how it reads its pages: ``page(pageno)`` the page's bytes as this snapshot has them."""

    page: Callable[[int], bytes | memoryview]
    out: bytearray
    used: bool = False  # some table's entries were written
    leaves: dict[str, tuple[int, int]] = field(default_factory=dict)  # table: (leaves read, leaves)


def table_stats(conn: apsw.Connection, with_checksums: bool,
                prior: Callable[[str], Prior | None] | None = None,
                reused: list[str] | None = None, sums: PageSums | None = None,
                version: int | None = CHECKSUM_VERSION) -> dict[str, tuple[int, str | None]]:
    """Row count and checksum (None without ``with_checksums``) of every user table, checksums as
    ``version`` defines them (older versions: for validating older snapshots). With ``sums`` (a
    backup reading its pages directly), each rowid table's checksum is summed leaf page by leaf
    page and the partial sums written to ``sums.out``; with ``prior`` too, a leaf that is byte for
    byte the parent's (``Prior.unchanged``), overflow pages included, keeps the parent's partial sum
    (not read again), and
    a table whose pages are all unchanged keeps the parent's values; each table that kept anything
    is appended to ``reused``. Row counts alone are always counted: ``count(*)`` reads the smallest
    index, cheaper than any walk."""
    out: dict[str, tuple[int, str | None]] = {}
    version = version if version is not None else 2
    schema = _schema_rows(conn) if (prior is not None or sums is not None) and with_checksums else {}
    for t in user_tables(conn):
        name = t["name"]
        p = prior(name) if prior is not None and with_checksums else None
        if p is not None and (p.checksum is None or not _same_table(schema.get(name), p)):
            p = None
        if not with_checksums:
            (n,) = conn.execute(f"SELECT count(*) FROM {qident(name)}").fetchone()  # type: ignore[misc]
            out[name] = (int(n), None)
            continue
        got = None
        if sums is not None and version == 3 and not t["without_rowid"] and name in schema:
            got = _summed_by_page(conn, name, int(schema[name]["rootpage"]), sums, p)
            if got is not None and got[2] and reused is not None:
                reused.append(name)
        if got is not None:
            out[name] = got[0], got[1]
        elif p is not None and reusable(conn, schema.get(name), p):
            out[name] = (p.rows, p.checksum)
            if reused is not None:
                reused.append(name)
        else:
            out[name] = table_checksum(conn, name, t["without_rowid"], version=version)
    return out


def _same_table(now: dict[str, Any] | None, prior: Prior) -> bool:
    """The same schema row (type, name, tbl_name, sql: the columns, their defaults, the key order)
    and the same root page as the parent's: what any reuse of the parent's values needs first."""
    return now is not None and isinstance(prior.root, int) and prior.root >= 1 and now["rootpage"] == prior.root \
        and all(now[k] == prior.schema.get(k) for k in ("type", "name", "tbl_name", "sql"))


def _schema_rows(conn: apsw.Connection) -> dict[str, dict[str, Any]]:
    return {r[1]: {"type": r[0], "name": r[1], "tbl_name": r[2], "sql": r[3], "rootpage": r[4]}
            for r in conn.execute("SELECT type, name, tbl_name, sql, rootpage FROM sqlite_schema WHERE type='table'")}


def reusable(conn: apsw.Connection, now: dict[str, Any] | None, prior: Prior) -> bool:
    """Whether a table's count and checksum are its parent's: the same table (``_same_table``) and
    every page of its b-tree now (interior, leaf and overflow, as SQLite's dbstat walks it from the
    root) byte-identical to the parent's at that place. Then the parent's tree, walked from the
    same root, is page for page the same tree: the same rows. Anything unknown: False."""
    if not _same_table(now, prior):
        return False
    pages = 0
    try:
        for pageno in table_pages(conn, prior.schema["name"]):
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


def table_checksum(conn: apsw.Connection, name: str, without_rowid: bool, scan: str | None = None,
                   version: int | None = CHECKSUM_VERSION) -> tuple[int, str]:
    """Row count and checksum of one table as ``version`` defines it (3: the sum of the rows'
    hashes; 2 and None: the rows in key order). ``scan``: what follows the table's name in a
    version-2 query instead of the defined order (``scan_order_matches``)."""
    if version is not None and version >= 3 and scan is None:
        return _sum_checksum(conn, name)
    cols = _columns(conn, name)
    order = scan if scan is not None else _key_order(conn, name) if without_rowid else " ORDER BY rowid"
    quoted = [f"quote({qident(c)})" for c in cols]
    if _utf8(conn):
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


def _columns(conn: apsw.Connection, name: str) -> list[str]:
    return [str(r[1]) for r in conn.execute(f"PRAGMA table_info({qident(name)})")]


def _utf8(conn: apsw.Connection) -> bool:
    return str(conn.execute("PRAGMA encoding").fetchone()[0]).upper() == "UTF-8"  # type: ignore[index]


def _row_bytes(conn: apsw.Connection, name: str, table: str = "") -> str:
    """The SQL of one row's bytes for version 3 (UTF-8 databases): its columns' ``quote()`` joined
    by 0x1f, as a BLOB straight from SQLite (the bytes version 2 hashes, without its 0x1e).
    ``table``: the alias its columns are qualified with."""
    quoted = [f"quote({table + '.' if table else ''}{qident(c)})" for c in _columns(conn, name)]
    return f"CAST(concat_ws(x'1f', {', '.join(quoted)}) AS BLOB)" if quoted else "x''"


def _lanes(values: Iterator[bytes]) -> np.ndarray:
    """Each value's xxh3-128 as two little-endian 64-bit lanes: an (n, 2) uint64 array."""
    return np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, values)), dtype="<u8").reshape(-1, 2)


def _hex(lanes: np.ndarray) -> str:
    return lanes.astype("<u8").tobytes().hex()


def _sum_checksum(conn: apsw.Connection, name: str) -> tuple[int, str]:
    """Version 3 over every row, in whatever order SQLite reads them (no ORDER BY: the sum does not
    depend on it). A database in UTF-16 hashes each row's text as UTF-8, as version 2 does."""
    if _utf8(conn):
        return _sum_rows(conn, f"SELECT {_row_bytes(conn, name)} FROM {qident(name)}", None)
    expr = "||x'1f'||".join(f"quote({qident(c)})" for c in _columns(conn, name)) or "''"
    try:
        return _sum_rows(conn, f"SELECT {expr} FROM {qident(name)}", _bytes)
    except UnicodeDecodeError:
        return _sum_rows(conn, f"SELECT CAST({expr} AS BLOB) FROM {qident(name)}", None)


def _sum_rows(conn: apsw.Connection, query: str, convert: Callable[[Any], bytes] | None) -> tuple[int, str]:
    total = np.zeros(2, dtype=np.uint64)
    n = 0
    cur = conn.execute(query)
    first = itemgetter(0)
    while rows := list(islice(cur, _CHUNK)):
        values = map(first, rows) if convert is None else map(convert, map(first, rows))
        total += _lanes(values).sum(axis=0, dtype=np.uint64)  # (wraps modulo 2**64, lane by lane)
        n += len(rows)
    return n, _hex(total)


def _summed_by_page(conn: apsw.Connection, name: str, root: int, sums: PageSums,
                    prior: Prior | None) -> tuple[int, str, bool] | None:
    """A rowid table's count and version-3 checksum summed leaf page by leaf page, each leaf's
    partial sum written to ``sums.out``; (rows, checksum, whether any leaf kept the parent's sum).

    SQLite's dbstat walks the b-tree from the root: its leaves in key order, each followed by its
    overflow pages (path: the leaf's path, the cell, "+", the overflow index). A leaf's rows are
    those whose rowid lies from its first cell's rowid to the next leaf's, so each run of leaves to
    read is one ranged query. A leaf keeps the parent's partial sum when the parent's entry for the
    page names this table's root and the page and each of its overflow pages is unchanged at its
    place (``Prior.same`` / ``Prior.unchanged``: the same cells, the same payloads, the same rows
    under the same schema, which ``prior`` was checked for). None (the
    caller reads the whole table) when the tree is not what this expects, the rowid is not reachable
    by name, or the database is not UTF-8."""
    # (table_xinfo: generated columns too, which table_info leaves out and which hide the rowid as well)
    cols = {str(r[1]).lower() for r in conn.execute(f"PRAGMA table_xinfo({qident(name)})")}
    alias = next((a for a in ("rowid", "_rowid_", "oid") if a not in cols), None)
    if alias is None or not _utf8(conn):
        return None
    leaves: list[int] = []
    paths: dict[str, int] = {}
    overflow: dict[int, list[int]] = {}
    try:
        for pageno, kind, path in conn.execute("SELECT pageno, pagetype, path FROM dbstat('main') WHERE name = ?",
                                               (name,)):
            if kind == "leaf":
                paths[path] = len(leaves)
                leaves.append(int(pageno))
            elif kind == "overflow":
                overflow.setdefault(paths.get(path[: path.rindex("/") + 1], -1), []).append(int(pageno))
    except (apsw.Error, ValueError):
        return None  # (an SQLite without dbstat)
    npages = len(sums.out) // PAGE_SUM.size
    if not leaves or -1 in overflow or any(not 1 <= pg <= npages for pg in leaves):
        return None
    part = np.zeros((len(leaves), 2), dtype=np.uint64)
    keep = [False] * len(leaves)
    if prior is not None and prior.sums is not None:
        entries = np.frombuffer(prior.sums, dtype=_ENTRY)
        at = np.array(leaves, dtype=np.int64) - 1
        ok = at < len(entries)
        ok[ok] = entries["root"][at[ok]] == root
        if prior.same is not None:
            same = np.frombuffer(prior.same, dtype=np.uint8)
            ok &= (at < len(same)) & (same[np.minimum(at, len(same) - 1)] == 1) if len(same) else False
        else:
            ok &= np.array([prior.unchanged(pg) for pg in leaves], dtype=bool)
        for i in overflow:  # (leaves with overflow pages: each of those unchanged too)
            if ok[i] and not all(prior.unchanged(o) for o in overflow[i]):
                ok[i] = False
        part[ok] = entries["sum"][at[ok]]
        keep = ok.tolist()
    firsts: dict[int, int | None] = {}  # leaf -> its first rowid (None: no cell), parsed only where needed

    def first(i: int) -> int | None:
        if i not in firsts:
            cell = _first_rowid(sums.page(leaves[i]), leaves[i])
            if cell is None:
                raise ValueError(f"page {leaves[i]} is not a table leaf")
            firsts[i] = cell[1]
        return firsts[i]

    # the runs of leaves to read, each as a rowid range (inclusive), all in one query
    ranges: list[tuple[int, int]] = []
    reading: list[int] = []  # the leaves read, in key order
    i = 0
    try:
        while i < len(leaves):
            if keep[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(leaves) and not keep[j + 1]:
                j += 1
            starts = [first(k) for k in range(i, j + 2 if j + 1 < len(leaves) else j + 1)]
            if len(leaves) == 1 and starts == [None]:
                break  # an empty table: its root is a leaf with no cell
            known = [f for f in starts if f is not None]
            if len(known) < len(starts) or any(b <= a for a, b in zip(known, known[1:], strict=False)):
                return None  # (a leaf with no cell beside others, or leaves out of key order)
            if reading and known[0] <= firsts[reading[-1]]:  # type: ignore[operator]
                return None
            ranges.append((known[0] if i > 0 else -(1 << 63), known[-1] - 1 if j + 1 < len(leaves) else (1 << 63) - 1))
            reading += range(i, j + 1)
            i = j + 1
    except ValueError:
        return None
    if ranges:
        split = np.array([firsts[k] for k in reading], dtype=np.int64)
        where = np.array(reading, dtype=np.int64)
        try:
            cur = conn.execute(f"SELECT t.{alias}, {_row_bytes(conn, name, 't')} FROM json_each(?) AS r "
                               f"CROSS JOIN {qident(name)} AS t WHERE t.{alias} BETWEEN r.value->>0 AND r.value->>1",
                               (json.dumps(ranges),))
            while rows := list(islice(cur, _CHUNK)):
                ids = np.fromiter(map(itemgetter(0), rows), dtype=np.int64, count=len(rows))
                at = np.maximum(np.searchsorted(split, ids, side="right") - 1, 0)
                np.add.at(part, where[at], _lanes(map(itemgetter(1), rows)))
        except apsw.Error:
            return None  # (a user table or view named json_each hides the function: the table is read whole)
    out = np.frombuffer(sums.out, dtype=_ENTRY)  # (a view: written in place, every leaf at once)
    at_leaf = np.array(leaves, dtype=np.int64) - 1
    out["root"][at_leaf] = root
    out["sum"][at_leaf] = part
    sums.used = True
    sums.leaves[name] = (keep.count(False), len(leaves))
    (n,) = conn.execute(f"SELECT count(*) FROM {qident(name)}").fetchone()  # type: ignore[misc]
    return int(n), _hex(part.sum(axis=0, dtype=np.uint64)), any(keep)


def _first_rowid(page: bytes | memoryview, pageno: int) -> tuple[int, int | None] | None:
    """(cells, the first cell's rowid or None when there is none) of a table b-tree leaf page;
    None when the page is not one (its header's type byte) or its first cell lies outside it."""
    h = 100 if pageno == 1 else 0
    try:
        if page[h] != 0x0D:
            return None
        cells = int.from_bytes(page[h + 3 : h + 5], "big")
        if cells == 0:
            return 0, None
        at = int.from_bytes(page[h + 8 : h + 10], "big")
        _, at = _varint(page, at)  # the payload's size
        rowid, _ = _varint(page, at)
    except IndexError:
        return None
    return cells, rowid - (1 << 64) if rowid >= 1 << 63 else rowid


def _varint(buf: bytes | memoryview, at: int) -> tuple[int, int]:
    """SQLite's varint at ``at``: (value, the offset after it); IndexError past the end."""
    value = 0
    for k in range(8):
        b = buf[at + k]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + k + 1
    return (value << 8) | buf[at + 8], at + 9


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
            if table_checksum(conn, name, True, scan, version=2)[1] == want:
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
