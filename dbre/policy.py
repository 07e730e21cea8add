"""The policy file: which databases, repositories, targets, retention, schedules and alerts there are.

An installation has one policy (YAML, see docs/policy.example.yaml). ``load_policy(path)`` parses and
validates it into a ``Policy`` or raises ``UsageError`` with one line naming the offending field.
Secrets never appear in it: keys and tokens are references, ``env:NAME`` (an environment
variable) or ``prefect-secret:BLOCK`` (a Prefect Secret block), resolved by whoever runs the work
(the CLI or the Prefect tasks), never here. A literal value in such a field is refused.
"""

from __future__ import annotations

import re
import zoneinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from dbre.errors import UsageError
from dbre.repository.keep import KeepDuration, KeepPolicy
from dbre.repository.manifest import check_db_name

# -- value types ---------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: object) -> int:
    """Seconds in a duration such as ``90s``, ``15m``, ``1h``, ``1h30m``, ``2d``, ``1w`` (or a bare number
    of seconds). Raises ValueError on anything else, or on zero."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.isdigit():
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"cannot parse duration {value!r} (use e.g. 30s, 15m, 1h, 1h30m, 1d)")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError("not a duration (use e.g. 30s, 15m, 1h, 1d)")
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return int(round(seconds))


def format_duration(seconds: float) -> str:
    """``3600`` -> ``1h``, ``5400`` -> ``1h30m``, ``45`` -> ``45s``."""
    rest = int(round(seconds))
    if rest <= 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s"):
        n, rest = divmod(rest, _UNIT_SECONDS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


ENV_REF = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
BLOCK_REF = re.compile(r"^prefect-secret:([a-z0-9][a-z0-9-]*)$")
SECRET_REF_HINT = "write env:VARIABLE or prefect-secret:BLOCK-NAME"


def check_secret_ref(value: str) -> str:
    """Accept ``env:NAME`` or ``prefect-secret:BLOCK``; refuse anything else as a literal secret.

    The message never repeats the value: it may be the very secret that must not be printed."""
    value = value.strip()
    if ENV_REF.match(value) or BLOCK_REF.match(value):
        return value
    if value.startswith(("env:", "prefect-secret:")):
        raise ValueError(f"malformed secret reference ({SECRET_REF_HINT}; block names are lowercase, digits, '-')")
    raise ValueError(f"a literal secret is not allowed in the policy file; {SECRET_REF_HINT}")


def _check_url_or_ref(value: str) -> str:
    value = value.strip()
    if value.startswith(("env:", "prefect-secret:")):
        return check_secret_ref(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL or a reference (env:VARIABLE or prefect-secret:BLOCK-NAME)")
    return value


_SECRET_QUERY_KEYS = {"authtoken", "auth_token", "token", "jwt", "password", "secret"}


def _no_credentials_in_url(value: str) -> str:
    """Refuse URLs that carry credentials (user:password@ or a token in the query string)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if "://" in value:
        parts = urlsplit(value)
        if parts.username or parts.password:
            raise ValueError("credentials in the URL are not allowed; use auth_token or the AWS environment")
        if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in parse_qsl(parts.query)):
            raise ValueError("a token in the URL is not allowed; put it in auth_token as env:VARIABLE")
    return value


def _check_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as UTC or Europe/Berlin)") from None
    return value


_CRON_FIELD = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/\d+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/\d+)?)*$")


def _check_cron(value: str) -> str:
    fields = value.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ValueError(f"not a 5-field cron expression: {value!r} (e.g. '0 * * * *' for hourly)")
    return " ".join(fields)


def _check_db_name(value: str) -> str:
    try:
        return check_db_name(value)
    except UsageError as err:
        raise ValueError(err.message) from None


