"""The `dbre` command line: parses options, reads env and key files, prints tables or JSON.

This is an edge of the program: only here (and in flows/deployments) are the environment and
files of secrets read. Errors print one line on stderr, "dbre: <what failed>: <cause> (<hint>)",
and exit 1 (a check failed or an operation failed) or 2 (bad input); --debug shows a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from dbre import __version__
from dbre.errors import DbreError, UsageError
from dbre.secrets import Secret
from dbre.units import human_bytes as human

app = typer.Typer(
    name="dbre",
    help="Backup and disaster recovery for libSQL, Turso and SQLite databases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

RepoOpt = Annotated[str, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix.")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Database name in the repository.")]
DbNameOpt = Annotated[str, typer.Option("--db", help="Database name in the repository.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option("--key-file", help="File holding the encryption passphrase (or set DBRE_ENCRYPTION_KEY)."),
]

T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        print(f"dbre {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """Backup and disaster recovery for libSQL, Turso and SQLite databases."""
    _state["debug"] = debug


# -- edges: secrets, output, progress ------------------------------------------------------------


def _key(key_file: Path | None) -> Secret | None:
    if key_file is not None:
        try:
            raw = key_file.read_text().strip()
        except OSError as err:
            raise UsageError(f"key file {key_file}: {err.strerror}", "check the --key-file path") from None
        if not raw:
            raise UsageError(f"key file {key_file} is empty", "put the passphrase in it")
        return Secret(raw)
    env = os.environ.get("DBRE_ENCRYPTION_KEY")
    if env is None and os.environ.get("DBRE_KEY_FILE"):
        return _key(Path(os.environ["DBRE_KEY_FILE"]))
    return Secret(env) if env else None


def _token() -> Secret | None:
    raw = os.environ.get("LIBSQL_AUTH_TOKEN") or os.environ.get("TURSO_AUTH_TOKEN")
    return Secret(raw) if raw else None


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except typer.Exit:
        raise
    except DbreError as err:
        if _state["debug"]:
            raise
        msg = err.message + (f" ({err.hint})" if err.hint else "")
        print(f"dbre: {msg}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("dbre: interrupted; the repository is unchanged by the unfinished step", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the one-line promise covers the unexpected too
        if _state["debug"]:
            raise
        print(f"dbre: unexpected error: {err.__class__.__name__}: {err} (run with --debug for details)",
              file=sys.stderr)
        raise typer.Exit(1) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def _progress(label: str, enabled: bool, unit_bytes: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing with --json or without a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    counter = DownloadColumn() if unit_bytes else MofNCompleteColumn()
    with Progress("[bold]" + label, BarColumn(), counter, TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in {"pages", "size", "added", "seconds", "rows"} else "left",
                     no_wrap=True)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)  # piped or logged: never cut ids and names down to 80 columns
    console.print(t)


# -- commands ------------------------------------------------------------------------------------


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
    key_file: KeyFileOpt = None,
) -> None:
    """Take a snapshot of SOURCE into the repository (created on first use)."""

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
            result = run_backup(repository, src, db, checksums=checksums, progress=bar, full=full)
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
            _print_json([m.summary() for m in snaps])
        else:
            _snapshot_table(repository.url, snaps)
        if damaged:
            raise typer.Exit(1)

    _run(go)


def _snapshot_table(url: str, snaps: list[Any]) -> None:
    rows = [
        [m.id, m.db, m.taken_at.replace("T", " ")[:19], m.page_count, human(m.size),
         human(m.stats.get("bytes_added")), m.parent[:8] if m.parent else "full"]
        for m in snaps
    ]
    _table(f"{len(snaps)} snapshots in {url}", ["id", "db", "taken at (UTC)", "pages", "size", "added", "parent"], rows)


@app.command()
def restore(
    repo: RepoOpt,
    db: DbNameOpt,
    to: Annotated[Path, typer.Option("--to", help="Path of the restored database file.")],
    snapshot: Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix).")] = None,
    at: Annotated[str | None, typer.Option("--at", help="ISO-8601 time: exactly the transactions replicated up "
                                           "to it, else the newest snapshot at or before it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file at --to.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan, restore nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
    txid: Annotated[int | None, typer.Option("--txid", help="Up to this replicated transaction.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep --to current from replicated segments (a "
                                         "read-only standby) until SIGINT/SIGTERM.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="With --follow: look for new segments this "
                                          "often.")] = "1s",
) -> None:
    """Restore a snapshot (default: the newest) to a new file."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.full import apply_restore, plan_restore

        if follow:
            from dbre.cli_replicate import follow_standby

            follow_standby(repo, db, to, interval, force, _key(key_file),
                           [o for o, v in (("--snapshot", snapshot), ("--at", at), ("--txid", txid),
                                           ("--dry-run", dry_run), ("--json", json_out)) if v])
            return
        when = _when(db, snapshot, at)
        repository = Repository.open(repo, _key(key_file))
        if (when is not None or txid is not None) and _restore_pitr(repository, db, to, when, txid, force,
                                                                     dry_run, json_out):
            return
        plan = plan_restore(repository, db, to, snapshot=snapshot, at=when, force=force)
        if dry_run:
            if json_out:
                _print_json(plan.describe())
            else:
                d = plan.describe()
                print(f"would restore snapshot {d['snapshot']} of {d['db']} taken {d['taken_at']} to {d['target']}: "
                      f"{d['pages']} pages, {human(d['size'])}, reading {human(d['bytes_to_read'])} "
                      f"from {d['packs']} packs" + (" (replacing the existing file)" if d["replaces_existing"] else ""))
            return
        with _progress("restore", not json_out, unit_bytes=True) as bar:
            result = apply_restore(repository, plan, bar)
        s = result.summary()
        if json_out:
            _print_json(s)
        else:
            print(f"restored snapshot {s['snapshot']} of {s['db']} (taken {s['taken_at']}) to {s['target']}: "
                  f"{human(s['size'])} in {s['seconds']:.2f} s")

    _run(go)


