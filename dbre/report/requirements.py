"""Requirements analysis, phase 1 of the method: know the data before deciding how to protect it.

``analyze`` measures each database — a live inventory (rows, bytes per table and index from
dbstat, foreign keys, personal data), growth and write rate from the snapshot history in the
repository, backup durations, snapshot intervals, restore times from drills — and checks the
policy's RPO, RTO, drill and retention targets against those measurements. It also projects the
repository's storage and S3 cost under the retention policy, and recommends changes.

The result is plain data; ``dbre.report.requirements_docs`` renders it (report.md, report.html)
and fills in the backup policy, recovery runbook and DR plan. Model choices (documented in the
report too): growth is a least-squares line over the snapshot history, projected 12 months past
the newest snapshot; the worst-case data loss is the 95th-percentile snapshot interval plus the
95th-percentile backup duration; storage kept is one full compressed copy plus, for every
retained snapshot, the change since the previous retained one at the measured change rate.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.errors import DbreError
from dbre.report.inventory import DatabaseInventory, TableInventory, inspect_database, inventory_from_schema
from dbre.repository.manifest import RUN_PAGES, Manifest, iso, now_utc, parse_time
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy, apply_policy

if TYPE_CHECKING:
    from dbre.policy import DatabasePolicy, Policy
    from dbre.secrets import Secret
    from dbre.sources.base import Source

PROJECTION_DAYS = 365.0
AT_RISK_SHARE = 0.8  # a measurement above 80% of its target is at risk
ATTAINMENT_WARN = 0.99  # the seed's warning threshold for RPO/RTO attainment
GIB = 1024**3  # S3 bills storage per GB-month with GB = 2^30 bytes
DAY = 86400.0
RESTORE_PROBE_MAX_BYTES = 1024**3  # restore at most this much to measure the restore throughput
DEFAULT_RETENTION = KeepPolicy(hourly=24, daily=7, weekly=4, monthly=12)

MET, AT_RISK, NOT_MET, NO_TARGET = "met", "at risk", "not met", "no target"

# The seed's recovery priorities (disaster-recovery-planning): tier -> (RPO, RTO) in seconds.
TIER_GUIDANCE: dict[str, tuple[int, int]] = {
    "critical": (15 * 60, 3600),
    "high": (3600, 4 * 3600),
    "standard": (24 * 3600, 24 * 3600),
    "low": (7 * 24 * 3600, 72 * 3600),
}
CADENCE_DAYS = {"weekly": 7, "monthly": 31, "quarterly": 92}


@dataclass
class Prices:
    """S3 prices, by default S3 Standard in us-east-1: storage per GB-month (GB = 2^30 bytes),
    PUT/COPY/POST/LIST requests and GET requests per 1000."""

    storage_gb_month: float = 0.023
    put_per_1000: float = 0.005
    get_per_1000: float = 0.0004
    currency: str = "USD"


@dataclass
class Trend:
    """A least-squares line through (days since the first snapshot, value)."""

    slope_per_day: float
    intercept: float
    r2: float | None
    current: float
    projected: float
    points: int


@dataclass
class Spread:
    p50: float
    p95: float
    max: float
    last: float
    n: int


@dataclass
class History:
    """Per-snapshot series of one database, oldest first."""

    taken_at: list[str] = field(default_factory=list)
    days: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    bytes_added: list[int] = field(default_factory=list)
    pages_added: list[int] = field(default_factory=list)
    packs_added: list[int] = field(default_factory=list)
    seconds: list[float | None] = field(default_factory=list)
    full: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.taken_at)


@dataclass
class TableReport:
    name: str
    tier: str | None
    critical: bool
    critical_basis: str
    inventory: TableInventory
    rows: int | None
    rows_history: list[int | None]
    rows_trend: Trend
    projected_bytes: float | None
    write_activity: float | None
    churn_rows_per_day: float | None
    has_suite: bool | None
    evidence: list[str] = field(default_factory=list)
    suggestion: str = ""


@dataclass
class RestoreTime:
    seconds: float | None
    basis: str  # "drill", "estimate" or "none"
    detail: str
    projected_seconds: float | None = None
    drills: int = 0
    drills_passed: int = 0
    last_drill_at: str | None = None
    last_drill_passed: bool | None = None
    attainment: float | None = None


@dataclass
class Check:
    db: str
    target: str
    objective: str
    measured: str
    status: str
    reason: str


@dataclass
class StorageProjection:
    retention: str
    retention_assumed: bool
    interval_seconds: float
    kept: int
    window_days: float
    compression_ratio: float
    change_bytes_per_day: float
    stored_full_now: float
    stored_full_12m: float
    bytes_kept_now: float
    bytes_kept_12m: float
    copies: int
    backups_per_month: float
    puts_per_backup: float
    gets_per_backup: float
    storage_cost_month_now: float
    storage_cost_month_12m: float
    request_cost_month: float
    cost_next_12_months: float

    @property
    def total_month_now(self) -> float:
        return self.storage_cost_month_now + self.request_cost_month

    @property
    def total_month_12m(self) -> float:
        return self.storage_cost_month_12m + self.request_cost_month


@dataclass
class Recommendation:
    """``action`` names a follow-up the documents spell out as a command for this installation
    ("drill", "suites"); ``cron`` is a schedule to set."""

    db: str | None
    area: str
    text: str
    action: str | None = None
    cron: str | None = None


@dataclass
class DatabaseReport:
    name: str
    tier: str | None
    rpo: int | None
    rto: int | None
    owner: str | None
    source: str | None
    compliance: list[str]
    critical_tables: list[str]
    inventory: DatabaseInventory
    tables: list[TableReport]
    history: History
    size: int
    size_trend: Trend
    backup_seconds: Spread | None
    interval_seconds: Spread | None
    newest_age_seconds: float | None
    rpo_achieved: float | None
    rpo_attainment: float | None
    pages_per_day: float | None
    change_bytes_per_day: float | None
    compression_ratio: float | None
    restore: RestoreTime
    storage: StorageProjection | None
    checks: list[Check] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows or 0 for t in self.tables)

    @property
    def personal_columns(self) -> int:
        return sum(1 for t in self.tables for p in t.inventory.personal if p.strong)


@dataclass
class RequirementsReport:
    generated_at: str
    repository: str
    policy_path: str | None
    prices: Prices
    offsite: list[str]
    restore_throughput: float | None  # bytes per second, measured or given
    restore_throughput_detail: str
    databases: list[DatabaseReport]
    recommendations: list[Recommendation]
    contacts: list[dict[str, Any]] = field(default_factory=list)
    compliance: list[str] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    retention: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    encrypted: bool = False
    drill_cadence: str = "monthly"
    drill_warn_days: int = 90
    expectations_dir: str | None = None

    def status_counts(self) -> dict[str, int]:
        out = {MET: 0, AT_RISK: 0, NOT_MET: 0, NO_TARGET: 0}
        for d in self.databases:
            for c in d.checks:
                out[c.status] = out.get(c.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def fmt_seconds(seconds: float | None) -> str:
    """A duration for people: 0.42 s, 38 s, 12 min, 5.5 h, 3.0 d."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 0.1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    if s < 10 * 86400:
        return f"{s / 86400:.1f} d"
    return f"{s / 86400:.0f} d"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_keep(keep: KeepPolicy) -> str:
    parts = [f"{name} {n}" for name, n in vars(keep).items() if n]
    return ", ".join(parts) or "nothing"