Duration = Annotated[int, BeforeValidator(parse_duration)]
SecretRef = Annotated[str, AfterValidator(check_secret_ref)]
UrlOrSecretRef = Annotated[str, AfterValidator(_check_url_or_ref)]
Location = Annotated[str, AfterValidator(_no_credentials_in_url)]
TimeZone = Annotated[str, AfterValidator(_check_timezone)]
KeepWithin = Annotated[str, AfterValidator(lambda v: str(KeepDuration.parse(v)))]  # restic's format, m = months
CronText = Annotated[str, AfterValidator(_check_cron)]
DbName = Annotated[str, AfterValidator(_check_db_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- sections ------------------------------------------------------------------------------------


class Tier(StrEnum):
    """How much the business depends on a database: orders drills, reports and alert urgency."""

    critical = "critical"
    high = "high"
    standard = "standard"
    low = "low"


def _check_admin_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username or parts.password:
        raise ValueError("must be an http(s) URL without credentials, e.g. http://127.0.0.1:9090")
    return value.strip().rstrip("/")


_SQLD_FIELDS = ("admin_url", "namespace", "url", "admin_key")
_TURSO_FIELDS = ("org", "database", "api_token")


class ProviderPolicy(_Model):
    """The provider's own history of a database, for a restore from it (`dbre restore --provider`, the
    restore form's provider source): a self-hosted sqld with bottomless, or Turso Cloud."""

    kind: Literal["sqld", "turso"]
    admin_url: Annotated[str, AfterValidator(_check_admin_url)] | None = Field(
        default=None, description="sqld: its admin API (--admin-listen-addr), e.g. http://127.0.0.1:9090")
    namespace: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
                                  description="sqld: the namespace restored; default: the database's namespace")
    url: Location | None = Field(default=None, description="sqld: its HTTP API, to read a fork to a file")
    admin_key: SecretRef | None = Field(default=None, description="sqld: --admin-auth-key, env:VAR or "
                                        "prefect-secret:BLOCK; default: $LIBSQL_ADMIN_AUTH_KEY")
    org: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="turso: organization")
    database: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$",
                                 description="turso: the database's name in Turso")
    api_token: SecretRef | None = Field(default=None, description="turso: Platform API token, env:VAR or "
                                        "prefect-secret:BLOCK; default: $TURSO_API_TOKEN")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> ProviderPolicy:
        own, other = (_SQLD_FIELDS, _TURSO_FIELDS) if self.kind == "sqld" else (_TURSO_FIELDS, _SQLD_FIELDS)
        foreign = [f for f in other if getattr(self, f) is not None]
        if foreign:
            raise ValueError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a {self.kind} "
                             f"setting (a {self.kind} entry takes {', '.join(own)})")
        needed = ["admin_url"] if self.kind == "sqld" else ["org", "database"]
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs {' and '.join(missing)}")
        return self


class DatabasePolicy(_Model):
    """One database to protect."""

    name: DbName
    source: Location = Field(description="A file path, or a libsql:// / http(s):// / ws(s):// URL")
    auth_token: SecretRef | None = Field(default=None, description="Token: env:VAR or prefect-secret:BLOCK")
    namespace: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                                  description="Namespace on a sqld run with --enable-namespaces (source is its URL)")
    replica_url: str | None = Field(
        default=None, description="The namespace addressed by hostname, e.g. http://{namespace}.sqld.internal:8080 "
        "(a wildcard DNS record): backups then sync an embedded replica and read only what changed, "
        "instead of a full /dump each time")
    tier: Tier = Tier.standard
    rpo: Duration = Field(description="Recovery point objective, e.g. 1h: the most data one may lose")
    rto: Duration = Field(description="Recovery time objective, e.g. 15m: the longest a restore may take")
    checksums: bool | None = Field(
        default=None, description="Per-table content checksums in each snapshot; default: up to 256 MiB"
    )
    expectations: str | None = Field(default=None, description="Folder of Great Expectations suites for this database")
    replicate: bool = Field(default=False, description="`dbre replicate --policy` ships its WAL continuously "
                            "(a local file source in WAL mode); `dbre status` then watches its replication lag")
    owner: str | None = None
    # -- read by the requirements report (dbre.report.requirements) --
    critical_tables: list[str] = Field(default_factory=list, description="Tables whose loss stops the business")
    compliance: list[str] = Field(default_factory=list, description="Regulations and contracts, e.g. 'GDPR: ...'")
    min_retention: Duration | None = Field(default=None, description="Shortest retention a regulation allows, e.g. 1y")
    provider: ProviderPolicy | None = Field(default=None, description="The provider's own history (sqld or "
                                            "turso): defaults of a restore from it")

    @model_validator(mode="after")
    def _replica_url(self) -> DatabasePolicy:
        if self.replica_url is not None:
            from dbre.errors import DbreError
            from dbre.sources.remote import _namespace_url

            try:
                _namespace_url(self.replica_url, self.namespace)
            except DbreError as err:
                raise ValueError(f"{err.message}; {err.hint}" if err.hint else err.message) from None
        return self


