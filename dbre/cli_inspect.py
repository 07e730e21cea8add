"""Looking into a repository: `dbre diff` (tables changed between two snapshots) and `dbre stats` (what is stored).

Both only read. Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dbre.cli import DbOpt, JsonOpt, KeyFileOpt, RepoOpt, _key, _print_json, _run, _table, app
from dbre.errors import UsageError
from dbre.units import human_bytes as human

if TYPE_CHECKING:
    from dbre.repository.manifest import Manifest
    from dbre.repository.repo import Repository

# -- diff ----------------------------------------------------------------------------------------


def _resolve(repository: Repository, word: str, db: str | None) -> Manifest | None:
    """The snapshot an id (or unique prefix) names, in ``db`` if given; None for ``latest`` (its
    database may be known only from the other argument)."""
    if word == "latest":
        return None
    if not word or not all(c in "0123456789abcdef" for c in word.lower()):
        raise UsageError(f"diff: {word!r} is not a snapshot id", "give an id or a unique prefix of one, or 'latest'")
    refs = [r for r in repository.list_snapshot_refs(db) if r.id.startswith(word.lower())]
    where = f" of {db!r}" if db else ""
    if not refs:
        raise UsageError(f"diff: no snapshot{where} with id {word!r} in {repository.url}",
                         "list them with `dbre snapshots`")
    if len(refs) > 1:
        raise UsageError(f"diff: {len(refs)} snapshots{where} have ids starting {word!r}", "give more of the id")
    return repository.load_ref(refs[0])


def _latest(repository: Repository, db: str | None) -> Manifest:
    """The newest snapshot (not a safety snapshot, as restore's default) of ``db``, or of the only database."""
    if db is None:
        names = repository.databases()
        if len(names) != 1:
            raise UsageError("diff: 'latest' of which database?",
                             f"pass --db NAME; known databases: {', '.join(names) or 'none'}")
        db = names[0]
    return repository.find_snapshot(db)


@dataclass
class TableChange:
    """One table between two snapshots: added, dropped, changed or unchanged, with its row counts."""

    table: str
    change: str
    rows_before: int | None
    rows_after: int | None
    schema_changed: bool = False

    def describe(self) -> dict[str, Any]:
        diff = (self.rows_after or 0) - (self.rows_before or 0)
        return {"table": self.table, "change": self.change, "rows_before": self.rows_before,
                "rows_after": self.rows_after, "rows_difference": diff, "schema_changed": self.schema_changed}


def _table_sql(m: Manifest) -> dict[str, str | None]:
    return {str(s.get("name")): s.get("sql") for s in m.schema if s.get("type") == "table"}


def _same_pages(a: Manifest, b: Manifest) -> bool:
    """Both snapshots hold the very same pages (the page map's root, or its runs in format 1)."""
    if (a.page_size, a.page_count) != (b.page_size, b.page_count):
        return False
    if a.root and b.root:
        return a.root == b.root
    return [r.hash for r in a.runs] == [r.hash for r in b.runs]


def _checksums_by_restore(repository: Repository, snaps: list[Manifest],
                          tables: list[str]) -> list[dict[str, str]]:
    """Each snapshot restored (every page checked) into a scratch folder, and ``tables`` checksummed there."""
    import apsw

    from dbre.repository.tables import table_checksum, user_tables
    from dbre.restore.full import apply_restore, plan_restore

    out = []
    with tempfile.TemporaryDirectory(prefix="dbre-diff-") as scratch:
        for i, m in enumerate(snaps):
            path = Path(scratch) / f"{i}.db"
            apply_restore(repository, plan_restore(repository, m.db, path, snapshot=m.id))
            conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                rowid = {t["name"]: t["without_rowid"] for t in user_tables(conn)}
                out.append({t: table_checksum(conn, t, rowid[t])[1] for t in tables if t in rowid})
            finally:
                conn.close()
            os.unlink(path)  # one restored copy on disk at a time
    return out


def diff_snapshots(repository: Repository, a: Manifest, b: Manifest) -> tuple[list[TableChange], str]:
    """The tables added, dropped and changed from ``a`` to ``b``, and how "changed" was judged: the same
    page map (nothing changed), the snapshots' table checksums, or both restored and checksummed."""
    before, after = a.tables, b.tables
    sql_a, sql_b = _table_sql(a), _table_sql(b)
    changes: list[TableChange] = []
    for name in sorted(set(before) - set(after)):
        changes.append(TableChange(name, "dropped", before[name].rows, None))
    for name in sorted(set(after) - set(before)):
        changes.append(TableChange(name, "added", None, after[name].rows))
    both = sorted(set(before) & set(after))
    if _same_pages(a, b):
        basis = "same pages"
        changes += [TableChange(n, "unchanged", before[n].rows, after[n].rows) for n in both]
        return sorted(changes, key=lambda c: c.table), basis
    # (checksums of two meanings, stats.checksum_version, are not compared: both tables are read again)
    unknown = [n for n in both if before[n].rows == after[n].rows and sql_a.get(n) == sql_b.get(n)
               and not (before[n].checksum and after[n].checksum and (a.checksum_version == b.checksum_version
                                                                      or before[n].checksum == after[n].checksum))]
    basis = "table checksums"
    restored: list[dict[str, str]] = [{}, {}]
    if unknown:
        restored = _checksums_by_restore(repository, [a, b], unknown)
        basis = "restored and compared"  # (tables whose row counts differ are changed without it)
    for n in both:
        schema_changed = sql_a.get(n) != sql_b.get(n)
        if n in unknown:
            same = restored[0].get(n) == restored[1].get(n)
        else:
            same = before[n].rows == after[n].rows and before[n].checksum == after[n].checksum
        change = "changed" if schema_changed or not same else "unchanged"
        changes.append(TableChange(n, change, before[n].rows, after[n].rows, schema_changed))
    return sorted(changes, key=lambda c: c.table), basis


@app.command()
def diff(
    snap1: Annotated[str, typer.Argument(metavar="FROM", help="The earlier snapshot: an id, a unique prefix, "
                                         "or 'latest'.")],
    snap2: Annotated[str, typer.Argument(metavar="TO", help="The later snapshot: an id, a unique prefix, "
                                         "or 'latest'.")],
    repo: RepoOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Tables added, dropped and changed between two snapshots of one database, with their row counts."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        if db:
            check_db_name(db)
        repository = Repository.open(repo, _key(key_file))
        if db and not repository.list_snapshot_refs(db):
            repository.require_db(db)  # raises, naming the known databases
        a, b = _resolve(repository, snap1, db), _resolve(repository, snap2, db)
        if a is not None and b is not None and a.db != b.db:
            raise UsageError(f"diff: {a.id} is a snapshot of {a.db!r}, {b.id} of {b.db!r}",
                             "diff compares two snapshots of one database")
        known = db or (a.db if a is not None else b.db if b is not None else None)
        a = a if a is not None else _latest(repository, known)
        b = b if b is not None else _latest(repository, known)
        changes, basis = diff_snapshots(repository, a, b)
        shown = [c for c in changes if c.change != "unchanged"]
        counts = {k: sum(1 for c in changes if c.change == k) for k in ("added", "dropped", "changed", "unchanged")}
        if json_out:
            _print_json({"db": a.db, "from": {"id": a.id, "taken_at": a.taken_at},
                         "to": {"id": b.id, "taken_at": b.taken_at}, "basis": basis, **counts,
                         "tables": [c.describe() for c in changes]})
            return

        def rows(n: int | None) -> str:
            return "-" if n is None else f"{n:,}"

        title = (f"{a.db}: {a.id} ({a.taken_at.replace('T', ' ')[:19]}) -> {b.id} "
                 f"({b.taken_at.replace('T', ' ')[:19]})")
        if shown:
            body = [[c.table, c.change + (" (schema)" if c.schema_changed else ""), rows(c.rows_before),
                     rows(c.rows_after), f"{c.describe()['rows_difference']:+,}"] for c in shown]
            _table(title, ["table", "change", "rows before", "rows after", "rows"], body,
                   whole={"table", "change"}, priority=["rows", "rows after", "rows before"])
        else:
            print(title)
        print(f"{counts['added']} added, {counts['dropped']} dropped, {counts['changed']} changed, "
              f"{counts['unchanged']} unchanged (judged by {basis})")

    _run(go)


# -- stats ---------------------------------------------------------------------------------------


def _segment_stats(repository: Repository, db: str, snaps: list[Manifest]) -> dict[str, Any] | None:
    """Replicated segments of ``db`` (None: it has none): counts, bytes where the store can say, and the
    window of times a restore reproduces exactly (from the oldest restorable generation's base, or the
    pruned marker if later, to the newest transaction its segments observed)."""
    from dbre.replicate.segment import to_time
    from dbre.replicate.window import generations, read_pruned
    from dbre.repository.manifest import iso

    gens = generations(repository, db, {m.id for m in snaps})
    if not gens:
        return None
    count = sum(len(g.segments) for g in gens)
    root = getattr(repository.store, "root", None)
    size: int | None = None
    if isinstance(root, Path):  # a local folder says its sizes; S3 listings here carry names only
        size = sum(p.stat().st_size for p in (root / "segments" / db).rglob("*") if p.is_file())
    ok = [g for g in gens if g.restorable]
    start: datetime | None = ok[0].time if ok else None
    pruned = read_pruned(repository, db)
    if start is not None and pruned is not None and pruned > start:
        start = pruned
    ends = [to_time(g.segments[-1].last_us) for g in ok if g.segments]
    end = max([*ends, *(g.time for g in ok)]) if ok else None
    return {"generations": len(gens), "restorable_generations": len(ok), "segments": count, "bytes": size,
            "window": {"from": iso(start), "to": iso(end)} if start is not None and end is not None else None}


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 2) if den > 0 else None


def database_stats(repository: Repository, db: str, snaps: list[Manifest], stored: int) -> dict[str, Any]:
    """What one database's snapshots hold and what they cost: logical bytes of every snapshot, the unique
    pages among them (after dedup) and what their packs take (after compression)."""
    regular = [m for m in snaps if not m.is_safety] or snaps
    newest, oldest = regular[-1], snaps[0]
    logical = sum(m.size for m in snaps)
    unique = sum(int(m.stats.get("pages_added", 0)) * m.page_size for m in snaps)
    return {
        "db": db,
        "snapshots": len(snaps),
        "oldest": {"id": oldest.id, "taken_at": oldest.taken_at},
        "newest": {"id": newest.id, "taken_at": newest.taken_at},
        "size": newest.size,
        "logical_bytes": logical,
        "unique_bytes": unique,
        "stored_bytes": stored,
        "dedup_ratio": _ratio(logical, unique),
        "compression_ratio": _ratio(unique, stored),
        "ratio": _ratio(logical, stored),
        "segments": _segment_stats(repository, db, snaps),
    }


@app.command()
def stats(
    repo: RepoOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """What the repository holds per database: snapshots, sizes, stored bytes, dedup and compression, and the
    window replicated segments restore exactly."""

    def go() -> None:
        from dbre.metrics import storage_used
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        if db:
            check_db_name(db)
        repository = Repository.open(repo, _key(key_file))
        if db:
            repository.require_db(db)  # raises, naming the known databases
        total, exact, per_db = storage_used(repository)  # as `dbre status` counts it
        snaps = repository.snapshots(db)
        names = [db] if db else sorted({m.db for m in snaps})
        out = [database_stats(repository, n, [m for m in snaps if m.db == n], per_db.get(n, 0)) for n in names]
        if json_out:
            _print_json({"repository": repository.url, "storage_bytes": total, "storage_exact": exact,
                         "databases": out})
            return

        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        rows = [[d["db"], d["snapshots"], d["oldest"]["taken_at"].replace("T", " ")[:19],
                 d["newest"]["taken_at"].replace("T", " ")[:19], d["newest"]["id"], human(d["size"]),
                 human(d["stored_bytes"]), x(d["dedup_ratio"]), x(d["compression_ratio"]),
                 "-" if d["segments"] is None else f"{d['segments']['segments']}"
                 + ("" if d["segments"]["bytes"] is None else f" ({human(d['segments']['bytes'])})")]
                for d in out]
        _table(f"stats of {repository.url}", ["db", "snapshots", "oldest (UTC)", "newest (UTC)", "newest id", "size",
                                              "stored", "dedup", "compression", "segments"], rows,
               whole={"db", "newest (UTC)", "newest id"},
               priority=["stored", "size", "snapshots", "dedup", "compression", "segments", "oldest (UTC)"])
        print(f"storage: {human(total)}" + ("" if exact else " (estimated: what the kept snapshots added)"))
        for d in out:
            w = d["segments"] and d["segments"]["window"]
            if w:
                print(f"restore window: {d['db']}: any time from {w['from']} to {w['to']} (replicated segments)")

    _run(go)
