"""`dbre export`: one table of a past state of a database to a Parquet or CSV file, streamed from the
repository without restoring it (dbre/restore/export.py).

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dbre.cli import DbNameOpt, JsonOpt, KeyFileOpt, RepoOpt, _key, _print_json, _progress, _run, app
from dbre.cli_sql import SqlAtOpt, SqlSnapshotOpt, SqlTxidOpt, _when
from dbre.units import human_bytes as human


@app.command("export")
def export(
    repo: RepoOpt,
    db: DbNameOpt,
    table: Annotated[str, typer.Option("--table", metavar="TABLE", help="The table (or view) to export.")],
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="parquet (column types from the declared "
                                     "types by SQLite's affinity rules) or csv (a header line; NULL is an empty "
                                     "field; blobs as hex).")],
    out: Annotated[Path, typer.Option("--out", help="The file to write (written beside it under a temporary name "
                                      "and renamed at the end).")],
    at: SqlAtOpt = None,
    snapshot: SqlSnapshotOpt = None,
    txid: SqlTxidOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file at --out.")] = False,
    key_file: KeyFileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export one table of a past state of a database to a Parquet or CSV file without restoring it: the rows are
    read through `dbre sql`'s read-only view of the repository and written in batches, so memory stays bounded
    whatever the table's size. The state is the one `dbre restore` would restore with the same options (the newest
    replicated state, else the newest snapshot, by default). A column whose values do not fit its declared type
    (SQLite is dynamically typed) is written as string, or binary when it holds blobs, and said on stderr. A
    failure leaves nothing at --out; an existing --out is replaced only with --force."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.export import check_target, export_table

        when = _when(db, at, snapshot, txid)
        check_target(out, fmt, force)
        repository = Repository.open(repo, _key(key_file))

        def warn(line: str) -> None:
            print(f"dbre: export: {line}", file=sys.stderr)

        with _progress(f"export {table}", not json_out) as progress:
            result = export_table(repository, db, table, out, fmt, snapshot=snapshot, at=when, txid=txid,
                                  force=force, progress=progress, warn=warn)
        if json_out:
            _print_json(result.describe())
            return
        s = result.stats
        rate = result.rows / result.seconds if result.seconds > 0 else 0.0
        rows = f"{result.rows:,} row{'' if result.rows == 1 else 's'}"
        print(f"exported {rows} of {result.table} ({result.state.label()}) to {out} as {fmt}: "
              f"{human(result.bytes_written)} in {result.seconds:.2f} s ({rate:,.0f} rows/s); read {s.objects} objects "
              f"({s.requests} requests), {human(s.bytes)} of {human(result.state.size)} from the repository")

    _run(go)
