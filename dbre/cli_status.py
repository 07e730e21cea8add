"""`dbre status`: backup health per database from dbre.metrics, with Prometheus output and alert webhooks.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import (
    JsonOpt,
    KeyFileOpt,
    PolicyOpt,
    RepoOpt,
    _key,
    _policy,
    _print_json,
    _run,
    _table,
    app,
)
from dbre.errors import UsageError
from dbre.units import human_bytes as human


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
    offsite: Annotated[list[str] | None, typer.Option("--offsite", metavar="REPO", help="An offsite copy to compare "
                                                      "with the primary (repeat; default: the policy's "
                                                      "repositories.offsite).")] = None,
    offsite_max_lag: Annotated[str, typer.Option("--offsite-max-lag", metavar="DURATION", help="Alert when the "
                                                 "offsite copy lacks a snapshot older than this.")] = "1d",
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Backup health per database: success rate, RPO/RTO attainment, drills, storage, how far each offsite copy
    is behind; exit 1 on any alert."""

    def go() -> None:
        from datetime import timedelta

        from dbre.metrics import (
            NotifyError,
            alert_payload,
            check_prometheus_path,
            compute_status,
            open_offsite,
            parse_size,
            send_webhook,
            write_prometheus,
        )
        from dbre.policy import parse_duration
        from dbre.repository.repo import Repository

        try:
            span = timedelta(seconds=parse_duration(window))
        except ValueError as err:
            raise UsageError(f"--window: {err}", "e.g. --window 30d") from None
        try:
            max_lag = parse_duration(offsite_max_lag)
        except ValueError as err:
            raise UsageError(f"--offsite-max-lag: {err}", "e.g. --offsite-max-lag 1d") from None
        quota_bytes = parse_size(quota) if quota else None
        if prom is not None:
            check_prometheus_path(prom)  # (before the status is computed: a typo costs nothing)
        if not 0 < storage_threshold <= 1:
            raise UsageError("--storage-threshold must be in (0, 1]", "e.g. 0.8 for 80 %")
        pol = _policy(policy)
        hooks = _webhook_urls(webhook, pol)
        key = _key(key_file)
        repository = Repository.open(repo, key)
        copies = open_offsite(offsite or (list(pol.repositories.offsite) if pol is not None else []), key)
        st = compute_status(repository, policy=pol, dbs=db or None, window=span, quota_bytes=quota_bytes,
                            storage_threshold=storage_threshold, offsite=copies, offsite_max_lag=max_lag)
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
                     pct(d.rpo_attainment), pct(d.rto_attainment), seconds_text(d.predicted_rto_seconds),
                     "-" if d.days_since_successful_drill is None else f"{d.days_since_successful_drill:.0f} d",
                     human(d.storage_bytes), human(d.added_bytes_per_day) + "/d", "ok" if d.ok else "ALERT"]
                    for d in st.databases]
            _table(f"status of {st.repository}", ["db", "snapshots", "newest point age", "backup success",
                                                   "RPO attained", "RTO attained", "RTO predicted", "since drill",
                                                   "stored",
                                                   "growth", "state"], rows,
                   whole={"db"}, priority=["state", "newest point age", "RPO attained", "since drill", "RTO attained",
                                           "RTO predicted", "backup success", "stored", "snapshots", "growth"])
            total = human(st.storage_bytes) + ("" if st.storage_exact else " (estimated)")
            if st.quota_bytes:
                total += f" of {human(st.quota_bytes)} ({st.storage_bytes / st.quota_bytes:.0%})"
            print(f"storage: {total}")
            for d in st.databases:
                if d.replication_lag_seconds is not None:
                    print(f"replication: {d.db}: lag {seconds_text(d.replication_lag_seconds)} (newest segment "
                          f"{d.replication_newest_segment_at}, heartbeat {d.replication_heartbeat_at or 'none'})")
            for d in st.databases:
                for o in d.offsite:
                    if o.error:
                        state = o.error if o.error.startswith("no copy:") else f"cannot be read: {o.error}"
                    elif not o.snapshots:
                        state = "holds no snapshot of it"
                    elif not o.missing_snapshots:
                        state = f"current (newest {o.newest_snapshot_at})"
                    else:
                        state = (f"{o.missing_snapshots} snapshot{'s' if o.missing_snapshots != 1 else ''} behind, "
                                 f"the oldest missing taken {o.oldest_missing_at}")
                    print(f"offsite: {d.db}: {o.repository}: {state}")
            if notified:
                print(f"notified: {', '.join(notified)}")
        for a in alerts:
            print(f"dbre: ALERT {a.event} ({a.severity}): {a.message}", file=sys.stderr)
        if alerts:
            raise typer.Exit(1)

    _run(go)
