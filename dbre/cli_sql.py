"""`dbre sql` (and `dbre shell`): read-only SQL on a past state of a database, answered from the
repository without restoring it (dbre/restore/query.py).

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from dbre.cli import DbNameOpt, KeyFileOpt, RepoOpt, _key, _run, _table, app
from dbre.errors import UsageError
from dbre.units import human_bytes as human

FORMATS = ("table", "csv", "json")
SqlSnapshotOpt = Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix); 'latest': "
                                                    "the newest snapshot, not the newer replicated state.")]
SqlTxidOpt = Annotated[int | None, typer.Option("--txid", help="Up to this replicated transaction (as `dbre restore "
                                               "--txid`).")]
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
    txid: SqlTxidOpt = None,
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table (default), csv or json (a list of "
                                     "objects); blobs as hex.")] = "table",
    key_file: KeyFileOpt = None,
) -> None:
    """Answer a read-only query against a past state of a database without restoring it: only the pages the
    query touches are read from the repository. The state is the one `dbre restore` would restore with the same
    options (the newest replicated state, else the newest snapshot, by default). A line on stderr says what was
    read. A statement that writes is refused (exit 2)."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.query import query

        when = _when(db, at, snapshot, txid)
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r} is not a format", "use table, csv or json")
        repository = Repository.open(repo, _key(key_file))
        if fmt == "table":
            result = query(repository, db, statement, snapshot=snapshot, at=when, txid=txid)
            title = f"{len(result.rows)} row{'' if len(result.rows) == 1 else 's'}"
            _table(title, result.columns, [[_cell(v) for v in row] for row in result.rows])
        else:  # rows are written as they come: a result larger than memory streams through
            result = query(repository, db, statement, snapshot=snapshot, at=when, txid=txid,
                           sink=_json_rows() if fmt == "json" else _csv_rows())
            if fmt == "json":
                print("[]" if not result.row_count else "\n]")
            elif not result.row_count:
                csv.writer(sys.stdout, lineterminator="\n").writerow(result.columns)
        sys.stdout.flush()
        s = result.stats
        print(f"dbre: {result.state.label()}: read {s.objects} objects ({s.requests} requests), {human(s.bytes)} of "
              f"{human(result.state.size)}; {s.pages_served} pages served in {result.seconds:.2f} s, nothing "
              "restored", file=sys.stderr)

    _run(go)


@app.command("shell")
def shell(
    repo: RepoOpt,
    db: DbNameOpt,
    at: SqlAtOpt = None,
    snapshot: SqlSnapshotOpt = None,
    txid: SqlTxidOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """An interactive SQLite shell (apsw's) on a past state of a database, read-only and without restoring it:
    pages are read from the repository as statements touch them. The state is chosen as `dbre sql` chooses it;
    statements that write are refused; .quit ends it."""

    def go() -> None:
        import apsw.shell

        from dbre.repository.repo import Repository
        from dbre.restore.query import open_query

        when = _when(db, at, snapshot, txid)
        with open_query(Repository.open(repo, _key(key_file)), db, snapshot=snapshot, at=when,
                        txid=txid) as session:
            print(f"dbre: {session.state.label()}, read-only, nothing restored; .help lists the commands, "
                  ".quit ends", file=sys.stderr)
            try:
                apsw.shell.Shell(db=session.conn).cmdloop()
            except SystemExit:  # (.quit and .exit end the loop by exiting)
                pass
            s = session.stats
        print(f"dbre: read {s.objects} objects ({s.requests} requests), {human(s.bytes)} of "
              f"{human(session.state.size)}; {s.pages_served} pages served", file=sys.stderr)

    _run(go)


def _when(db: str, at: str | None, snapshot: str | None, txid: int | None) -> Any:
    """Check the database name and the choice of state (before any request); the time --at names, or None."""
    from dbre.repository.manifest import check_db_name, parse_time

    check_db_name(db)
    when = parse_time(at) if at else None
    given = [o for o, v in (("--snapshot", snapshot), ("--at", at), ("--txid", txid)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} were {'both ' if len(given) == 2 else ''}given", "pass one of them")
    return when


def _json_rows() -> Callable[[list[str], tuple[Any, ...]], None]:
    """A sink that prints rows as a JSON list of objects, one by one (the caller closes the list)."""
    first = True

    def sink(columns: list[str], row: tuple[Any, ...]) -> None:
        nonlocal first
        obj = {c: v.hex() if isinstance(v, bytes) else v for c, v in zip(columns, row, strict=True)}
        sys.stdout.write(("[\n  " if first else ",\n  ") + json.dumps(obj))
        first = False

    return sink


def _csv_rows() -> Callable[[list[str], tuple[Any, ...]], None]:
    """A sink that prints rows as CSV, the header before the first."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    first = True

    def sink(columns: list[str], row: tuple[Any, ...]) -> None:
        nonlocal first
        if first:
            out.writerow(columns)
            first = False
        out.writerow(["" if v is None else v.hex() if isinstance(v, bytes) else v for v in row])

    return sink


def _cell(v: Any) -> str:
    """A value as the table shows it (rich markup in the data is shown, not applied)."""
    from rich.markup import escape

    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return v[:16].hex() + ("…" if len(v) > 16 else "") + f" ({len(v)} bytes)"
    return escape(str(v))
