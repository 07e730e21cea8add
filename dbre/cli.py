"""The `dbre` command line: parses options, reads env and key files, prints tables or JSON.

This is an edge of the program: only here (and in flows/deployments) are the environment and
files of secrets read. Errors print one line on stderr, "dbre: <what failed>: <cause> (<hint>)",
and exit 1 (a check failed or an operation failed) or 2 (bad input); --debug shows a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from dbre import __version__
from dbre.errors import DbreError, UsageError
from dbre.secrets import Secret

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


def human(n: float | int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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
    Console().print(t)


# -- commands ------------------------------------------------------------------------------------


@app.command()
def backup(
    source: Annotated[str, typer.Argument(help="A database file, or libsql:// / http(s):// / ws(s):// URL.")],
    repo: RepoOpt,
    db: DbOpt = None,
    json_out: JsonOpt = False,
    checksums: Annotated[
        bool, typer.Option("--checksums/--no-checksums", help="Record per-table content checksums.")
    ] = True,
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
            result = run_backup(repository, src, db, checksums=checksums, progress=bar)
        s = result.summary()
        if json_out:
            _print_json(s)
            return
        kind = "incremental" if s["parent"] else "full"
        print(
            f"snapshot {s['id']} of {s['db']} ({kind}): {s['pages']} pages, {human(s['size'])}; "
            f"added {s['pages_added']} pages, {human(s['bytes_added'])} in {s['seconds']:.2f} s"
        )

    _run(go)


@app.command()
def snapshots(repo: RepoOpt, db: DbOpt = None, json_out: JsonOpt = False, key_file: KeyFileOpt = None) -> None:
    """List snapshots, oldest first."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        repository = Repository.open(repo, _key(key_file))
        if db:
            check_db_name(db)
            repository.require_db(db)
        snaps = repository.snapshots(db)
        if json_out:
            _print_json([m.summary() for m in snaps])
            return
        rows = [
            [m.id, m.db, m.taken_at.replace("T", " ")[:19], m.page_count, human(m.size),
             human(m.stats.get("bytes_added")), m.parent[:8] if m.parent else "full"]
            for m in snaps
        ]
        _table(f"{len(snaps)} snapshots in {repository.url}",
               ["id", "db", "taken at (UTC)", "pages", "size", "added", "parent"], rows)

    _run(go)


@app.command()
def restore(
    repo: RepoOpt,
    db: Annotated[str, typer.Option("--db", help="Database name in the repository.")],
    to: Annotated[Path, typer.Option("--to", help="Path of the restored database file.")],
    snapshot: Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix).")] = None,
    at: Annotated[str | None, typer.Option("--at", help="ISO-8601 time: the newest snapshot at or before it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file at --to.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan, restore nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Restore a snapshot (default: the newest) to a new file."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name, parse_time
        from dbre.repository.repo import Repository
        from dbre.restore.full import apply_restore, plan_restore

        check_db_name(db)
        when = parse_time(at) if at else None
        if snapshot and when:
            raise UsageError("--snapshot and --at were both given", "pass one of them")
        repository = Repository.open(repo, _key(key_file))
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


@app.command()
def verify(
    repo: RepoOpt,
    db: DbOpt = None,
    read_data: Annotated[bool, typer.Option("--read-data", help="Read and check every byte of every pack.")] = False,
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
        if json_out:
            _print_json(report.summary())
        else:
            for p in report.problems:
                print(f"DAMAGED {p.object}: {p.detail}", file=sys.stderr)
            what = f"{report.snapshots} snapshots, {report.packs} packs"
            if read_data:
                what += f", read {report.packs_read} packs ({human(report.bytes_read)})"
            print(("ok: " if report.ok else f"{len(report.problems)} problems: ") + what)
        if not report.ok:
            raise typer.Exit(1)

    _run(go)


@app.command()
def forget(
    repo: RepoOpt,
    db: DbOpt = None,
    keep_last: Annotated[int, typer.Option("--keep-last", help="Keep the N newest snapshots.")] = 0,
    keep_hourly: Annotated[int, typer.Option("--keep-hourly", help="Keep the newest of each of N hours.")] = 0,
    keep_daily: Annotated[int, typer.Option("--keep-daily", help="Keep the newest of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option("--keep-weekly", help="Keep the newest of each of N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option("--keep-monthly", help="Keep the newest of each of N months.")] = 0,
    keep_yearly: Annotated[int, typer.Option("--keep-yearly", help="Keep the newest of each of N years.")] = 0,
    prune_packs: Annotated[bool, typer.Option("--prune", help="Then delete packs no snapshot needs.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go, delete nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Forget snapshots a retention policy does not keep; --prune frees their space."""

    def go() -> None:
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.repository.retention import KeepPolicy, apply_forget, plan_forget, prune

        policy = KeepPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
        policy.check()
        if db:
            check_db_name(db)
        repository = Repository.open(repo, _key(key_file))
        plan = plan_forget(repository, policy, db)
        out: dict[str, Any] = {"dry_run": dry_run, **plan.describe()}
        if not dry_run:
            apply_forget(repository, plan)
        if prune_packs:
            if dry_run:
                # what prune would free once the forgotten snapshots are gone
                from dbre.repository.retention import PrunePlan

                keep_packs: set[str] = set()
                for m, _ in plan.keep:
                    keep_packs.update(m.packs)
                for m in repository.snapshots():
                    if db and m.db != db:
                        keep_packs.update(m.packs)
                present = repository.pack_ids()
                pplan = PrunePlan(sorted(present - keep_packs), len(present & keep_packs))
            else:
                pplan = prune(repository)
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
            print(f"prune: {verb} {p['delete_packs']} unused packs, kept {p['keep_packs']}")

    _run(go)


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
        from dbre.repository.copy import apply_copy, plan_copy
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository

        if db:
            check_db_name(db)
        key = _key(key_file)
        src = Repository.open(repo, key)
        dst = Repository.init_copy_of(src, to, key)
        plan = plan_copy(src, dst, db)
        with _progress("copy", not json_out) as bar:
            copied = apply_copy(src, dst, plan, bar)
        out = {**plan.describe(), "bytes_copied": copied}
        if json_out:
            _print_json(out)
        else:
            print(f"copied {len(plan.snapshots)} snapshots ({len(plan.packs)} packs, {human(copied)}) to {dst.url}; "
                  f"{plan.already} were already there")

    _run(go)


@app.command()
def unlock(
    repo: RepoOpt,
    remove_all: Annotated[bool, typer.Option("--remove-all", help="Remove every lock, not only stale ones.")] = False,
) -> None:
    """Remove locks left by runs that died."""

    def go() -> None:
        from dbre.repository.repo import Repository, remove_locks
        from dbre.storage import open_store

        store = open_store(repo)
        if Repository.read_config(store) is None:
            raise UsageError(f"no repository at {store.url}", "check --repo")
        print(f"removed {remove_locks(store, all_locks=remove_all)} locks")

    _run(go)


def main() -> None:
    """Entry point of the `dbre` script: click's standalone mode gives usage errors exit 2."""
    app()


if __name__ == "__main__":
    main()
