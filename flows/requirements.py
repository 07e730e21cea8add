"""Requirements report (quarterly): measure every database, check the policy's targets, project storage
and cost, write the report, backup policy, recovery runbook and DR plan, and publish them as artifacts."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dbre.report.requirements_docs import action_command, installation
from dbre.report.requirements_model import MET, NO_TARGET, RequirementsReport
from dbre.units import human_bytes as fmt_bytes
from flows.common import POLICY_ENV, ReportSite, load, md_table, publish, report_folder, reports_site, repos, where
from flows.names import from_parameters, requirements_name
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.report import analyze_requirements, cli_commands, write_requirements_documents

DOCUMENTS = [("report.html", "requirements report (HTML)"), ("report.md", "requirements report (Markdown)"),
             ("backup-policy.md", "backup policy"), ("recovery-runbook.md", "recovery runbook"),
             ("dr-plan.md", "disaster-recovery plan")]


def _run_name(out_dir: str | None = None, **params: Any) -> str:
    """The run's name: without out_dir, the report goes to the reports folder (not "to None")."""
    return requirements_name(out_dir or "the reports folder", **params)


@store_references_only
@flow(name="dbre-requirements-report", flow_run_name=from_parameters(_run_name, "requirements report"),
      persist_result=False)
def requirements_report_flow(out_dir: str | None = None, policy: str | None = None,
                             repo: str | None = None, key: KeyRef = None, sources: dict[str, str] | None = None,
                             expectations: str | None = "expectations", storage_gb_month: float | None = None,
                             put_per_1000: float | None = None, get_per_1000: float | None = None,
                             restore_throughput: float | None = None, dated: bool = True) -> dict[str, Any]:
    """Analyse every database (the policy's, given ``sources`` {name: path or URL}, and those in the
    repository) and write the documents into ``out_dir`` (a dated subfolder unless ``dated`` is false; default
    ``requirements/`` in the reports folder: the policy's reports.dir, else the worker's data dir).
    Prices default to the policy's ``costs``; ``restore_throughput`` (bytes/s) skips the restore probe."""
    refuse_literal_secrets("requirements", key=key)
    log = get_run_logger()
    pol = load(policy)
    policy_path = policy or os.environ.get(POLICY_ENV) or None
    r = repos(pol, repo, None, key)
    prices = {k: v for k, v in (("storage_gb_month", storage_gb_month), ("put_per_1000", put_per_1000),
                                ("get_per_1000", get_per_1000)) if v is not None}
    report = analyze_requirements(r.primary, r.key, policy_path, sources, expectations, prices or None,
                                  restore_throughput)
    site = reports_site(pol)
    folder = report_folder(site, out_dir, "requirements")
    target = folder / datetime.now(UTC).strftime("%Y-%m-%d") if dated else folder
    paths = write_requirements_documents(report, str(target), policy_path)
    counts = report.status_counts()
    log.info("requirements of %d databases: %d targets met, %d at risk, %d not met; documents in %s",
             len(report.databases), counts[MET], counts["at risk"], counts["not met"], target)
    _publish(report, paths, pol, site, target)
    return {"out_dir": str(target), "files": paths, "targets": counts,
            "recommendations": len(report.recommendations)}


def _publish(report: RequirementsReport, paths: dict[str, str], pol: Any, site: ReportSite, target: Path) -> None:
    counts = report.status_counts()
    stor = [d.storage for d in report.databases if d.storage]
    cur = report.prices.currency
    rows = [{"db": c.db, "target": c.target, "objective": c.objective, "measured": c.measured, "status": c.status,
             "reason": c.reason} for d in report.databases for c in d.checks]
    missed = [x for x in rows if x["status"] not in (MET, NO_TARGET)]
    inst = installation(report, pol, cli_commands())
    md = ["# Backup and recovery requirements", "",
          f"Repository `{report.repository}`: {len(report.databases)} databases, "
          f"{sum(len(d.tables) for d in report.databases)} tables, "
          f"{fmt_bytes(sum(d.size for d in report.databases))} now, "
          f"{fmt_bytes(sum(d.size_trend.projected for d in report.databases))} projected in 12 months.", "",
          f"**Targets**: {counts[MET]} met, {counts['at risk']} at risk, {counts['not met']} not met"
          + (f", {counts[NO_TARGET]} without a target" if counts[NO_TARGET] else "") + ".", "",
          f"**Storage** under the retention policy: {cur} {sum(s.total_month_now for s in stor):.4f}/month now, "
          f"{cur} {sum(s.total_month_12m for s in stor):.4f}/month in 12 months.", "",
          "## Targets not met or at risk", "",
          # the table artifact has every target: the summary shows only those that need work
          md_table(missed, ["db", "target", "objective", "measured", "status", "reason"]) if missed
          else f"All {len(rows)} targets met (each is in the table artifact).", "",
          "## Recommendations", ""]
    for i, rec in enumerate(report.recommendations, 1):
        cmd = action_command(rec, inst, report)
        md.append(f"{i}. **{rec.db or 'installation'} · {rec.area}**: {rec.text}" + (f" — `{cmd}`" if cmd else ""))
    md += ["", f"Documents in {where(target, 'the report folder', site)} ({site.origin}):"]
    links = [(paths[name], text) for name, text in DOCUMENTS if name in paths]
    publish("requirements", "\n".join(md), rows, links, description="requirements report", site=site)
