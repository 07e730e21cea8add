"""`dbre restore`, `restore-table` and `repair-rows`: a whole database (from snapshots or, to the
transaction, from replicated segments), or tables and rows back into a live database.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import (
    DbNameOpt,
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
from dbre.errors import UsageError
from dbre.units import human_bytes as human

_PROVIDER_PANEL = "Provider history (--provider)"


@app.command()
def restore(
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix "
                                             "(required unless --provider).")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database name in the repository (required unless "
                                           "--provider).")] = None,
    to: Annotated[Path | None, typer.Option("--to", help="Path of the restored database file.")] = None,
    snapshot: Annotated[str | None, typer.Option("--snapshot", help="Snapshot id (or a unique prefix); 'latest': "
                                                 "the newest snapshot, not the newer replicated state.")] = None,
    at: Annotated[str | None, typer.Option("--at", help="ISO-8601 time: exactly the transactions replicated up "
                                           "to it, else the newest snapshot at or before it; with --provider, the "
                                           "provider's history at that time.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file at --to; refused while a process "
                                        "has it open (stop the application first). With --into URL: drop every "
                                        "user object in the remote database first.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan, restore nothing.")] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
    txid: Annotated[int | None, typer.Option("--txid", help="Up to this replicated transaction.")] = None,
    no_safety: Annotated[bool, typer.Option("--no-safety-snapshot", help="With --force: replace a database without "
                                            "first snapshotting it into the repository (tagged safety) "
                                            "(a read-only repository, a damaged database).")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Keep --to current from replicated segments (a "
                                         "read-only standby) until SIGINT/SIGTERM.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="With --follow: look for new segments this "
                                          "often.")] = "1s",
    if_db_not_exists: Annotated[bool, typer.Option("--if-db-not-exists", help="When --to holds a database, say so "
                                                   "and exit 0 without touching it; an empty file (or the one empty "
                                                   "page a WAL application leaves by connecting) holds none and is "
                                                   "restored over (container start-up).")] = False,
    if_replica_exists: Annotated[bool, typer.Option("--if-replica-exists", help="When the repository has no "
                                                    "snapshot of --db, say so and exit 0.")] = False,
    fallback: FallbackOpt = None,
    policy: FallbackPolicyOpt = None,
    provider: Annotated[str | None, typer.Option("--provider", help="Restore from the provider's own history "
                                                 "instead of a repository: sqld (bottomless, a namespace fork) "
                                                 "or turso (Platform API, TURSO_API_TOKEN).",
                                                 rich_help_panel=_PROVIDER_PANEL)] = None,
    admin_url: Annotated[str | None, typer.Option("--admin-url", metavar="URL",
                                                  help="sqld: its admin API (--admin-listen-addr; "
                                                  "key in LIBSQL_ADMIN_AUTH_KEY).",
                                                  rich_help_panel=_PROVIDER_PANEL)] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="sqld: the namespace to restore.",
                                                  rich_help_panel=_PROVIDER_PANEL)] = None,
    into_namespace: Annotated[str | None, typer.Option("--into-namespace", metavar="NAME",
                                                       help="sqld: fork into this new "
                                                       "namespace instead of a file (--to).",
                                                       rich_help_panel=_PROVIDER_PANEL)] = None,
    url: Annotated[str | None, typer.Option("--url", help="sqld: its HTTP address, to read the fork for --to "
                                            "and to refuse an empty fork (a time before its history) "
                                            "(token in LIBSQL_AUTH_TOKEN).", rich_help_panel=_PROVIDER_PANEL)] = None,
    org: Annotated[str | None, typer.Option("--org", help="turso: the organization.",
                                            rich_help_panel=_PROVIDER_PANEL)] = None,
    database: Annotated[str | None, typer.Option("--database", help="turso: the database to restore.",
                                                 rich_help_panel=_PROVIDER_PANEL)] = None,
    into: Annotated[str | None, typer.Option("--into", metavar="NAME/URL",
                                             help="turso: create this new database instead of a file "
                                             "(--to). With --repo, a URL (libsql://, http(s)://; token in "
                                             "LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN): load the restore into that "
                                             "empty remote database (sqld: --into-namespace NAME for a namespace, "
                                             "created first with --admin-url) "
                                             "in batches, one transaction each (a long one would hold the server's "
                                             "write lock); a failed load drops what it created, leaving the target "
                                             "empty. A non-empty target is refused; --force drops every user object "
                                             "in it first (one transaction). Checked after: row counts and row "
                                             "digests per table.", rich_help_panel=_PROVIDER_PANEL)] = None,
) -> None:
    """Restore a database to a new file: its newest replicated state (else its newest snapshot), a
    snapshot (--snapshot), or a point in time (--at, --txid). An existing file is replaced only with
    --force, and never while a process has it open. With --provider, from the provider's own
    point-in-time history (sqld bottomless, Turso Cloud) instead of a repository. With --into URL, into an
    empty remote libSQL database (sqld, a sqld namespace, Turso), checked table by table after the load."""

    def go() -> None:
        import os

        from dbre.provider.command import ProviderOptions, provider_options_given, run_provider_restore
        from dbre.restore.full import apply_restore, is_empty_database, plan_restore

        popts = ProviderOptions(provider or "", at, to, force, dry_run, json_out, admin_url, namespace,
                                into_namespace, url, org, database, into)
        if provider is not None:
            repo_only = [o for o, v in (("--repo", repo), ("--db", db), ("--snapshot", snapshot), ("--txid", txid),
                                        ("--key-file", key_file), ("--follow", follow),
                                        ("--no-safety-snapshot", no_safety), ("--if-db-not-exists", if_db_not_exists),
                                        ("--if-replica-exists", if_replica_exists), ("--fallback", fallback),
                                        ("--policy", policy)) if v]
            if repo_only:
                raise UsageError(f"{', '.join(repo_only)} cannot be used with --provider (it restores from the "
                                 "provider's history, not a repository)", "drop them, or drop --provider")
            run_provider_restore(popts)
            return
        from dbre.restore.remote_command import is_remote_url

        if into is not None and is_remote_url(into):  # (--into NAME: a new Turso database; URL: a load)
            _restore_into(repo, db, into, into_namespace, admin_url, to, snapshot, at, txid, force, dry_run,
                          json_out, key_file, fallback, policy, url, org, database, follow, no_safety,
                          if_db_not_exists, if_replica_exists)
            return
        if into is not None and "://" in into:  # (a URL, but not a libSQL one: not a provider's database name)
            raise UsageError(f"--into {into.split('://', 1)[0]}://...: not a libSQL URL",
                             "use libsql://, https://, http://, wss:// or ws:// (a Turso database name needs "
                             "--provider turso)")
        if provider_options_given(popts):
            extra = provider_options_given(popts)
            raise UsageError(f"{', '.join(extra)} {'needs' if len(extra) == 1 else 'need'} --provider",
                             "add --provider sqld or --provider turso")
        for opt, value in (("--repo", repo), ("--db", db), ("--to", to)):
            if value is None:
                raise UsageError(f"missing option '{opt}'", "see 'dbre restore --help'")
        assert repo is not None and db is not None and to is not None
        if if_db_not_exists and force:
            raise UsageError("--if-db-not-exists and --force were both given", "pass one of them")
        newest_snapshot = snapshot == "latest"
        snap_id = None if newest_snapshot else snapshot
        if follow:
            from dbre.cli_replicate import follow_standby

            conflicts = [o for o, v in (("--snapshot", snapshot), ("--at", at), ("--txid", txid),
                                        ("--dry-run", dry_run), ("--json", json_out),
                                        ("--if-db-not-exists", if_db_not_exists), ("--fallback", fallback),
                                        ("--policy", policy)) if v]
            if not conflicts and if_replica_exists and _no_replica(repo, db, key_file):
                return
            follow_standby(repo, db, to, interval, force, _key(key_file), conflicts)
            return
        when = _when(db, snapshot, at)  # (--snapshot latest with --at too: one of them)
        if txid is not None and snapshot:
            raise UsageError("--snapshot and --txid were both given", "pass one of them")
        target = to.expanduser().absolute()
        replace, only_empty, dest = force, False, to
        if if_db_not_exists and target.is_dir():  # (not a database that exists: the restore could never go there)
            raise UsageError(f"restore target {target} is a directory", "give a file path, e.g. --to restored.db")
        if if_db_not_exists and target.exists():
            if not is_empty_database(target):
                _say(json_out, {"restored": False, "target": str(target), "reason": "exists"},
                     f"{target} already exists: nothing restored (--if-db-not-exists)")
                return
            # an empty file holds no database (what `sqlite3 app.db` or a probe that opened the path
            # leaves; a WAL application that merely connected leaves one schema-less page): restored
            # over, as restore --force replaces a file (refused while a process has it), and only while
            # it still holds none at the rename; through a symlink, where the link points
            replace = only_empty = True
            dest = Path(os.path.realpath(target))
        if if_replica_exists and _no_replica(repo, db, key_file, json_out):
            return
        repository = _open(repo, key_file, fallback, policy)
        if not snap_id and not newest_snapshot and _restore_pitr(repository, db, dest, when, txid, replace, dry_run,
                                                                  json_out, only_empty, not no_safety):
            return
        plan = plan_restore(repository, db, dest, snapshot=snap_id, at=when, force=replace,
                            only_empty=only_empty)
        plan.safety = not no_safety
        if dry_run:
            if json_out:
                _print_json({**plan.describe(), **_fallback_json(repository)})
            else:
                _said_fallback(repository)
                d = plan.describe()
                print(f"would restore snapshot {d['snapshot']} of {d['db']} taken {d['taken_at']} to {d['target']}: "
                      f"{d['pages']} pages, {human(d['size'])}, reading {human(d['bytes_to_read'])} "
                      f"from {d['packs']} packs" + (" (replacing the existing file)" if d["replaces_existing"] else ""))
                _said_skipped(d)
            return
        with _progress("restore", not json_out, unit_bytes=True) as bar:
            result = apply_restore(repository, plan, bar)
        s = {**result.summary(), **_fallback_json(repository)}
        if json_out:
            _print_json(s)
        else:
            _said_fallback(repository)
            print(f"restored snapshot {s['snapshot']} of {s['db']} (taken {s['taken_at']}) to {s['target']}: "
                  f"{human(s['size'])} in {s['seconds']:.2f} s")
            _said_skipped(s)
            _said_safety(s, repository.url)

    _run(go)


def _said_skipped(described: dict[str, Any]) -> None:
    """One line on stderr when the choice passed over newer safety snapshots (the states a recovery
    replaced): they exist, and how to get one back."""
    skipped = described.get("skipped_safety_snapshots") or []
    if skipped:
        newest = skipped[0]
        more = f" and {len(skipped) - 1} older" if len(skipped) > 1 else ""
        sid = newest["snapshot"]
        print(f"note: passed over safety snapshot {sid} (taken {newest['taken_at']}){more}: the database a "
              f"restore --force or repair replaced, not the backup history; --snapshot {sid} restores it",
              file=sys.stderr)


# `last-good` is a command of its own, not `restore --last-good`: restore requires --to and writes a file,
# and most of its options (--force, --follow, --if-*, --dry-run, --snapshot/--at/--txid) would conflict with
# a search that writes nothing and ends by printing the restore command it found, to run (or not) after.
@app.command("last-good")
def last_good(
    repo: RepoOpt,
    db: DbNameOpt,
    check: Annotated[list[str] | None, typer.Option("--check", metavar="SQL", help="A read-only statement whose "
                                                    "first column of the first row must be true (non-zero), e.g. "
                                                    "\"SELECT count(*) > 1000 FROM orders\" (repeat for more).")
                     ] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="TIME", help="ISO-8601 time: search from the "
                                              "point `restore --at` would take (default: the oldest point).")] = None,
    expectations: Annotated[Path | None, typer.Option("--expectations", metavar="DIR", help="Also run the GX suites "
                                                      "of --db under DIR (DIR/<db>/ or DIR) on each point that "
                                                      "passes the other checks; restored to a temporary file "
                                                      "for that only.")] = None,
    quick: Annotated[bool, typer.Option("--quick-check", help="PRAGMA quick_check instead of integrity_check on "
                                        "every state (the default uses quick_check above 1 GiB).")] = False,
    to: Annotated[str | None, typer.Option("--to", metavar="PATH", help="The file the printed restore command "
                                           "restores to (default: DB-last-good.db).")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Find the newest good point of a database without restoring it: the newest state (every snapshot but safety
    ones and, when replicated, every transaction of the PITR window) that passes PRAGMA integrity_check, each
    --check and, with --expectations, its GX suites. Each probe queries the state in place (read-only, nothing
    restored), except the suites, which need a temporary restored copy. It bisects: the newest point first (good:
    done), then the --since point (or the oldest; bad: nothing good, exit 1), then halves the gap, about log2(n)
    probes. It assumes the timeline is good up to some point and bad from the next on: it finds that boundary, the
    newest good point before the oldest one it saw bad, not every good point. Prints each probe as it ends, then the
    `dbre restore` command for the point found. A --check that does not parse or writes is refused before any
    probe (exit 2)."""

    def go() -> None:
        import sys

        from dbre.errors import DbreError
        from dbre.repository.manifest import check_db_name, iso, parse_time
        from dbre.repository.repo import Repository
        from dbre.restore.lastgood import Probe, check_syntax, find_last_good
        from dbre.validate.drill import drill_suites

        check_db_name(db)
        when = parse_time(since) if since else None
        checks = list(check or [])
        check_syntax(checks)  # (before the repository is opened: a typo costs no request)
        suites = drill_suites(expectations, db) if expectations is not None else None
        repository = Repository.open(repo, _key(key_file))
        widths = (32, 26, 6)
        result_rows: list[Probe] = []

        def row(p: Probe) -> None:
            if not result_rows:  # (the header with the first row: a refused check prints nothing on stdout)
                print(f"{'time':<{widths[0]}} {'point':<{widths[1]}} {'result':<{widths[2]}} failed check")
            result_rows.append(p)
            why = f"{p.failed}: {p.detail}" if p.failed else (p.integrity or "")
            if p.restored_for_expectations:
                why += " (suites on a temporary restore)" if p.good else ""
            print(f"{p.time:<{widths[0]}} {p.point.label():<{widths[1]}} {'good' if p.good else 'BAD':<{widths[2]}} "
                  f"{why}", flush=True)

        result = find_last_good(repository, db, checks, since=when, suites=suites, quick=True if quick else None,
                                on_probe=None if json_out else row)
        target = to or f"{db}-last-good.db"
        command = result.restore_command(repo, target, str(key_file) if key_file else None)
        if json_out:
            _print_json({**result.describe(), "restore_command": command})
        elif result.found is not None:
            f = result.found
            print(f"last good: {f.point.label()} ({f.time}), {len(result.probes)} probes of {result.points} points "
                  f"in {result.seconds:.2f} s" + (f"; the next one, {result.first_bad.point.label()}, is bad"
                                                   if result.first_bad else ""))
            print(f"to restore it:\n  {command}")
        if result.found is None:
            start = iso(when) if when else "the oldest point"
            bad = result.first_bad
            msg = (f"no good point since {start}: {result.lower.label()} fails "
                   f"{bad.failed if bad else 'a check'}")
            if json_out:
                sys.stdout.flush()
                print(f"dbre: {msg}", file=sys.stderr)
                raise typer.Exit(1)
            raise DbreError(msg, "pass an earlier --since, or check the checks")

    _run(go)


