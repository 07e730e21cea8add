"""Row-level repair: rows of one table, chosen by a WHERE, put back as a snapshot had them.

The plan restores the snapshot to scratch, selects the rows the WHERE matches there and in the
live database, and diffs them by primary key (the rowid when the table has none) with pandas:
rows missing in live are inserted, rows that differ are updated back, rows only in live are
reported (and deleted only with ``delete_extra``). Rows are compared by the ``quote()`` of every
stored column, so 1, 1.0 and '1' differ as SQLite stores them. Applying re-reads the live
selection inside the write transaction and stops if it is not what the plan saw.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any

import apsw
import xxhash

from dbre.errors import RestoreError, UsageError
from dbre.repository.manifest import Manifest, check_db_name
from dbre.repository.repo import Repository
from dbre.repository.tables import qident
from dbre.restore.live import (
    SNAPSHOT_SCHEMA,
    SQL_TOKEN,
    Scratch,
    check_live_file,
    fk_message,
    fk_violations,
    has_rowid,
    manifest_tables,
    new_fk_violations,
    referencing_tables,
    restore_to_scratch,
    rowid_alias,
    show_value,
    stored_columns,
    table_names,
    unknown_table,
    write_audit,
    write_transaction,
)

OPERATION = "repair-rows"
MAX_ROWS = 1_000_000  # a selection larger than this needs max_rows raised: the diff holds it in memory
PREVIEW_ROWS = 10
CHUNK_ROWS = 50_000  # rows fetched and hashed at a time

Key = tuple[Any, ...]


@dataclass
class RowRepairPlan:
    """The diff of one table's selected rows between a snapshot and live, ready to apply."""

    repo: Repository
    db: str
    live: Path
    table: str
    where: str
    scratch: Scratch
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
    live_seen: Any = field(default=None, repr=False)  # DataFrame (kq, h) of the live selection

    @property
    def manifest(self) -> Manifest:
        return self.scratch.manifest

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
        return {"operation": OPERATION, "db": self.db, "live": str(self.live), "table": self.table,
                "where": self.where, "snapshot": m.id, "taken_at": m.taken_at, "key": self.key,
                "snapshot_rows": self.snapshot_rows, "live_rows": self.live_rows, "delete_extra": self.delete_extra,
                "counts": self.counts(), "preview": self.preview}

    def close(self) -> None:
        self.scratch.close()

    def __enter__(self) -> RowRepairPlan:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass
class RowRepairResult:
    plan: RowRepairPlan
    inserted: int
    updated: int
    deleted: int
    audit_record: str
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {**self.plan.describe(), "inserted": self.inserted, "updated": self.updated, "deleted": self.deleted,
                "audit_record": self.audit_record, "seconds": round(self.seconds, 3)}


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


def _prepare_where(conn: apsw.Connection, table: str, where: str, side: str) -> None:
    try:
        conn.execute(f"EXPLAIN SELECT 1 FROM main.{qident(table)} WHERE ({where})").fetchall()
    except apsw.BindingsError:
        raise UsageError(f"{OPERATION}: the WHERE has a parameter (?, :name, @name or $name)",
                         "write the values into it") from None
    except apsw.Error as err:
        raise UsageError(f"{OPERATION}: bad WHERE for {table} in {side}: {err}", "check the expression") from None


# -- selection and diff --------------------------------------------------------------------------


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