class ObjectLockPolicy(_Model):
    """S3 Object Lock for a repository: what `dbre init --policy` records in it (it cannot change later)."""

    mode: Literal["governance", "compliance"]
    period: Duration = Field(description="How long every object a snapshot needs stays undeletable, e.g. 30d")


class Repositories(_Model):
    """Where snapshots go: the primary repository and offsite copies (the fourth layer).

    Each entry is a URL, or a mapping ``{url: ..., object_lock: {mode: governance|compliance, period: 30d}}``."""

    primary: Location
    offsite: list[Location] = Field(default_factory=list)
    encryption_key: SecretRef | None = None
    object_lock: dict[str, ObjectLockPolicy] = Field(
        default_factory=dict, description="Filled from the mapping entries: URL -> its Object Lock")

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        locks: dict[str, Any] = dict(data.get("object_lock") or {})

        def one(entry: Any) -> Any:
            if isinstance(entry, dict):
                extra = set(entry) - {"url", "object_lock"}
                if "url" not in entry or extra:
                    raise ValueError("a repository entry is a URL or {url: ..., object_lock: {mode: ..., period: ...}}")
                if entry.get("object_lock") is not None:
                    locks[str(entry["url"])] = entry["object_lock"]
                return entry["url"]
            return entry

        if "primary" in data:
            data["primary"] = one(data["primary"])
        offsite = data.get("offsite")
        if offsite is not None:
            data["offsite"] = [one(e) for e in (offsite if isinstance(offsite, list) else [offsite])]
        data["object_lock"] = locks
        return data

    @model_validator(mode="after")
    def _locks_on_s3(self) -> Repositories:
        for url in self.object_lock:
            if url not in [self.primary, *self.offsite]:
                raise ValueError(f"object_lock for {url}, which is not a repository here")
            if not url.startswith("s3://"):
                raise ValueError(f"object_lock on {url}: Object Lock needs an s3:// repository")
        return self

    def lock_for(self, url: str) -> Any:
        """The Object Lock (dbre.repository.immutable.ObjectLock) the policy asks of ``url``, or None."""
        found = self.object_lock.get(url)
        if found is None:
            return None
        from dbre.repository.immutable import ObjectLock

        return ObjectLock.of(found.mode, float(found.period))


class Retention(_Model):
    """Which snapshots to keep, in restic's terms; ``prune`` then frees the space of the rest."""

    keep_last: NonNegativeInt = 0
    keep_hourly: NonNegativeInt = 0
    keep_daily: NonNegativeInt = 0
    keep_weekly: NonNegativeInt = 0
    keep_monthly: NonNegativeInt = 0
    keep_yearly: NonNegativeInt = 0
    keep_within: KeepWithin | None = Field(
        default=None, description="Keep every snapshot within this of the newest, restic's format: 7d, 12h, 1y6m")
    timezone: TimeZone | None = Field(
        default=None, description="Zone of the hours, days, weeks...; default: the schedules' time zone")
    prune: bool = True

    @model_validator(mode="after")
    def _some_rule(self) -> Retention:
        if not any((self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly,
                    self.keep_yearly, self.keep_within)):
            raise ValueError("keeps nothing: set at least one keep_* above zero, or keep_within")
        return self

    def keep_policy(self) -> KeepPolicy:
        return KeepPolicy(self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly,
                          self.keep_monthly, self.keep_yearly, self.keep_within, self.timezone)