# -- storage model -------------------------------------------------------------------------------

_PERIOD_SECONDS = {"hourly": 3600.0, "daily": DAY, "weekly": 7 * DAY, "monthly": 31 * DAY, "yearly": 366 * DAY}


def kept_ages(interval_seconds: float, keep: KeepPolicy) -> list[float]:
    """Ages in days (newest first) of the snapshots a retention policy keeps in steady state,
    when snapshots are taken every ``interval_seconds``: simulated with the repository's own rules."""
    interval = max(float(interval_seconds), 1.0)
    horizon = keep.last * interval
    for name, period in _PERIOD_SECONDS.items():
        horizon = max(horizon, getattr(keep, name) * max(interval, period))
    count = int(horizon // interval) + 2
    anchor = datetime(2001, 1, 1, tzinfo=UTC)  # a fixed anchor keeps the simulation deterministic
    fake = [
        Manifest(id=f"{k:08d}", db="sim", taken_at=iso(anchor - timedelta(seconds=k * interval)), page_size=0,
                 page_count=0, runs=[], packs=[])
        for k in range(count)
    ]
    kept = apply_policy(fake, keep)
    return sorted(int(m_id) * interval / DAY for m_id in kept)


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


def _restore_time(drills: list[dict[str, Any]], target: int | None, size: int, size_12m: float,
                  throughput: float | None, throughput_detail: str) -> RestoreTime:
    measured = [d for d in drills if d.get("rto_seconds") is not None]
    if measured:
        last = measured[-1]
        seconds = float(last["rto_seconds"])
        passed = [d for d in measured if d.get("passed")]
        attain = None
        if target is not None:
            attain = sum(1 for d in measured if d.get("passed") and float(d["rto_seconds"]) <= target) / len(measured)
        when = _drill_time(last)
        return RestoreTime(
            seconds=seconds, basis="drill",
            detail=f"last of {len(measured)} drills ({'passed' if last.get('passed') else 'FAILED'})",
            projected_seconds=seconds * size_12m / size if size else None, drills=len(measured),
            drills_passed=len(passed), last_drill_at=iso(when) if when else None,
            last_drill_passed=bool(last.get("passed")), attainment=attain,
        )
    if throughput and size:
        seconds = size / throughput
        return RestoreTime(seconds=seconds, basis="estimate",
                           detail=f"{fmt_bytes(size)} at {fmt_bytes(throughput)}/s, restore only",
                           projected_seconds=size_12m / throughput)
    return RestoreTime(seconds=None, basis="none", detail="no drill and no snapshot to estimate from")


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
        if tb.rows != ta.rows or (ta.checksum and tb.checksum and ta.checksum != tb.checksum):
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
    report.recommendations = _installation_recommendations(report, policy)
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

    storage = None
    if snaps:
        keep = policy.retention.keep_policy() if policy else DEFAULT_RETENTION
        copies = 1 + (len(policy.repositories.offsite) if policy else 0)
        puts = (sum(history.packs_added[i] for i in incr) / len(incr) if incr else 1.0) + 4  # manifest, lock, 2 LISTs
        storage = project_storage(
            size_now=float(size), size_12m=size_12m, compression_ratio=ratio if ratio is not None else 1.0,
            change_per_day=change_per_day or 0.0,
            interval_seconds=interval_spread.p50 if interval_spread else DAY, keep=keep,
            retention_assumed=policy is None, copies=copies, puts_per_backup=puts,
            page_count=snaps[-1].page_count, prices=prices)
        if ratio is None:
            notes.append("the first full snapshot was forgotten: storage assumes no compression")

    d = DatabaseReport(
        name=name, tier=str(pdb.tier) if pdb else None, rpo=rpo, rto=rto, owner=pdb.owner if pdb else None,
        source=_source_label(source) or (pdb.source if pdb else None),
        compliance=list(getattr(pdb, "compliance", None) or []),
        critical_tables=list(getattr(pdb, "critical_tables", None) or []), inventory=inv, tables=tables,
        history=history, size=size, size_trend=size_trend, backup_seconds=backup_spread,
        interval_seconds=interval_spread, newest_age_seconds=newest_age, rpo_achieved=rpo_achieved,
        rpo_attainment=attainment, pages_per_day=pages_per_day, change_bytes_per_day=change_per_day,
        compression_ratio=ratio, restore=restore, storage=storage, notes=notes,
    )
    d.checks = _checks(d, pdb, policy, now, offsite_newest)
    d.recommendations = _db_recommendations(d, pdb, policy)
    return d


# -- checks --------------------------------------------------------------------------------------


def _check_rpo(d: DatabaseReport) -> Check:
    objective = f"lose at most {fmt_seconds(d.rpo)} of writes" if d.rpo else "none in the policy"
    if not d.history:
        return Check(d.name, "RPO", objective, "no snapshot", NOT_MET if d.rpo else NO_TARGET,
                     "nothing has been backed up: every write would be lost")
    if d.interval_seconds is None or d.rpo_achieved is None:
        return Check(d.name, "RPO", objective, "one snapshot", AT_RISK if d.rpo else NO_TARGET,
                     "a single snapshot: no interval between backups measured yet")
    iv, bs = d.interval_seconds, d.backup_seconds
    measured = (f"p95 interval {fmt_seconds(iv.p95)} + p95 backup {fmt_seconds(bs.p95 if bs else 0)} "
                f"= {fmt_seconds(d.rpo_achieved)}")
    if d.rpo_attainment is not None:
        measured += f"; attainment {d.rpo_attainment:.1%}"
    if d.rpo is None:
        return Check(d.name, "RPO", objective, measured, NO_TARGET, "set rpo for this database in the policy")
    if d.newest_age_seconds is not None and d.newest_age_seconds > d.rpo:
        return Check(d.name, "RPO", objective, measured, NOT_MET,
                     f"the newest snapshot is {fmt_seconds(d.newest_age_seconds)} old: backups stopped or fall behind")
    if d.rpo_achieved > d.rpo:
        return Check(d.name, "RPO", objective, measured, NOT_MET,
                     f"snapshots come every {fmt_seconds(iv.p50)} (p95 {fmt_seconds(iv.p95)}): a failure just before "
                     f"the next one loses up to {fmt_seconds(d.rpo_achieved)}")
    if d.rpo_achieved > AT_RISK_SHARE * d.rpo:
        return Check(d.name, "RPO", objective, measured, AT_RISK,
                     f"worst case uses {d.rpo_achieved / d.rpo:.0%} of the target: a slow or skipped backup breaks it")
    if d.rpo_attainment is not None and d.rpo_attainment < ATTAINMENT_WARN:
        return Check(d.name, "RPO", objective, measured, AT_RISK,
                     f"{1 - d.rpo_attainment:.1%} of intervals exceeded the target (max {fmt_seconds(iv.max)}); "
                     f"the seed warns below {ATTAINMENT_WARN:.0%}")
    return Check(d.name, "RPO", objective, measured, MET,
                 f"worst case {fmt_seconds(d.rpo_achieved)} is within {fmt_seconds(d.rpo)}")


def _check_rto(d: DatabaseReport, warn_days: int, now: datetime) -> Check:
    r = d.restore
    objective = f"restore within {fmt_seconds(d.rto)}" if d.rto else "none in the policy"
    if r.seconds is None:
        return Check(d.name, "RTO", objective, "nothing measured", NOT_MET if d.rto else NO_TARGET, r.detail)
    measured = f"{fmt_seconds(r.seconds)} ({'drill' if r.basis == 'drill' else 'estimate'})"
    if r.projected_seconds is not None:
        measured += f"; {fmt_seconds(r.projected_seconds)} at the 12-month size"
    if d.rto is None:
        return Check(d.name, "RTO", objective, measured, NO_TARGET, "set rto for this database in the policy")
    if r.basis == "drill":
        if not r.last_drill_passed:
            return Check(d.name, "RTO", objective, measured, NOT_MET, "the last drill failed its validation")
        if r.seconds > d.rto:
            return Check(d.name, "RTO", objective, measured, NOT_MET,
                         f"the last drill took {fmt_seconds(r.seconds)}, over the {fmt_seconds(d.rto)} target")
        if r.seconds > AT_RISK_SHARE * d.rto:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"the last drill used {r.seconds / d.rto:.0%} of the target")
        if r.projected_seconds is not None and r.projected_seconds > d.rto:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"at the projected size in 12 months a restore would take {fmt_seconds(r.projected_seconds)}")
        age = (now - parse_time(r.last_drill_at)).days if r.last_drill_at else None
        if age is not None and age > warn_days:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"the last drill was {age} days ago (warn after {warn_days})")
        return Check(d.name, "RTO", objective, measured, MET,
                     f"the last drill restored and validated in {fmt_seconds(r.seconds)}")
    if r.seconds > d.rto:
        return Check(d.name, "RTO", objective, measured, NOT_MET,
                     f"even the bare restore would take {fmt_seconds(r.seconds)} ({r.detail})")
    return Check(d.name, "RTO", objective, measured, AT_RISK,
                 f"estimate only ({r.detail}): no drill has measured the whole recovery with validation")


