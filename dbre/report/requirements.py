"""Requirements analysis, phase 1 of the method: know the data before deciding how to protect it.

``analyze`` measures each database — a live inventory (rows, bytes per table and index from
dbstat, foreign keys, personal data), growth and write rate from the snapshot history in the
repository, backup durations, snapshot intervals, restore times from drills — and checks the
policy's RPO, RTO, drill and retention targets against those measurements. It also projects the
repository's storage and S3 cost under the retention policy, and recommends changes.

The result is plain data (``requirements_model``); the checks and recommendations are in
``requirements_checks``; ``requirements_docs`` renders it all (report.md, report.html) and fills
in the backup policy, recovery runbook and DR plan. Model choices (documented in the
report too): growth is a least-squares line over the snapshot history, projected 12 months past
the newest snapshot; the worst-case data loss is the 95th-percentile snapshot interval plus the
95th-percentile backup duration; storage kept is one full compressed copy plus, for every
retained snapshot, the change since the previous retained one at the measured change rate.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.errors import DbreError
from dbre.report.inventory import DatabaseInventory, TableInventory, inspect_database, inventory_from_schema
from dbre.report.requirements_checks import (
    checks_for,
    db_recommendations,
    installation_recommendations,
    scheduled_interval,
)
from dbre.report.requirements_cost import (
    BACKUP_INTERVALS,
    MONTH_DAYS,
    REPLICATION_INTERVALS,
    CostInputs,
    CostPerRpo,
    assumptions,
    backup_option,
    measure_segments,
    replication_option,
)
from dbre.report.requirements_model import (
    CADENCE_DAYS,
    DAY,
    DEFAULT_RETENTION,
    GIB,
    PROJECTION_DAYS,
    RESTORE_PROBE_MAX_BYTES,
    DatabaseReport,
    History,
    Prices,
    RequirementsReport,
    RestoreTime,
    Spread,
    StorageProjection,
    TableReport,
    Trend,
    fmt_keep,
    provider_history,
)
from dbre.repository.manifest import RUN_PAGES, Manifest, iso, now_utc, parse_time
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy, apply_policy
from dbre.units import human_bytes as fmt_bytes
from dbre.validate.rto import estimate_rto

if TYPE_CHECKING:
    from dbre.policy import DatabasePolicy, Policy
    from dbre.secrets import Secret
    from dbre.sources.base import Source


# -- small numeric helpers -----------------------------------------------------------------------


def fit_trend(days: Sequence[float], values: Sequence[float], horizon_days: float = PROJECTION_DAYS) -> Trend:
    """Least-squares line through the points; ``projected`` is its value ``horizon_days`` after the
    last point (never below zero)."""
    import numpy as np

    n = len(values)
    if n == 0:
        return Trend(0.0, 0.0, None, 0.0, 0.0, 0)
    x = np.asarray(days, dtype=float)
    y = np.asarray(values, dtype=float)
    if n < 2 or float(x.max() - x.min()) == 0.0:
        last = float(y[-1])
        return Trend(0.0, last, None, last, last, n)
    slope, intercept = np.polyfit(x, y, 1)
    fitted = intercept + slope * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fitted) ** 2).sum()) / ss_tot if ss_tot > 0 else None
    projected = max(0.0, float(intercept + slope * (x[-1] + horizon_days)))
    return Trend(float(slope), float(intercept), r2, float(y[-1]), projected, n)


def spread(values: Sequence[float]) -> Spread | None:
    import numpy as np

    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return Spread(float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.max()), float(a[-1]), len(a))


# -- storage model -------------------------------------------------------------------------------

SIM_SNAPSHOTS = 100_000  # the most snapshots `_kept_ages` simulates
_PERIOD_SECONDS = {"hourly": 3600.0, "daily": DAY, "weekly": 7 * DAY, "monthly": 31 * DAY, "yearly": 366 * DAY}


def kept_ages(interval_seconds: float, keep: KeepPolicy) -> list[float]:
    """Ages in days (newest first) of the snapshots a retention policy keeps in steady state,
    when snapshots are taken every ``interval_seconds``: simulated with the repository's own rules."""
    return list(_kept_ages(max(float(interval_seconds), 1.0), tuple(vars(keep).items())))


