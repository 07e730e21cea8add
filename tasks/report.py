"""Report tasks: the requirements analysis, and the documents it writes.

The analysis only reads (the repository, the live databases, one restore into a temp folder to
measure throughput), so it is retried on transient errors like any read. The report object goes
from the first task to the second in memory; nothing is persisted in Prefect's result storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dbre.policy import load_policy
from dbre.report.requirements import analyze
from dbre.report.requirements_model import Prices, RequirementsReport
from dbre.repository.repo import Repository
from dbre.sources import open_source
from tasks.retry import HOUR, NO_RESULTS, TASK_OPTIONS
from tasks.secrets import resolve_key, resolve_token


def _sources(policy: Any, sources: dict[str, str] | None) -> dict[str, Any]:
    """Sources by database name: the given ones, else the policy's (tokens resolved here, at the edge)."""
    if sources:
        return {name: open_source(spec, resolve_token(None)) for name, spec in sources.items()}
    if policy is None:
        return {}
    return {d.name: open_source(d.source, resolve_token(d.auth_token)) for d in policy.databases}


def cli_commands() -> set[str]:
    """The `dbre` commands this installation has, so the runbook only shows commands that exist."""
    from dbre.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return names | {g.name for g in app.registered_groups if g.name}


@task(name="analyze requirements", task_run_name="analyze requirements of {repo}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def analyze_requirements(repo: str, key: str | None = None, policy: str | None = None,
                         sources: dict[str, str] | None = None, expectations: str | None = "expectations",
                         prices: dict[str, Any] | None = None,
                         restore_throughput: float | None = None) -> RequirementsReport:
    """Inventory, growth, classification, RPO/RTO checks, storage cost and recommendations."""
    pol = load_policy(policy) if policy else None
    secret = resolve_key(key)
    price = Prices(**pol.costs.model_dump()) if pol is not None else Prices()
    if prices:
        price = Prices(**{**vars(price), **prices})
    return analyze(Repository.open(repo, secret), _sources(pol, sources), pol, policy_path=policy, prices=price,
                   restore_throughput=restore_throughput, expectations_dir=Path(expectations) if expectations else None,
                   key=secret)


@task(name="write requirements documents", task_run_name="write requirements documents to {out_dir}",
      timeout_seconds=HOUR, **NO_RESULTS)
def write_requirements_documents(report: RequirementsReport, out_dir: str, policy: str | None = None
                                 ) -> dict[str, str]:
    """report.md, report.html, backup-policy.md, recovery-runbook.md, dr-plan.md and the charts."""
    from dbre.report.requirements_docs import write_documents

    pol = load_policy(policy) if policy else None
    return {name: str(path) for name, path in write_documents(report, out_dir, pol, cli_commands()).items()}
