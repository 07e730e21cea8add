"""Row-level repair: rows of one table, chosen by a WHERE, put back as a snapshot had them.

The plan reads the snapshot (or the replicated point ``--at`` names) in place, through the
repository's read-only VFS (only the pages the selection touches are fetched, each checked), selects
the rows the WHERE matches there and in the live database, and diffs them by primary key (the rowid
when the table has none) with pandas: rows missing in live are inserted, rows that differ are
updated back, rows only in live are reported (and deleted only with ``delete_extra``). The plan also
names what applying it does beyond the table: rows of other tables whose foreign keys point at rows
it deletes or re-keys (counted in live; a repair never runs ON DELETE/UPDATE actions, so they would
be left pointing at nothing and the apply stops), and the table's triggers that fire (or stay
suspended). Each row is compared by a hash of its stored values with their types, so 1, 1.0 and '1'
differ as SQLite stores them. Applying re-reads the live selection inside the write transaction and
stops if it is not what the plan saw; the rows it writes were staged from the past state just before
the write lock (``_stage_rows``), so the lock is never held over a repository read.

The live database is a local file, or a remote libSQL database (sqld, Turso) reached with
libsql-client: then the rows are read in pages by key, and the repair is one interactive
transaction over a WebSocket, with foreign keys as the server enforces them.
"""

from __future__ import annotations

import os
import shlex
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw
import xxhash

from dbre.errors import DbreError, RepositoryError, RestoreError, UsageError
from dbre.repository.fallback import primary_of, retrying
from dbre.repository.manifest import check_db_name
from dbre.repository.repo import Repository
from dbre.repository.tables import qident
from dbre.restore.connection import BadSql, LocalDb, RemoteDb, TextNotUtf8, connect_remote, redact
from dbre.restore.live import (
    SNAPSHOT_SCHEMA,
    SQL_TOKEN,
    PastCopy,
    PastPlan,
    Violation,
    check_live_file,
    fk_message,
    is_remote,
    manifest_tables,
    new_fk_violations,
    open_past,
    rolled_back,
    rowid_alias,
    show_value,
    unknown_table,
    violation,
    write_audit,
    write_transaction,
)
from dbre.secrets import Secret
from dbre.sources.local import keep_wal

OPERATION = "repair-rows"
MAX_ROWS = 1_000_000  # a selection larger than this needs max_rows raised: the diff holds it in memory
PREVIEW_ROWS = 10
CHUNK_ROWS = 50_000  # rows hashed and added to the diff at a time
STAGE_SCHEMA = "dbre_stage"  # a private temporary database the rows to write are staged in before the write lock
REMOTE_PAGE_ROWS = 2_000  # rows per request to a remote database (sqld caps a response at 10 MB)

Key = tuple[Any, ...]
Db = LocalDb | RemoteDb


@dataclass
class RowRepairPlan(PastPlan):
    """The diff of one table's selected rows between a snapshot and live, ready to apply."""

    repo: Repository
    db: str
    live: str  # the file's path, or the server's URL without its query
    table: str
    where: str
    past: PastCopy  # the state the rows come from, held open (and the repository's shared lock) until closed
    columns: list[str]  # stored columns, in the snapshot's order
    key: list[str]  # key column names, or [rowid alias] when the table has no primary key
    key_is_rowid: bool
    delete_extra: bool
    max_rows: int
    snapshot_rows: int  # rows the WHERE selects in the snapshot
    live_rows: int  # ... and in live
    inserts: list[Key]
    updates: list[Key]
    extras: list[Key]
    preview: list[dict[str, Any]] = field(default_factory=list)
    effects: list[dict[str, Any]] = field(default_factory=list)  # what applying does beyond the table's rows
    fire_triggers: bool = False
    live_seen: Any = field(default=None, repr=False)  # DataFrame (kq, h) of the live selection
    live_url: str | None = field(default=None, repr=False)  # a remote database's full URL
    token: Secret | None = field(default=None, repr=False)

    @property
    def unchanged(self) -> int:
        return self.live_rows - len(self.updates) - len(self.extras)

    @property
    def changes(self) -> int:
        return len(self.inserts) + len(self.updates) + (len(self.extras) if self.delete_extra else 0)

    def counts(self) -> dict[str, int]:
        return {"insert": len(self.inserts), "update": len(self.updates),
                "delete" if self.delete_extra else "extra_kept": len(self.extras), "unchanged": self.unchanged}

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"operation": OPERATION, "db": self.db, "live": self.live, "table": self.table,
                "where": self.where, "snapshot": m.id, "taken_at": m.taken_at, "key": self.key,
                "snapshot_rows": self.snapshot_rows, "live_rows": self.live_rows, "delete_extra": self.delete_extra,
                "counts": self.counts(), "fire_triggers": self.fire_triggers, "effects": self.effects,
                "preview": self.preview, **self.past.describe()}



