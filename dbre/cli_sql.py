"""`dbre sql` (and `dbre shell`): read-only SQL on a past state of a database, answered from the
repository without restoring it (dbre/restore/query.py).

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated, Any

import typer

from dbre.cli import DbNameOpt, KeyFileOpt, RepoOpt, _key, _run, _table, app
from dbre.errors import UsageError
from dbre.units import human_bytes as human

FORMATS = ("table", "csv", "json")
SqlSnapshotOpt = Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix); 'latest': "
                                                    "the newest snapshot, not the newer replicated state.")]
SqlAtOpt = Annotated[str | None, typer.Option("--at", help="ISO-8601 time: the state `dbre restore --at` restores "
                                              "(exactly the transactions replicated up to it, else the newest "
                                              "snapshot at or before it).")]


@app.command("sql")
def sql(
    statement: Annotated[str, typer.Argument(help="One read-only SQL statement (SELECT, read-only PRAGMA, "
                                             "EXPLAIN).", metavar="SQL")],
    repo: RepoOpt,
    db: DbNameOpt,
    at: SqlAtOpt = None,
    snapshot: SqlSnapshotOpt = None,
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table (default), csv or json (a list of "
                                     "objects); blobs as hex.")] = "table",
    key_file: KeyFileOpt = None,
) -> None:
    """Answer a read-only query against a past state of a database without restoring it: only the pages the
    query touches are read from the repository. The state is the one `dbre restore` would restore with the same
    options (the newest replicated state, else the newest snapshot, by default). A line on stderr says what was
    read. A statement that writes is refused (exit 2)."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name, parse_time
        from dbre.repository.repo import Repository
        from dbre.restore.query import query

        check_db_name(db)
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r} is not a format", "use table, csv or json")
        when = parse_time(at) if at else None
        if snapshot and when:
            raise UsageError("--snapshot and --at were both given", "pass one of them")
        result = query(Repository.open(repo, _key(key_file)), db, statement, snapshot=snapshot, at=when)
        if fmt == "json":
            print(json.dumps([dict(zip(result.columns, map(_json_value, row), strict=True)) for row in result.rows],
                             indent=2))
        elif fmt == "csv":
            out = csv.writer(sys.stdout, lineterminator="\n")
            out.writerow(result.columns)
            out.writerows([_csv_value(v) for v in row] for row in result.rows)
        else:
            title = f"{len(result.rows)} row{'' if len(result.rows) == 1 else 's'}"
            _table(title, result.columns, [[_cell(v) for v in row] for row in result.rows])
        sys.stdout.flush()
        s = result.stats
        print(f"dbre: {result.state.label()}: read {s.objects} objects ({s.requests} requests), {human(s.bytes)} of "
              f"{human(result.state.size)}; {s.pages_served} pages served in {result.seconds:.2f} s, nothing "
              "restored", file=sys.stderr)

    _run(go)


def _json_value(v: Any) -> Any:
    return v.hex() if isinstance(v, bytes) else v


def _csv_value(v: Any) -> Any:
    return "" if v is None else v.hex() if isinstance(v, bytes) else v


def _cell(v: Any) -> str:
    """A value as the table shows it (rich markup in the data is shown, not applied)."""
    from rich.markup import escape

    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return v[:16].hex() + ("…" if len(v) > 16 else "") + f" ({len(v)} bytes)"
    return escape(str(v))
