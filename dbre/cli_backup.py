"""`dbre backup` and `dbre snapshots`: take snapshots into a repository and list them.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from dbre.cli import (
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    RepoOpt,
    _key,
    _print_json,
    _progress,
    _run,
    _table,
    _token,
    app,
)
from dbre.units import human_bytes as human


@app.command()
def backup(
    source: Annotated[str, typer.Argument(help="A database file, or libsql:// / http(s):// / ws(s):// URL.")],
    repo: RepoOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
    checksums: Annotated[
        bool | None,
        typer.Option(
            "--checksums/--no-checksums",
            help="Record per-table content checksums (default: for databases up to 256 MiB).",
            show_default=False,
        ),
    ] = None,
    full: Annotated[bool, typer.Option(
        "--full", help="Store every page again in new packs, reusing nothing of the previous snapshot.")] = False,
    accept_new_source: Annotated[bool, typer.Option(
        "--accept-new-source",
        help="SOURCE is the database's new place (moved, or restored elsewhere): continue its snapshots "
             "although they came from another path or URL.")] = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Take a snapshot of SOURCE into the repository (created on first use).

    A database name keeps one source: a backup of another file or URL under a name whose
    snapshots came from elsewhere is refused (exit 2) unless --accept-new-source."""

    def go() -> None:
        from dbre.repository.backup import backup as run_backup
        from dbre.repository.repo import Repository
        from dbre.sources import open_source

        src = open_source(source, _token())
        check = getattr(src, "check", None)
        if check is not None:
            check()  # a missing or non-SQLite file fails before a repository is created for it
        repository = Repository.open_or_init(repo, _key(key_file))
        with _progress("backup", not json_out) as bar:
            result = run_backup(repository, src, db, checksums=checksums, progress=bar, full=full,
                                accept_new_source=accept_new_source)
        s = result.summary()
        if json_out:
            _print_json(s)
            return
        kind = "incremental" if s["parent"] else "full"
        print(
            f"snapshot {s['id']} of {s['db']} ({kind}): {s['pages']} pages, {human(s['size'])}; "
            f"added {s['pages_added']} pages, {human(s['bytes_added'])} in {s['seconds']:.2f} s"
        )
        if s["note"]:
            print(f"note: {s['note']}")

    _run(go)


@app.command()
def snapshots(
    repo: RepoOpt,
    db: DbOpt = None,
    last: Annotated[int | None, typer.Option("--last", min=1, help="Only the newest N snapshots.")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """List snapshots, oldest first."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        repository = Repository.open(repo, _key(key_file))
        if db:
            check_db_name(db)
            if not repository.list_snapshot_refs(db):
                repository.require_db(db)  # raises, naming the known databases
        damaged: list[tuple[str, str]] = []
        snaps = repository.snapshots(db, damaged=damaged, last=last)
        if last is not None:
            snaps = snaps[-last:]  # (format 1 reads them all to know their times)
        for key, why in damaged:
            print(f"dbre: {why} (listed without {key}; run `dbre verify`)", file=sys.stderr)
        if json_out:
            _print_json([m.summary() for m in snaps], "snapshots")
        else:
            _snapshot_table(repository.url, snaps)
        if damaged:
            raise typer.Exit(1)

    _run(go)


def _snapshot_table(url: str, snaps: list[Any]) -> None:
    from dbre.repository.identity import describe

    rows = [
        [m.id, m.db, m.taken_at.replace("T", " ")[:19], m.page_count, human(m.size),
         human(m.stats.get("bytes_added")), m.parent[:8] if m.parent else "full",
         ",".join(m.tags) or "-", describe(m.source)]
        for m in snaps
    ]
    _table(f"{len(snaps)} snapshots in {url}",
           ["id", "db", "taken at (UTC)", "pages", "size", "added", "parent", "tags", "source"], rows,
           whole={"id", "db", "taken at (UTC)"}, priority=["size", "parent", "tags", "added", "source", "pages"])