def _restore_into(repo: str | None, db: str | None, into: str, namespace: str | None, admin_url: str | None,
                  to: Path | None, snapshot: str | None, at: str | None, txid: int | None, force: bool,
                  dry_run: bool, json_out: bool, key_file: Any, fallback: Any, policy: Any, *unused: Any) -> None:
    """restore --repo R --db NAME --into URL: see dbre/restore/remote_command.py."""
    from dbre.restore.remote_command import check_into_options, run_remote_restore

    for opt, value in (("--repo", repo), ("--db", db)):
        if value is None:
            raise UsageError(f"--into URL needs '{opt}' (it loads a restore from a repository)",
                             "or use --provider turso --into NAME for a Turso fork")
    names = ("--url", "--org", "--database", "--follow", "--no-safety-snapshot",
             "--if-db-not-exists", "--if-replica-exists")
    check_into_options(**{"--to": to, "--txid": txid, **dict(zip(names, unused, strict=True))})
    assert repo is not None and db is not None
    when = _when(db, snapshot, at)
    from dbre.restore.remote import HranaTarget

    HranaTarget(into, None)  # (a bad URL: refused before the repository is opened)
    repository = _open(repo, key_file, fallback, policy)
    run_remote_restore(repository, db, into, _token(), namespace=namespace, admin_url=admin_url,
                       snapshot=None if snapshot == "latest" else snapshot, newest_snapshot=snapshot == "latest",
                       at=when, force=force, dry_run=dry_run, json_out=json_out,
                       progress=lambda: _progress("load", not json_out))