@dataclass
class RowRepairResult:
    plan: RowRepairPlan
    inserted: int
    updated: int
    deleted: int
    audit_record: str
    seconds: float
    safety_snapshot: str | None = None  # the live database just before the repair (local files)

    def summary(self) -> dict[str, Any]:
        return {**self.plan.describe(), "inserted": self.inserted, "updated": self.updated, "deleted": self.deleted,
                "audit_record": self.audit_record, "seconds": round(self.seconds, 3),
                "safety_snapshot": self.safety_snapshot}

    def undo_command(self, key_file: str | os.PathLike[str] | None = None) -> str | None:
        """The command (quoted, absolute paths) that puts the rows this repair changed back as they
        were before it, from its safety snapshot; None without a safety snapshot.

        It selects the repair's own rows only (its WHERE and their keys: rows the application wrote
        since, under other keys, are left alone; rows the repair inserted are deleted again with
        ``--delete-extra``), with the table's triggers suspended (the safety snapshot holds the
        stored values, whatever triggers did). Past UNDO_KEYS keys it is printed without
        ``--apply``: its dry run shows what it would do."""
        if self.safety_snapshot is None:
            return None
        from dbre.restore.table import absolute_url

        p = self.plan
        touched = p.inserts + p.updates + (p.extras if p.delete_extra else [])
        where = p.where
        if touched and len(touched) <= UNDO_KEYS:
            cols = p.key if p.key_is_rowid else [qident(k) for k in p.key]
            if len(cols) == 1:
                where = f"({p.where}) AND {cols[0]} IN ({', '.join(_literal(k[0]) for k in touched)})"
            else:
                rows = ", ".join(f"({', '.join(map(_literal, k))})" for k in touched)
                where = f"({p.where}) AND ({', '.join(cols)}) IN (VALUES {rows})"
        words = ["dbre", "repair-rows", "--repo", absolute_url(p.repo.url), "--db", p.db,
                 "--live", absolute_url(str(p.live)), "--table", p.table, "--where", where,
                 "--snapshot", self.safety_snapshot, "--delete-extra"]
        if len(touched) <= UNDO_KEYS:
            words.append("--apply")
        if key_file is not None:
            words += ["--key-file", str(Path(key_file).expanduser().absolute())]
        return shlex.join(words)


UNDO_KEYS = 1000  # keys listed in an undo command's WHERE


def _literal(value: Any) -> str:
    """An SQL literal of a key value (integer, real, text, blob)."""
    if isinstance(value, bool) or value is None:
        return "NULL" if value is None else str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"X'{bytes(value).hex()}'"
    return "'" + str(value).replace("'", "''") + "'"


# -- the WHERE -----------------------------------------------------------------------------------


def check_where(where: str) -> str:
    """The WHERE expression, stripped, once it is one parameter-free expression; UsageError otherwise.

    It is put in ``WHERE (...)``: a ';', a comment or a parenthesis closed early could make it more
    than that, so those are refused here (a ';' inside a string is fine)."""
    text = where.strip()
    if not text:
        raise UsageError(f"{OPERATION}: the WHERE is empty", 'select the rows, e.g. --where "id IN (1, 2, 3)"')
    depth = 0
    for m in SQL_TOKEN.finditer(text):
        tok = m.group()
        if tok == ";":
            raise UsageError(f"{OPERATION}: the WHERE holds a ';'", "give one expression, not statements")
        if tok.startswith(("--", "/*")):
            raise UsageError(f"{OPERATION}: the WHERE holds a comment", "leave comments out")
        if tok[0] in "'\"`[" and (len(tok) < 2 or tok[-1] != {"[": "]"}.get(tok[0], tok[0])):
            raise UsageError(f"{OPERATION}: the WHERE has an unclosed quote: {tok[:20]}", "close it")
        depth += {"(": 1, ")": -1}.get(tok, 0)
        if depth < 0:
            raise UsageError(f"{OPERATION}: the WHERE closes a parenthesis it did not open", "check the parentheses")
    if depth:
        raise UsageError(f"{OPERATION}: the WHERE leaves a parenthesis open", "check the parentheses")
    return text


def _prepare_where(db: Db, table: str, where: str) -> None:
    try:
        db.check(f"SELECT 1 FROM main.{qident(table)} WHERE ({where})")
    except BadSql as err:
        if err.parameters:
            raise UsageError(f"{OPERATION}: the WHERE has a parameter (?, :name, @name or $name)",
                             "write the values into it") from None
        raise UsageError(f"{OPERATION}: bad WHERE for {table} in {db.label}: {err}", "check the expression") from None


# -- the table: its columns and key --------------------------------------------------------------


@dataclass
class _Shape:
    """How rows of the table are keyed and compared."""

    table: str
    columns: list[str]
    key: list[str]
    key_is_rowid: bool

    @property
    def key_exprs(self) -> list[str]:
        return self.key if self.key_is_rowid else [qident(k) for k in self.key]

    @property
    def key_match(self) -> str:
        return " AND ".join(f"{k} IS ?" for k in self.key_exprs)

    @property
    def value_columns(self) -> list[str]:
        """The columns an update sets: every stored column but the key's."""
        key = {k.lower() for k in self.key}
        return [c for c in self.columns if c.lower() not in key]


def _tables(db: Db) -> dict[str, str]:
    """Ordinary tables of main by lower-cased name (SQLite names are case-insensitive)."""
    rows = db.rows("SELECT name FROM pragma_table_list WHERE schema='main' AND type='table' "
                   "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")
    return {str(r[0]).lower(): str(r[0]) for r in rows}


def _shape(db: Db, table: str) -> _Shape:
    columns = [str(r[0]) for r in db.rows("SELECT name, hidden FROM pragma_table_xinfo(?, 'main') ORDER BY cid",
                                          (table,)) if r[1] == 0]
    pk = [str(r[0]) for r in db.rows("SELECT name FROM pragma_table_info(?, 'main') WHERE pk > 0 ORDER BY pk",
                                     (table,))]
    if pk:
        return _Shape(table, columns, pk, False)
    without_rowid = db.rows("SELECT wr FROM pragma_table_list WHERE schema='main' AND name=?", (table,))
    alias = rowid_alias(columns) if without_rowid and not without_rowid[0][0] else None
    if alias is None:
        raise UsageError(f"{OPERATION}: table {table} has no primary key and its columns hide the rowid",
                         "restore the table with `dbre restore-table` and repair by hand")
    return _Shape(table, columns, [alias], True)


def _children(db: Db, table: str) -> list[tuple[str, str, str]]:
    """(child table, on update, on delete) of each foreign key that points at ``table``."""
    out = []
    for child in _tables(db).values():
        for parent, on_update, on_delete in db.rows(
                "SELECT \"table\", on_update, on_delete FROM pragma_foreign_key_list(?, 'main')", (child,)):
            if str(parent).lower() == table.lower():
                out.append((child, str(on_update), str(on_delete)))
    return out