def _check_backup_duration(d: DatabaseReport) -> Check | None:
    bs, iv = d.backup_seconds, d.interval_seconds
    if bs is None or iv is None:
        return None
    objective = "p95 backup time at most half the snapshot interval"
    measured = f"p50 {fmt_seconds(bs.p50)}, p95 {fmt_seconds(bs.p95)}, max {fmt_seconds(bs.max)}"
    if bs.p95 > iv.p50:
        return Check(d.name, "backup duration", objective, measured, NOT_MET,
                     f"backups take longer than the {fmt_seconds(iv.p50)} between them: they queue up")
    if bs.p95 > iv.p50 / 2:
        return Check(d.name, "backup duration", objective, measured, AT_RISK,
                     f"backups take over half of the {fmt_seconds(iv.p50)} interval")
    share = bs.p95 / iv.p50
    return Check(d.name, "backup duration", objective, measured, MET,
                 f"{'under 0.1%' if share < 0.001 else f'{share:.1%}'} of the {fmt_seconds(iv.p50)} interval")


def _check_drills(d: DatabaseReport, cadence: str, warn_days: int, now: datetime) -> Check:
    objective = f"a passing drill at least {cadence} (warn after {warn_days} days)"
    r = d.restore
    if r.basis != "drill" or not r.last_drill_at:
        return Check(d.name, "drill frequency", objective, "no drill recorded", NOT_MET,
                     "RTO has never been measured end to end")
    age = (now - parse_time(r.last_drill_at)).total_seconds() / DAY
    measured = f"last drill {age:.0f} days ago; {r.drills_passed}/{r.drills} passed"
    if not r.last_drill_passed:
        return Check(d.name, "drill frequency", objective, measured, NOT_MET, "the last drill failed")
    if age > warn_days:
        return Check(d.name, "drill frequency", objective, measured, NOT_MET, f"no drill for over {warn_days} days")
    if age > CADENCE_DAYS.get(cadence, 31):
        return Check(d.name, "drill frequency", objective, measured, AT_RISK, f"the {cadence} drill is overdue")
    return Check(d.name, "drill frequency", objective, measured, MET, f"drilled within the {cadence} cadence")


