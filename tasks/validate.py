"""Validation tasks: the steps of a recovery drill, the drill report, the weekly integrity validation,
and the backup-health status with its alerts.

A drill is not retried: a second attempt would measure a different RTO, and a restore that
failed is what the drill is there to find (the store layer already retries transient reads).
The drill's state (``dbre.validate.drill.Drill``) passes between its tasks in memory; the clock
runs from ``start drill`` to the end of ``validate restore``.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from dbre.errors import DbreError, UsageError
from dbre.metrics import (
    Alert,
    Status,
    alert_payload,
    compute_status,
    prepare_prometheus_path,
    send_webhook,
    write_prometheus,
)
from dbre.repository.repo import Repository
from dbre.validate.drill import (
    Drill,
    DrillTargets,
    begin_drill,
    drill_suites,
    finish_drill,
    namespace_step,
    restore_step,
    validate_step,
)
from dbre.validate.integrity import validate_repository
from dbre.validate.namespace import NamespaceTarget
from dbre.validate.suites import Suite, build_data_docs
from tasks.retry import HOUR, NO_RESULTS, TASK_OPTIONS
from tasks.secrets import resolve_key, resolve_secret, resolve_token


@task(name="load suites", task_run_name="load suites of {db}", timeout_seconds=60, **NO_RESULTS)
def load_drill_suites(expectations: str, db: str) -> list[Suite]:
    """The GX suites of ``db``; fails before the drill starts when there are none or one is not a suite."""
    return drill_suites(expectations, db)


@task(name="start drill", task_run_name="start drill of {db}", timeout_seconds=HOUR, **NO_RESULTS)
def start_drill(repo: str, db: str, key: str | None = None, target: str = "newest",
                scratch_dir: str | None = None) -> Drill:
    """Start the clock, choose the snapshot, note the newest restorable point (RPO), make scratch."""
    return begin_drill(Repository.open(repo, resolve_key(key)), db, target, scratch_dir=scratch_dir)


@task(name="restore to scratch", task_run_name="restore {drill.db} to scratch", timeout_seconds=6 * HOUR,
      **NO_RESULTS)
def restore_to_scratch(repo: str, drill: Drill, key: str | None = None) -> Drill:
    """Restore the chosen snapshot (every page checked); a failure is recorded on the drill, not raised."""
    try:
        restore_step(Repository.open(repo, resolve_key(key)), drill)
    except UsageError:
        raise
    except DbreError as err:
        drill.error = str(err)
    return drill


@task(name="validate restore", task_run_name="validate {drill.db}", timeout_seconds=6 * HOUR, **NO_RESULTS)
def validate_restore(drill: Drill, suites: list[Suite] | None = None, namespace_admin: str | None = None,
                     namespace_url: str | None = None, token: str | None = None) -> Drill:
    """integrity_check, foreign_key_check, schema, restore-equivalence, the GX suites; with ``namespace_admin``
    and ``namespace_url`` also load the restore into a new sqld namespace and count its rows there (kept)."""
    if drill.error is None:
        try:
            validate_step(drill, suites)
            if namespace_admin and namespace_url:
                target = NamespaceTarget(namespace_admin, namespace_url,
                                         f"drill-{drill.db}-{drill.started_at:%Y%m%d%H%M%S}".replace(".", "-"),
                                         resolve_token(token), keep=True)
                namespace_step(drill, target)
        except UsageError:
            raise
        except DbreError as err:
            drill.error = str(err)
    drill.ended = time.monotonic()
    return drill


@task(name="record drill", task_run_name="record drill of {drill.db}", timeout_seconds=HOUR, **TASK_OPTIONS)
def record_drill(repo: str, drill: Drill, key: str | None = None, rpo_seconds: float | None = None,
                 rto_seconds: float | None = None) -> dict[str, Any]:
    """Stop the clock, compare with the targets, store the drill record, remove scratch."""
    targets = DrillTargets(rpo_seconds=rpo_seconds, rto_seconds=rto_seconds)
    return finish_drill(Repository.open(repo, resolve_key(key)), drill, targets)


@task(name="drill report", task_run_name="drill report of {drill.db}", timeout_seconds=HOUR, **NO_RESULTS)
def drill_report(repo: str, drill: Drill, record: dict[str, Any], report_dir: str, key: str | None = None,
                 data_docs: bool = True) -> dict[str, str]:
    """Markdown and self-contained HTML report (charts of past drills); GX Data Docs beside it."""
    from dbre.report.drill import report_folder, write_drill_report

    if data_docs and drill.suite_run is not None:
        build_data_docs(drill.suite_run, report_folder(report_dir, record) / "data-docs")
    history = Repository.open(repo, resolve_key(key)).records("drills", drill.db)
    return write_drill_report(report_dir, record, history, drill.all_checks(), drill.suite_run)


@task(name="integrity validation", task_run_name="integrity validation of {repo}", timeout_seconds=12 * HOUR,
      **TASK_OPTIONS)
def integrity_validation(repo: str, key: str | None = None, databases: list[str] | None = None,
                         subset: tuple[int, int] | None = None, cycle_weeks: int = 4,
                         expectations: str | None = None, scratch_dir: str | None = None) -> dict[str, Any]:
    """Verify, read this week's subset of packs, restore-check each database's newest snapshot."""
    return validate_repository(Repository.open(repo, resolve_key(key)), dbs=databases, subset=subset,
                               cycle_weeks=cycle_weeks, expectations=expectations, scratch_dir=scratch_dir)


@task(name="compute status", task_run_name="status of {repo}", timeout_seconds=HOUR, **TASK_OPTIONS)
def compute_repository_status(repo: str, key: str | None = None, policy: Any = None, window_seconds: int = 30 * 86400,
                              quota_bytes: int | None = None, storage_threshold: float = 0.8,
                              prom: str | None = None, offsite: list[str] | None = None) -> Status:
    """Backup success rate, RPO/RTO attainment, drills and storage per database, with alerts; how far each
    ``offsite`` copy is behind (one that cannot be opened is an alert, not a failed task)."""
    from datetime import timedelta

    from dbre.metrics import open_offsite

    secret = resolve_key(key)
    copies = open_offsite(offsite or [], secret)
    status = compute_status(Repository.open(repo, secret), policy=policy,
                            window=timedelta(seconds=window_seconds), quota_bytes=quota_bytes,
                            storage_threshold=storage_threshold, offsite=copies)
    if prom:
        prepare_prometheus_path(prom)
        write_prometheus(prom, status)
    return status


@task(name="notify webhook", task_run_name="notify {channel}", timeout_seconds=120, **TASK_OPTIONS)
def notify_webhook(channel: str, url_ref: str, status: Status, alerts: list[Alert]) -> int:
    """POST the alerts as JSON to the webhook a reference (env:NAME / prefect-secret:BLOCK) or URL names."""
    url = url_ref if url_ref.startswith(("http://", "https://")) else str(resolve_secret(url_ref).reveal())
    return send_webhook(url, alert_payload(status, alerts))


@task(name="notify block", task_run_name="notify {block}", timeout_seconds=120, **TASK_OPTIONS)
def notify_block(block: str, status: Status, alerts: list[Alert]) -> None:
    """Send the alerts through a Prefect notification block (Slack, e-mail, PagerDuty, ...).

    ``block`` is ``type-slug/name`` or just the name of a block whose type can notify."""
    from prefect.blocks.core import Block

    payload = alert_payload(status, alerts)
    body = "\n".join(f"- [{a.severity}] {a.event}: {a.message}" for a in alerts)
    notifier: Any = Block.load(block if "/" in block else _block_slug(block))
    notifier.notify(body=body, subject=payload["text"][:200])


def _block_slug(name: str) -> str:
    """``type-slug/name`` of the notification block called ``name``; UsageError if there is none."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        docs = client.read_block_documents(include_secrets=False)
    for doc in docs:
        caps = doc.block_schema.capabilities if doc.block_schema else []
        if doc.name == name and doc.block_type and "notify" in caps:
            return f"{doc.block_type.slug}/{name}"
    raise UsageError(f"no Prefect notification block named {name!r}",
                     "create one in the UI (Blocks > e.g. Slack Webhook) or fix alerts[].block in the policy")