def _fk_violations(db: Db, tables: Iterable[str]) -> Counter[Violation]:
    names = _tables(db)
    out: Counter[Violation] = Counter()
    for t in sorted({t.lower() for t in tables}):
        if t in names:
            out.update(violation(r) for r in db.rows("SELECT * FROM pragma_foreign_key_check(?, 'main')",
                                                     (names[t],)))
    return out


# -- selection and diff --------------------------------------------------------------------------


def _typed(values: Key) -> bytes:
    """Stored values with their types, as bytes to hash: 1, 1.0, '1' and x'31' all differ."""
    out = bytearray()
    for v in values:
        if v is None:
            out += b"n\x1f"
        elif isinstance(v, int):
            out += b"i%d\x1f" % v
        elif isinstance(v, float):
            out += b"r" + repr(v).encode() + b"\x1f"
        elif isinstance(v, str):
            data = v.encode("utf-8", "surrogatepass")
            out += b"t%d:" % len(data) + data
        else:
            data = bytes(v)
            out += b"b%d:" % len(data) + data
    return bytes(out)


def _key_text(values: Key) -> str:
    """A key as one string, equal for equal keys whatever their types' Python equality says."""
    return "\x1f".join(f"{type(v).__name__[0]}{v.hex() if isinstance(v, bytes) else repr(v)}" for v in values)


def _scan(db: Db, shape: _Shape, where: str, in_sql: bool) -> Iterator[tuple[str, bytes, Key]]:
    """(key text, row bytes to hash, key) of every selected row, in key order.

    ``in_sql``: SQLite writes both texts with ``quote()`` (fast; both sides must be the same SQLite
    build, as a local file and the past state are under apsw). Otherwise the raw values are
    fetched and typed here: a server's ``quote()`` may print a float differently. A remote
    database is read page by page, by key."""
    n = len(shape.key)
    keys = ", ".join(shape.key_exprs)
    table = f"main.{qident(shape.table)}"
    if in_sql:
        kq = "||char(31)||".join(f"quote({k})" for k in shape.key_exprs)
        row = "||char(31)||".join(f"quote({qident(c)})" for c in shape.columns) or "''"
        # (the row's text as bytes: a TEXT value that is not valid UTF-8, legacy data or the damage being
        # repaired, is hashed as it is stored instead of stopping the repair; its quote() is those bytes)
        for r in db.scan(f"SELECT {kq}, CAST({row} AS BLOB), {keys} FROM {table} WHERE ({where}) ORDER BY {keys}"):
            yield r[0], r[1], r[2:]
        return
    select = f"SELECT {keys}, {', '.join(qident(c) for c in shape.columns)} FROM {table} WHERE ({where})"
    for r in (_pages(db, select, keys, n) if db.remote else db.scan(f"{select} ORDER BY {keys}")):
        yield _key_text(r[:n]), _typed(r[n:]), r[:n]


def _pages(db: Db, select: str, keys: str, n: int) -> Iterator[Key]:
    after: Key | None = None
    page = REMOTE_PAGE_ROWS
    while True:
        more = "" if after is None else f" AND ({keys}) > ({', '.join('?' * n)})"
        try:
            rows = db.rows(f"{select}{more} ORDER BY {keys} LIMIT {page}", after or ())
        except RestoreError as err:
            if page > 1 and ("too large" in err.message.lower() or "size" in err.message.lower()):
                page = max(1, page // 4)  # wide rows: a page over the server's response cap
                continue
            raise
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1][:n]


def _select(db: Db, shape: _Shape, where: str, max_rows: int, in_sql: bool) -> tuple[list[Key], Any]:
    """The selected rows' keys, and a DataFrame (kq: key text, h: row hash, i: index into the keys).

    Rows stream from the database and only their hashes are kept; the cap bounds the memory."""
    import pandas as pd

    keys: list[Key] = []
    kqs: list[str] = []
    hashes: list[str] = []
    digest = xxhash.xxh3_128_hexdigest
    try:
        for kq, row, key in _scan(db, shape, where, in_sql):
            if len(keys) >= max_rows:
                raise UsageError(f"{OPERATION}: the WHERE selects more than {max_rows:,} rows of {shape.table} in "
                                 f"{db.label}", "narrow the WHERE, or raise --max-rows")
            keys.append(key)
            kqs.append(kq)
            hashes.append(digest(row))
    except (apsw.SQLError, apsw.AuthError) as err:  # what only running it finds (a function the guard refuses)
        raise UsageError(f"{OPERATION}: bad WHERE for {shape.table} in {db.label}: {err}",
                         "check the expression (a read-only one: no load_extension or other writing function)"
                         ) from None
    frame = pd.DataFrame({"kq": pd.Series(kqs, dtype=object), "h": pd.Series(hashes, dtype=object),
                          "i": range(len(kqs))})
    if frame["kq"].duplicated().any():
        raise RestoreError(f"{OPERATION}: the key of {shape.table} ({', '.join(shape.key)}) is not unique in "
                           f"{db.label}", "repair by hand from a restored copy (`dbre restore-table`)")
    return keys, frame


def _diff(snap: Any, live: Any) -> tuple[list[int], list[int], list[int]]:
    """Positions of the rows to insert and update (snapshot side) and of the rows only in live."""
    m = snap.merge(live, on="kq", how="outer", suffixes=("_s", "_l"), indicator=True)
    inserts = m.loc[m["_merge"] == "left_only", "i_s"]
    both = m[m["_merge"] == "both"]
    updates = both.loc[both["h_s"] != both["h_l"], "i_s"]
    extras = m.loc[m["_merge"] == "right_only", "i_l"]
    return (sorted(int(i) for i in inserts), sorted(int(i) for i in updates), sorted(int(i) for i in extras))


