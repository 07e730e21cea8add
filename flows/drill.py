"""Recovery drill (monthly): for each database, restore to scratch, validate, measure RTO and RPO
against the policy, store the drill record, render the report; the run fails naming every failure."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from dbre.errors import DbreError
from dbre.report.drill import check_writable, seconds_text
from dbre.validate.crosscheck import CrossCheckTarget
from dbre.validate.drill import Drill, cross_check_step
from dbre.validate.suites import Suite
from flows.common import (
    MARKDOWN_LIMIT,
    ReportSite,
    RunFailed,
    load,
    publish,
    report_folder,
    reports_site,
    repos,
    truncate,
    where,
)
from flows.names import drill_name, from_parameters
from flows.references import KeyRef, TokenRef, refuse_literal_secrets, store_references_only
from tasks.retry import HOUR, NO_RESULTS
from tasks.secrets import resolve_secret, resolve_token
from tasks.validate import (
    drill_report,
    load_drill_suites,
    record_drill,
    restore_to_scratch,
    start_drill,
    validate_restore,
)


@store_references_only
@flow(name="dbre-drill", flow_run_name=from_parameters(drill_name, "drill"), persist_result=False)
def drill_flow(databases: list[str] | None = None, policy: str | None = None, repo: str | None = None,
               key: KeyRef = None, target: str | None = None, expectations: str | None = None,
               report_dir: str | None = None, scratch_dir: str | None = None, data_docs: bool = True,
               namespace_admin: str | None = None, namespace_url: str | None = None, token: TokenRef = None,
               cross_check: str | None = None, provider_admin_url: str | None = None,
               provider_namespaces: dict[str, str] | None = None, provider_url: str | None = None,
               provider_org: str | None = None, provider_databases: dict[str, str] | None = None,
               provider_key: TokenRef = None) -> list[dict[str, Any]]:
    """Drill each database (the named ones, else the policy's). ``target``: newest, random or an ISO time
    (default: the policy's). ``expectations``: the GX suites folder (default: each database's in the policy).
    ``namespace_admin`` and ``namespace_url`` (sqld's admin API and HTTP URL; ``token`` a reference) also load
    each restore into a new namespace ``drill-<db>-<time>``, left for inspection. ``cross_check`` (sqld or
    turso) also restores the provider's own history at each drill's time and compares the two restores per
    table: sqld needs ``provider_admin_url`` and ``provider_url`` (``provider_namespaces`` maps a database to
    its namespace, default the same name; ``provider_key`` the admin key, else LIBSQL_ADMIN_AUTH_KEY), turso
    ``provider_org`` (``provider_databases`` likewise; ``provider_key`` the Platform API token, else
    TURSO_API_TOKEN). Reports go to ``report_dir``, else ``drills/`` in the reports folder (the policy's
    reports.dir, else the worker's data dir); the run's markdown artifact holds each report."""
    refuse_literal_secrets("drill", key=key, token=token, provider_key=provider_key)
    log = get_run_logger()
    pol = load(policy)
    r = repos(pol, repo, None, key)
    if databases:
        names = list(databases)
    elif pol is not None:
        names = [d.name for d in pol.databases]
    else:
        from dbre.errors import UsageError

        raise UsageError("no databases to drill", "pass databases, or a policy")
    site = reports_site(pol)
    out = report_folder(site, report_dir, "drills")
    check_writable(out, "report_dir")  # before any restore: not a failed run after the drills
    records, reports = [], {}
    for db in names:
        entry = next((d for d in pol.databases if d.name == db), None) if pol else None
        suites_dir = expectations or (entry.expectations if entry else None)
        suites = load_drill_suites(suites_dir, db) if suites_dir else None
        try:
            drill = start_drill(r.primary, db, r.key, target or (pol.drills.target if pol else "newest"),
                                scratch_dir or (pol.drills.scratch_dir if pol else None))
        except DbreError as err:
            # one database that cannot be drilled (no snapshot yet, a name the repository does not hold, a
            # scratch folder that cannot be made) is one failed row: the others are still drilled
            log.error("drill of %s not started: %s", db, err)
            records.append(_not_started(db, entry, str(err)))
            continue
        drill = restore_to_scratch(r.primary, drill, r.key)
        drill = validate_restore(drill, suites, namespace_admin, namespace_url, token)
        if cross_check:
            drill = cross_check_drill(drill, suites, _cross_target(
                cross_check, provider_admin_url, (provider_namespaces or {}).get(db, db), provider_url,
                provider_org, (provider_databases or {}).get(db, db), token, provider_key))
        record = record_drill(r.primary, drill, r.key, float(entry.rpo) if entry else None,
                              float(entry.rto) if entry else None)
        try:
            paths = drill_report(r.primary, drill, record, str(out), r.key, data_docs)
        except OSError as err:  # (a full disk, a folder made read-only during the drill)
            # the drill happened and its record is in the repository: its verdict still decides the run
            log.warning("the drill report of %s could not be written to %s (%s); its record is in the "
                        "repository (the status flow shows the last drill)", db, out, err.strerror or err)
        else:
            record = {**record, "report": paths["html"]}
            reports[db] = paths
        log.info("drill of %s %s: RTO %s, RPO %s", db, "passed" if record["passed"] else "FAILED",
                 seconds_text(record["rto_seconds"]), seconds_text(record["rpo_seconds"]))
        cc = record.get("cross_check") or {}
        if cc:
            log.info("cross-check of %s with %s at %s: %s", db, cc["provider"], cc["at"],
                     "agree" if cc["agree"] else "DIFFER: " + ", ".join(cc["tables_differ"]) if not cc["error"]
                     else f"not done: {cc['error']}")
        if cc.get("warning"):
            log.warning("%s", cc["warning"])
        records.append(record)
    _publish(records, reports, site, out)
    bad = [rec for rec in records if not rec["passed"]]
    if bad:
        raise RunFailed(f"{len(bad)} of {len(records)} drills failed: "
                        + "; ".join(f"{rec['db']}: " + "; ".join(rec["failures"]) for rec in bad))
    return records


def _not_started(db: str, entry: Any, why: str) -> dict[str, Any]:
    """The record of a drill that could not start (not stored in the repository: no restore was measured)."""
    return {"db": db, "snapshot": None, "passed": False, "failures": [f"not started: {why}"],
            "rto_seconds": None, "rpo_seconds": None,
            "rto_target_seconds": float(entry.rto) if entry else None,
            "rpo_target_seconds": float(entry.rpo) if entry else None,
            "checks": {"total": 0, "failed": 0}, "started": False}


@task(name="cross-check", task_run_name="cross-check {drill.db} with {target.provider}", timeout_seconds=6 * HOUR,
      **NO_RESULTS)
def cross_check_drill(drill: Drill, suites: list[Suite] | None, target: CrossCheckTarget) -> Drill:
    """The provider's history at the drill's time: restored, checked the same way, compared per table."""
    cross_check_step(drill, target, suites)
    return drill


def _cross_target(provider: str, admin_url: str | None, namespace: str, url: str | None, org: str | None,
                  database: str, token: str | None, provider_key: str | None) -> CrossCheckTarget:
    import os

    from dbre.secrets import Secret

    env = "LIBSQL_ADMIN_AUTH_KEY" if provider == "sqld" else "TURSO_API_TOKEN"
    key = resolve_secret(provider_key) if provider_key else (
        Secret(os.environ[env].strip()) if os.environ.get(env, "").strip() else None)
    sqld = provider == "sqld"
    return CrossCheckTarget(provider, admin_url if sqld else None, namespace if sqld else None, url if sqld else None,
                            None if sqld else org, None if sqld else database, token=resolve_token(token),
                            admin_key=key, api_url=os.environ.get("TURSO_API_BASE_URL", "").strip() or None)


def _publish(records: list[dict[str, Any]], reports: dict[str, dict[str, str]], site: ReportSite, out: Path) -> None:
    """The run's artifacts: a summary with each database's report in it (read in the UI, nothing to open),
    the figures as a table, links to the report files only when the reports folder is served over http."""
    rows = [{"db": rec["db"], "snapshot": rec["snapshot"], "RTO": seconds_text(rec["rto_seconds"]),
             "RTO target": seconds_text(rec["rto_target_seconds"]), "RPO": seconds_text(rec["rpo_seconds"]),
             "RPO target": seconds_text(rec["rpo_target_seconds"]),
             "checks": f"{rec['checks']['total'] - rec['checks']['failed']}/{rec['checks']['total']}",
             "result": "passed" if rec["passed"] else "FAILED"} for rec in records]
    md = ["# Recovery drill", "",
          f"{sum(1 for rec in records if rec['passed'])} of {len(records)} databases restored, validated and "
          "within their RTO and RPO (figures in the table artifact).", "",
          f"Reports are in {where(out, 'the reports folder', site)} ({site.origin}).", ""]
    budget = (MARKDOWN_LIMIT - 2000) // max(1, len(reports))
    for rec in records:
        if rec.get("started") is False:
            md += [f"## {rec['db']}: FAILED, not started", "", rec["failures"][0], ""]
            continue
        paths = reports.get(rec["db"])
        if paths is None:
            continue
        title, _, body = _served_images(Path(paths["markdown"]), site).partition("\n")
        md += [title, "", where(paths["html"], "HTML report", site)
               + (" · " + where(paths["data-docs"], "Data Docs", site) if "data-docs" in paths else ""),
               truncate(body, budget, paths["markdown"]), ""]
    publish("drill", "\n".join(md), rows, description="recovery drill", site=site)


def _served_images(report: Path, site: ReportSite) -> str:
    """report.md one heading level down (under the run's title), its images (files beside it) pointed at
    their URLs when served, else left out."""
    def image(m: re.Match[str]) -> str:
        url = site.url(report.parent / m.group(2))
        return f"![{m.group(1)}]({url})" if url else ""

    text = _IMAGE.sub(image, report.read_text(encoding="utf-8")).replace("\n\n\n", "\n\n")
    return re.sub(r"(?m)^#", "##", text)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+)\)")