def _restore_pitr(repository: Any, db: str, to: Path, when: Any, txid: int | None, force: bool, dry_run: bool,
                  json_out: bool) -> bool:
    """Restore from replicated segments when they cover the time (or txid); False: use snapshots."""
    from dbre.restore.pitr import apply_pitr, plan_pitr

    plan = plan_pitr(repository, db, to, at=when, txid=txid, force=force)
    if plan is None:
        return False
    if dry_run:
        d = plan.describe()
        if json_out:
            _print_json(d)
        else:
            print(f"would restore {db} from snapshot {d['snapshot']} (taken {d['taken_at']}) and {d['segments']} "
                  f"segments of generation {d['generation']} to {d['target']}")
        return True
    s = apply_pitr(repository, plan).summary()
    if json_out:
        _print_json(s)
    else:
        print(f"restored {db} at {s['at'] or 'txid ' + str(s['txid'])} to {s['target']}: snapshot {s['snapshot']} "
              f"+ {s['transactions']} transactions (last txid {s['last_txid']}, committed {s['last_committed']}) "
              f"in {s['seconds']:.2f} s")
    return True


# -- table and row restores into a live database (plan shown by default; --apply does it) -------

LiveOpt = Annotated[str, typer.Option("--live", help="The live database file to restore into.")]
SnapshotOpt = Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix).")]
AtOpt = Annotated[str | None, typer.Option("--at", help="ISO-8601 time: the newest snapshot at or before it.")]
ApplyOpt = Annotated[bool, typer.Option("--apply", help="Do it (default: show the plan and change nothing).")]
AllowFkOpt = Annotated[bool, typer.Option("--allow-fk-violations",
                                          help="Commit even when foreign_key_check finds new violations.")]


def _when(db: str, snapshot: str | None, at: str | None) -> Any:
    """Check the database name and the snapshot choice; the time --at names (or None)."""
    from dbre.repository.manifest import check_db_name, parse_time

    check_db_name(db)
    when = parse_time(at) if at else None
    if snapshot and when:
        raise UsageError("--snapshot and --at were both given", "pass one of them")
    return when


@app.command("restore-table")
def restore_table(
    repo: RepoOpt,
    db: DbNameOpt,
    live: LiveOpt,
    table: Annotated[list[str], typer.Option("--table", help="Table to restore (repeat for more).")],
    snapshot: SnapshotOpt = None,
    at: AtOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Drop the live table and recreate it from the snapshot "
                                          "(a safety snapshot of the live database is taken first).")] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="Without --replace, the copy is named TABLE+SUFFIX.")
                      ] = "_restored",
    apply: ApplyOpt = False,
    allow_fk_violations: AllowFkOpt = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Restore tables of a snapshot into the live database: as TABLE_restored, or in place with --replace."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.table import apply_table_restore, plan_table_restore

        when = _when(db, snapshot, at)
        repository = Repository.open(repo, _key(key_file))
        plan = plan_table_restore(repository, db, live, table, snapshot=snapshot, at=when,
                                  mode="replace" if replace else "rename", suffix=suffix)
        with plan:
            d = plan.describe()
            if not apply:
                if json_out:
                    _print_json({"dry_run": True, **d})
                    return
                print(f"restore of {', '.join(table)} into {d['live']} from snapshot {d['snapshot']} "
                      f"(taken {d['taken_at']}) (dry run)")
                _table(f"{d['mode']} mode", ["table", "action", "as", "rows", "live rows"],
                       [[a["table"], a["action"], a["target"], a["snapshot_rows"],
                         "-" if a["live_rows"] is None else a["live_rows"]] for a in d["tables"]])
                for a in d["tables"]:
                    for stmt in a["statements"]:
                        print(stmt + ";")
                    for why in a["skipped"]:
                        print(f"-- not created: {why}")
                if replace:
                    print("a safety snapshot of the live database is taken first")
                print("dry run: nothing changed; pass --apply to restore")
                return
            result = apply_table_restore(plan, allow_fk_violations=allow_fk_violations)
        s = result.summary()
        if json_out:
            _print_json(s)
            return
        for a in s["tables"]:
            verb = "restored as" if a["target"] != a["table"] else "replaced"
            print(f"{a['table']}: {verb} {a['target']} ({a['snapshot_rows']} rows from snapshot {s['snapshot']})")
        if s["safety_snapshot"]:
            print(f"safety snapshot {s['safety_snapshot']} of the live database taken first; to undo: "
                  f"dbre restore-table --repo {repo} --db {db} --live {live} --snapshot {s['safety_snapshot']} "
                  + " ".join(f"--table {a['table']}" for a in s["tables"]) + " --replace --apply")
        print(f"audit record {s['audit_record']}")

    _run(go)