def _changed_since(seen: Any, now: Any) -> list[str]:
    """Key texts of live rows that differ between two selections (added, removed or changed)."""
    m = seen.merge(now, on="kq", how="outer", suffixes=("_a", "_b"), indicator=True)
    changed = m[(m["_merge"] != "both") | (m["h_a"] != m["h_b"])]
    return [str(k) for k in changed["kq"]]


# -- plan ----------------------------------------------------------------------------------------


def plan_row_repair(repo: Repository, db: str, live_path: str | os.PathLike[str], table: str, where: str, *,
                    snapshot: str | None = None, at: datetime | None = None, delete_extra: bool = False,
                    max_rows: int = MAX_ROWS, preview_rows: int = PREVIEW_ROWS,
                    scratch_dir: str | os.PathLike[str] | None = None, token: Secret | None = None,
                    fire_triggers: bool = False) -> RowRepairPlan:
    """Open the snapshot (``at``: the state then, a replicated point when segments hold it) in place, select
    the rows in both, diff them; the live database is only read. The plan holds the state and the
    repository's shared lock until it is applied or closed.

    ``fire_triggers``: the apply lets the table's triggers fire (the plan's effects say which).

    ``live_path`` is a file, or a libsql:// / http(s):// / ws(s):// URL with ``token`` (or
    ``?authToken=``) for a remote database."""
    check_db_name(db)
    if snapshot and at:
        raise UsageError("--snapshot and --at were both given", "pass one of them")
    if max_rows < 1:
        raise UsageError(f"{OPERATION}: max_rows must be at least 1")
    where = check_where(where)
    remote = is_remote(live_path)
    path = None if remote else check_live_file(live_path, OPERATION)
    manifest = retrying(repo, lambda: repo.find_snapshot(db, snapshot, at))  # (fallback.py: offsite copies)
    known = manifest_tables(manifest)
    if known and at is None and table.lower() not in {k.lower() for k in known}:
        raise unknown_table(OPERATION, manifest, [table], known)  # (at a time, the state's own schema decides)
    url = str(live_path) if remote else None
    client = connect_remote(str(live_path), token) if remote else None  # an unreachable server fails first
    try:
        past = open_past(repo, db, OPERATION, snapshot=None if at else manifest.id, at=at, scratch_dir=scratch_dir)
        try:
            src = LocalDb(past.connect(), "the snapshot")
            live: Db = (RemoteDb(client, "the live database") if client is not None else
                        LocalDb(keep_wal(apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)),
                                "the live database"))
            try:
                plan = _plan(repo, db, redact(url) if url else str(path), src, live, past, table, where,
                             delete_extra, max_rows, preview_rows, fire_triggers)
            finally:
                src.conn.close()
                if isinstance(live, LocalDb):
                    live.conn.close()
        except BaseException:
            past.close()
            raise
    finally:
        if client is not None:
            client.close()
    plan.live_url, plan.token = url, token
    return plan


def _plan(repo: Repository, db: str, live_name: str, src: LocalDb, live: Db, past: PastCopy, table: str,
          where: str, delete_extra: bool, max_rows: int, preview_rows: int, fire_triggers: bool) -> RowRepairPlan:
    names = _tables(src)
    if table.lower() not in names:
        raise unknown_table(OPERATION, past.manifest, [table], names.values())
    table = names[table.lower()]
    if table.lower() not in _tables(live):
        raise UsageError(f"{OPERATION}: table {table} is not in the live database",
                         f"restore the whole table: dbre restore-table --table {table}")
    shape = _shape(src, table)
    live_shape = _shape(live, table)
    if sorted(c.lower() for c in shape.columns) != sorted(c.lower() for c in live_shape.columns) \
            or [k.lower() for k in shape.key] != [k.lower() for k in live_shape.key]:
        only_s = sorted(set(shape.columns) - set(live_shape.columns))
        only_l = sorted(set(live_shape.columns) - set(shape.columns))
        raise UsageError(f"{OPERATION}: {table} has other columns or another key in live than in the snapshot "
                         f"(only in the snapshot: {only_s or '-'}; only in live: {only_l or '-'})",
                         "restore a copy with `dbre restore-table` and move the rows by hand")
    _prepare_where(src, table, where)
    _prepare_where(live, table, where)
    in_sql = not live.remote  # the past state and a local live file are read by the same SQLite (apsw's)
    snap_keys, snap = _select(src, shape, where, max_rows, in_sql)
    live_keys, live_frame = _select(live, shape, where, max_rows, in_sql)
    ins, upd, extra = _diff(snap, live_frame)
    plan = RowRepairPlan(  # (its writes, the safety snapshot and the audit record: the primary's)
        repo=primary_of(repo), db=db, live=live_name, table=table, where=where, past=past, columns=shape.columns,
        key=shape.key, key_is_rowid=shape.key_is_rowid, delete_extra=delete_extra, max_rows=max_rows,
        snapshot_rows=len(snap_keys), live_rows=len(live_keys), inserts=[snap_keys[i] for i in ins],
        updates=[snap_keys[i] for i in upd], extras=[live_keys[i] for i in extra], live_seen=live_frame[["kq", "h"]],
        fire_triggers=fire_triggers)
    if live.remote:
        _check_remote_actions(live, plan)
    plan.effects = _effects(src, live, live_shape, plan)
    plan.preview = _preview(src, live, shape, plan, preview_rows)
    return plan


def _check_remote_actions(live: Db, plan: RowRepairPlan) -> None:
    """A server enforces foreign keys: an update or delete here must not cascade into other tables."""
    if not (plan.updates or (plan.delete_extra and plan.extras)):
        return
    enforced = live.rows("PRAGMA foreign_keys")
    if not enforced or not enforced[0][0]:
        return
    actions = [f"{child} (on update {upd.lower()}, on delete {dele.lower()})" for child, upd, dele in
               _children(live, plan.table) if {upd, dele} - {"NO ACTION", "RESTRICT"}]
    if actions:
        raise UsageError(f"{OPERATION}: the server enforces foreign keys and {', '.join(actions)} would act on "
                         f"rows changed in {plan.table}", "repair these rows by hand")


