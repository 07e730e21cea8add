"""Table-level restore: chosen tables of a snapshot back into the live database, as copies or in place.

``rename`` mode creates ``<table><suffix>`` beside the live table (its indexes renamed the same
way, no triggers: they would fire on the copy), or, when the live database has no such table (it
was dropped), the table under its own name with its indexes and triggers; ``replace`` mode drops
the live table and recreates it with the snapshot's indexes and triggers, after a safety snapshot
of the live database, so the replace can be undone (the result carries the undo as shell
commands). Either way the work is one transaction on the live file: the rows are read from the
snapshot in place (through the repository's VFS: only the pages of the tables restored, each checked,
never the whole database first; see live.py) into a private temporary database *before* the write lock,
so the application's writers never wait on the network; then, under the lock, they are copied from
there, foreign keys are checked (``PRAGMA foreign_key_check``) and the transaction rolls back on a new
violation.
"""

from __future__ import annotations

import os
import shlex
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import DbreError, RepositoryError, RestoreError, UsageError
from dbre.repository.fallback import primary_of, retrying
from dbre.repository.lock import LockLostError
from dbre.repository.manifest import Manifest, check_db_name
from dbre.repository.repo import Repository
from dbre.repository.tables import qident
from dbre.restore.live import (
    SNAPSHOT_SCHEMA,
    SQL_TOKEN,
    PastCopy,
    PastPlan,
    check_live_file,
    fk_message,
    fk_violations,
    has_rowid,
    manifest_tables,
    new_fk_violations,
    open_past,
    referencing_tables,
    rolled_back,
    rowid_alias,
    stored_columns,
    table_names,
    unknown_table,
    write_audit,
    write_transaction,
)
from dbre.sources.local import keep_wal

MODES = ("rename", "replace")
OPERATION = "restore-table"
STAGE_SCHEMA = "dbre_stage"  # a private temporary database the rows are staged in before the write lock


@dataclass
class TableAction:
    """What happens to one table: ``table`` in the snapshot becomes ``target`` in the live database."""

    table: str
    target: str
    snapshot_rows: int
    live_rows: int | None  # rows the live ``target`` holds now; None when there is no such table
    statements: list[str]  # CREATE TABLE, then its indexes and triggers, as they will run
    skipped: list[str] = field(default_factory=list)  # schema objects not recreated, and why
    sequence: int | None = None  # the snapshot's sqlite_sequence value (AUTOINCREMENT tables)

    @property
    def action(self) -> str:
        if self.target != self.table:
            return "create copy"
        return "recreate (dropped in live)" if self.live_rows is None else "replace"

    def describe(self) -> dict[str, Any]:
        return {"table": self.table, "target": self.target, "action": self.action,
                "snapshot_rows": self.snapshot_rows, "live_rows": self.live_rows,
                "statements": self.statements, "skipped": self.skipped}


@dataclass
class TableRestorePlan(PastPlan):
    """A table restore worked out and ready to apply; holds the past state open until applied or closed."""

    repo: Repository
    db: str
    live: Path
    mode: str
    past: PastCopy
    actions: list[TableAction]

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"operation": OPERATION, "db": self.db, "live": str(self.live), "mode": self.mode,
                "snapshot": m.id, "taken_at": m.taken_at, "safety_snapshot": self.mode == "replace",
                "tables": [a.describe() for a in self.actions], **self.past.describe()}



@dataclass
class TableRestoreResult:
    plan: TableRestorePlan
    safety_snapshot: str | None
    audit_record: str
    seconds: float
    undo: list[str] = field(default_factory=list)  # shell commands that put the live database back

    def summary(self) -> dict[str, Any]:
        return {**self.plan.describe(), "safety_snapshot": self.safety_snapshot, "audit_record": self.audit_record,
                "undo": self.undo, "seconds": round(self.seconds, 3)}


