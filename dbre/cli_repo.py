"""Repository upkeep: `dbre verify`, `forget` (and prune), `copy` offsite, `migrate` to format 2, `unlock`.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from dbre.cli import (
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    PolicyOpt,
    RepoOpt,
    _duration,
    _key,
    _policy,
    _print_json,
    _progress,
    _run,
    _table,
    app,
)
from dbre.errors import RepositoryError, UsageError
from dbre.units import human_bytes as human


@app.command()
def init(
    repo: Annotated[str | None, typer.Option(
        "--repo", "-r", help="Repository: a local path or s3://bucket/prefix (default: the policy's, all of them).",
    )] = None,
    object_lock: Annotated[str | None, typer.Option(
        "--object-lock", help="S3 Object Lock for every object a snapshot needs: MODE:PERIOD, e.g. governance:30d "
        "or compliance:1y (the bucket must have Object Lock enabled; the setting cannot be changed later).",
    )] = None,
    policy: PolicyOpt = None,
    key_file: KeyFileOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a repository (backup also creates one); --object-lock makes its objects immutable on S3."""

    def go() -> None:
        from dbre.repository.immutable import ObjectLock, enable
        from dbre.repository.repo import Repository

        setting = ObjectLock.parse(object_lock) if object_lock else None
        targets: list[tuple[str, ObjectLock | None]] = []
        if repo:
            targets = [(repo, setting)]
        else:
            pol = _policy(policy)
            if pol is None:
                raise UsageError("init needs --repo or --policy", "e.g. dbre init --repo s3://bucket/repo")
            if setting is not None:
                raise UsageError("--object-lock with --policy", "set repositories.*.object_lock in the policy")
            r = pol.repositories
            targets = [(u, r.lock_for(u)) for u in [r.primary, *r.offsite]]
        for url, lock in targets:
            if lock is not None and not url.startswith("s3://"):
                raise UsageError(f"--object-lock: repository {url} is not on S3: Object Lock needs an S3 bucket",
                                 "drop --object-lock, or use s3://bucket/prefix on a bucket with Object Lock enabled")
        key = _key(key_file)
        first: Repository | None = None
        made = []
        for url, lock in targets:
            found = Repository.open_or_init(url, key) if first is None else Repository.init_copy_of(first, url, key)
            first = first or found
            enabled = bool(lock and enable(found, lock))
            what = f"Object Lock {lock.describe()}" if enabled and lock else (
                f"Object Lock {lock.describe()} (already)" if lock else "no Object Lock")
            made.append({"repository": found.url, "id": found.id,
                         "object_lock": lock.describe() if lock else None, "object_lock_set_now": enabled})
            if not json_out:
                print(f"repository {found.url}: id {found.id[:8]}, {what}")
        if json_out:
            _print_json(made, "repositories")

    _run(go)