@functools.lru_cache(maxsize=64)
def _kept_ages(interval: float, rules: tuple[tuple[str, Any], ...]) -> tuple[float, ...]:
    """``kept_ages`` once per interval and rules: every database of a policy shares them (a long
    retention at a short interval simulates tens of thousands of snapshots)."""
    keep = KeepPolicy(**dict(rules))
    horizon = keep.last * interval
    for name, period in _PERIOD_SECONDS.items():
        horizon = max(horizon, getattr(keep, name) * max(interval, period))
    within = keep.within_duration()
    if within is not None:
        horizon = max(horizon, within.longest_seconds())
    # at most SIM_SNAPSHOTS simulated: a yearly rule at a 1 s interval would be 10^8 manifests (the
    # requirements report died of memory in a test whose backups were a second apart); past that the
    # interval is coarsened, which undercounts keep-last/keep-within snapshots at sub-minute intervals
    interval = max(interval, horizon / SIM_SNAPSHOTS)
    count = int(horizon // interval) + 2
    anchor = datetime(2001, 1, 1, tzinfo=UTC)  # a fixed anchor keeps the simulation deterministic
    fake = [
        Manifest(id=f"{k:08d}", db="sim", taken_at=iso(anchor - timedelta(seconds=k * interval)), page_size=0,
                 page_count=0, runs=[], packs=[])
        for k in range(count)
    ]
    kept = apply_policy(fake, keep)
    return tuple(sorted(int(m_id) * interval / DAY for m_id in kept))


def bytes_kept(full_stored: float, change_per_day: float, ages_days: Sequence[float]) -> float:
    """One full copy plus, for each retained snapshot, the change since the previous retained one
    (never more than a full copy)."""
    if not ages_days:
        return 0.0
    total = full_stored
    ages = sorted(ages_days)
    for newer, older in zip(ages, ages[1:], strict=False):
        total += min(change_per_day * (older - newer), full_stored)
    return total


def project_storage(*, size_now: float, size_12m: float, compression_ratio: float, change_per_day: float,
                    interval_seconds: float, keep: KeepPolicy, retention_assumed: bool, copies: int,
                    puts_per_backup: float, page_count: int, prices: Prices) -> StorageProjection:
    """Bytes kept under the retention policy now and in 12 months, and what S3 charges for them."""
    ages = kept_ages(interval_seconds, keep)
    full_now = size_now * compression_ratio
    full_12m = size_12m * compression_ratio
    kept_now = bytes_kept(full_now, change_per_day, ages)
    kept_12m = bytes_kept(full_12m, change_per_day, ages)
    backups_per_month = 30.44 * DAY / max(interval_seconds, 1.0)
    # a backup reads every kept manifest of its database and the parent's page-map runs
    gets = len(ages) + math.ceil(page_count / RUN_PAGES)
    request_month = backups_per_month * (puts_per_backup * copies * prices.put_per_1000
                                         + gets * prices.get_per_1000) / 1000
    storage_now = kept_now / GIB * prices.storage_gb_month * copies
    storage_12m = kept_12m / GIB * prices.storage_gb_month * copies
    next_12 = sum(storage_now + (storage_12m - storage_now) * m / 12 + request_month for m in range(1, 13))
    return StorageProjection(
        retention=fmt_keep(keep), retention_assumed=retention_assumed, interval_seconds=interval_seconds,
        kept=len(ages), window_days=max(ages) if ages else 0.0, compression_ratio=compression_ratio,
        change_bytes_per_day=change_per_day, stored_full_now=full_now, stored_full_12m=full_12m,
        bytes_kept_now=kept_now, bytes_kept_12m=kept_12m, copies=copies, backups_per_month=backups_per_month,
        puts_per_backup=puts_per_backup, gets_per_backup=float(gets), storage_cost_month_now=storage_now,
        storage_cost_month_12m=storage_12m, request_cost_month=request_month, cost_next_12_months=next_12,
    )


# -- measurements --------------------------------------------------------------------------------


def history_of(snaps: Sequence[Manifest]) -> History:
    h = History()
    if not snaps:
        return h
    t0 = snaps[0].time
    for m in snaps:
        h.taken_at.append(m.taken_at)
        h.days.append((m.time - t0).total_seconds() / DAY)
        h.sizes.append(m.size)
        h.bytes_added.append(int(m.stats.get("bytes_added", 0) or 0))
        h.pages_added.append(int(m.stats.get("pages_added", 0) or 0))
        h.packs_added.append(int(m.stats.get("packs_added", 0) or 0))
        sec = m.stats.get("seconds")
        h.seconds.append(float(sec) if sec is not None else None)
        h.full.append(m.parent is None)
    return h


def measure_restore_throughput(repo: Repository, manifest: Manifest) -> tuple[float, str]:
    """Restore one snapshot to a temp file and time it: bytes per second of a real restore."""
    from dbre.restore.full import apply_restore, plan_restore

    with tempfile.TemporaryDirectory(prefix="dbre-probe-") as tmp:
        plan = plan_restore(repo, manifest.db, Path(tmp) / "probe.db", snapshot=manifest.id)
        started = time.perf_counter()
        apply_restore(repo, plan)
        seconds = max(time.perf_counter() - started, 1e-6)
    rate = manifest.size / seconds
    detail = (f"measured by restoring snapshot {manifest.id[:8]} of {manifest.db} "
              f"({fmt_bytes(manifest.size)} in {seconds:.2f} s)")
    return rate, detail


def _drill_time(rec: dict[str, Any]) -> datetime | None:
    for key in ("started_at", "finished_at", "taken_at"):
        if rec.get(key):
            try:
                return parse_time(str(rec[key]))
            except DbreError:
                continue
    return None


def _validated(drill: dict[str, Any]) -> bool:
    """The drill's restore was validated (older records lack the field: their verdict stands in)."""
    return bool(drill.get("validated", drill.get("passed")))


def _restore_time(drills: list[dict[str, Any]], target: int | None, size: int, size_12m: float,
                  throughput: float | None, throughput_detail: str) -> RestoreTime:
    measured = [d for d in drills if d.get("rto_seconds") is not None]
    if measured:
        last = measured[-1]
        seconds = float(last["rto_seconds"])
        passed = [d for d in measured if d.get("passed")]
        attain = None
        if target is not None:
            attain = sum(1 for d in measured if _validated(d) and float(d["rto_seconds"]) <= target) / len(measured)
        when = _drill_time(last)
        # the size-proportional phases scale, the fixed ones (tool start, imports) do not
        est = estimate_rto(measured, int(size_12m)) if size_12m else None
        projected = est.seconds if est is not None else (seconds * size_12m / size if size else None)
        return RestoreTime(
            seconds=seconds, basis="drill",
            detail=f"last of {len(measured)} drills ({'passed' if last.get('passed') else 'FAILED'})"
                   + (f"; {est.fixed_seconds:.1f} s of it fixed" if est is not None else ""),
            projected_seconds=projected, drills=len(measured),
            drills_passed=len(passed), last_drill_at=iso(when) if when else None,
            last_drill_passed=bool(last.get("passed")), last_drill_validated=_validated(last), attainment=attain,
        )
    if throughput and size:
        seconds = size / throughput
        return RestoreTime(seconds=seconds, basis="estimate",
                           detail=f"{fmt_bytes(size)} at {fmt_bytes(throughput)}/s, restore only",
                           projected_seconds=size_12m / throughput)
    return RestoreTime(seconds=None, basis="none", detail="no drill and no snapshot to estimate from")


# -- cost per RPO --------------------------------------------------------------------------------


def _window_days(keep: KeepPolicy) -> float:
    """The PITR window segments are kept for: keep-within (0 without it: the newest state only)."""
    within = keep.within_duration()
    return within.longest_seconds() / DAY if within is not None else 0.0


def _cost_per_rpo(repo: Repository, db: str, storage: StorageProjection,
                  project: Callable[[float], StorageProjection], inputs: CostInputs, replicated: bool,
                  notes: list[str]) -> CostPerRpo:
    """Replication at 1 s and 10 s, the policy's backups, and backups every 15 min, 1 h, 1 day."""
    try:
        rate = measure_segments(repo, db)
    except DbreError as err:
        notes.append(f"segments could not be measured, cost per RPO assumes none: {err}")
        rate = None
    options = [replication_option(i, storage, inputs, rate, current=replicated and i == REPLICATION_INTERVALS[0])
               for i in REPLICATION_INTERVALS]
    backups = [backup_option(storage, inputs, current=not replicated)]
    backups += [backup_option(project(i), inputs) for i in BACKUP_INTERVALS
                if abs(i - storage.interval_seconds) > 0.1 * i]
    options += sorted(backups, key=lambda o: o.interval_seconds)
    return CostPerRpo(options, assumptions(rate, inputs, replicated), rate)


# -- suites --------------------------------------------------------------------------------------


def suite_tables(expectations_dir: Path | None, db: str, db_dir: str | None) -> set[str] | None:
    """Lower-cased names of the tables that have an expectation suite, or None if there is no
    folder to look in. Same layout as the drills read: ``<dir>/<db>/*.json`` when that folder
    exists, else ``<dir>/*.json``; a suite names its table in ``meta.dbre.table``, else by file name."""
    root = Path(db_dir) if db_dir else expectations_dir
    if root is None or not root.is_dir():
        return None
    folder = root / db if (root / db).is_dir() else root
    tables: set[str] = set()
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        meta = data.get("meta") if isinstance(data, dict) else None
        table = ((meta or {}).get("dbre") or {}).get("table") if isinstance(meta, dict) else None
        tables.add(str(table or urllib.parse.unquote(path.stem)).lower())
    return tables


# -- analysis ------------------------------------------------------------------------------------


def _policy_db(policy: Policy | None, name: str) -> DatabasePolicy | None:
    if policy is None:
        return None
    return next((d for d in policy.databases if d.name == name), None)


def _source_label(source: Source | None) -> str | None:
    if source is None:
        return None
    ident = source.identity()
    return str(ident.get("url") or ident.get("path") or ident)


def _table_reports(inv: DatabaseInventory, snaps: Sequence[Manifest], history: History, pdb: DatabasePolicy | None,
                   suites: set[str] | None) -> list[TableReport]:
    tier = str(pdb.tier) if pdb else None
    critical_tables = [t.lower() for t in getattr(pdb, "critical_tables", None) or []]
    names = list(inv.tables)
    if snaps:
        names += [n for n in snaps[-1].tables if n not in inv.tables and not n.startswith("sqlite_")]
    out = []
    for name in names:
        ti = inv.tables.get(name) or TableInventory(name)
        series: list[int | None] = [m.tables[name].rows if name in m.tables else None for m in snaps]
        pts = [(d, r) for d, r in zip(history.days, series, strict=True) if r is not None]
        trend = fit_trend([p[0] for p in pts], [p[1] for p in pts])
        rows = ti.rows if ti.rows is not None else (series[-1] if series else None)
        projected_bytes = None
        if ti.total_bytes is not None and rows:
            projected_bytes = ti.total_bytes * trend.projected / rows if trend.points else float(ti.total_bytes)
        activity, churn = _write_rate(snaps, name)
        if name.lower() in critical_tables:
            critical, basis = True, "listed in the policy's critical_tables"
        elif not critical_tables and tier == "critical":
            critical, basis = True, "database tier is critical"
        else:
            critical, basis = False, f"database tier is {tier}" if tier else "no policy"
        t = TableReport(name=name, tier="critical" if critical else tier, critical=critical, critical_basis=basis,
                        inventory=ti, rows=rows, rows_history=series, rows_trend=trend,
                        projected_bytes=projected_bytes, write_activity=activity, churn_rows_per_day=churn,
                        has_suite=None if suites is None else name.lower() in suites)
        _evidence(t, len(snaps), tier, bool(critical_tables))
        out.append(t)
    return out


def _write_rate(snaps: Sequence[Manifest], name: str) -> tuple[float | None, float | None]:
    """Share of snapshot intervals in which the table changed (row count or content checksum),
    and the mean absolute row-count change per day."""
    changed = pairs = 0
    churn = 0
    span = 0.0
    for a, b in zip(snaps, snaps[1:], strict=False):
        ta, tb = a.tables.get(name), b.tables.get(name)
        if ta is None or tb is None:
            continue
        pairs += 1
        span += (b.time - a.time).total_seconds() / DAY
        churn += abs(tb.rows - ta.rows)
        same_meaning = a.checksum_version == b.checksum_version  # (two definitions differ on equal data)
        if tb.rows != ta.rows or (ta.checksum and tb.checksum and same_meaning and ta.checksum != tb.checksum):
            changed += 1
    if not pairs:
        return None, None
    return changed / pairs, (churn / span if span > 0 else None)


def _evidence(t: TableReport, snapshots: int, tier: str | None, has_list: bool) -> None:
    inv = t.inventory
    hub = inv.fk_in_degree >= 2
    if inv.referenced_by:
        t.evidence.append(f"referenced by {inv.fk_in_degree} table{'s' if inv.fk_in_degree > 1 else ''} "
                          f"({', '.join(inv.referenced_by)})")
    strong = [p for p in inv.personal if p.strong]
    weak = [p for p in inv.personal if not p.strong]
    if strong:
        t.evidence.append("personal data: " + ", ".join(f"{p.column} ({p.kind})" for p in strong))
    if weak:
        t.evidence.append("possibly personal: " + ", ".join(f"{p.column} ({p.kind})" for p in weak))
    if t.write_activity is not None:
        if t.write_activity == 0:
            t.evidence.append(f"unchanged over {snapshots} snapshots")
        else:
            t.evidence.append(f"changed in {t.write_activity:.0%} of snapshot intervals")
    if t.rows_trend.points >= 2 and abs(t.rows_trend.slope_per_day) >= 0.05:
        t.evidence.append(f"{t.rows_trend.slope_per_day:+,.1f} rows/day")
    if not t.critical and (hub or strong):
        why = " and ".join(x for x in ("is a hub of the foreign-key graph" if hub else "",
                                       "holds personal data" if strong else "") if x)
        if has_list:
            t.suggestion = f"consider listing it in critical_tables: it {why}"
        elif tier in ("standard", "low", None):
            t.suggestion = f"review the tier ({tier or 'none'}): the table {why}"


def analyze(
    repo: Repository,
    sources: Mapping[str, Source] | None = None,
    policy: Policy | None = None,
    *,
    policy_path: str | None = None,
    prices: Prices | None = None,
    now: datetime | None = None,
    restore_throughput: float | None = None,
    measure_restore: bool = True,
    expectations_dir: Path | None = Path("expectations"),
    key: Secret | None = None,
    sample: int = 100,
) -> RequirementsReport:
    """Measure every database (in the policy, given as a source, or in the repository) and check
    the policy's targets against the measurements."""
    sources = dict(sources or {})
    prices = prices or _policy_prices(policy) or Prices()
    now = now or now_utc()
    names = [d.name for d in policy.databases] if policy else []
    names += [n for n in sources if n not in names]
    names += [n for n in repo.databases() if n not in names]
    all_snaps = {n: repo.snapshots(n) for n in names}

    throughput_detail = "given"
    if restore_throughput is None and measure_restore:
        probe = [s[-1] for s in all_snaps.values() if s and s[-1].size <= RESTORE_PROBE_MAX_BYTES]
        if probe:
            # the largest probe: on a tiny database fixed costs hide the throughput
            restore_throughput, throughput_detail = measure_restore_throughput(repo, max(probe, key=lambda m: m.size))
        else:
            throughput_detail = "not measured: no snapshot small enough to probe"
    offsite = list(policy.repositories.offsite) if policy else []
    offsite_newest = _offsite_newest(offsite, names, key)

    dbs = [
        _analyze_db(repo, name, all_snaps[name], sources.get(name), _policy_db(policy, name), policy, prices, now,
                    restore_throughput, throughput_detail, expectations_dir, offsite_newest, sample)
        for name in names
    ]
    report = RequirementsReport(
        generated_at=iso(now), repository=repo.url, policy_path=policy_path, prices=prices, offsite=offsite,
        restore_throughput=restore_throughput, restore_throughput_detail=throughput_detail, databases=dbs,
        recommendations=[], expectations_dir=str(expectations_dir) if expectations_dir else None,
    )
    if policy is not None:
        report.contacts = [c.model_dump() for c in getattr(policy, "contacts", [])]
        report.compliance = list(getattr(policy, "compliance", []) or [])
        report.schedules = [{"name": n, "cron": s.cron, "timezone": s.timezone, "enabled": s.enabled}
                            for n, s in policy.schedules.items()]
        report.retention = policy.retention.model_dump()
        report.alerts = [{"name": a.name, "kind": a.kind, "target": a.block or "webhook", "events": list(a.events)}
                         for a in policy.alerts]
        report.drill_cadence = policy.drills.cadence
        report.drill_warn_days = policy.drills.warn_after_days
    else:
        from dbre.policy import Schedules

        report.schedules = [{"name": n, "cron": s.cron, "timezone": s.timezone, "enabled": s.enabled,
                             "assumed": True} for n, s in Schedules().items()]
        report.retention = {f"keep_{k}": v for k, v in vars(DEFAULT_RETENTION).items()} | {"assumed": True}
    report.encrypted = bool(repo.config.get("encryption"))
    report.recommendations = installation_recommendations(report, policy)
    return report


def _policy_prices(policy: Policy | None) -> Prices | None:
    costs = getattr(policy, "costs", None) if policy else None
    if costs is None:
        return None
    return Prices(costs.storage_gb_month, costs.put_per_1000, costs.get_per_1000, costs.currency)


def _offsite_newest(urls: list[str], names: list[str], key: Secret | None) -> dict[str, dict[str, Any]]:
    """For each offsite repository: the newest snapshot time per database, or the error opening it."""
    out: dict[str, dict[str, Any]] = {}
    for url in urls:
        try:
            other = Repository.open(url, key)
            newest = {}
            for n in names:
                snaps = other.snapshots(n)
                if snaps:
                    newest[n] = snaps[-1].time
            out[url] = {"newest": newest}
        except DbreError as err:
            out[url] = {"error": str(err)}
    return out


def _lag(repo: Repository, name: str, now: datetime, source: str | None) -> float | None:
    """The replication lag of a database with segments (``dbre status``'s), None without."""
    from dbre.metrics import replication_lag

    found = replication_lag(repo, name, now, source)
    return found.seconds if found is not None else None


def _analyze_db(repo: Repository, name: str, snaps: list[Manifest], source: Source | None,
                pdb: DatabasePolicy | None, policy: Policy | None, prices: Prices, now: datetime,
                throughput: float | None, throughput_detail: str, expectations_dir: Path | None,
                offsite_newest: dict[str, dict[str, Any]], sample: int) -> DatabaseReport:
    notes: list[str] = []
    inv: DatabaseInventory | None = None
    if source is not None:
        try:
            with source.connect() as conn:
                inv = inspect_database(conn, sample=sample)
        except DbreError as err:
            notes.append(f"live inspection failed, figures come from the newest snapshot: {err}")
    if inv is None:
        inv = inventory_from_schema(snaps[-1].schema) if snaps else DatabaseInventory(live=False)
        if snaps:
            inv.page_size, inv.page_count = snaps[-1].page_size, snaps[-1].page_count
            if source is None:
                notes.append("no live source given: rows come from the newest snapshot; bytes per table, "
                             "indexes and value sniffing need the live database")
    history = history_of(snaps)
    size = inv.size or (snaps[-1].size if snaps else 0)
    size_trend = fit_trend(history.days, history.sizes)
    if inv.live and snaps:
        # the live size is the current value; the trend's slope still comes from the history
        size_trend.current = float(size)
    size_12m = size_trend.projected if size_trend.points >= 2 else float(size)

    intervals = [(b.time - a.time).total_seconds() for a, b in zip(snaps, snaps[1:], strict=False)]
    seconds = [s for s in history.seconds if s is not None]
    backup_spread = spread(seconds)
    interval_spread = spread(intervals)
    newest_age = (now - snaps[-1].time).total_seconds() if snaps else None
    rpo = pdb.rpo if pdb else None
    rto = pdb.rto if pdb else None
    rpo_achieved = attainment = None
    if interval_spread is not None:
        rpo_achieved = interval_spread.p95 + (backup_spread.p95 if backup_spread else 0.0)
        if rpo is not None:
            after = [s if s is not None else 0.0 for s in history.seconds[1:]]
            attainment = sum(1 for i, s in zip(intervals, after, strict=True) if i + s <= rpo) / len(intervals)
    span_days = history.days[-1] if history else 0.0
    incr = [i for i in range(1, len(history))]
    pages_per_day = change_per_day = None
    if span_days > 0:
        pages_per_day = sum(history.pages_added[i] for i in incr) / span_days
        change_per_day = sum(history.bytes_added[i] for i in incr) / span_days
    fulls = [i for i in range(len(history)) if history.full[i] and history.sizes[i]]
    ratio = history.bytes_added[fulls[0]] / history.sizes[fulls[0]] if fulls else None

    drills = repo.records("drills", name) if snaps or pdb else []
    restore = _restore_time(drills, rto, size, size_12m, throughput, throughput_detail)
    suites = suite_tables(expectations_dir, name, pdb.expectations if pdb else None)
    tables = _table_reports(inv, snaps, history, pdb, suites)

    storage = costs = None
    if snaps:
        keep = policy.retention.keep_policy() if policy else DEFAULT_RETENTION
        copies = 1 + (len(policy.repositories.offsite) if policy else 0)
        puts = (sum(history.packs_added[i] for i in incr) / len(incr) if incr else 1.0) + 4  # manifest, lock, 2 LISTs

        def project(interval: float) -> StorageProjection:
            return project_storage(
                size_now=float(size), size_12m=size_12m, compression_ratio=ratio if ratio is not None else 1.0,
                change_per_day=change_per_day or 0.0, interval_seconds=interval, keep=keep,
                retention_assumed=policy is None, copies=copies, puts_per_backup=puts,
                page_count=snaps[-1].page_count, prices=prices)

        # (one snapshot has no measured interval: the policy's schedule says what it will be, else a day)
        storage = project(interval_spread.p50 if interval_spread else (scheduled_interval(policy) or DAY))
        if ratio is None:
            notes.append("the first full snapshot was forgotten: storage assumes no compression")
        inputs = CostInputs(
            prices=prices, copies=copies, window_days=_window_days(keep), change_bytes_per_day=change_per_day or 0.0,
            snapshot_restore_gets=1 + math.ceil(snaps[-1].page_count / RUN_PAGES) + 2 * len(snaps[-1].packs),
            restores_per_month=MONTH_DAYS / CADENCE_DAYS.get(policy.drills.cadence if policy else "monthly", 31),
            backup_p95=backup_spread.p95 if backup_spread else 0.0)
        costs = _cost_per_rpo(repo, name, storage, project, inputs, bool(pdb and pdb.replicate), notes)

    d = DatabaseReport(
        name=name, tier=str(pdb.tier) if pdb else None, rpo=rpo, rto=rto, owner=pdb.owner if pdb else None,
        source=_source_label(source) or (pdb.source if pdb else None),
        compliance=list(getattr(pdb, "compliance", None) or []),
        critical_tables=list(getattr(pdb, "critical_tables", None) or []), inventory=inv, tables=tables,
        history=history, size=size, size_trend=size_trend, backup_seconds=backup_spread,
        interval_seconds=interval_spread, newest_age_seconds=newest_age, rpo_achieved=rpo_achieved,
        rpo_attainment=attainment, pages_per_day=pages_per_day, change_bytes_per_day=change_per_day,
        compression_ratio=ratio, restore=restore, storage=storage, notes=notes, cost_per_rpo=costs,
        # judged by replication where the policy asks for it (or there is no policy): stale segments of a
        # database the policy backs up on a schedule do not excuse that schedule
        replication_lag_seconds=_lag(repo, name, now, pdb.source if pdb else None)
        if pdb is None or pdb.replicate else None,
    )
    d.provider = provider_history(d.source, pdb.namespace if pdb else None)
    d.checks = checks_for(d, pdb, policy, now, offsite_newest)
    d.recommendations = db_recommendations(d, pdb, policy)
    return d