def _say(json_out: bool, record: dict[str, Any], line: str) -> None:
    if json_out:
        _print_json(record)
    else:
        print(line)


def _no_replica(repo: str, db: str, key_file: Any, json_out: bool = False) -> bool:
    """For --if-replica-exists: whether there is nothing to restore ``db`` from (no repository at
    ``repo``, or no snapshot of ``db`` in it); if so, says so in one line. An unreachable store or a
    wrong key is still an error."""
    from dbre.errors import RepositoryError
    from dbre.repository.manifest import check_db_name
    from dbre.repository.repo import Repository
    from dbre.storage import open_store

    check_db_name(db)
    try:
        repository = Repository.open(repo, _key(key_file))
    except RepositoryError as err:
        if open_store(repo).exists("config") or "holds data but no config" in err.message:
            raise  # (a repository that lost its config is not "no replica": the on-call must hear of it)
        missing = True
    else:
        missing = not repository.list_snapshot_refs(db)
    if missing:
        _say(json_out, {"restored": False, "db": db, "reason": "no replica"},
             f"no snapshot of {db} in {repo}: nothing restored (--if-replica-exists)")
    return missing


def _said_safety(s: dict[str, Any], url: str) -> None:
    """The line that says where the replaced database went (restore --force over a database), with the
    whole command that brings it back (to a new file beside the target: nothing is replaced again)."""
    if s.get("safety_snapshot"):
        import shlex

        target = Path(s["target"])
        back = target.with_name(target.stem + "-replaced" + target.suffix)
        print(f"the database it replaced is safety snapshot {s['safety_snapshot']} (tagged safety, kept 7 days); "
              f"to get it back: dbre restore --repo {shlex.quote(url)} --db {shlex.quote(s['db'])} "
              f"--snapshot {s['safety_snapshot']} --to {shlex.quote(str(back))}")


