"""The data of a requirements analysis: per database and table what was measured, each target
checked against it, the storage projection and the recommendations. Plain dataclasses and the
formatting helpers the documents share; no I/O here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dbre.report.inventory import DatabaseInventory, TableInventory
from dbre.repository.retention import KeepPolicy

if TYPE_CHECKING:
    from dbre.report.requirements_cost import CostPerRpo

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
    # the last drill's restore was validated (its RTO a real one), whatever its RPO or cross-check said
    last_drill_validated: bool | None = None
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
class ProviderHistory:
    """What the database's provider keeps of its own history (the first layer), beside what dbre
    adds; ``restore`` is the `dbre restore --provider` command for it (None: no provider history)."""

    provider: str  # "turso", "sqld" or "none"
    retention: str
    granularity: str
    restore: str | None


def provider_history(source: str | None, namespace: str | None = None) -> ProviderHistory:
    """The provider history a database's source has: Turso Cloud for ``*.turso.io``, a self-hosted
    sqld (if it runs bottomless) for any other libSQL URL, none for a file."""
    from urllib.parse import urlsplit

    from dbre.provider.plan import GUARANTEES

    parts = urlsplit(source or "")
    if parts.scheme not in ("libsql", "http", "https", "ws", "wss"):
        return ProviderHistory("none", "none: a local file has no history but dbre's", "-", None)
    if (parts.hostname or "").endswith(".turso.io"):
        g = GUARANTEES["turso"]
        return ProviderHistory("turso", g.retention, g.granularity,
                               "dbre restore --provider turso --org ORG --database DB --at TIME --to FILE")
    g = GUARANTEES["sqld"]
    plain = parts.scheme in ("http", "ws") or (parts.scheme == "libsql" and "tls=0" in parts.query)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    http = f"{'http' if plain else 'https'}://{host}" + (f":{parts.port}" if parts.port else "")  # (no credentials)
    return ProviderHistory("sqld", "only if sqld runs with --enable-bottomless-replication: " + g.retention,
                           g.granularity, f"dbre restore --provider sqld --admin-url ADMIN_URL --namespace "
                           f"{namespace or 'default'} --url {http} --at TIME --to FILE")


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
    cost_per_rpo: CostPerRpo | None = None
    replication_lag_seconds: float | None = None  # segments exist: the lag when the report was made
    provider: ProviderHistory | None = None  # the provider's own history, beside dbre's

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


# -- formatting ----------------------------------------------------------------------------------


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


def fmt_keep(keep: KeepPolicy) -> str:
    parts = [f"{name} {n}" for name, n in vars(keep).items() if n]
    return ", ".join(parts) or "nothing"