@app.command("repair-rows")
def repair_rows(
    repo: RepoOpt,
    db: DbNameOpt,
    live: Annotated[str, typer.Option("--live", help="The live database: a file, or a libsql:// / https:// URL "
                                      "(token in LIBSQL_AUTH_TOKEN or TURSO_AUTH_TOKEN).")],
    table: Annotated[str, typer.Option("--table", help="The table to repair.")],
    where: Annotated[str, typer.Option("--where", help='SQL expression selecting the rows, e.g. "id IN (1,2,3)".')],
    snapshot: SnapshotOpt = None,
    at: AtOpt = None,
    delete_extra: Annotated[bool, typer.Option("--delete-extra", help="Also delete selected rows that are only "
                                               "in the live database.")] = False,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Refuse selections larger than this.")] = 1_000_000,
    preview: Annotated[int, typer.Option("--preview", help="Rows of each kind to show.")] = 10,
    fire_triggers: Annotated[bool, typer.Option("--fire-triggers", help="Let the table's triggers fire on the "
                                                "repair (default: they are suspended).")] = False,
    apply: ApplyOpt = False,
    allow_fk_violations: AllowFkOpt = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Put rows selected by --where back as a snapshot has them: diff by primary key, then --apply."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.rows import apply_row_repair, check_where, plan_row_repair

        when = _when(db, snapshot, at)
        check_where(where)
        repository = Repository.open(repo, _key(key_file))
        plan = plan_row_repair(repository, db, live, table, where, snapshot=snapshot, at=when,
                               delete_extra=delete_extra, max_rows=max_rows, preview_rows=max(preview, 0),
                               token=_token())
        with plan:
            d = plan.describe()
            if not apply or not plan.changes:
                if json_out:
                    _print_json({"dry_run": not apply, **d})
                    return
                print(f"repair of {d['table']} where {d['where']} in {d['live']} from snapshot {d['snapshot']} "
                      f"(taken {d['taken_at']})" + ("" if apply else " (dry run)") + f": {d['snapshot_rows']} rows "
                      f"selected in the snapshot, {d['live_rows']} in live")
                _table("diff", ["kind", "rows"], [[k.replace("_", " "), v] for k, v in d["counts"].items()])
                if d["preview"]:
                    _table(f"first {preview} rows of each kind", ["action", "key", "values"],
                           [[p["action"], p["key"], p["detail"]] for p in d["preview"]])
                print("nothing to repair" if not plan.changes
                      else "dry run: nothing changed; pass --apply to repair")
                return
            result = apply_row_repair(plan, allow_fk_violations=allow_fk_violations, fire_triggers=fire_triggers)
        s = result.summary()
        if json_out:
            _print_json(s)
            return
        kept = "" if delete_extra else f", {len(plan.extras)} rows only in live kept"
        print(f"{s['table']}: inserted {s['inserted']}, updated {s['updated']}, deleted {s['deleted']} rows from "
              f"snapshot {s['snapshot']}{kept}; audit record {s['audit_record']}")

    _run(go)


@app.command()
def verify(
    repo: RepoOpt,
    db: DbOpt = None,
    read_data: Annotated[bool, typer.Option(
        "--read-data", help="Also read every pack: each page checked against its record, index and hash.",
    )] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Check snapshots and packs; exit 1 naming every damaged or missing object."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.repository.verify import verify as run_verify

        repository = Repository.open(repo, _key(key_file))
        if db:
            check_db_name(db)
            repository.require_db(db)
        with _progress("verify", not json_out) as bar:
            report = run_verify(repository, db, read_data=read_data, progress=bar)
        from dbre.replicate.check import verify_segments

        segments, segment_problems = verify_segments(repository, db)  # replicated chains, end to end
        if json_out:
            _print_json({**report.summary(), "segments": segments,
                         "segment_problems": [{"object": o, "detail": d} for o, d in segment_problems]})
        else:
            for p in report.problems:
                print(f"DAMAGED {p.object}: {p.detail}", file=sys.stderr)
            for obj, detail in segment_problems:
                print(f"DAMAGED {obj}: {detail}", file=sys.stderr)
            what = f"{report.snapshots} snapshots, {report.packs} packs"
            what += f", {segments} segments" if segments else ""
            if read_data:
                what += f", read {report.packs_read} packs ({human(report.bytes_read)})"
            n = len(report.problems) + len(segment_problems)
            print(("ok: " if not n else f"{n} problems: ") + what)
            if report.damaged:
                print(f"snapshots that cannot be restored: {', '.join(sorted(report.damaged))}; the next "
                      "`dbre backup` stores lost pages again (`--full` stores every page again)")
        if not report.ok or segment_problems:
            raise typer.Exit(1)

    _run(go)


@app.command()
def forget(
    repo: RepoOpt,
    db: DbOpt = None,
    keep_last: Annotated[str, typer.Option("--keep-last", help="Keep the N newest snapshots.")] = "0",
    keep_hourly: Annotated[str, typer.Option("--keep-hourly", help="Keep the newest of each of N hours.")] = "0",
    keep_daily: Annotated[str, typer.Option("--keep-daily", help="Keep the newest of each of N days.")] = "0",
    keep_weekly: Annotated[str, typer.Option("--keep-weekly", help="Keep the newest of each of N ISO weeks.")] = "0",
    keep_monthly: Annotated[str, typer.Option("--keep-monthly", help="Keep the newest of each of N months.")] = "0",
    keep_yearly: Annotated[str, typer.Option("--keep-yearly", help="Keep the newest of each of N years.")] = "0",
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", help="Keep all snapshots within DURATION of the newest: 7d, 12h, 2y5m7d3h (m = months).",
    )] = None,
    keep_tz: Annotated[str, typer.Option(
        "--keep-tz", help="Time zone of the hours, days, weeks, months and years, e.g. Europe/Paris.")] = "UTC",
    prune_packs: Annotated[bool, typer.Option("--prune", help="Then delete packs no snapshot needs.")] = False,
    grace: Annotated[str, typer.Option(
        "--grace", help="With --prune: keep unused packs younger than this (store's clock): 2h, 90min, 1d, 0.")] = "2h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go, delete nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Forget snapshots a retention policy does not keep (restic's rules; a count may be unlimited); --prune frees
    their space."""

    def go() -> None:
        from dbre.repository.keep import parse_count
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.repository.retention import KeepPolicy, forget

        counts = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily, "weekly": keep_weekly,
                  "monthly": keep_monthly, "yearly": keep_yearly}
        policy = KeepPolicy(**{k: parse_count(v, f"--keep-{k}") for k, v in counts.items()}, within=keep_within,
                            timezone=keep_tz)
        policy.check()
        grace_seconds = _duration(grace, "--grace")
        if db:
            check_db_name(db)
        repository = Repository.open(repo, _key(key_file))
        # planned and applied under one exclusive lock (a dry run: a shared one, deleting nothing)
        plan, pplan = forget(repository, policy, db, dry_run=dry_run, prune=prune_packs, grace=grace_seconds)
        out: dict[str, Any] = {"dry_run": dry_run, **plan.describe()}
        if pplan is not None:
            out["prune"] = pplan.describe()
        if json_out:
            _print_json(out)
            return
        rows = [[m.id, m.db, m.taken_at[:19], "keep", ", ".join(r)] for m, r in plan.keep]
        rows += [[m.id, m.db, m.taken_at[:19], "forget" if not dry_run else "would forget", ""] for m in plan.remove]
        rows.sort(key=lambda r: (r[1], r[2]))
        title = "retention" + (" (dry run)" if dry_run else "")
        _table(title, ["id", "db", "taken at (UTC)", "action", "kept by"], rows)
        if "prune" in out:
            p = out["prune"]
            verb = "would delete" if dry_run else "deleted"
            print(f"prune: {verb} {p['delete_packs']} unused packs, kept {p['keep_packs']} in use and "
                  f"{p['grace_kept_packs']} unused but younger than the grace period ({grace})")
            for s in p["segments"]:
                print(f"prune: {s['db']}: {verb} {len(s['delete_generations'])} generations "
                      f"({s['delete_segments']} segments), kept {len(s['keep_generations'])} "
                      f"(window from {s['window_start']}) and {len(s['grace_kept_generations'])} younger than "
                      f"the grace period; restorable by segments from {s['restorable_from'] or 'the oldest kept'}")
        else:
            for s in out["segments"]:
                go_ = s["prune_deletes_generations"]
                print(f"segments: {s['db']}: window from {s['window_start']}, {len(s['keep_generations'])} "
                      f"generations kept; the next prune deletes {len(go_)} generations "
                      f"({sum(g['segments'] for g in go_)} segments)")

    _run(go)


_DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def _duration(text: str, option: str) -> float:
    """Seconds in "90s", "30min", "2h", "1d" or "0"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d)?\s*", text)
    if not match or (match.group(2) is None and float(match.group(1)) != 0):
        raise UsageError(f"{option} {text!r} is not a duration", "use e.g. 2h, 90min, 1d or 0")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