def _shape(conn: apsw.Connection, table: str) -> _Shape:
    columns = stored_columns(conn, table)
    pk = [str(r[0]) for r in conn.execute("SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (table,))]
    if pk:
        return _Shape(table, columns, pk, False)
    alias = rowid_alias(columns) if has_rowid(conn, table) else None
    if alias is None:
        raise UsageError(f"{OPERATION}: table {table} has no primary key and its columns hide the rowid",
                         "restore the table with `dbre restore-table` and repair by hand")
    return _Shape(table, columns, [alias], True)


def _select(conn: apsw.Connection, shape: _Shape, where: str, max_rows: int, side: str) -> tuple[list[Key], Any]:
    """The selected rows' keys, and a DataFrame (kq: quoted key, h: row hash, i: index into the keys)."""
    import pandas as pd

    keys = shape.key_exprs
    kq = "||char(31)||".join(f"quote({k})" for k in keys)
    row = "||char(31)||".join(f"quote({qident(c)})" for c in shape.columns) or "''"
    sql = (f"SELECT {kq}, {row}, {', '.join(keys)} FROM main.{qident(shape.table)} WHERE ({where}) "
           f"ORDER BY {', '.join(keys)}")
    cursor = conn.execute(sql)
    n = len(keys)
    out_keys: list[Key] = []
    kqs: list[str] = []
    hashes: list[str] = []
    while True:
        chunk = list(islice(cursor, CHUNK_ROWS))
        if not chunk:
            break
        if len(out_keys) + len(chunk) > max_rows:
            raise UsageError(f"{OPERATION}: the WHERE selects more than {max_rows:,} rows of {shape.table} in {side}",
                             "narrow the WHERE, or raise --max-rows")
        for r in chunk:
            kqs.append(r[0])
            hashes.append(xxhash.xxh3_128_hexdigest(r[1].encode("utf-8", "surrogatepass")))
            out_keys.append(tuple(r[2 : 2 + n]))
    frame = pd.DataFrame({"kq": kqs, "h": hashes, "i": range(len(kqs))})
    if frame["kq"].duplicated().any():
        raise RestoreError(f"{OPERATION}: the key of {shape.table} ({', '.join(shape.key)}) is not unique in {side}",
                           "repair by hand from a restored copy (`dbre restore-table`)")
    return out_keys, frame


def _diff(snap: Any, live: Any) -> tuple[list[int], list[int], list[int]]:
    """Positions of the rows to insert and update (snapshot side) and of the rows only in live."""
    m = snap.merge(live, on="kq", how="outer", suffixes=("_s", "_l"), indicator=True)
    inserts = m.loc[m["_merge"] == "left_only", "i_s"]
    both = m[m["_merge"] == "both"]
    updates = both.loc[both["h_s"] != both["h_l"], "i_s"]
    extras = m.loc[m["_merge"] == "right_only", "i_l"]
    return (sorted(int(i) for i in inserts), sorted(int(i) for i in updates), sorted(int(i) for i in extras))


def _changed_since(seen: Any, now: Any) -> list[str]:
    """Quoted keys of live rows that differ between two selections (added, removed or changed)."""
    m = seen.merge(now, on="kq", how="outer", suffixes=("_a", "_b"), indicator=True)
    changed = m[(m["_merge"] != "both") | (m["h_a"] != m["h_b"])]
    return [str(k) for k in changed["kq"]]


# -- plan ----------------------------------------------------------------------------------------


def plan_row_repair(repo: Repository, db: str, live_path: str | os.PathLike[str], table: str, where: str, *,
                    snapshot: str | None = None, at: datetime | None = None, delete_extra: bool = False,
                    max_rows: int = MAX_ROWS, preview_rows: int = PREVIEW_ROWS,
                    scratch_dir: str | os.PathLike[str] | None = None) -> RowRepairPlan:
    """Restore the snapshot to scratch, select the rows in both, diff them; the live database is only read."""
    check_db_name(db)
    if snapshot and at:
        raise UsageError("--snapshot and --at were both given", "pass one of them")
    if max_rows < 1:
        raise UsageError(f"{OPERATION}: max_rows must be at least 1")
    where = check_where(where)
    live = check_live_file(live_path, OPERATION)
    manifest = repo.find_snapshot(db, snapshot, at)
    known = manifest_tables(manifest)
    if known and table.lower() not in {k.lower() for k in known}:
        raise unknown_table(OPERATION, manifest, [table], known)
    scratch = restore_to_scratch(repo, db, snapshot=manifest.id, scratch_dir=scratch_dir)
    try:
        src = scratch.connect()
        conn = apsw.Connection(str(live), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            plan = _plan(repo, db, live, src, conn, scratch, table, where, delete_extra, max_rows, preview_rows)
        finally:
            conn.close()
            src.close()
    except BaseException:
        scratch.close()
        raise
    return plan


def _plan(repo: Repository, db: str, live: Path, src: apsw.Connection, conn: apsw.Connection, scratch: Scratch,
          table: str, where: str, delete_extra: bool, max_rows: int, preview_rows: int) -> RowRepairPlan:
    names = table_names(src)
    if table.lower() not in names:
        raise unknown_table(OPERATION, scratch.manifest, [table], names.values())
    table = names[table.lower()]
    if table.lower() not in table_names(conn):
        raise UsageError(f"{OPERATION}: table {table} is not in the live database",
                         f"restore the whole table: dbre restore-table --table {table}")
    shape = _shape(src, table)
    live_shape = _shape(conn, table)
    if sorted(c.lower() for c in shape.columns) != sorted(c.lower() for c in live_shape.columns) \
            or [k.lower() for k in shape.key] != [k.lower() for k in live_shape.key]:
        only_s = sorted(set(shape.columns) - set(live_shape.columns))
        only_l = sorted(set(live_shape.columns) - set(shape.columns))
        raise UsageError(f"{OPERATION}: {table} has other columns or another key in live than in the snapshot "
                         f"(only in the snapshot: {only_s or '-'}; only in live: {only_l or '-'})",
                         "restore a copy with `dbre restore-table` and move the rows by hand")
    _prepare_where(src, table, where, "the snapshot")
    _prepare_where(conn, table, where, "the live database")
    snap_keys, snap = _select(src, shape, where, max_rows, "the snapshot")
    live_keys, live_frame = _select(conn, shape, where, max_rows, "the live database")
    ins, upd, extra = _diff(snap, live_frame)
    plan = RowRepairPlan(
        repo=repo, db=db, live=live, table=table, where=where, scratch=scratch, columns=shape.columns,
        key=shape.key, key_is_rowid=shape.key_is_rowid, delete_extra=delete_extra, max_rows=max_rows,
        snapshot_rows=len(snap_keys), live_rows=len(live_keys), inserts=[snap_keys[i] for i in ins],
        updates=[snap_keys[i] for i in upd], extras=[live_keys[i] for i in extra], live_seen=live_frame[["kq", "h"]])
    plan.preview = _preview(src, conn, shape, plan, preview_rows)
    return plan


def _row(conn: apsw.Connection, shape: _Shape, key: Key) -> dict[str, Any]:
    cols = ", ".join(qident(c) for c in shape.columns)
    cur = conn.execute(f"SELECT {cols} FROM main.{qident(shape.table)} WHERE {shape.key_match}", key)
    values = cur.fetchone()
    return dict(zip(shape.columns, values or (), strict=False))


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _preview(src: apsw.Connection, live: apsw.Connection, shape: _Shape, plan: RowRepairPlan,
             n: int) -> list[dict[str, Any]]:
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


def apply_row_repair(plan: RowRepairPlan, *, allow_fk_violations: bool = False, fire_triggers: bool = False,
                     who: str | None = None) -> RowRepairResult:
    """Insert, update (and with ``delete_extra`` delete) the planned rows in one transaction; audit it.

    The live selection is read again inside the transaction: if any selected row was added,
    removed or changed since the plan, nothing is written. The table's triggers do not fire
    (they are dropped and recreated inside the transaction) unless ``fire_triggers``: an
    "updated_at" trigger would otherwise change the rows just put back. The scratch copy is
    removed at the end, whatever happens.
    """
    started = time.perf_counter()
    shape = _Shape(plan.table, plan.columns, plan.key, plan.key_is_rowid)
    counts = {"insert": 0, "update": 0, "delete": 0}
    try:
        with write_transaction(plan.live, plan.scratch) as conn:
            _, now = _select(conn, shape, plan.where, plan.max_rows, "the live database")
            changed = _changed_since(plan.live_seen, now)
            if changed:
                example = ", ".join(f"{k}={v}" for k, v in zip(plan.key, changed[0].split("\x1f"), strict=False))
                raise RestoreError(f"{OPERATION}: {len(changed)} selected rows of {plan.table} changed in the live "
                                   f"database since the plan (e.g. {example}); nothing was changed",
                                   "plan again and check the new diff")
            triggers = [] if fire_triggers else _suspend_triggers(conn, plan.table)
            related = referencing_tables(conn, [plan.table]) | {plan.table}
            before = fk_violations(conn, related)
            counts = _write_rows(conn, shape, plan)
            for sql in triggers:
                conn.execute(sql)
            new = new_fk_violations(before, fk_violations(conn, related))
            if new and not allow_fk_violations:
                raise RestoreError(f"{OPERATION}: the repair breaks foreign keys ({fk_message(new)} new "
                                   "violations); rolled back, nothing was changed",
                                   "repair the rows they reference too, or allow the violations")
    except apsw.Error as err:
        raise RestoreError(f"{OPERATION} in {plan.live}: {err}; rolled back, nothing was changed") from err
    finally:
        plan.close()
    record = {**plan.describe(), "inserted": counts["insert"], "updated": counts["update"],
              "deleted": counts["delete"], "foreign_key_violations_allowed": allow_fk_violations,
              "keys": {"insert": plan.inserts[:1000], "update": plan.updates[:1000],
                       "extra": plan.extras[:1000]}}
    record.pop("preview", None)
    audit = write_audit(plan.repo, plan.db, record, who)
    return RowRepairResult(plan, counts["insert"], counts["update"], counts["delete"], audit,
                           time.perf_counter() - started)


def _suspend_triggers(conn: apsw.Connection, table: str) -> list[str]:
    """Drop the table's triggers; returns their CREATE statements to run again before commit."""
    rows = conn.execute("SELECT name, sql FROM main.sqlite_schema WHERE type='trigger' AND lower(tbl_name)=lower(?)",
                        (table,)).fetchall()
    for name, _ in rows:
        conn.execute(f"DROP TRIGGER main.{qident(str(name))}")
    return [str(sql) for _, sql in rows]


def _write_rows(conn: apsw.Connection, shape: _Shape, plan: RowRepairPlan) -> dict[str, int]:
    t = qident(plan.table)
    cols = [qident(c) for c in shape.columns]
    if shape.key_is_rowid:
        cols.insert(0, shape.key[0])  # the key is the rowid: keep it
    col_list = ", ".join(cols)
    match = shape.key_match
    key_cols = {k.lower() for k in shape.key}
    values = [qident(c) for c in shape.columns if c.lower() not in key_cols]
    steps: list[tuple[str, str, list[Key], int]] = [
        ("insert", f"INSERT INTO main.{t} ({col_list}) SELECT {col_list} FROM {SNAPSHOT_SCHEMA}.{t} WHERE {match}",
         plan.inserts, 1),
    ]
    if values:
        v = ", ".join(values)
        steps.append(("update", f"UPDATE main.{t} SET ({v}) = (SELECT {v} FROM {SNAPSHOT_SCHEMA}.{t} WHERE {match}) "
                                f"WHERE {match}", plan.updates, 2))
    if plan.delete_extra:
        steps.append(("delete", f"DELETE FROM main.{t} WHERE {match}", plan.extras, 1))
    counts = {"insert": 0, "update": 0, "delete": 0}
    for what, sql, keys, repeat in steps:
        for key in keys:
            conn.execute(sql, key * repeat)
            if conn.changes() != 1:
                raise RestoreError(f"{OPERATION}: {what} of {dict(zip(shape.key, key, strict=True))} in "
                                   f"{plan.table} touched {conn.changes()} rows; rolled back")
            counts[what] += 1
    return counts