def _check_retention(d: DatabaseReport, pdb: DatabasePolicy | None) -> Check | None:
    s = d.storage
    if s is None:
        return None
    minimum = getattr(pdb, "min_retention", None) if pdb else None
    oldest = d.history.days[-1] if d.history else 0.0
    measured = f"{s.retention}: restore points back {s.window_days:.0f} days; history now spans {oldest:.0f} days"
    if not minimum:
        return Check(d.name, "retention", "no minimum set (compliance)", measured, NO_TARGET,
                     "add min_retention to the policy if a regulation or contract requires one")
    objective = f"keep restore points for {fmt_seconds(minimum)}"
    if s.window_days * DAY < minimum:
        return Check(d.name, "retention", objective, measured, NOT_MET,
                     f"the retention rules keep only {s.window_days:.0f} days")
    if oldest * DAY < minimum:
        return Check(d.name, "retention", objective, measured, AT_RISK,
                     "the rules would keep enough, but the history is still shorter than the minimum")
    return Check(d.name, "retention", objective, measured, MET, "the retention window covers the minimum")


def _check_offsite(d: DatabaseReport, policy: Policy | None, now: datetime,
                   offsite_newest: dict[str, dict[str, Any]]) -> list[Check]:
    objective = "an offsite copy at most a day behind (nightly copy)"
    if policy is None:
        return []
    if not policy.repositories.offsite:
        return [Check(d.name, "offsite copy", objective, "no offsite repository", NOT_MET,
                      "the policy has no offsite repository: a lost primary loses every backup")]
    out = []
    for url, info in offsite_newest.items():
        if "error" in info:
            out.append(Check(d.name, "offsite copy", objective, f"{url}: not readable", NO_TARGET,
                             f"could not open it: {info['error']}"))
            continue
        newest = info["newest"].get(d.name)
        if newest is None:
            out.append(Check(d.name, "offsite copy", objective, f"{url}: no snapshot", NOT_MET,
                             "nothing of this database has been copied"))
            continue
        lag = (now - newest).total_seconds()
        measured = f"{url}: newest {fmt_seconds(lag)} old"
        status = MET if lag <= DAY + 2 * 3600 else AT_RISK if lag <= 2 * DAY else NOT_MET
        reason = {MET: "the copy keeps up", AT_RISK: "the copy is more than a day behind",
                  NOT_MET: "the copy is more than two days behind"}[status]
        out.append(Check(d.name, "offsite copy", objective, measured, status, reason))
    return out