@app.command()
def copy(
    repo: RepoOpt,
    to: Annotated[str, typer.Option("--to", help="The offsite repository: a path or s3://bucket/prefix.")],
    db: DbOpt = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Copy snapshots not yet there to a second repository (the offsite layer)."""

    def go() -> None:
        from dbre.repository.copy import copy_snapshots
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        if db:
            check_db_name(db)
        key = _key(key_file)
        src = Repository.open(repo, key)
        dst = Repository.init_copy_of(src, to, key)
        with _progress("copy", not json_out) as bar:
            plan, copied = copy_snapshots(src, dst, db, bar)
        out = {**plan.describe(), "bytes_copied": copied}
        if json_out:
            _print_json(out)
        else:
            print(f"copied {len(plan.snapshots)} snapshots ({len(plan.packs)} packs, {human(copied)}) to {dst.url}; "
                  f"{plan.already} were already there"
                  + (f"; {plan.segments} segments of replication ({plan.generations} new generations)"
                     if plan.segments or plan.generations else ""))
        for line in plan.problems:  # the healthy snapshots are copied; each problem is one line
            print(f"dbre: {line}", file=sys.stderr)
        if plan.problems:
            raise typer.Exit(1)

    _run(go)


@app.command()
def migrate(
    repo: RepoOpt,
    to: Annotated[str, typer.Option("--to", help="A new, empty location for the format-2 repository.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be migrated, write nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Convert a format-1 repository into a new format-2 one (the old one is only read)."""

    def go() -> None:
        from dbre.repository.migrate import apply_migrate, plan_migrate
        from dbre.repository.repo import Repository

        key = _key(key_file)
        src = Repository.open(repo, key)
        if src.version != 1:
            raise UsageError(f"repository {src.url} already uses format {src.version}", "nothing to migrate")
        if dry_run:
            from dbre.storage import open_store

            store = open_store(to)
            if Repository.read_config(store) is None:  # a dry run creates nothing, not even the target
                n = len(src.snapshots())
                out = {"source": src.url, "target": store.url, "snapshots_to_migrate": n}
                if json_out:
                    _print_json(out)
                else:
                    print(f"would migrate {n} snapshots from {src.url} to {store.url} (format 2)")
                return
        dst = Repository.open_or_init(to, key)
        plan = plan_migrate(src, dst)
        if dry_run:
            if json_out:
                _print_json(plan.describe())
            else:
                print(f"would migrate {len(plan.snapshots)} snapshots and {len(plan.records)} records to {dst.url}; "
                      f"{plan.already} already migrated")
            return
        with _progress("migrate", not json_out, unit_bytes=True) as bar:
            result = apply_migrate(src, dst, plan, bar)
        if json_out:
            _print_json(result.summary())
        else:
            print(f"migrated {len(result.migrated)} snapshots and {result.records} records to {dst.url} "
                  f"in {result.seconds:.1f} s (each restored from both and compared); "
                  f"{plan.already} were already there")
        for name, why in plan.damaged:
            print(f"dbre: not migrated, its manifest cannot be read: {name}: {why}", file=sys.stderr)
        for what, why in result.failed:
            print(f"dbre: not migrated, it cannot be restored: {what}: {why}", file=sys.stderr)
        if plan.damaged or result.failed:
            raise typer.Exit(1)

    _run(go)


@app.command()
def unlock(
    repo: RepoOpt,
    remove_all: Annotated[bool, typer.Option("--remove-all", help="Remove every lock, not only stale ones.")] = False,
) -> None:
    """Remove locks left by runs that died."""

    def go() -> None:
        from dbre.repository.lock import remove_locks
        from dbre.repository.repo import Repository
        from dbre.storage import open_store

        store = open_store(repo)
        if Repository.read_config(store) is None:
            raise UsageError(f"no repository at {store.url}", "check --repo")
        print(f"removed {remove_locks(store, all_locks=remove_all)} locks")

    _run(go)


# -- verification: drills, expectations, weekly validation, status (dbre.validate, dbre.metrics) ------

expectations_app = typer.Typer(help="Great Expectations suites: starter suites from a live database.",
                               no_args_is_help=True)
app.add_typer(expectations_app, name="expectations")

PolicyOpt = Annotated[
    Path | None, typer.Option("--policy", help="Policy file: RPO/RTO targets, drills, alerts (or set DBRE_POLICY).")
]
ExpectationsOpt = Annotated[
    Path | None,
    typer.Option("--expectations", help="GX suites: expectations/ (its <db>/ folder is used) or one db's folder."),
]
ScratchOpt = Annotated[Path | None, typer.Option("--scratch-dir", help="Where checked restores go (then removed).")]


def _policy(path: Path | None) -> Any:
    from dbre.policy import load_policy

    env = os.environ.get("DBRE_POLICY")
    chosen = path or (Path(env) if env else None)
    return load_policy(chosen) if chosen else None


@expectations_app.command("profile")
def expectations_profile(
    source: Annotated[str, typer.Argument(help="A database file, or libsql:// / http(s):// / ws(s):// URL.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the suites, e.g. expectations/NAME/.")],
    db: DbOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace suites that already exist.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a starter suite per table of SOURCE (keys, NOT NULL, foreign keys, value sets, ranges, freshness)."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.sources import open_source
        from dbre.validate.profile import profile_database, write_suites

        src = open_source(source, _token())
        name = check_db_name(db or src.name)
        with src.connect() as conn:
            suites = profile_database(conn, name)
        written = write_suites(suites, out, overwrite=overwrite)
        summary = {"db": name, "out": str(out), "tables": len(suites), "written": [str(p) for p in written],
                   "kept": len(suites) - len(written),
                   "expectations": sum(len(s["expectations"]) for s in suites.values())}
        if json_out:
            _print_json(summary)
            return
        print(f"wrote {len(written)} suites ({summary['expectations']} expectations over {len(suites)} tables) "
              f"to {out}" + (f"; kept {summary['kept']} existing (--overwrite replaces them)" if summary["kept"]
                             else ""))

    _run(go)


@app.command()
def drill(
    repo: RepoOpt,
    db: DbNameOpt,
    expectations: ExpectationsOpt = None,
    policy: PolicyOpt = None,
    target: Annotated[str, typer.Option("--target", help="newest, random, or an ISO time.")] = "newest",
    report_dir: Annotated[Path | None, typer.Option("--report-dir", help="Write the drill report here.")] = None,
    scratch_dir: ScratchOpt = None,
    data_docs: Annotated[bool, typer.Option("--data-docs/--no-data-docs",
                                            help="Also build GX Data Docs into the report folder.")] = True,
    namespace_admin: Annotated[str | None, typer.Option(
        "--namespace-admin", help="sqld admin API: also load the restore into a new namespace there.")] = None,
    namespace_url: Annotated[str | None, typer.Option(
        "--namespace-url", help="sqld's HTTP URL, to check the namespace (token: LIBSQL_AUTH_TOKEN).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Its name (default drill-<db>-<time>).")] = None,
    keep_namespace: Annotated[bool, typer.Option("--keep-namespace", help="Keep it after the drill.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the drill record as JSON.")] = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Recovery drill: restore to scratch, validate, measure RTO and RPO; exit 1 naming every failure."""

    def go() -> None:
        import secrets
        import shutil

        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.validate.drill import DrillTargets, run_drill

        check_db_name(db)
        pol = _policy(policy)
        targets = DrillTargets.from_policy(pol, db)
        suites = expectations
        if suites is None and pol is not None and pol.database(db).expectations:
            suites = Path(pol.database(db).expectations)
        scratch = scratch_dir or (Path(pol.drills.scratch_dir) if pol and pol.drills.scratch_dir else None)
        ns_target = None
        if namespace_admin or namespace_url:
            if not (namespace_admin and namespace_url):
                raise UsageError("--namespace-admin and --namespace-url go together", "pass both, or neither")
            import time

            from dbre.validate.namespace import NamespaceTarget

            ns_target = NamespaceTarget(namespace_admin, namespace_url,
                                        namespace or f"drill-{db}-{time.strftime('%Y%m%d%H%M%S')}".replace(".", "-"),
                                        _token(), keep_namespace)
        repository = Repository.open(repo, _key(key_file))
        docs_tmp = None
        if report_dir is not None and data_docs and suites is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            docs_tmp = report_dir / f".data-docs-{secrets.token_hex(4)}"
        try:
            outcome = run_drill(repository, db, target=target, targets=targets, expectations=suites,
                                scratch_dir=scratch, data_docs_dir=docs_tmp, namespace=ns_target)
            record = outcome.record
            if report_dir is not None:
                from dbre.report.drill import report_folder, write_drill_report

                folder = report_folder(report_dir, record)
                folder.mkdir(parents=True, exist_ok=True)
                if docs_tmp is not None and docs_tmp.exists():
                    shutil.rmtree(folder / "data-docs", ignore_errors=True)
                    docs_tmp.rename(folder / "data-docs")
                paths = write_drill_report(report_dir, record, repository.records("drills", db), outcome.checks,
                                           outcome.suite_run)
                record = {**record, "report": paths["html"], "report_markdown": paths["markdown"]}
        finally:
            if docs_tmp is not None:
                shutil.rmtree(docs_tmp, ignore_errors=True)
        if json_out:
            _print_json(record)
        else:
            from dbre.report.drill import seconds_text

            def vs(key: str) -> str:
                t = record[f"{key}_target_seconds"]
                met = record[f"{key}_met"]
                return f"{seconds_text(record[f'{key}_seconds'])}" + (
                    f" (target {seconds_text(t)}: {'met' if met else 'MISSED'})" if t is not None else "")

            verdict = "passed" if record["passed"] else "FAILED"
            print(f"drill of {db} {verdict}: snapshot {record['snapshot']} taken {record['snapshot_taken_at']}; "
                  f"RTO {vs('rto')}; RPO {vs('rpo')}; {record['checks']['total'] - record['checks']['failed']}/"
                  f"{record['checks']['total']} checks passed")
            if record.get("report"):
                print(f"report: {record['report']}")
        if not record["passed"]:
            for f in record["failures"]:
                print(f"dbre: drill of {db}: {f}", file=sys.stderr)
            raise typer.Exit(1)

    _run(go)


@app.command("validate")
def validate_repository_cmd(
    repo: RepoOpt,
    db: Annotated[list[str] | None, typer.Option("--db", help="Database(s) to restore-check (default: all).")] = None,
    read_data_subset: Annotated[str | None, typer.Option(
        "--read-data-subset", help="Read the packs of bucket n of m (n/m); default: this week's bucket.")] = None,
    cycle_weeks: Annotated[int, typer.Option("--cycle-weeks", help="Every pack is read once in this many weeks.")] = 4,
    expectations: ExpectationsOpt = None,
    scratch_dir: ScratchOpt = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Weekly integrity validation: verify, read a rotating subset of packs, restore-check each newest snapshot."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.validate.integrity import validate_repository
        from dbre.validate.subset import parse_subset

        subset = parse_subset(read_data_subset) if read_data_subset else None
        repository = Repository.open(repo, _key(key_file))
        with _progress("read packs", not json_out) as bar:
            out = validate_repository(repository, dbs=db or None, subset=subset, cycle_weeks=cycle_weeks,
                                      expectations=expectations, scratch_dir=scratch_dir, progress=bar)
        if json_out:
            _print_json(out)
        else:
            v = out["verify"]
            print(f"verify: {v['snapshots']} snapshots, {v['packs']} packs; read subset {out['read_data_subset']}: "
                  f"{v['packs_read']} packs ({human(v['bytes_read'])}); {len(v['problems'])} problems")
            for r in out["databases"]:
                gx = r["expectations"]
                print(f"{r['db']}: snapshot {r['snapshot']} restored in {r['restore_seconds']:.2f} s; "
                      f"{r['checks']['total'] - r['checks']['failed']}/{r['checks']['total']} checks passed"
                      + (f" ({gx['expectations']} GX expectations)" if gx else "")
                      + ("" if r["passed"] else " - FAILED"))
        if not out["ok"]:
            for p in out["verify"]["problems"]:
                print(f"dbre: DAMAGED {p['object']}: {p['detail']}", file=sys.stderr)
            for r in out["databases"]:
                for c in r["failed_checks"]:
                    where = f"{c['table']}.{c['column']}" if c.get("table") and c.get("column") else (
                        c.get("table") or "database")
                    print(f"dbre: {r['db']}: {c['check']} on {where}: {c['detail']}", file=sys.stderr)
                if r["error"]:
                    print(f"dbre: {r['db']}: {r['error']}", file=sys.stderr)
            raise typer.Exit(1)

    _run(go)


def _webhook_urls(webhook: str | None, pol: Any) -> list[tuple[str, str, list[str] | None]]:
    """(name, url, events) of the webhooks to notify; env:NAME references are read here, at the edge."""
    def resolve(ref: str) -> str | None:
        if ref.startswith("env:"):
            return os.environ.get(ref[4:]) or None
        return None if ref.startswith("prefect-secret:") else ref  # blocks are for the status flow

    out: list[tuple[str, str, list[str] | None]] = []
    if webhook:
        url = resolve(webhook)
        if not url:
            raise UsageError("--webhook: the environment variable it names is not set", "export it or pass a URL")
        out.append(("--webhook", url, None))
    for ch in (pol.alerts if pol is not None else []):
        if ch.kind == "webhook" and ch.url:
            url = resolve(ch.url)
            if url:
                out.append((ch.name, url, list(ch.events)))
    return out


@app.command()
def status(
    repo: RepoOpt,
    policy: PolicyOpt = None,
    db: Annotated[list[str] | None, typer.Option("--db", help="Only these databases (default: all).")] = None,
    prom: Annotated[Path | None, typer.Option("--prom", help="Also write Prometheus text format to this file.")] = None,
    quota: Annotated[str | None, typer.Option("--quota", help="Storage quota of the repository, e.g. 50GiB.")] = None,
    storage_threshold: Annotated[float, typer.Option("--storage-threshold",
                                                     help="Alert above this share of the quota.")] = 0.8,
    window: Annotated[str, typer.Option("--window", help="Period for success rate and RPO attainment.")] = "30d",
    webhook: Annotated[str | None, typer.Option("--webhook", help="POST alerts as JSON to a URL (env:NAME).")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Backup health per database: success rate, RPO/RTO attainment, drills, storage; exit 1 on any alert."""

    def go() -> None:
        from datetime import timedelta

        from dbre.metrics import NotifyError, alert_payload, compute_status, parse_size, send_webhook, write_prometheus
        from dbre.policy import parse_duration
        from dbre.repository.repo import Repository

        try:
            span = timedelta(seconds=parse_duration(window))
        except ValueError as err:
            raise UsageError(f"--window: {err}", "e.g. --window 30d") from None
        quota_bytes = parse_size(quota) if quota else None
        if not 0 < storage_threshold <= 1:
            raise UsageError("--storage-threshold must be in (0, 1]", "e.g. 0.8 for 80 %")
        pol = _policy(policy)
        hooks = _webhook_urls(webhook, pol)
        repository = Repository.open(repo, _key(key_file))
        st = compute_status(repository, policy=pol, dbs=db or None, window=span, quota_bytes=quota_bytes,
                            storage_threshold=storage_threshold)
        if prom is not None:
            write_prometheus(prom, st)
        alerts = st.all_alerts
        notified = []
        for name, url, events in hooks if alerts else []:
            mine = [a for a in alerts if events is None or a.event in events]
            if not mine:
                continue
            try:
                send_webhook(url, alert_payload(st, mine))
                notified.append(name)
            except NotifyError as err:
                print(f"dbre: alert channel {name}: {err}", file=sys.stderr)
        if json_out:
            _print_json({**st.to_dict(), "notified": notified})
        else:
            def pct(v: float | None) -> str:
                return "-" if v is None else f"{v:.1%}"

            from dbre.report.drill import seconds_text

            rows = [[d.db, d.snapshots, seconds_text(d.newest_restorable_age_seconds), pct(d.backup_success_rate),
                     pct(d.rpo_attainment), pct(d.rto_attainment),
                     "-" if d.days_since_successful_drill is None else f"{d.days_since_successful_drill:.0f} d",
                     human(d.storage_bytes), human(d.added_bytes_per_day) + "/d", "ok" if d.ok else "ALERT"]
                    for d in st.databases]
            _table(f"status of {st.repository}", ["db", "snapshots", "newest point age", "backup success",
                                                   "RPO attained", "RTO attained", "since drill", "stored",
                                                   "growth", "state"], rows)
            total = human(st.storage_bytes) + ("" if st.storage_exact else " (estimated)")
            if st.quota_bytes:
                total += f" of {human(st.quota_bytes)} ({st.storage_bytes / st.quota_bytes:.0%})"
            print(f"storage: {total}")
            for d in st.databases:
                if d.replication_lag_seconds is not None:
                    print(f"replication: {d.db}: lag {seconds_text(d.replication_lag_seconds)} (newest segment "
                          f"{d.replication_newest_segment_at}, heartbeat {d.replication_heartbeat_at or 'none'})")
            if notified:
                print(f"notified: {', '.join(notified)}")
        for a in alerts:
            print(f"dbre: ALERT {a.event} ({a.severity}): {a.message}", file=sys.stderr)
        if alerts:
            raise typer.Exit(1)

    _run(go)


# -- reports: the requirements analysis (dbre.report.requirements) --------------------------------

report_app = typer.Typer(help="Reports: the requirements analysis with its policy, runbook and DR plan.",
                         no_args_is_help=True)
app.add_typer(report_app, name="report")


def _named_sources(specs: list[str], pol: Any) -> dict[str, Any]:
    """Sources by database name: NAME=SOURCE, or SOURCE named as `dbre backup` names it; with no
    SOURCE, the policy's sources (their tokens from env:NAME references)."""
    import re

    from dbre.repository.manifest import check_db_name
    from dbre.sources import open_source

    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and rest and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            out[check_db_name(name)] = open_source(rest, _token())
        else:
            src = open_source(spec, _token())
            out[check_db_name(src.name)] = src
    if not specs and pol is not None:
        for d in pol.databases:
            token = _token()
            if d.auth_token and d.auth_token.startswith("env:") and os.environ.get(d.auth_token[4:]):
                token = Secret(os.environ[d.auth_token[4:]])
            out[d.name] = open_source(d.source, token)
    return out


@report_app.command("requirements")
def report_requirements(
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md/.html, backup-policy.md, "
                                                    "recovery-runbook.md, dr-plan.md.")],
    sources: Annotated[list[str] | None, typer.Argument(
        help="Databases to inspect live: a file or URL, or NAME=SOURCE (default: the policy's sources).")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository (default: policy's primary).")] = None,
    policy: PolicyOpt = None,
    expectations: Annotated[Path, typer.Option("--expectations", help="Folder of GX suites to look for.")] = Path(
        "expectations"),
    price_gb_month: Annotated[float | None, typer.Option(
        "--price-gb-month", help="Storage price per GB-month (default: policy costs, else 0.023 USD).")] = None,
    price_put: Annotated[float | None, typer.Option("--price-put", help="Price per 1000 PUT/LIST requests.")] = None,
    price_get: Annotated[float | None, typer.Option("--price-get", help="Price per 1000 GET requests.")] = None,
    restore_throughput: Annotated[float | None, typer.Option(
        "--restore-throughput", help="Restore speed in bytes/s for RTO estimates (default: measured).")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Requirements analysis: inventory, growth, classification, RPO/RTO feasibility, storage cost, documents."""

    def go() -> None:
        from dataclasses import replace

        from dbre.report.requirements import analyze
        from dbre.report.requirements_docs import write_documents
        from dbre.report.requirements_model import MET, NO_TARGET, Prices
        from dbre.repository.repo import Repository
        from dbre.units import human_bytes as fmt_bytes

        for opt, value in (("--price-gb-month", price_gb_month), ("--price-put", price_put),
                           ("--price-get", price_get), ("--restore-throughput", restore_throughput)):
            if value is not None and (value < 0 or (opt == "--restore-throughput" and value == 0)):
                raise UsageError(f"{opt} must be a positive number", f"e.g. {opt} 0.023")
        pol = _policy(policy)
        url = repo or (pol.repositories.primary if pol else None)
        if not url:
            raise UsageError("no repository given", "pass --repo, or a --policy naming the primary repository")
        key = _key(key_file)
        if key is None and pol is not None and (ref := pol.repositories.encryption_key or "").startswith("env:"):
            key = Secret(os.environ[ref[4:]]) if os.environ.get(ref[4:]) else None
        repository = Repository.open(url, key)
        prices = Prices(**pol.costs.model_dump()) if pol is not None else Prices()
        prices = replace(prices, storage_gb_month=prices.storage_gb_month if price_gb_month is None else price_gb_month,
                         put_per_1000=prices.put_per_1000 if price_put is None else price_put,
                         get_per_1000=prices.get_per_1000 if price_get is None else price_get)
        policy_path = str(policy or os.environ.get("DBRE_POLICY")) if pol is not None else None
        result = analyze(repository, _named_sources(sources or [], pol), pol, policy_path=policy_path, prices=prices,
                         restore_throughput=restore_throughput, expectations_dir=expectations, key=key)
        commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
        commands |= {g.name for g in app.registered_groups if g.name}
        paths = write_documents(result, out, pol, commands)
        counts = result.status_counts()
        if json_out:
            _print_json({"out": str(out), "files": sorted(str(p) for p in paths.values()), "targets": counts,
                         "checks": [vars(c) for d in result.databases for c in d.checks],
                         "recommendations": [vars(r) for r in result.recommendations]})
            return
        rows = [[c.db, c.target, c.status, c.measured, c.reason] for d in result.databases for c in d.checks
                if c.status not in (MET, NO_TARGET)]
        if rows:
            _table("targets at risk or not met", ["db", "target", "status", "measured", "reason"], rows)
        tables = sum(len(d.tables) for d in result.databases)
        print(f"{len(result.databases)} databases, {tables} tables, {fmt_bytes(sum(d.size for d in result.databases))}"
              f"; targets: {counts['met']} met, {counts['at risk']} at risk, {counts['not met']} not met; "
              f"{len(result.recommendations)} recommendations")
        print(f"wrote {out}: report.html, report.md, backup-policy.md, recovery-runbook.md, dr-plan.md")

    _run(go)


import dbre.cli_replicate  # noqa: E402, F401 - registers `dbre replicate` on the app above


def main() -> None:
    """Entry point of the `dbre` script: click's standalone mode gives usage errors exit 2."""
    app()


if __name__ == "__main__":
    main()