def plan_table_restore(repo: Repository, db: str, live_path: str | os.PathLike[str], tables: list[str], *,
                       snapshot: str | None = None, at: datetime | None = None, mode: str = "rename",
                       suffix: str = "_restored", scratch_dir: str | os.PathLike[str] | None = None
                       ) -> TableRestorePlan:
    """Open the snapshot (``at``: the state then, a replicated point when segments hold it) in place and work
    out every statement; the live database is only read. The plan holds the state and the repository's
    shared lock until it is applied or closed."""
    check_db_name(db)
    if mode not in MODES:
        raise UsageError(f"{OPERATION}: mode {mode!r} is not one of {', '.join(MODES)}")
    if not tables:
        raise UsageError(f"{OPERATION}: no table given", "pass --table NAME")
    if snapshot and at:
        raise UsageError("--snapshot and --at were both given", "pass one of them")
    if mode == "rename" and not suffix:
        raise UsageError(f"{OPERATION}: an empty suffix would replace the live table", "pass --replace to do that")
    live = check_live_file(live_path, OPERATION)
    # a typo fails before the restore (a damaged manifest is read from an offsite copy: fallback.py)
    manifest = retrying(repo, lambda: repo.find_snapshot(db, snapshot, at))
    if at is None:  # (at a time, the state's own schema decides: a replicated point may have more tables)
        _precheck_manifest(manifest, tables)
    past = open_past(repo, db, OPERATION, snapshot=None if at else manifest.id, at=at, scratch_dir=scratch_dir)
    try:
        src = past.connect()
        try:
            conn = keep_wal(apsw.Connection(str(live), flags=apsw.SQLITE_OPEN_READONLY))
            try:
                _check_same_database(src, conn, live, past.manifest)
                actions = [_plan_table(src, conn, t, mode, suffix) for t in _resolve(src, past.manifest, tables)]
            finally:
                conn.close()
        finally:
            src.close()
        targets = [a.target.lower() for a in actions]
        if len(set(targets)) != len(targets):
            raise UsageError(f"{OPERATION}: a table was named twice", "name each table once")
    except BaseException:
        past.close()
        raise
    return TableRestorePlan(primary_of(repo), db, live, mode, past, actions)  # (its writes: the primary's)


def _check_same_database(src: apsw.Connection, live: apsw.Connection, path: Path, manifest: Manifest) -> None:
    """A --live file that holds tables, none of them the snapshot's, is another database (a wrong
    path, or --db naming another one): refused before anything is planned. One with no table at all
    is a new database to fill, and is planned as usual."""
    mine, theirs = table_names(src), table_names(live)
    if theirs and not mine.keys() & theirs.keys():
        shown = ", ".join(sorted(theirs.values())[:5]) + (", ..." if len(theirs) > 5 else "")
        raise UsageError(f"{OPERATION}: --live {path} shares no table with snapshot {manifest.id} of "
                         f"{manifest.db} (it has {shown})",
                         f"check --live and --db: is it the database backed up as {manifest.db}?")


def _precheck_manifest(manifest: Manifest, tables: list[str]) -> None:
    known = manifest_tables(manifest)
    missing = [t for t in tables if t.lower() not in {k.lower() for k in known}]
    if known and missing:  # an old manifest without the schema: the state's own schema decides
        raise unknown_table(OPERATION, manifest, missing, known)


def _resolve(src: apsw.Connection, manifest: Manifest, tables: list[str]) -> list[str]:
    """The snapshot's own spelling of each table name; UsageError for unknown or unsupported ones."""
    names = table_names(src)
    missing = [t for t in tables if t.lower() not in names]
    if missing:
        virtual = {str(r[0]).lower() for r in src.execute("SELECT name FROM pragma_table_list WHERE type='virtual'")}
        if any(t.lower() in virtual for t in missing):
            raise UsageError(f"{OPERATION}: virtual tables (e.g. FTS) cannot be restored one by one",
                             "restore the whole database to a new file with `dbre restore`")
        raise unknown_table(OPERATION, manifest, missing, names.values())
    return [names[t.lower()] for t in tables]


