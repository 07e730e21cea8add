"""Proof that backups restore: `dbre drill`, weekly `dbre validate`, and `dbre expectations profile`
(the GX suites both check), on dbre.validate.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import (
    DbNameOpt,
    DbOpt,
    JsonOpt,
    KeyFileOpt,
    PolicyOpt,
    RepoOpt,
    _key,
    _policy,
    _print_json,
    _progress,
    _run,
    _token,
    app,
)
from dbre.errors import UsageError
from dbre.units import human_bytes as human

expectations_app = typer.Typer(help="Great Expectations suites: starter suites from a live database.",
                               no_args_is_help=True)
app.add_typer(expectations_app, name="expectations")

ExpectationsOpt = Annotated[
    Path | None,
    typer.Option("--expectations", help="GX suites: expectations/ (its <db>/ folder is used) or one db's folder."),
]
_CROSS = "Cross-check with the provider's history (--cross-check)"
ScratchOpt = Annotated[Path | None, typer.Option("--scratch-dir", help="Where checked restores go (then removed).")]


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
    target: Annotated[str, typer.Option("--target", help=(
        "newest, random, or an ISO time (of a replicated database: its newest replicated state, "
        "a random moment of its PITR window, that moment)."))] = "newest",
    report_dir: Annotated[Path | None, typer.Option("--report-dir", help="Write the drill report here.")] = None,
    scratch_dir: ScratchOpt = None,
    data_docs: Annotated[bool, typer.Option("--data-docs/--no-data-docs",
                                            help="Also build GX Data Docs into the report folder (self-contained: "
                                                 "they render offline).")] = True,
    namespace_admin: Annotated[str | None, typer.Option(
        "--namespace-admin", help="sqld admin API: also load the restore into a new namespace there.")] = None,
    namespace_url: Annotated[str | None, typer.Option(
        "--namespace-url", help="sqld's HTTP URL, to check the namespace (token: LIBSQL_AUTH_TOKEN).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Its name (default drill-<db>-<time>).")] = None,
    keep_namespace: Annotated[bool, typer.Option("--keep-namespace", help="Keep it after the drill.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the drill record as JSON.")] = False,
    key_file: KeyFileOpt = None,
    cross_check: Annotated[str | None, typer.Option(
        "--cross-check", metavar="PROVIDER", rich_help_panel=_CROSS,
        help="sqld or turso: after the drill, restore the provider's own history at the same time too, run the "
        "same checks on it and compare the two restores table by table (rows and checksum); a disagreement "
        "fails the drill and is named in the report. sqld 0.24: the fork stops the namespace's own bottomless "
        "uploads until sqld restarts (a warning says so).")] = None,
    provider_admin_url: Annotated[str | None, typer.Option(
        "--provider-admin-url", metavar="URL", rich_help_panel=_CROSS,
        help="sqld: its admin API (key in LIBSQL_ADMIN_AUTH_KEY).")] = None,
    provider_namespace: Annotated[str | None, typer.Option(
        "--provider-namespace", metavar="NAME", rich_help_panel=_CROSS,
        help="sqld: the namespace dbre backs up as --db.")] = None,
    provider_url: Annotated[str | None, typer.Option(
        "--provider-url", metavar="URL", rich_help_panel=_CROSS,
        help="sqld: its HTTP address, to read the fork (token in LIBSQL_AUTH_TOKEN).")] = None,
    provider_org: Annotated[str | None, typer.Option(
        "--provider-org", metavar="ORG", rich_help_panel=_CROSS,
        help="turso: the organization (Platform API token in TURSO_API_TOKEN).")] = None,
    provider_database: Annotated[str | None, typer.Option(
        "--provider-database", metavar="NAME", rich_help_panel=_CROSS,
        help="turso: the database dbre backs up as --db.")] = None,
) -> None:
    """Recovery drill: restore to scratch, validate, measure RTO and RPO; exit 1 naming every failure.
    With --cross-check, the provider's own history at the drill's time is restored and checked too, and
    the drill says per table whether the two independent backups agree."""

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
        cc_target = _cross_check_target(cross_check, provider_admin_url, provider_namespace, provider_url,
                                        provider_org, provider_database)
        repository = Repository.open(repo, _key(key_file))
        docs_tmp = None
        if report_dir is not None:
            from dbre.report.drill import check_writable

            check_writable(report_dir, "--report-dir")  # before the drill, not after its restore
        if report_dir is not None and data_docs and suites is not None:
            docs_tmp = report_dir / f".data-docs-{secrets.token_hex(4)}"
        try:
            outcome = run_drill(repository, db, target=target, targets=targets, expectations=suites,
                                scratch_dir=scratch, data_docs_dir=docs_tmp, namespace=ns_target,
                                cross_check=cc_target)
            record = outcome.record
            if report_dir is not None:
                from dbre.report.drill import report_folder, write_drill_report

                try:
                    folder = report_folder(report_dir, record)
                    folder.mkdir(parents=True, exist_ok=True)
                    if docs_tmp is not None and docs_tmp.exists():
                        shutil.rmtree(folder / "data-docs", ignore_errors=True)
                        docs_tmp.rename(folder / "data-docs")
                    paths = write_drill_report(report_dir, record, repository.records("drills", db),
                                               outcome.checks, outcome.suite_run)
                    record = {**record, "report": paths["html"], "report_markdown": paths["markdown"]}
                except OSError as err:  # (a full disk, a folder made read-only during the drill)
                    # the drill happened and its record is in the repository: its verdict still counts
                    print(f"warning: the drill report could not be written to {report_dir} "
                          f"({err.strerror or err}); its record is in the repository (`dbre status` "
                          f"shows the last drill)", file=sys.stderr)
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
            pit = record.get("point_in_time")
            if pit:
                print(f"point in time {pit['at'] or 'newest replicated state'}: {pit['transactions']} transactions "
                      f"from {pit['segments']} segments applied (last txid {pit['last_txid']}, committed "
                      f"{pit['last_committed']})")
            cc = record.get("cross_check")
            if cc:
                print(cross_check_line(cc))
                if cc.get("warning"):
                    print(f"dbre: warning: {cc['warning']}", file=sys.stderr)
            if record.get("report"):
                print(f"report: {record['report']}")
        if not record["passed"]:
            for f in record["failures"]:
                print(f"dbre: drill of {db}: {f}", file=sys.stderr)
            raise typer.Exit(1)

    _run(go)


def _cross_check_target(provider: str | None, admin_url: str | None, namespace: str | None, url: str | None,
                        org: str | None, database: str | None) -> Any:
    """The --cross-check target (None without it), with the keys from the environment."""
    import os

    from dbre.secrets import Secret

    given = [o for o, v in (("--provider-admin-url", admin_url), ("--provider-namespace", namespace),
                            ("--provider-url", url), ("--provider-org", org), ("--provider-database", database)) if v]
    if provider is None:
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --cross-check",
                             "add --cross-check sqld or --cross-check turso")
        return None
    from dbre.validate.crosscheck import CrossCheckTarget

    def env(name: str) -> Secret | None:
        value = os.environ.get(name, "").strip()
        return Secret(value) if value else None

    return CrossCheckTarget(provider, admin_url, namespace, url, org, database, token=_token(),
                            admin_key=env("LIBSQL_ADMIN_AUTH_KEY" if provider == "sqld" else "TURSO_API_TOKEN"),
                            api_url=os.environ.get("TURSO_API_BASE_URL", "").strip() or None)


def cross_check_line(cc: dict[str, Any]) -> str:
    """The cross-check in one line: agree, or which tables differ and how."""
    head = f"cross-check with {cc['provider']} ({cc['source']}) at {cc['at']}: "
    if cc["error"]:
        return head + f"not done: {cc['error']}"
    if cc["agree"]:
        return head + (f"agree: {cc['tables_agree']} tables with the same rows and checksum in both restores "
                       "(two independent backups agree)")
    differ = [f"{t['table']} ({t['how']})" for t in cc["tables"] if not t["agree"]]
    return head + "DIFFER: " + "; ".join(differ + cc["checks_differ"] + [f"GX {g}" for g in
                                                                       cc["expectations"]["differ"]])


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