@app.command()
def verify(
    repo: RepoOpt,
    db: DbOpt = None,
    read_data: Annotated[bool, typer.Option(
        "--read-data", help="Also read every pack: each page checked against its record, index and hash.",
    )] = False,
    immutable: Annotated[bool, typer.Option(
        "--immutable", help="Prove every snapshot inside the Object Lock window restores from locked versions "
        "alone (reads every page; ignores delete markers and unlocked versions).",
    )] = False,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Check snapshots and packs; exit 1 naming every damaged or missing object."""

    def go() -> None:
        if immutable:
            if db:
                raise UsageError("--immutable checks every database", "leave out --db")
            from dbre.repository.immutable import verify_immutable

            found = verify_immutable(repo, _key(key_file))
            if json_out:
                _print_json(found.summary())
            else:
                for obj, detail in found.problems:
                    print(f"NOT PROTECTED {obj}: {detail}", file=sys.stderr)
                for name in found.hidden:
                    print(f"HIDDEN {name}: its locked manifest is hidden by a delete marker, so `dbre restore` does "
                          "not see it (a rollback): recover with `dbre copy --repo URL --to NEW --immutable`",
                          file=sys.stderr)
                for name, why in found.outside:
                    print(f"outside the lock window: {name}: {why}")
                lock = found.setting.describe() if found.setting else "none"
                n = len(found.problems)
                print(("ok: " if found.ok else f"{n} problem{'s' if n != 1 else ''}: ")
                      + f"{len(found.protected)} snapshots restore from locked versions alone (Object Lock {lock}); "
                      f"{len(found.outside)} outside the window"
                      + (f"; {found.segments} replicated segments checked" if found.segments else "")
                      + (f"; {len(found.hidden)} hidden by delete markers" if found.hidden else ""))
            if not found.ok:
                raise typer.Exit(1)
            return
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.repository.verify import verify as run_verify

        repository = Repository.open(repo, _key(key_file))
        if db:
            check_db_name(db)
            repository.require_db(db)
        from dbre.replicate.check import verify_segments

        with repository.read_lock("verify"):  # (over both: a prune waits for, or is refused beside, the segments too)
            with _progress("verify", not json_out) as bar:
                report = run_verify(repository, db, read_data=read_data, progress=bar)
            segments, segment_problems = verify_segments(repository, db)  # replicated chains, end to end
        if json_out:
            _print_json({"repository": repository.url, **report.summary(), "segments": segments,
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
            print(("ok: " if not n else f"{n} problem{'s' if n != 1 else ''}: ") + what)
            unopened = sum(1 for p in report.problems if p.detail.startswith("cannot read manifest"))
            if report.snapshots == 0 and unopened >= 2:  # (as backup refuses then: see _refuse_if_no_manifest_opens)
                print(f"no snapshot manifest opens ({unopened} tried): the config may be another repository's or "
                      "replaced; put this repository's config back (`dbre copy` keeps one offsite) before anything "
                      "else")
            if report.damaged:
                print(f"snapshots that cannot be restored: {', '.join(sorted(report.damaged))}; the next "
                      "`dbre backup` stores the pages of missing packs again, but an incremental one reuses a "
                      "damaged page batch as it is: run `dbre backup --full` to store every page again")
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
        from dbre.metrics import store_bytes
        from dbre.repository.keep import parse_count
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.repository.retention import KeepPolicy, forget
        from dbre.units import human_bytes

        counts = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily, "weekly": keep_weekly,
                  "monthly": keep_monthly, "yearly": keep_yearly}
        policy = KeepPolicy(**{k: parse_count(v, f"--keep-{k}") for k, v in counts.items()}, within=keep_within,
                            timezone=keep_tz)
        policy.check()
        grace_seconds = _duration(grace, "--grace")
        if db:
            check_db_name(db)
        repository = Repository.open(repo, _key(key_file))
        measure = prune_packs and not dry_run
        before = store_bytes(repository) if measure else None  # what the prune frees, said after it
        # planned and applied under one exclusive lock (a dry run: a shared one, deleting nothing)
        plan, pplan = forget(repository, policy, db, dry_run=dry_run, prune=prune_packs, grace=grace_seconds)
        out: dict[str, Any] = {"dry_run": dry_run, **plan.describe()}
        if pplan is not None:
            out["prune"] = pplan.describe()
            after = store_bytes(repository) if before is not None else None
            if before is not None and after is not None:  # (net: a backup running beside it adds meanwhile)
                out["prune"].update(storage_bytes_before=before, storage_bytes_after=after,
                                    freed_bytes=max(0, before - after))
        if json_out:
            _print_json(out)
            return
        rows = [[m.id, m.db, m.taken_at[:19], "keep", ", ".join(r)] for m, r in plan.keep]
        rows += [[m.id, m.db, m.taken_at[:19], "forget" if not dry_run else "would forget", ""] for m in plan.remove]
        rows += [[m.id, m.db, m.taken_at[:19], "keep", f"locked until {u}"] for m, u in
                 ((m, d["locked_until"]) for (m, _), d in zip(plan.locked, out["locked"], strict=True))]
        rows.sort(key=lambda r: (r[1], r[2]))
        title = "retention" + (" (dry run)" if dry_run else "")
        _table(title, ["id", "db", "taken at (UTC)", "action", "kept by"], rows,
               whole={"id", "db", "taken at (UTC)", "action"})
        if "prune" in out:
            p = out["prune"]
            verb = "would delete" if dry_run else "deleted"
            print(f"prune: {verb} {p['delete_packs']} unused packs, kept {p['keep_packs']} in use and "
                  f"{p['grace_kept_packs']} unused but younger than the grace period ({grace})")
            if "freed_bytes" in p:
                kept = (" (their locked versions stay billed until retention ends)"
                        if repository.object_lock is not None else "")
                print(f"prune: freed {human_bytes(p['freed_bytes'])}: the repository went from "
                      f"{human_bytes(p['storage_bytes_before'])} to {human_bytes(p['storage_bytes_after'])}{kept}")
            if p["locked_kept"]:
                last = max(x["locked_until"] for x in p["locked_kept"])
                print(f"prune: kept {len(p['locked_kept'])} unused objects under Object Lock (locked until {last} "
                      "at the latest); a later prune deletes them")
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


@app.command()
def copy(
    repo: RepoOpt,
    to: Annotated[str, typer.Option("--to", help="The offsite repository: a path or s3://bucket/prefix.")],
    db: DbOpt = None,
    immutable: Annotated[bool, typer.Option(
        "--immutable", help="Copy from the locked versions alone (recovery after an attack on an Object Lock "
        "bucket: delete markers, overwritten and unlocked objects are ignored; nothing there is changed).",
    )] = False,
    object_lock: Annotated[str | None, typer.Option(
        "--object-lock", help="Make the offsite copy immutable (S3 Object Lock, MODE:PERIOD, e.g. compliance:30d) "
        "before anything is copied; a copy that has a setting keeps it (it cannot change).",
    )] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Copy snapshots not yet there to a second repository (the offsite layer)."""

    def go() -> None:
        from dbre.repository.copy import copy_snapshots
        from dbre.repository.immutable import ObjectLock, enable
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.storage import open_store, overlap

        if db:
            check_db_name(db)
        setting = ObjectLock.parse(object_lock) if object_lock else None
        if setting is not None and not to.startswith("s3://"):
            raise UsageError(f"--object-lock: repository {to} is not on S3: Object Lock needs an S3 bucket",
                             "drop --object-lock, or copy to s3://bucket/prefix on a bucket with Object Lock enabled")
        src_store, dst_store = open_store(repo), open_store(to)
        # the same place however spelled (a trailing slash, a relative path, a symlinked folder, s3://b/p/),
        # or one inside the other: a copy in the primary's folder is lost with it, and counted in its size
        where = overlap(src_store, dst_store)
        if where == "same":
            raise UsageError(f"copy: --to is the repository being copied from ({src_store.url})",
                             "name another location for the offsite copy: a folder or s3://bucket/prefix")
        if where == "inside":
            raise UsageError(f"copy: --to {dst_store.url} and the repository {src_store.url} lie one inside the other",
                             "name a location outside the repository for the offsite copy (another disk or bucket)")
        key = _key(key_file)
        if immutable:
            from dbre.repository.immutable import open_locked

            src = open_locked(src_store, key)
        else:
            src = Repository.open(src_store, key)
        dst = Repository.init_copy_of(src, dst_store, key)
        if setting is not None:
            enable(dst, setting)
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
    json_out: JsonOpt = False,
) -> None:
    """Remove locks left by runs that died."""

    def go() -> None:
        import time

        from dbre.repository.lock import STALE_SECONDS, list_locks, remove_locks
        from dbre.repository.repo import Repository
        from dbre.storage import open_store

        store = open_store(repo)
        if Repository.read_config(store) is None:
            raise RepositoryError(f"no repository at {store.url}", "check --repo")  # (exit 1, as every command)
        removed = remove_locks(store, all_locks=remove_all)
        left = list_locks(store)  # live (or young) ones: say whose, and what removes them
        if json_out:
            _print_json({"repository": store.url, "removed": removed, "remove_all": remove_all,
                         "remaining": [{"key": i.key, "op": i.record.get("op"), "host": i.record.get("host"),
                                        "pid": i.record.get("pid"), "modified": i.modified} for i in left]})
            return
        print(f"removed {removed} locks")
        if left:
            now = time.time()
            for info in left:
                age = now - info.modified
                when = (f"written {age:.0f} s ago" if age >= 0 else
                        f"dated {-age:.0f} s in the future (a clock ahead, or planted)")
                print(f"kept: {info.describe()}, {when}")
            print(f"{len(left)} locks kept: their runs may be alive (a lock is stale {STALE_SECONDS:.0f} s after "
                  "its last refresh, or at once when its process on this host is gone); if you know they "
                  "are dead, `dbre unlock --remove-all` removes them")

    _run(go)