def _plan_table(src: apsw.Connection, live: apsw.Connection, table: str, mode: str, suffix: str) -> TableAction:
    schema = src.execute("SELECT type, name, sql FROM sqlite_schema WHERE tbl_name=? AND sql IS NOT NULL "
                         "ORDER BY type='trigger', type='index', rowid", (table,)).fetchall()
    table_sql = next(str(s[2]) for s in schema if s[0] == "table")
    indexes = [(str(s[1]), str(s[2])) for s in schema if s[0] == "index"]
    triggers = [(str(s[1]), str(s[2])) for s in schema if s[0] == "trigger"]
    (rows,) = src.execute(f"SELECT count(*) FROM {qident(table)}").fetchone()  # type: ignore[misc]
    sequence = None
    if src.execute("SELECT 1 FROM sqlite_schema WHERE name='sqlite_sequence'").fetchone():
        seq = src.execute("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)).fetchone()
        sequence = int(seq[0]) if seq else None
    live_objects = {str(r[0]).lower(): (str(r[1]), str(r[2]), str(r[0]))
                    for r in live.execute("SELECT name, type, tbl_name FROM sqlite_schema")}

    existing = live_objects.get(table.lower())
    if mode == "replace" or existing is None:
        # in place: over the live table (--replace), or under its own name when live has none (dropped)
        target, skipped = table, []
        statements = [table_sql, *(sql for _, sql in indexes), *(sql for _, sql in triggers)]
        _check_names_free(live_objects, table, [name for name, _ in [*indexes, *triggers]])
    else:
        target = table + suffix
        statements = _renamed(table_sql, indexes, table, target, suffix)
        skipped = [f"trigger {name} (a trigger on the copy would fire on writes to it)" for name, _ in triggers]
        for name in [target, *(n + suffix for n, _ in indexes)]:
            if name.lower() in live_objects:
                raise UsageError(f"{OPERATION}: {name!r} already exists in the live database",
                                 "drop it, or pass another --suffix")
    live_rows = None
    if target.lower() in live_objects:
        (n,) = live.execute(f"SELECT count(*) FROM {qident(target)}").fetchone()  # type: ignore[misc]
        live_rows = int(n)
    return TableAction(table, target, int(rows), live_rows, statements, skipped, sequence)


def _check_names_free(live_objects: dict[str, tuple[str, str, str]], table: str, names: list[str]) -> None:
    """``table`` is a table or free in live, and its index and trigger names are free or on it."""
    existing = live_objects.get(table.lower())
    if existing is not None and existing[0] != "table":
        raise UsageError(f"{OPERATION}: {table!r} is a {existing[0]} in the live database, not a table",
                         "drop or rename it first")
    for name in names:
        other = live_objects.get(name.lower())
        if other is not None and other[1].lower() != table.lower():
            raise UsageError(f"{OPERATION}: the live database has a {other[0]} {name!r} on {other[1]!r}, "
                             f"the name of a {table!r} index or trigger in the snapshot",
                             "rename it first, or restore under a new name (--suffix, without --replace)")


def _renamed(table_sql: str, indexes: list[tuple[str, str]], table: str, target: str, suffix: str) -> list[str]:
    """The table's CREATE statements for its copy: SQLite's own ALTER TABLE ... RENAME rewrites the
    table (a foreign key to itself included) and the ON clause of its indexes; index names get the suffix."""
    mem = apsw.Connection(":memory:")
    try:
        mem.execute(table_sql)
        for _, sql in indexes:
            mem.execute(sql)
        mem.execute(f"ALTER TABLE {qident(table)} RENAME TO {qident(target)}")
        new_table = str(mem.execute("SELECT sql FROM sqlite_schema WHERE type='table' AND name=?",
                                    (target,)).fetchone()[0])  # type: ignore[index]
        new_indexes = [_rename_index(str(mem.execute("SELECT sql FROM sqlite_schema WHERE type='index' AND name=?",
                                                     (name,)).fetchone()[0]), name + suffix)  # type: ignore[index]
                       for name, _ in indexes]
    except apsw.Error as err:
        raise RestoreError(f"{OPERATION}: cannot rename {table!r} to {target!r} ({err})",
                           "restore it in place with --replace, or the whole database with `dbre restore`") from err
    finally:
        mem.close()
    return [new_table, *new_indexes]




def _rename_index(sql: str, new_name: str) -> str:
    """``CREATE [UNIQUE] INDEX [IF NOT EXISTS] name ON ...`` with ``name`` replaced."""
    words = [(m.start(), m.end(), m.group()) for m in SQL_TOKEN.finditer(sql)
             if not m.group().isspace() and not m.group().startswith(("--", "/*"))]
    i = next(i for i, w in enumerate(words) if w[2].upper() == "INDEX") + 1
    if [w[2].upper() for w in words[i:i + 3]] == ["IF", "NOT", "EXISTS"]:
        i += 3
    start, end, _ = words[i]
    return sql[:start] + qident(new_name) + sql[end:]


class _SafetySource:
    """The live file as a backup source whose manifest says why the snapshot was taken."""

    def __init__(self, path: Path, purpose: str) -> None:
        from dbre.sources.local import LocalFileSource

        self._inner = LocalFileSource(path)
        self.name = self._inner.name
        self.purpose = purpose

    def identity(self) -> dict[str, Any]:
        return {**self._inner.identity(), "purpose": self.purpose}

    def connect(self) -> AbstractContextManager[apsw.Connection]:
        return self._inner.connect()

    def file_mode(self) -> int | None:
        return self._inner.file_mode()


def safety_snapshot(repo: Repository, db: str, live: Path, purpose: str) -> str:
    """Snapshot the live database into ``repo`` under its own name ``db``; returns the snapshot id."""
    from dbre.repository.backup import backup

    try:
        return backup(repo, _SafetySource(live, purpose), db).manifest.id
    except DbreError as err:
        raise RestoreError(f"{purpose}: the safety snapshot of {live} failed ({err.message})",
                           "nothing was changed; fix the repository and try again") from err


def apply_table_restore(plan: TableRestorePlan, *, force_safety: bool = False, allow_fk_violations: bool = False,
                        who: str | None = None, key_file: str | os.PathLike[str] | None = None) -> TableRestoreResult:
    """Do what the plan says in one transaction on the live file, then write the audit record.

    ``replace`` always takes a safety snapshot of the live database first: before the write lock, kept
    when no other connection committed between it and the lock (``PRAGMA data_version``), else taken again
    inside the write transaction; either way it holds exactly what gets replaced. ``force_safety`` takes one in
    ``rename`` mode too. The shared lock the plan took is checked first (LockLostError: plan again); the rows
    are staged from the past state before the write lock (``_stage``); a damaged or missing page, or a
    store that gives up, fails the apply with nothing changed. The past state is let go at the end,
    whatever happens. ``key_file`` (the passphrase file the repository was opened with) goes into the undo.
    """
    started = time.perf_counter()
    safety: str | None = None
    had_violations = False
    take_safety = plan.mode == "replace" or force_safety
    purpose = f"{OPERATION} {plan.mode} of {', '.join(a.table for a in plan.actions)}"
    seen: list[int] = []  # the live file's data_version when the safety snapshot began

    def stage(conn: apsw.Connection) -> None:
        nonlocal safety
        _stage(conn, plan)
        if take_safety:
            # before the write lock too (a backup of the whole file, uploaded: the application's writers must not
            # wait on it); kept if no other connection commits before BEGIN IMMEDIATE (data_version), else
            # taken again under the lock
            seen.append(_data_version(conn))
            safety = safety_snapshot(plan.repo, plan.db, plan.live, purpose)

    try:
        plan.past.check_alive(f"{OPERATION} into {plan.live}")
        with write_transaction(plan.live, plan.past, stage) as conn:
            _recheck(conn, plan)
            if take_safety and (safety is None or _data_version(conn) != seen[0]):
                # the live file changed since: under the write lock, the snapshot sees exactly what is replaced
                safety = safety_snapshot(plan.repo, plan.db, plan.live, purpose)
            targets = [a.target for a in plan.actions]
            related = referencing_tables(conn, targets) | set(targets)
            before = fk_violations(conn, related)
            for i, action in enumerate(plan.actions):
                _restore_one(conn, action, plan.mode, _staged(i))
            had_violations = any(before.values())
            new = new_fk_violations(before, fk_violations(conn, related | referencing_tables(conn, targets)))
            if new and not allow_fk_violations:
                raise RestoreError(f"{OPERATION}: the restored tables break foreign keys ({fk_message(new)} new "
                                   f"violations); rolled back, nothing was changed",
                                   "restore the tables they reference too, or allow the violations")
    except apsw.Error as err:
        raise RestoreError(f"{OPERATION} into {plan.live}: {err}; rolled back, nothing was changed") from err
    except LockLostError:
        raise  # (says what and that nothing was changed itself)
    except RepositoryError as err:  # the past state could not be read (damaged, missing, the store gave up)
        raise rolled_back(err, f"{OPERATION} into {plan.live}") from err
    finally:
        plan.close()
    undo = undo_commands(plan, safety, had_violations, key_file)
    record = {**plan.describe(), "safety_snapshot": safety, "undo": "\n".join(undo),
              "foreign_key_violations_allowed": allow_fk_violations}
    audit = write_audit(plan.repo, plan.db, record, who)
    return TableRestoreResult(plan, safety, audit, time.perf_counter() - started, undo)


def undo_commands(plan: TableRestorePlan, safety: str | None, had_violations: bool = False,
                  key_file: str | os.PathLike[str] | None = None) -> list[str]:
    """Shell commands (quoted, absolute paths) that put the live tables back as they were before the apply.

    A table that replaced a live one comes back from the safety snapshot with ``restore-table
    --replace`` (with ``--allow-fk-violations`` when the live tables had violations then: the undo
    brings them back too); a table that did not exist in live (a copy, or a dropped table
    recreated) is dropped with the ``sqlite3`` shell, which drops its indexes and triggers with it."""
    out = []
    replaced = [a.table for a in plan.actions if a.live_rows is not None and a.target == a.table]
    if replaced and safety:
        words = ["dbre", "restore-table", "--repo", absolute_url(plan.repo.url), "--db", plan.db, "--live",
                 str(plan.live), "--snapshot", safety, *[w for t in replaced for w in ("--table", t)], "--replace",
                 "--apply"]
        if had_violations:
            words.append("--allow-fk-violations")
        if key_file is not None:
            words += ["--key-file", str(Path(key_file).expanduser().absolute())]
        out.append(shlex.join(words))
    created = [a.target for a in plan.actions if a.live_rows is None or a.target != a.table]
    if created:
        out.append(shlex.join(["sqlite3", str(plan.live), "; ".join(f"DROP TABLE {qident(t)}" for t in created)]))
    return out


def absolute_url(url: str) -> str:
    """A repository URL or local path as a printed command needs it: a relative path made absolute."""
    return url if "://" in url else str(Path(url).expanduser().absolute())


def _recheck(conn: apsw.Connection, plan: TableRestorePlan) -> None:
    """The live database still looks as the plan found it (names taken or free)."""
    names = table_names(conn)
    for a in plan.actions:
        exists = a.target.lower() in names
        if plan.mode == "rename" and exists:
            raise RestoreError(f"{OPERATION}: {a.target!r} was created in the live database after the plan",
                               "plan again")
        if plan.mode == "replace" and exists != (a.live_rows is not None):
            raise RestoreError(f"{OPERATION}: {a.target!r} was {'created' if exists else 'dropped'} in the live "
                               "database after the plan", "plan again")


def _data_version(conn: apsw.Connection) -> int:
    """SQLite's count of commits to the live file by other connections, as this connection last saw it."""
    return int(conn.execute("PRAGMA main.data_version").fetchone()[0])  # type: ignore[index]


def _staged(i: int) -> str:
    return f"{STAGE_SCHEMA}.rows_{i}"


def _stage(conn: apsw.Connection, plan: TableRestorePlan) -> None:
    """Copy each table's rows from the past state into a private temporary database (``ATTACH ''``: on disk
    in the temp folder, removed when the connection closes; the table's size, never held in memory), then
    detach the past state, all before the write lock: a repository read is a network read, retried for up to
    minutes when the store fails, and the application's writers must not wait on it. The columns are
    untyped, so every value stays as stored; the rowid leads when the table has one."""
    conn.execute(f"ATTACH DATABASE '' AS {STAGE_SCHEMA}")
    for i, action in enumerate(plan.actions):
        cols = stored_columns(conn, action.table, SNAPSHOT_SCHEMA)
        alias = rowid_alias(cols) if has_rowid(conn, action.table, SNAPSHOT_SCHEMA) else None
        names = ([alias] if alias else []) + [qident(c) for c in cols]
        conn.execute(f"CREATE TABLE {_staged(i)}({', '.join(f'c{j}' for j in range(len(names)))})")
        conn.execute(f"INSERT INTO {_staged(i)} SELECT {', '.join(names)} "
                     f"FROM {SNAPSHOT_SCHEMA}.{qident(action.table)}")
    conn.execute(f"DETACH DATABASE {SNAPSHOT_SCHEMA}")  # the write transaction cannot read the repository


def _restore_one(conn: apsw.Connection, action: TableAction, mode: str, staged: str) -> None:
    live_seq = None
    if mode == "replace" and action.live_rows is not None:
        if _has_sequence_table(conn):
            row = conn.execute("SELECT seq FROM main.sqlite_sequence WHERE name=?", (action.target,)).fetchone()
            live_seq = int(row[0]) if row else None
        conn.execute(f"DROP TABLE main.{qident(action.target)}")
    create_table, *rest = action.statements
    conn.execute(create_table)
    cols = stored_columns(conn, action.target)
    names = [qident(c) for c in cols]
    alias = rowid_alias(cols) if has_rowid(conn, action.target) else None
    if alias:
        names.insert(0, alias)
    before = conn.total_changes()
    # (the staged columns are the snapshot table's, in the same order: the CREATE statement is its own)
    conn.execute(f"INSERT INTO main.{qident(action.target)} ({', '.join(names)}) "
                 f"SELECT {', '.join(f'c{j}' for j in range(len(names)))} FROM {staged}")
    copied = conn.total_changes() - before
    if copied != action.snapshot_rows:
        raise RestoreError(f"{OPERATION}: copied {copied} rows of {action.table!r}, the snapshot has "
                           f"{action.snapshot_rows}; rolled back")
    for sql in rest:  # indexes after the rows (faster), triggers last (they must not fire on the copy)
        conn.execute(sql)
    seq = max((s for s in (action.sequence, live_seq) if s is not None), default=None)
    if seq is not None:
        # keep AUTOINCREMENT from handing out ids the table used before (in the snapshot or in live)
        updated = conn.execute("UPDATE main.sqlite_sequence SET seq=max(seq, ?) WHERE name=? RETURNING 1",
                               (seq, action.target)).fetchall()
        if not updated:
            conn.execute("INSERT INTO main.sqlite_sequence(name, seq) VALUES (?, ?)", (action.target, seq))


def _has_sequence_table(conn: apsw.Connection) -> bool:
    return conn.execute("SELECT 1 FROM main.sqlite_schema WHERE name='sqlite_sequence'").fetchone() is not None