FallbackOpt = Annotated[list[str] | None, typer.Option(
    "--fallback", metavar="REPO", help="An offsite copy (`dbre copy --to`) to read each object from that is "
    "missing or damaged in --repo, checked as strictly; one line per object taken (repeat for more).")]
FallbackPolicyOpt = Annotated[Path | None, typer.Option(
    "--policy", help="Policy file: its repositories.offsite entries are the --fallback copies.")]


def _open(repo: str, key_file: Any, fallback: list[str] | None, policy: Path | None) -> Any:
    """The repository, reading through the --fallback copies and the policy's offsite ones (if any)."""
    from dbre.repository.fallback import open_with_fallbacks

    copies = list(fallback or [])
    if policy is not None:
        from dbre.policy import load_policy

        copies += load_policy(policy).repositories.offsite
    return open_with_fallbacks(repo, _key(key_file), copies)


def _fallback_json(repository: Any) -> dict[str, Any]:
    """The "fallback" part of --json (only when copies were given): objects taken from them."""
    from dbre.repository.fallback import FallbackRepository

    return {"fallback": repository.describe_fallback()} if isinstance(repository, FallbackRepository) else {}


def _said_fallback(repository: Any) -> None:
    """One line per object read from an offsite copy."""
    from dbre.repository.fallback import FallbackRepository

    if isinstance(repository, FallbackRepository):
        for line in repository.fallback_lines():
            print(line)


