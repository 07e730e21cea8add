"""Checks of a restored database file against SQLite itself and against its snapshot's manifest.

Each check yields ``CheckResult`` rows named for what they catch:
  integrity_check     PRAGMA integrity_check (damaged pages, indexes out of step, NOT NULL)
  foreign_key_check   PRAGMA foreign_key_check, one row per (table, foreign key) with orphans
  schema              every table, index, view and trigger the manifest recorded, with its SQL
  row_count           per-table row count equal to the manifest's (missing or extra rows)
  checksum            per-table content checksum equal to the manifest's (a changed value)
Great Expectations results become rows of the same shape (check "gx.<expectation type>").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import apsw

from dbre.errors import RestoreError
from dbre.repository.manifest import Manifest
from dbre.repository.tables import (
    CHECKSUM_VERSION,
    qident,
    scan_order_matches,
    sqlite_engine,
    table_stats,
    user_tables,
)


@dataclass
class CheckResult:
    """One check on one object; ``table`` and ``column`` say where, ``detail`` what was found."""

    check: str
    passed: bool
    table: str | None = None
    column: str | None = None
    detail: str = ""

    @property
    def where(self) -> str:
        if self.table and self.column:
            return f"{self.table}.{self.column}"
        return self.table or self.column or "database"

    def describe(self) -> str:
        """One line naming the check, table and column, e.g. for an exit message."""
        text = f"{self.check} on {self.where}"
        return f"{text}: {self.detail}" if self.detail else text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        return cls(d["check"], bool(d["passed"]), d.get("table"), d.get("column"), d.get("detail", ""))


def open_restored(path: str | os.PathLike[str]) -> apsw.Connection:
    """A read-only connection to a restored file; RestoreError if it is not a database."""
    try:
        conn = apsw.Connection(os.fspath(path), flags=apsw.SQLITE_OPEN_READONLY)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    except apsw.Error as err:
        raise RestoreError(f"validate {path}: cannot open the restored file ({err})",
                           "the restore is damaged; try another snapshot") from err
    return conn


def integrity_check(conn: apsw.Connection, max_errors: int = 100) -> list[CheckResult]:
    rows = [r[0] for r in conn.execute(f"PRAGMA integrity_check({int(max_errors)})")]
    if rows == ["ok"]:
        return [CheckResult("integrity_check", True, detail="ok")]
    shown = "; ".join(rows[:5]) + (f"; ... ({len(rows)} problems)" if len(rows) > 5 else "")
    return [CheckResult("integrity_check", False, detail=shown)]


def foreign_key_check(conn: apsw.Connection) -> list[CheckResult]:
    """One failing row per foreign key with orphans, else a single passing row."""
    orphans: dict[tuple[str, int], int] = {}
    parents: dict[tuple[str, int], str] = {}
    for table, _rowid, parent, fkid in conn.execute("PRAGMA foreign_key_check"):
        orphans[(table, fkid)] = orphans.get((table, fkid), 0) + 1
        parents[(table, fkid)] = parent
    if not orphans:
        return [CheckResult("foreign_key_check", True, detail="no orphan rows")]
    out = []
    for (table, fkid), n in sorted(orphans.items()):
        cols = [r[3] for r in conn.execute(f"PRAGMA foreign_key_list({qident(table)})") if r[0] == fkid]
        out.append(CheckResult("foreign_key_check", False, table, ", ".join(cols) or None,
                               f"{n} rows refer to missing rows of {parents[(table, fkid)]}"))
    return out


def _schema(conn: apsw.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall()
    return {(str(r[0]), str(r[1])): {"type": r[0], "name": r[1], "tbl_name": r[2], "sql": r[3]} for r in rows}


def schema_check(conn: apsw.Connection, manifest: Manifest) -> list[CheckResult]:
    """Every schema object of the snapshot present with the same SQL, and nothing extra."""
    if not manifest.schema:
        return [CheckResult("schema", True, detail="manifest records no schema: skipped")]
    want = {(o["type"], o["name"]): o for o in manifest.schema}
    have = _schema(conn)
    out = []
    for key in sorted(want.keys() - have.keys()):
        o = want[key]
        out.append(CheckResult("schema", False, o["tbl_name"], None, f"{o['type']} {o['name']} is missing"))
    for key in sorted(have.keys() - want.keys()):
        o = have[key]
        out.append(CheckResult("schema", False, o["tbl_name"], None, f"{o['type']} {o['name']} is not in the snapshot"))
    for key in sorted(want.keys() & have.keys()):
        if (want[key]["sql"] or "") != (have[key]["sql"] or ""):
            o = want[key]
            out.append(CheckResult("schema", False, o["tbl_name"], None, f"{o['type']} {o['name']} has different SQL"))
    if not out:
        out.append(CheckResult("schema", True, detail=f"{len(want)} objects as in the snapshot"))
    return out


def equivalence_check(conn: apsw.Connection, manifest: Manifest) -> list[CheckResult]:
    """Per table: row count, then content checksum, equal to what the backup recorded."""
    with_checksums = any(t.checksum for t in manifest.tables.values())
    version = manifest.checksum_version  # (None: a snapshot from before it was recorded)
    # (each snapshot's checksums are computed as its version defines them; a newer one: not compared)
    have = table_stats(conn, with_checksums, version=version if version is None or version <= CHECKSUM_VERSION
                       else CHECKSUM_VERSION)
    without_rowid = {t["name"] for t in user_tables(conn) if t["without_rowid"]} if version is None else set()
    out = []
    for name in sorted(manifest.tables.keys() | have.keys()):
        want = manifest.tables.get(name)
        got = have.get(name)
        if want is None:
            out.append(CheckResult("row_count", False, name, None, "table is not in the snapshot's manifest"))
            continue
        if got is None:
            out.append(CheckResult("row_count", False, name, None, f"table is missing (expected {want.rows} rows)"))
            continue
        rows, checksum = got
        if rows != want.rows:
            diff = want.rows - rows
            what = f"{diff} rows missing" if diff > 0 else f"{-diff} extra rows"
            out.append(CheckResult("row_count", False, name, None, f"{what}: expected {want.rows}, found {rows}"))
        else:
            out.append(CheckResult("row_count", True, name, None, f"{rows} rows"))
        if want.checksum and version is not None and version > CHECKSUM_VERSION:
            out.append(CheckResult("checksum", True, name, None, f"not compared: the snapshot's checksums are "
                                   f"version {version}, this dbre computes {CHECKSUM_VERSION} (upgrade dbre)"))
        elif want.checksum:
            if checksum != want.checksum and name in without_rowid and scan_order_matches(conn, name, want.checksum):
                out.append(CheckResult("checksum", True, name, None, "content as backed up (read in the "
                                       "scan order of snapshots made before stats.checksum_version)"))
            elif checksum != want.checksum:
                out.append(CheckResult("checksum", False, name, None,
                                       f"content differs from the backup (xxh3 {str(checksum)[:12]}, "
                                       f"expected {want.checksum[:12]})" + _real_text_hint(conn, name, manifest)))
            else:
                out.append(CheckResult("checksum", True, name, None, "content as backed up"))
    return out


def _real_text_hint(conn: apsw.Connection, name: str, manifest: Manifest) -> str:
    """A checksum mismatch's other possible cause, said where it applies: a row's checksum hashes
    its ``quote()`` text, and SQLite's text of a REAL changed between versions. When the snapshot
    says another SQLite computed its checksums and the table holds a REAL value, the failure says
    so (it stays a failure: the rows may differ too)."""
    basis = manifest.stats.get("checksum_basis") if isinstance(manifest.stats, dict) else None
    then = basis.get("sqlite") if isinstance(basis, dict) else None
    now = sqlite_engine()
    if not isinstance(then, str) or then == now:
        return ""
    try:
        cols = [str(r[1]) for r in conn.execute(f"PRAGMA table_info({qident(name)})")]
        real = bool(cols) and conn.execute(
            f"SELECT 1 FROM {qident(name)} WHERE "
            + " OR ".join(f"typeof({qident(c)}) = 'real'" for c in cols) + " LIMIT 1").fetchone() is not None
    except apsw.Error:
        return ""
    if not real:
        return ""
    return (f"; it holds REAL values, and the backup's checksums were computed by SQLite {then.split()[0]}, "
            f"this check by {now.split()[0]}, whose text of a REAL may differ: compare the rows "
            "(`dbre sql`) before trusting this one")


def run_checks(path: str | os.PathLike[str], manifest: Manifest | None) -> list[CheckResult]:
    """Every SQLite and manifest check on a restored file, in a fixed order (``manifest`` None: a
    point in time restored from segments, which has no manifest: the SQLite checks only)."""
    conn = open_restored(path)
    try:
        out = [
            *_guard("integrity_check", lambda: integrity_check(conn)),
            *_guard("foreign_key_check", lambda: foreign_key_check(conn)),
        ]
        if manifest is not None:
            out += [*_guard("schema", lambda: schema_check(conn, manifest)),
                    *_guard("row_count", lambda: equivalence_check(conn, manifest))]
        return out
    finally:
        conn.close()


def _guard(check: str, fn: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """A check SQLite cannot even run (a malformed file) fails, naming SQLite's error, instead of raising."""
    try:
        return fn()
    except apsw.Error as err:
        return [CheckResult(check, False, detail=f"SQLite error: {err}")]


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.passed]