class Schedule(_Model):
    """When one workflow runs: a cron expression in a time zone (the section's default if unset)."""

    cron: CronText
    timezone: TimeZone | None = None
    enabled: bool = True


WORKFLOWS = ("backup_hourly", "backup_nightly", "verify_weekly", "drill_monthly", "report_quarterly")


class Schedules(_Model):
    """One schedule per scheduled workflow; restore has none (it runs on demand)."""

    timezone: TimeZone = "UTC"
    backup_hourly: Schedule = Schedule(cron="0 * * * *")
    backup_nightly: Schedule = Schedule(cron="30 1 * * *")
    verify_weekly: Schedule = Schedule(cron="0 4 * * 0")
    drill_monthly: Schedule = Schedule(cron="0 3 1 * *")
    report_quarterly: Schedule = Schedule(cron="0 6 1 1,4,7,10 *")

    @model_validator(mode="after")
    def _fill_timezones(self) -> Schedules:
        for name in WORKFLOWS:
            sched: Schedule = getattr(self, name)
            if sched.timezone is None:
                setattr(self, name, sched.model_copy(update={"timezone": self.timezone}))
        return self

    def items(self) -> list[tuple[str, Schedule]]:
        return [(name, getattr(self, name)) for name in WORKFLOWS]


class Drills(_Model):
    """Recovery drills: how often, what to restore, when a missing drill becomes a warning."""

    cadence: Literal["weekly", "monthly", "quarterly"] = "monthly"
    target: Literal["newest", "random"] = "newest"
    warn_after_days: int = Field(default=90, ge=1)
    scratch_dir: str | None = None