# -- what applying does beyond the table's rows ---------------------------------------------------

EFFECT_COUNT_MAX = 20_000  # parent rows beyond which the rows pointing at them are not counted
_PARAMS = 900  # bound parameters per query (SQLite builds before 3.32 allow 999)
_ACTIONS = {"CASCADE": "{verb} them", "SET NULL": "set their key to NULL",
            "SET DEFAULT": "set their key to its default"}


@dataclass
class _ForeignKey:
    """A foreign key of ``child`` whose ``columns`` point at ``parent_columns`` of the repaired table."""

    child: str
    columns: list[str]
    parent_columns: list[str]
    on_update: str
    on_delete: str


def _foreign_keys_to(db: Db, table: str) -> list[_ForeignKey]:
    pk = [str(r[0]) for r in db.rows("SELECT name FROM pragma_table_info(?, 'main') WHERE pk > 0 ORDER BY pk",
                                     (table,))]
    out = []
    for child in _tables(db).values():
        fks: dict[int, _ForeignKey] = {}
        for fid, parent, frm, to, on_update, on_delete in db.rows(
                "SELECT id, \"table\", \"from\", \"to\", on_update, on_delete "
                "FROM pragma_foreign_key_list(?, 'main') ORDER BY id, seq", (child,)):
            if str(parent).lower() == table.lower():
                fk = fks.setdefault(int(fid), _ForeignKey(child, [], [], str(on_update), str(on_delete)))
                fk.columns.append(str(frm))
                fk.parent_columns.append("" if to is None else str(to))
        for fk in fks.values():
            if "" in fk.parent_columns:
                fk.parent_columns = pk  # REFERENCES table without columns: its primary key
            if len(fk.parent_columns) == len(fk.columns):  # else SQLite reports a mismatch, not a key
                out.append(fk)
    return out


def _in_values(exprs: list[str], count: int) -> str:
    one = "(" + ", ".join("?" * len(exprs)) + ")"
    return f"({', '.join(exprs)}) IN (VALUES {', '.join([one] * count)})"