def _restore_pitr(repository: Any, db: str, to: Path, when: Any, txid: int | None, force: bool, dry_run: bool,
                  json_out: bool, only_empty: bool = False, safety: bool = True) -> bool:
    """Restore from replicated segments when they cover the time (or txid; with neither, when they
    hold a newer state than the newest snapshot); False: use snapshots."""
    from dbre.replicate.segment import to_time
    from dbre.repository.manifest import iso
    from dbre.restore.pitr import apply_pitr, plan_pitr

    plan = plan_pitr(repository, db, to, at=when, txid=txid, force=force, only_empty=only_empty)
    if plan is None:
        return False
    plan.safety = safety
    newest = when is None and txid is None
    if dry_run:
        d = {**plan.describe(), **_fallback_json(repository)}
        if json_out:
            _print_json(d)
            return True
        _said_fallback(repository)
        if newest:
            last = plan.segments[-1]
            print(f"would restore the newest replicated state of {db} (txid {last.last}, committed "
                  f"{iso(to_time(last.last_us))}) from snapshot {d['snapshot']} (taken {d['taken_at']}) and "
                  f"{d['segments']} segments of generation {d['generation']} to {d['target']}")
        else:
            print(f"would restore {db} from snapshot {d['snapshot']} (taken {d['taken_at']}) and {d['segments']} "
                  f"segments of generation {d['generation']} to {d['target']}")
        return True
    s = {**apply_pitr(repository, plan).summary(), **_fallback_json(repository)}
    if json_out:
        _print_json(s)
    else:
        _said_fallback(repository)
        what = ("the newest replicated state" if newest else
                f"at {s['at']}" if s["at"] else f"at txid {s['txid']}")
        print(f"restored {db} {what} to {s['target']}: snapshot {s['snapshot']} + {s['transactions']} transactions "
              f"(last txid {s['last_txid']}, {_committed(s.get('last_committed'))}) in {s['seconds']:.2f} s")
        _said_safety(s, repository.url)
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
    fallback: FallbackOpt = None,
    policy: FallbackPolicyOpt = None,
) -> None:
    """Restore tables of a snapshot into the live database: as TABLE_restored, or in place with --replace."""

    def go() -> None:
        from dbre.restore.table import apply_table_restore, plan_table_restore

        when = _when(db, snapshot, at)
        repository = _open(repo, key_file, fallback, policy)
        plan = plan_table_restore(repository, db, live, table, snapshot=snapshot, at=when,
                                  mode="replace" if replace else "rename", suffix=suffix)
        with plan:
            d = {**plan.describe(), **_fallback_json(repository)}
            if not apply:
                if json_out:
                    _print_json({"dry_run": True, **d})
                    return
                _said_fallback(repository)
                print(f"restore of {', '.join(table)} into {d['live']} {_read_from(d)} (dry run)")
                _table(f"{d['mode']} mode", ["table", "action", "as", "rows", "live rows"],
                       [[a["table"], a["action"], a["target"], a["snapshot_rows"],
                         "-" if a["live_rows"] is None else a["live_rows"]] for a in d["tables"]],
                       whole={"table", "as"}, priority=["action", "rows", "live rows"])
                for a in d["tables"]:
                    for stmt in a["statements"]:
                        print(stmt + ";")
                    for why in a["skipped"]:
                        print(f"-- not created: {why}")
                if replace:
                    print("a safety snapshot of the live database is taken first")
                print("dry run: nothing changed; pass --apply to restore")
                return
            result = apply_table_restore(plan, allow_fk_violations=allow_fk_violations, key_file=key_file)
        s = {**result.summary(), **_fallback_json(repository)}
        if json_out:
            _print_json(s)
            return
        _said_fallback(repository)
        for a in s["tables"]:
            verb = {"create copy": "restored as", "replace": "replaced"}.get(a["action"], "recreated")
            print(f"{a['table']}: {verb} {a['target']} ({a['snapshot_rows']} rows from snapshot {s['snapshot']})")
        if s["safety_snapshot"]:
            print(f"safety snapshot {s['safety_snapshot']} of the live database taken first")
        print("to undo:" if len(s["undo"]) == 1 else "to undo, run each:", *s["undo"], sep="\n  ")
        print(f"audit record {s['audit_record']}")

    _run(go)