def _checks(d: DatabaseReport, pdb: DatabasePolicy | None, policy: Policy | None, now: datetime,
            offsite_newest: dict[str, dict[str, Any]]) -> list[Check]:
    cadence = policy.drills.cadence if policy else "monthly"
    warn_days = policy.drills.warn_after_days if policy else 90
    out = [_check_rpo(d), _check_rto(d, warn_days, now)]
    for extra in (_check_backup_duration(d), _check_retention(d, pdb)):
        if extra is not None:
            out.append(extra)
    out.append(_check_drills(d, cadence, warn_days, now))
    out.extend(_check_offsite(d, policy, now, offsite_newest))
    return out


# -- recommendations -----------------------------------------------------------------------------

_INTERVALS: list[tuple[int, str]] = [
    (5 * 60, "*/5 * * * *"), (15 * 60, "*/15 * * * *"), (30 * 60, "*/30 * * * *"), (3600, "0 * * * *"),
    (2 * 3600, "0 */2 * * *"), (4 * 3600, "0 */4 * * *"), (6 * 3600, "0 */6 * * *"), (12 * 3600, "0 */12 * * *"),
    (86400, "30 1 * * *"),
]


def suggest_schedule(rpo: float, backup_p95: float) -> tuple[int, str] | None:
    """The longest standard interval whose worst case (interval + backup) stays within 80% of the RPO."""
    fitting = [(s, cron) for s, cron in _INTERVALS if s + backup_p95 <= AT_RISK_SHARE * rpo]
    return fitting[-1] if fitting else None