def _chunks(items: list[Key], width: int) -> Iterator[list[Key]]:
    size = max(1, _PARAMS // max(width, 1))
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _values_by_key(db: Db, shape: _Shape, keys: list[Key], columns: list[str]) -> dict[str, Key]:
    """``columns`` of the rows with these keys, by key text."""
    n = len(shape.key)
    out = {}
    for chunk in _chunks(keys, n):
        for r in db.rows(f"SELECT {', '.join(shape.key_exprs)}, {', '.join(qident(c) for c in columns)} "
                         f"FROM main.{qident(shape.table)} WHERE {_in_values(shape.key_exprs, len(chunk))}",
                         [v for k in chunk for v in k]):
            out[_key_text(tuple(r[:n]))] = tuple(r[n:])
    return out


def _count_pointing(db: Db, fk: _ForeignKey, values: list[Key]) -> int:
    """Rows of the child whose foreign key holds one of ``values`` (parent key values)."""
    values = [v for v in values if None not in v]  # a NULL parent value is never referenced
    exprs = [qident(c) for c in fk.columns]
    total = 0
    for chunk in _chunks(values, len(exprs)):
        (n,) = db.rows(f"SELECT count(*) FROM main.{qident(fk.child)} WHERE {_in_values(exprs, len(chunk))}",
                       [v for k in chunk for v in k])[0]
        total += int(n)
    return total


def _effects(src: Db, live: Db, shape: _Shape, plan: RowRepairPlan) -> list[dict[str, Any]]:
    """What applying the plan does beyond the selected rows: one dict per foreign key or trigger.

    A deleted row (``delete_extra``), or an updated one whose referenced columns change, leaves
    the rows pointing at it in live: the apply writes with foreign keys off (local) and never runs
    their ON DELETE / ON UPDATE action, so they become violations and the apply stops. Those rows
    are counted in live (up to EFFECT_COUNT_MAX parent rows). Triggers are listed by name."""
    out = []
    deleted = plan.extras if plan.delete_extra else []
    key = {k.lower() for k in shape.key}
    for fk in _foreign_keys_to(live, plan.table):
        for kind, keys, action in (("delete", deleted, fk.on_delete), ("update", plan.updates, fk.on_update)):
            if not keys or (kind == "update" and {c.lower() for c in fk.parent_columns} <= key):
                continue  # an update writes every column but the key: referenced key columns stay
            rows: int | None = None
            if len(keys) <= EFFECT_COUNT_MAX:
                old = _values_by_key(live, shape, keys, fk.parent_columns)
                if kind == "update":
                    new = _values_by_key(src, shape, keys, fk.parent_columns)
                    old = {k: v for k, v in old.items()
                           if not all(_same(a, b) for a, b in zip(v, new.get(k, ()), strict=False)) or k not in new}
                rows = _count_pointing(live, fk, list(old.values()))
                if not rows:
                    continue
            out.append({"table": fk.child, "through": f"foreign key ({', '.join(fk.columns)}) -> {plan.table}"
                        f"({', '.join(fk.parent_columns)}) ON {kind.upper()} {action}", "rows": rows,
                        "when_applied": _fk_outcome(kind, action, rows, len(keys), live.remote)})
    return out + _trigger_effects(live, shape, plan)


def _fk_outcome(kind: str, action: str, rows: int | None, parents: int, remote: bool) -> str:
    done = _ACTIONS.get(action.upper())
    not_run = f"; ON {kind.upper()} {action} would {done.format(verb=kind)}, but a repair never runs it" if done else ""
    allow = "" if remote else " unless --allow-fk-violations"
    if rows is None:
        return (f"rows pointing at the {parents:,} {kind}d rows were not counted (over {EFFECT_COUNT_MAX:,}){not_run}: "
                f"any there are would point at nothing and stop the apply (new foreign-key violations){allow}")
    return (f"these rows point at {'deleted' if kind == 'delete' else 're-keyed'} rows{not_run}: they would point at "
            f"nothing, so the apply stops (new foreign-key violations){allow}")


def _trigger_effects(live: Db, shape: _Shape, plan: RowRepairPlan) -> list[dict[str, Any]]:
    """The table's triggers that the planned inserts, updates and deletes set off, with the tables they write."""
    events = {"INSERT": len(plan.inserts), "UPDATE": len(plan.updates) if shape.value_columns else 0,
              "DELETE": len(plan.extras) if plan.delete_extra else 0}
    out = []
    for name, sql in live.rows("SELECT name, sql FROM main.sqlite_schema WHERE type='trigger' "
                               "AND lower(tbl_name)=lower(?) ORDER BY name", (plan.table,)):
        event, writes = _trigger_parts(str(sql))
        n = events.get(event, 0)
        if not n:
            continue
        on = f"{n} {event.lower()}{'s' if n > 1 else ''}"
        out.append({"table": ", ".join(writes) or "-", "through": f"trigger {name} ({event.lower()})",
                    "rows": None if plan.fire_triggers else 0,
                    "when_applied": f"fires on the {on} (--fire-triggers); rows it touches are not counted"
                    if plan.fire_triggers else f"suspended: does not fire on the {on} (--fire-triggers lets it)"})
    return out


def _unquote(word: str) -> str:
    if word[:1] in "\"`[" and len(word) > 1:
        return word[1:-1].replace(word[0] * 2, word[0]) if word[0] != "[" else word[1:-1]
    return word


def _trigger_parts(sql: str) -> tuple[str, list[str]]:
    """A trigger's event (INSERT, UPDATE or DELETE) and the tables its body writes, from its CREATE TRIGGER."""
    words = [m.group() for m in SQL_TOKEN.finditer(sql)
             if not m.group().isspace() and not m.group().startswith(("--", "/*"))]
    upper = [w.upper() for w in words]
    begin = upper.index("BEGIN") if "BEGIN" in upper else len(words)
    event = next((w for w in upper[3:begin] if w in ("INSERT", "UPDATE", "DELETE")), "")
    writes: list[str] = []
    for i in range(begin, len(words)):
        w, j = upper[i], i + 1
        if w not in ("INSERT", "REPLACE", "UPDATE", "DELETE"):
            continue
        if w != "DELETE" and upper[j:j + 1] == ["OR"]:
            j += 2  # INSERT OR IGNORE INTO t, UPDATE OR REPLACE t
        if w != "UPDATE":
            if upper[j:j + 1] not in (["INTO"], ["FROM"]):
                continue  # replace(...), the function
            j += 1
        if j < len(words) and upper[j] != "SET" and words[j] not in ("(", ";"):  # DO UPDATE SET: an upsert
            name = _unquote(words[j])
            if name not in writes:
                writes.append(name)
    return event, writes


class NotUtf8Text(str):
    """A TEXT value whose bytes are not valid UTF-8 (legacy data, or the damage being repaired), as the
    preview shows it: never equal to a decoded value, so the row shows as changed."""

    def __new__(cls, raw: bytes) -> NotUtf8Text:
        return super().__new__(cls, f"text, not UTF-8: x'{raw[:20].hex()}{'…' if len(raw) > 20 else ''}'")


def _row(db: Db, shape: _Shape, key: Key, columns: list[str] | None = None) -> dict[str, Any]:
    cols = shape.columns if columns is None else columns
    table = f"main.{qident(shape.table)}"
    try:
        found = db.rows(f"SELECT {', '.join(qident(c) for c in cols)} FROM {table} WHERE {shape.key_match}", key)
    except TextNotUtf8:
        if db.remote:
            raise
        # (read again with TEXT as its bytes: the row can still be shown, and repaired)
        exprs = [f"typeof({qident(c)}) = 'text', CASE WHEN typeof({qident(c)}) = 'text' "
                 f"THEN CAST({qident(c)} AS BLOB) ELSE {qident(c)} END" for c in cols]
        raw = db.rows(f"SELECT {', '.join(exprs)} FROM {table} WHERE {shape.key_match}", key)
        found = [tuple(_as_text(is_text, v) for is_text, v in zip(r[0::2], r[1::2], strict=True)) for r in raw]
    return dict(zip(cols, found[0] if found else (), strict=False))


def _as_text(is_text: int, value: Any) -> Any:
    if not is_text or not isinstance(value, bytes):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return NotUtf8Text(value)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _preview(src: Db, live: Db, shape: _Shape, plan: RowRepairPlan, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of each kind, values shortened for display."""
    out = []

    def key_text(key: Key) -> str:
        return ", ".join(f"{k}={show_value(v)}" for k, v in zip(shape.key, key, strict=True))

    def values_text(row: dict[str, Any]) -> str:
        return ", ".join(f"{c}={show_value(v)}" for c, v in row.items() if c not in shape.key)

    for key in plan.inserts[:n]:
        out.append({"action": "insert", "key": key_text(key), "detail": values_text(_row(src, shape, key))})
    for key in plan.updates[:n]:
        old, new = _row(live, shape, key), _row(src, shape, key)
        diffs = [f"{c}: {show_value(old.get(c))} -> {show_value(v)}" for c, v in new.items()
                 if not _same(old.get(c), v)]
        out.append({"action": "update", "key": key_text(key), "detail": "; ".join(diffs)})
    for key in plan.extras[:n]:
        out.append({"action": "delete" if plan.delete_extra else "keep (only in live)", "key": key_text(key),
                    "detail": values_text(_row(live, shape, key))})
    return out


# -- apply ---------------------------------------------------------------------------------------


def apply_row_repair(plan: RowRepairPlan, *, allow_fk_violations: bool = False, fire_triggers: bool | None = None,
                     who: str | None = None, safety: bool = True,
                     key_file: str | os.PathLike[str] | None = None) -> RowRepairResult:
    """Insert, update (and with ``delete_extra`` delete) the planned rows in one transaction; audit it.

    The live selection is read again inside the transaction: if any selected row was added,
    removed or changed since the plan, nothing is written. The table's triggers do not fire
    (they are dropped and recreated inside the transaction) unless ``fire_triggers``: an
    "updated_at" trigger would otherwise change the rows just put back. New foreign-key
    violations roll the transaction back unless ``allow_fk_violations`` (local files only: a
    server enforces its foreign keys itself). The shared lock the plan took is checked first (LockLostError:
    plan again). The past state is let go at the end, whatever happens: a damaged page read from it in the
    transaction, or a store that gives up, rolls it back.
    ``fire_triggers`` None: as the plan says. ``safety``: a local live file is snapshotted into the
    repository first, just before the write transaction (a repair that turns out wrong is undone
    with `repair-rows --snapshot` of it: ``RowRepairResult.undo_command``, also in the audit record);
    a remote database is not (that would be a whole /dump of it). ``key_file`` goes into the undo.
    """
    started = time.perf_counter()
    fire_triggers = plan.fire_triggers if fire_triggers is None else fire_triggers
    shape = _Shape(plan.table, plan.columns, plan.key, plan.key_is_rowid)
    try:
        # before the safety snapshot and any write: a plan kept past the lock's stale limit is planned again
        plan.past.check_alive(f"{OPERATION} in {plan.live}")
        if plan.live_url is not None:
            if allow_fk_violations:
                raise UsageError(f"{OPERATION}: a remote database enforces its own foreign keys",
                                 "leave out allow_fk_violations")
            counts, taken = _apply_remote(plan, shape, fire_triggers), None
        else:
            counts, taken = _apply_local(plan, shape, allow_fk_violations, fire_triggers, safety)
    finally:
        plan.close()
    record = {**plan.describe(), "safety_snapshot": taken, "inserted": counts["insert"], "updated": counts["update"],
              "deleted": counts["delete"], "foreign_key_violations_allowed": allow_fk_violations,
              "keys": {"insert": plan.inserts[:1000], "update": plan.updates[:1000],
                       "extra": plan.extras[:1000]}}
    record.pop("preview", None)
    result = RowRepairResult(plan, counts["insert"], counts["update"], counts["delete"], "",
                             time.perf_counter() - started, taken)
    record["undo"] = result.undo_command(key_file)
    result.audit_record = write_audit(plan.repo, plan.db, record, who)
    return result


def _apply_local(plan: RowRepairPlan, shape: _Shape, allow_fk_violations: bool,
                 fire_triggers: bool, safety: bool) -> tuple[dict[str, int], str | None]:
    from dbre.restore.table import safety_snapshot

    # before the write lock, not inside it: a backup of a large file would block the application's
    # writers for its whole length (~25 ms/MiB). The undo puts back the repaired rows only, and the
    # transaction below refuses to write if any selected row changed since the plan, so the rows it
    # changes are in this snapshot as they were when it wrote
    taken = safety_snapshot(plan.repo, plan.db, Path(plan.live), f"{OPERATION} of {plan.table}") if safety else None
    try:
        with write_transaction(Path(plan.live), plan.past, lambda conn: _stage_rows(conn, plan, shape)) as conn:
            db = LocalDb(conn, "the live database")
            return _repair(db, plan, shape, allow_fk_violations, fire_triggers, None), taken
    except apsw.Error as err:
        raise RestoreError(f"{OPERATION} in {plan.live}: {err}; rolled back, nothing was changed") from err
    except RepositoryError as err:  # the past state could not be read (damaged, missing, the store gave up)
        raise rolled_back(err, f"{OPERATION} in {plan.live}") from err


def _stage_rows(conn: apsw.Connection, plan: RowRepairPlan, shape: _Shape) -> None:
    """The rows the repair writes (its inserts and updates), copied from the past state into a private
    temporary database (``ATTACH ''``: on disk in the temp folder, gone with the connection) under the table's
    name, then the past state detached, all before the write lock: rows that left the state's cache since the
    plan are read from the repository (network reads, retried for minutes when the store fails) while the
    application's writers go on. Untyped columns keep every value as stored; a rowid key is the row's rowid."""
    t = qident(plan.table)
    cols = [qident(c) for c in shape.columns]
    names = ", ".join(([shape.key[0]] if shape.key_is_rowid else []) + cols)
    conn.execute(f"ATTACH DATABASE '' AS {STAGE_SCHEMA}")
    conn.execute(f"CREATE TABLE {STAGE_SCHEMA}.{t}({', '.join(cols)})")
    for key in [*plan.inserts, *(plan.updates if shape.value_columns else [])]:
        conn.execute(f"INSERT INTO {STAGE_SCHEMA}.{t} ({names}) SELECT {names} FROM {SNAPSHOT_SCHEMA}.{t} "
                     f"WHERE {shape.key_match}", key)
    conn.execute(f"DETACH DATABASE {SNAPSHOT_SCHEMA}")  # the write transaction cannot read the repository


def _apply_remote(plan: RowRepairPlan, shape: _Shape, fire_triggers: bool) -> dict[str, int]:
    assert plan.live_url is not None
    client = connect_remote(plan.live_url, plan.token)
    src: apsw.Connection | None = None
    try:
        # the rows to write, staged before the server's transaction opens (it holds the server's write lock)
        src = apsw.Connection("", flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_URI)
        plan.past.attach(src)
        _stage_rows(src, plan, shape)
        tx = client.transaction()
        try:
            db = RemoteDb(tx, "the live database")
            db.rows("PRAGMA defer_foreign_keys=ON")  # a child may come back before its parent: checked at the end
            counts = _repair(db, plan, shape, False, fire_triggers, LocalDb(src, "the snapshot"))
        except BaseException:
            try:
                tx.rollback()
            except Exception:  # noqa: BLE001 - the server drops an unfinished transaction anyway
                pass
            tx.close()
            raise
        try:
            tx.commit()
        except Exception as err:  # noqa: BLE001 - the client's and aiohttp's errors alike
            raise RestoreError(f"{OPERATION} in {plan.live}: the commit failed or was not confirmed "
                               f"({err.__class__.__name__}: {err})",
                               "plan again: the new plan shows whether the rows came back") from None
        finally:
            tx.close()
        return counts
    except DbreError as err:
        if isinstance(err, UsageError) or "nothing was changed" in err.message or "commit" in err.message:
            raise
        raise RestoreError(f"{OPERATION} in {plan.live}: {err.message}; rolled back, nothing was changed") from err
    except Exception as err:  # noqa: BLE001 - a lost connection before the commit: the server rolls back
        raise RestoreError(f"{OPERATION} in {plan.live}: {err.__class__.__name__}: {err}; rolled back, nothing was "
                           "changed", "check the server and try again") from None
    finally:
        if src is not None:
            src.close()
        client.close()


def _repair(db: Db, plan: RowRepairPlan, shape: _Shape, allow_fk_violations: bool, fire_triggers: bool,
            values: LocalDb | None) -> dict[str, int]:
    """Inside the open transaction: check that live is as planned, then write.

    ``values`` is the connection the snapshot's rows were staged on (remote), or None when they were staged
    on the live connection (local) and are copied in SQL (``_stage_rows`` either way)."""
    _, now = _select(db, shape, plan.where, plan.max_rows, not db.remote)
    changed = _changed_since(plan.live_seen, now)
    if changed:
        example = ", ".join(f"{k}={v[1:] if db.remote else v}"
                            for k, v in zip(plan.key, changed[0].split("\x1f"), strict=False))
        raise RestoreError(f"{OPERATION}: {len(changed)} selected rows of {plan.table} changed in the live "
                           f"database since the plan (e.g. {example}); nothing was changed",
                           "plan again and check the new diff")
    triggers = [] if fire_triggers else _suspend_triggers(db, plan.table)
    related = {plan.table} | {c for c, _, _ in _children(db, plan.table)}
    before = _fk_violations(db, related)
    counts = _write_rows(db, shape, plan, values)
    for sql in triggers:
        db.write(sql)
    after = _fk_violations(db, related)
    new = new_fk_violations(before, after)
    if new and not allow_fk_violations:
        raise RestoreError(f"{OPERATION}: the repair breaks foreign keys ({fk_message(new)} new violations); "
                           "rolled back, nothing was changed",
                           "repair the rows they reference too" + ("" if db.remote else ", or allow the violations"))
    return counts


def _suspend_triggers(db: Db, table: str) -> list[str]:
    """Drop the table's triggers; returns their CREATE statements to run again before commit."""
    rows = db.rows("SELECT name, sql FROM main.sqlite_schema WHERE type='trigger' AND lower(tbl_name)=lower(?)",
                   (table,))
    for name, _ in rows:
        db.write(f"DROP TRIGGER main.{qident(str(name))}")
    return [str(sql) for _, sql in rows]


def _write_rows(db: Db, shape: _Shape, plan: RowRepairPlan, values: LocalDb | None) -> dict[str, int]:
    t = qident(plan.table)
    cols = list(shape.columns)
    names = [qident(c) for c in cols]
    if shape.key_is_rowid:
        cols.insert(0, shape.key[0])  # the key is the rowid: keep it
        names.insert(0, shape.key[0])
    match = shape.key_match
    sets = shape.value_columns
    set_list = ", ".join(qident(c) for c in sets)

    def snapshot_row(key: Key, columns: list[str]) -> Key:
        assert values is not None
        exprs = [c if shape.key_is_rowid and c == shape.key[0] else qident(c) for c in columns]
        found = values.rows(f"SELECT {', '.join(exprs)} FROM {STAGE_SCHEMA}.{t} WHERE {match}", key)
        if not found:
            raise RestoreError(f"{OPERATION}: row {key} is missing from the snapshot")
        return found[0]

    counts = {"insert": 0, "update": 0, "delete": 0}

    def run(what: str, sql: str, params: Key, key: Key) -> None:
        touched = db.write(sql, params)
        if touched != 1:
            raise RestoreError(f"{OPERATION}: {what} of {dict(zip(shape.key, key, strict=True))} in "
                               f"{plan.table} touched {touched} rows; rolled back")
        counts[what] += 1

    col_list = ", ".join(names)
    for key in plan.inserts:
        if values is None:
            run("insert", f"INSERT INTO main.{t} ({col_list}) SELECT {col_list} FROM {STAGE_SCHEMA}.{t} "
                          f"WHERE {match}", key, key)
        else:
            run("insert", f"INSERT INTO main.{t} ({col_list}) VALUES ({', '.join('?' * len(cols))})",
                snapshot_row(key, cols), key)
    for key in plan.updates if sets else []:
        if values is None:
            run("update", f"UPDATE main.{t} SET ({set_list}) = (SELECT {set_list} FROM {STAGE_SCHEMA}.{t} "
                          f"WHERE {match}) WHERE {match}", key + key, key)
        else:
            run("update", f"UPDATE main.{t} SET ({set_list}) = ({', '.join('?' * len(sets))}) WHERE {match}",
                snapshot_row(key, sets) + key, key)
    for key in plan.extras if plan.delete_extra else []:
        run("delete", f"DELETE FROM main.{t} WHERE {match}", key, key)
    return counts
