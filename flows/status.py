"""Backup health: per database, success rate, RPO/RTO attainment, drills and storage; Prometheus text;
alerts sent to the policy's channels (webhooks, Prefect notification blocks); the run fails on any alert."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dbre.errors import UsageError
from dbre.metrics import Alert, OffsiteStatus, Status, parse_size, prepare_prometheus_path
from dbre.policy import parse_duration
from dbre.report.drill import seconds_text
from dbre.units import human_bytes as human
from flows.common import RunFailed, failures, load, outcome, publish, refused, repos
from flows.names import from_parameters, status_name
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.validate import compute_repository_status, notify_block, notify_webhook


@store_references_only
@flow(name="dbre-status", flow_run_name=from_parameters(status_name, "status"), persist_result=False)
def status_flow(policy: str | None = None, repo: str | None = None, key: KeyRef = None,
                quota: str | None = None, storage_threshold: float = 0.8, window: str = "30d",
                prom: str | None = None, webhook: str | None = None, notify: bool = True) -> dict[str, Any]:
    """Compute the status of every database; ``prom`` writes a node-exporter textfile; ``webhook`` (a URL or a
    reference, env:NAME / prefect-secret:BLOCK) gets every alert, the policy's channels the events they list."""
    refuse_literal_secrets("status", key=key)
    pol = load(policy)
    r = repos(pol, repo, None, key)
    try:  # (parameters typed into the form: one line, no traceback, before any work)
        try:
            span = parse_duration(window)
        except ValueError as err:
            raise UsageError(f"status: window: {err}", "e.g. 30d or 12h") from None
        if prom:
            prepare_prometheus_path(prom)
    except UsageError as err:
        return refused(err)
    status: Status = compute_repository_status(r.primary, r.key, pol, span,
                                               parse_size(quota) if quota else None, storage_threshold, prom,
                                               r.offsite)
    alerts = status.all_alerts
    sent, failed = [], []
    if alerts and notify:
        channels: list[tuple[str, str, str, list[str] | None]] = []  # (name, kind, target, events)
        if webhook:
            channels.append(("webhook", "webhook", webhook, None))
        for ch in pol.alerts if pol else []:
            channels.append((ch.name, ch.kind, ch.url or ch.block or "", list(ch.events)))
        for name, kind, target, events in channels:
            mine = [a for a in alerts if events is None or a.event in events]
            if not mine:
                continue
            if kind == "webhook":
                state = notify_webhook.with_options(task_run_name=f"notify {name}")(name, target, status, mine,
                                                                                    return_state=True)
            else:
                state = notify_block(target, status, mine, return_state=True)
            ok, res = outcome(state)
            (sent if ok else failed).append(name if ok else f"{name}: {res}")
    _publish(status, alerts, sent, failed)
    if alerts:
        raise RunFailed(f"{len(alerts)} alerts: " + "; ".join(f"{a.event}: {a.message}" for a in alerts)
                        + (f" (notification failed: {'; '.join(failed)})" if failed else ""))
    return status.to_dict()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _days(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _offsite(o: OffsiteStatus) -> str:
    if o.error:
        return f"{o.repository}: unreadable"
    if not o.snapshots:
        return f"{o.repository}: empty"
    return f"{o.repository}: " + ("current" if not o.missing_snapshots else f"{o.missing_snapshots} behind")


def _publish(status: Status, alerts: list[Alert], sent: list[str], failed: list[str]) -> None:
    rows = [{"db": d.db, "snapshots": d.snapshots, "newest point age": seconds_text(d.newest_restorable_age_seconds),
             "backup success": _pct(d.backup_success_rate), "RPO attained": _pct(d.rpo_attainment),
             "RTO attained": _pct(d.rto_attainment),
             "days since drill": _days(d.days_since_successful_drill),
             "stored": human(d.storage_bytes),
             **({"offsite": "; ".join(_offsite(o) for o in d.offsite)} if d.offsite else {}),
             "state": "ok" if d.ok else "ALERT"} for d in status.databases]
    healthy = sum(1 for d in status.databases if d.ok)
    md = [f"# Backup health of `{status.repository}`: {healthy} of {len(status.databases)} databases ok"
          + (f", {len(alerts)} alert{'s' if len(alerts) != 1 else ''}" if alerts else ""), "",
          f"Storage: {human(status.storage_bytes)}" + ("" if status.storage_exact else " (estimated)")
          + (f" of {human(status.quota_bytes)}" if status.quota_bytes else "")
          + ". Each database's figures are in the table artifact.", ""]
    if alerts:
        md += ["## Alerts", "", *[f"- **{a.event}** ({a.severity}): {a.message}" for a in alerts], "",
               "What to do:", "", *[f"- {event}: {_TODO.get(event, 'see the message above')}"
                                    for event in dict.fromkeys(a.event for a in alerts)], ""]
    if sent:
        md.append(f"Notified: {', '.join(sent)}.")
    md += failures([(f"notification {name}", err) for name, _, err in (f.partition(": ") for f in failed)],
                   ["The alerts above reached no one through that channel: check its URL or block, and the "
                    "receiver; the next status run sends them again while they last."])
    publish("status", "\n".join(md), rows, description="backup health")


_TODO = {  # what the person on call does about each alert (the message says which database and why)
    "backup_failure": "read the failed backup run's error, fix its cause (the source, its token, the repository), "
                      "then run the backup again",
    "backup_delay": "the newest restorable point is older than the RPO: check that the backup deployment runs "
                    "(its schedule, a worker polling its pool) and that its last runs passed",
    "replication_lag": "check that `dbre replicate` runs for the database and can write to the repository",
    "storage_capacity": "raise the quota, or tighten retention and run the dbre-retention flow",
    "offsite_unreadable": "check the offsite repository's credentials and network from the worker",
    "offsite_behind": "copy now (the message has the command), and check that the backups' offsite copies pass",
    "drill_failure": "read the drill's report (the dbre-drill run's summary): it names each failed check",
    "drill_missed": "run the dbre-drill flow, and check its monthly schedule",
    "rto_at_risk": "a restore would now take longer than the RTO: make the restore path faster (storage nearer "
                   "the worker) or agree a longer RTO, then run a drill to measure again",
}