def cron_interval(cron: str) -> float | None:
    """Seconds between runs of a simple cron schedule (every N minutes, hourly, every N hours,
    daily or a few times a day); None for anything fancier."""
    fields = cron.split()
    if len(fields) != 5 or fields[2:4] != ["*", "*"] or fields[4] != "*":
        return None
    minute, hour = fields[0], fields[1]
    if minute == "*" and hour == "*":
        return 60.0
    if minute.startswith("*/") and minute[2:].isdigit() and hour == "*":
        return int(minute[2:]) * 60.0
    if not minute.isdigit():
        return None
    if hour == "*":
        return 3600.0
    if hour.startswith("*/") and hour[2:].isdigit():
        return int(hour[2:]) * 3600.0
    if all(h.isdigit() for h in hour.split(",")):
        return 86400.0 / len(hour.split(","))
    return None


def scheduled_interval(policy: Policy | None) -> float | None:
    """How often the policy's backup schedules take a snapshot (the shortest enabled one)."""
    if policy is None:
        return None
    found = [cron_interval(s.cron) for name, s in policy.schedules.items()
             if name.startswith("backup_") and s.enabled]
    known = [f for f in found if f is not None]
    return min(known) if known else None


def _db_recommendations(d: DatabaseReport, pdb: DatabasePolicy | None, policy: Policy | None) -> list[Recommendation]:
    out: list[Recommendation] = []
    by_target = {c.target: c for c in d.checks}
    rpo_check = by_target.get("RPO")
    scheduled = scheduled_interval(policy) if pdb is not None else None
    bs = d.backup_seconds.p95 if d.backup_seconds else 0.0
    drift = bool(d.interval_seconds and scheduled and d.interval_seconds.p50 > 2 * scheduled)
    if drift and d.interval_seconds and scheduled:
        out.append(Recommendation(d.name, "schedule",
                                  f"snapshots arrive every {fmt_seconds(d.interval_seconds.p50)} although the policy "
                                  f"schedules a backup every {fmt_seconds(scheduled)}: check that the backup "
                                  "deployments run for this database and succeed (`dbre status`)"))
    if d.rpo and rpo_check and rpo_check.status in (NOT_MET, AT_RISK) and d.interval_seconds:
        schedule_is_enough = scheduled is not None and scheduled + bs <= AT_RISK_SHARE * d.rpo
        pick = suggest_schedule(d.rpo, bs)
        if drift and schedule_is_enough:
            pass  # the schedule would meet the RPO: the missing runs are the problem (above)
        elif pick:
            now_every = fmt_seconds(scheduled if scheduled else d.interval_seconds.p50)
            out.append(Recommendation(d.name, "schedule",
                                      f"take a snapshot every {fmt_seconds(pick[0])} (now every {now_every}) to meet "
                                      f"the {fmt_seconds(d.rpo)} RPO", cron=pick[1]))
        else:
            out.append(Recommendation(d.name, "schedule",
                                      f"an RPO of {fmt_seconds(d.rpo)} is below what periodic snapshots can give "
                                      f"(a backup alone takes {fmt_seconds(bs)}): it needs continuous WAL shipping "
                                      "(the PITR layer) or a relaxed target"))
    elif d.rpo and rpo_check and rpo_check.status == MET and d.interval_seconds and \
            d.interval_seconds.p50 * 8 < d.rpo:
        pick = suggest_schedule(d.rpo, bs)
        if pick and pick[0] > d.interval_seconds.p50 * 2:
            out.append(Recommendation(d.name, "schedule",
                                      f"snapshots every {fmt_seconds(d.interval_seconds.p50)} are far inside the "
                                      f"{fmt_seconds(d.rpo)} RPO; every {fmt_seconds(pick[0])} would do and cost fewer "
                                      "requests", cron=pick[1]))
    rto_check = by_target.get("RTO")
    if rto_check and rto_check.status == NOT_MET and d.restore.seconds is not None:
        out.append(Recommendation(d.name, "recovery time",
                                  f"restores take {fmt_seconds(d.restore.seconds)} against an RTO of "
                                  f"{fmt_seconds(d.rto)}: restore onto local disk near the repository, keep a warm "
                                  "standby copy restored nightly, split the database, or agree a longer RTO"))
    drill_check = by_target.get("drill frequency")
    if drill_check and drill_check.status != MET:
        out.append(Recommendation(d.name, "drills", f"{drill_check.reason}: run a recovery drill and keep the "
                                  "monthly drill deployment enabled", action="drill"))
    if pdb is not None:
        guide = TIER_GUIDANCE.get(str(pdb.tier))
        if guide and (pdb.rpo > guide[0] or pdb.rto > guide[1]):
            out.append(Recommendation(d.name, "targets",
                                      f"tier {pdb.tier} usually means RPO ≤ {fmt_seconds(guide[0])} and RTO ≤ "
                                      f"{fmt_seconds(guide[1])}; the policy allows {fmt_seconds(pdb.rpo)} / "
                                      f"{fmt_seconds(pdb.rto)}: confirm with the business or lower the tier"))
    for t in d.tables:
        if t.suggestion:
            out.append(Recommendation(d.name, "classification", f"{t.name}: {t.suggestion}"))
    if d.personal_columns and pdb is not None and str(pdb.tier) in ("standard", "low") and not d.compliance:
        cols = f"{d.personal_columns} column{'s hold' if d.personal_columns > 1 else ' holds'}"
        out.append(Recommendation(d.name, "compliance",
                                  f"{cols} personal data but the database is tier "
                                  f"{pdb.tier} with no compliance notes: record the regulation (e.g. GDPR) and how "
                                  "erasure requests reach backups (they expire with retention)"))
    missing = [t.name for t in d.tables if t.has_suite is False]
    if missing:
        out.append(Recommendation(d.name, "suites",
                                  f"no expectation suite for {len(missing)} of {len(d.tables)} tables "
                                  f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): drills can only "
                                  "check integrity and row counts there", action="suites"))
    elif all(t.has_suite is None for t in d.tables) and d.tables:
        out.append(Recommendation(d.name, "suites", "no expectations folder found: drills validate integrity and "
                                  "row counts only; write suites for the critical tables", action="suites"))
    if d.storage and d.size_trend.points >= 2 and d.size_trend.current > 0:
        growth = d.size_trend.projected / d.size_trend.current
        if growth >= 1.5:
            monthly = fmt_bytes(d.size_trend.slope_per_day * 30.44)
            out.append(Recommendation(d.name, "capacity",
                                      f"the database grows {monthly}/month and would be {growth:.1f}x its size in "
                                      f"12 months ({fmt_bytes(d.size_trend.projected)}): re-run drills as it grows, "
                                      "restore time scales with size"))
    return out


def _installation_recommendations(report: RequirementsReport, policy: Policy | None) -> list[Recommendation]:
    out: list[Recommendation] = []
    if policy is None:
        out.append(Recommendation(None, "policy", "no policy file: targets are unknown and retention was assumed "
                                  f"({fmt_keep(DEFAULT_RETENTION)}); write one (docs/policy.example.yaml)"))
    else:
        keep = policy.retention.keep_policy()
        if keep.daily + keep.weekly * 7 + keep.monthly * 31 + keep.yearly * 366 < 30 and keep.last < 720:
            out.append(Recommendation(None, "retention", f"retention ({fmt_keep(keep)}) keeps under a month: a "
                                      "mistake noticed later cannot be undone; add keep_weekly/keep_monthly"))
        if not policy.repositories.offsite:
            out.append(Recommendation(None, "offsite", "add an offsite repository (another bucket or region): the "
                                      "fourth layer of the defence-in-depth model"))
        if not getattr(policy, "contacts", None):
            out.append(Recommendation(None, "runbook", "the policy lists no contacts: the runbook's escalation "
                                      "table is empty; add contacts to the policy"))
    for d in report.databases:
        out.extend(d.recommendations)
    return out