def _absolute_dir(value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path (or start with ~), not {value!r}: reports go to one known place")
    return str(path)


def check_base_url(value: str) -> str:
    """An http(s) URL without credentials or query, without a trailing slash (ValueError otherwise)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, e.g. https://reports.example.com/dbre, not {value!r}")
    if parts.username or parts.password or parts.query:
        raise ValueError("credentials or a query in the URL are not allowed")
    return value.rstrip("/")


class Reports(_Model):
    """Where drill and requirements reports are written, and the URL that serves that folder (if any):
    a report under ``dir`` is linked in the Prefect UI as ``base_url`` + its path below ``dir``."""

    dir: Annotated[str, AfterValidator(_absolute_dir)] | None = Field(
        default=None, description="Absolute folder for reports (default: ~/.local/share/dbre/reports on the worker)")
    base_url: Annotated[str, AfterValidator(check_base_url)] | None = Field(
        default=None, description="http(s) URL at which dir is served; unset: reports are not linked")


AlertEvent = Literal["backup_failure", "backup_delay", "storage_capacity", "verify_failure", "drill_failure",
                     "drill_missed"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("backup_failure", "backup_delay", "storage_capacity", "verify_failure",
                                        "drill_failure", "drill_missed")


class AlertChannel(_Model):
    """Where alerts go: a webhook (Slack, Teams, a pager) or a Prefect notification block."""

    name: str = Field(min_length=1)
    kind: Literal["webhook", "prefect-block"] = "webhook"
    url: UrlOrSecretRef | None = Field(default=None, description="Webhook URL, or a reference to it")
    block: str | None = Field(default=None, description="Name of a Prefect notification block (kind prefect-block)")
    events: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS))

    @model_validator(mode="after")
    def _target(self) -> AlertChannel:
        if self.kind == "webhook" and not self.url:
            raise ValueError("a webhook channel needs url")
        if self.kind == "prefect-block" and not self.block:
            raise ValueError("a prefect-block channel needs block")
        return self


class Fleet(_Model):
    """How a fleet backup fans out: concurrent backups per run, the task runner, a global limit."""

    max_concurrency: int = Field(default=4, ge=1, le=1024)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(default=None, description="A running Dask scheduler; unset starts a local cluster")
    concurrency_limit: str | None = Field(default="dbre-backup", description="Global limit shared by runs")
    concurrency_limit_slots: int = Field(default=8, ge=1)


# -- sections read by the requirements report and the documents it writes ------------------------


class Contact(_Model):
    """A person or rota the runbook lists: who to call, how, and when they answer."""

    role: str = Field(min_length=1, description="e.g. primary on-call, DBA, tech lead, escalation")
    name: str = Field(min_length=1)
    reach: str = Field(default="", description="How to reach them: phone, Slack channel, e-mail, pager")
    hours: str = Field(default="24/7", description="When they answer, e.g. 24/7 or business hours")


class Costs(_Model):
    """Storage prices for the cost projection; defaults are S3 Standard in us-east-1 (GB = 2^30 bytes)."""

    storage_gb_month: float = Field(default=0.023, ge=0)
    put_per_1000: float = Field(default=0.005, ge=0, description="PUT, COPY, POST and LIST requests")
    get_per_1000: float = Field(default=0.0004, ge=0, description="GET and all other requests")
    currency: str = "USD"


class Policy(_Model):
    """A whole installation's policy."""

    version: Literal[1] = 1
    repositories: Repositories
    databases: list[DatabasePolicy] = Field(min_length=1)
    retention: Retention
    schedules: Schedules = Schedules()
    drills: Drills = Drills()
    alerts: list[AlertChannel] = Field(default_factory=list)
    fleet: Fleet = Fleet()
    contacts: list[Contact] = Field(default_factory=list)
    compliance: list[str] = Field(default_factory=list, description="Installation-wide regulations and contracts")
    costs: Costs = Costs()
    reports: Reports = Reports()

    @model_validator(mode="after")
    def _retention_timezone(self) -> Policy:
        if self.retention.timezone is None:  # days and weeks are those of the schedules' zone
            self.retention = self.retention.model_copy(update={"timezone": self.schedules.timezone})
        return self

    @field_validator("databases")
    @classmethod
    def _unique_names(cls, dbs: list[DatabasePolicy]) -> list[DatabasePolicy]:
        seen: set[str] = set()
        for db in dbs:
            if db.name in seen:
                raise ValueError(f"database {db.name!r} appears twice")
            seen.add(db.name)
        return dbs

    def database(self, name: str) -> DatabasePolicy:
        for db in self.databases:
            if db.name == name:
                return db
        known = ", ".join(d.name for d in self.databases)
        raise UsageError(f"database {name!r} is not in the policy", f"known databases: {known}")

    def select(self, names: list[str] | None) -> list[DatabasePolicy]:
        """The named databases (all when ``names`` is empty), in policy order."""
        if not names:
            return list(self.databases)
        return [self.database(n) for n in names]


# -- loading -------------------------------------------------------------------------------------


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "literal[")) or "[" in part:
            continue  # pydantic's name for a validator or a union member, not a field
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _describe(err: ValidationError) -> str:
    """One line from a ValidationError: field path and reason of the first problem, then a count.

    Built from ``loc`` and ``msg`` only: pydantic's own text repeats the input, which may be a secret."""
    errors = err.errors(include_url=False, include_input=False)
    first = errors[0]
    msg = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "extra_forbidden":
        msg = "is not a known field"
    line = f"{_where(first['loc'])}: {msg}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def parse_policy(data: Any, origin: str = "policy") -> Policy:
    """Validate already-parsed YAML/JSON data into a Policy; ``origin`` names it in errors."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: the policy must be a mapping of sections", "see docs/policy.example.yaml")
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"{origin}: {_describe(err)}", "see docs/policy.example.yaml") from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; UsageError with one line (file, field, reason) if it is wrong."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"policy {p}: no such file", "pass the path of the policy file (DBRE_POLICY)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"policy {p}: cannot read it ({err})", "check the file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise UsageError(f"policy {p}: invalid YAML{where}: {problem}", "fix the YAML syntax") from None
    except RecursionError:
        raise UsageError(f"policy {p}: nested too deeply to be a policy", "fix the YAML structure") from None
    try:
        return parse_policy(data, f"policy {p}")
    except RecursionError:
        raise UsageError(f"policy {p}: nested too deeply to be a policy", "fix the YAML structure") from None