@app.command("repair-rows")
def repair_rows(
    repo: RepoOpt,
    db: DbNameOpt,
    live: Annotated[str, typer.Option("--live", metavar="SOURCE", help="The live database: a file, or a libsql:// / "
                                      "https:// URL (token in LIBSQL_AUTH_TOKEN or TURSO_AUTH_TOKEN).")],
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
    fallback: FallbackOpt = None,
    policy: FallbackPolicyOpt = None,
) -> None:
    """Put rows selected by --where back as a snapshot has them: diff by primary key, then --apply."""

    def go() -> None:
        from dbre.restore.rows import apply_row_repair, check_where, plan_row_repair

        when = _when(db, snapshot, at)
        check_where(where)
        repository = _open(repo, key_file, fallback, policy)
        plan = plan_row_repair(repository, db, live, table, where, snapshot=snapshot, at=when,
                               delete_extra=delete_extra, max_rows=max_rows, preview_rows=max(preview, 0),
                               token=_token(), fire_triggers=fire_triggers)
        with plan:
            d = {**plan.describe(), **_fallback_json(repository)}
            if not apply or not plan.changes:
                if json_out:
                    _print_json({"dry_run": not apply, **d})
                    return
                _said_fallback(repository)
                print(f"repair of {d['table']} where {d['where']} in {d['live']} {_read_from(d)}"
                      + ("" if apply else " (dry run)") + f": {d['snapshot_rows']} rows "
                      f"selected in the past state, {d['live_rows']} in live")
                _table("diff", ["kind", "rows"], [[k.replace("_", " "), v] for k, v in d["counts"].items()])
                if d["preview"]:
                    _table(f"first {preview} rows of each kind", ["action", "key", "values"],
                           [[p["action"], p["key"], p["detail"]] for p in d["preview"]], whole={"key"})
                if d["effects"]:
                    _table("beyond these rows: other tables and triggers", ["table", "through", "rows", "when applied"],
                           [[e["table"], e["through"], "?" if e["rows"] is None else e["rows"], e["when_applied"]]
                            for e in d["effects"]], whole={"table"}, priority=["through", "when applied", "rows"])
                print("nothing to repair" if not plan.changes
                      else "dry run: nothing changed; pass --apply to repair")
                return
            result = apply_row_repair(plan, allow_fk_violations=allow_fk_violations, fire_triggers=fire_triggers,
                                      key_file=key_file)
        s = {**result.summary(), "undo": result.undo_command(key_file), **_fallback_json(repository)}
        if json_out:
            _print_json(s)
            return
        _said_fallback(repository)
        kept = "" if delete_extra else f", {len(plan.extras)} rows only in live kept"
        print(f"{s['table']}: inserted {s['inserted']}, updated {s['updated']}, deleted {s['deleted']} rows from "
              f"snapshot {s['snapshot']}{kept}; audit record {s['audit_record']}")
        if s["undo"]:
            dry = "" if s["undo"].endswith("--apply") or " --apply " in s["undo"] else \
                " (a dry run: read its plan, then add --apply)"
            print(f"safety snapshot {s['safety_snapshot']} holds the database as it was; to undo{dry}:\n  {s['undo']}")

    _run(go)


def _committed(when: str | None) -> str:
    """When the last applied transaction was committed (none applied: the base snapshot's state)."""
    return f"committed {when}" if when else "no transaction after the base"


def _read_from(d: dict[str, Any]) -> str:
    """Where a table restore or row repair reads its past state: a snapshot, or a replicated point."""
    if d.get("last_txid") is not None:
        return (f"at transaction {d['last_txid']} ({_committed(d.get('last_committed'))}; generation "
                f"{d.get('generation')}, {d.get('transactions')} transactions over snapshot {d['snapshot']})")
    return f"from snapshot {d['snapshot']} (taken {d['taken_at']})"
