"""The plan of a restore from a provider's history, what each provider guarantees, the window a
time must fall in, and the atomic write of the restored database to a file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apsw

from dbre.errors import RestoreError, UsageError
from dbre.repository.manifest import iso

PROVIDERS = ("sqld", "turso")


@dataclass(frozen=True)
class Guarantee:
    """What a provider promises about its own history; ``max_age`` bounds the times it can restore
    (None: nothing is deleted unless its operator configures a retention)."""

    provider: str
    retention: str
    granularity: str
    max_age: timedelta | None


GUARANTEES = {
    "sqld": Guarantee(
        "sqld",
        retention="everything since the namespace's first bottomless generation (bottomless deletes "
                  "nothing unless its operator runs a retention)",
        granularity="the WAL batches uploaded before the time's second: nothing committed after the time, and "
                    "up to LIBSQL_BOTTOMLESS_BATCH_INTERVAL_SECS (15 s by default) + 1 s before it missing",
        max_age=None,
    ),
    "turso": Guarantee(
        "turso",
        retention="24 h (Free), 10 days (Developer), 30 days (Scaler), 90 days (Pro)",
        granularity="to the second, with a gap of up to 15 s before the time (Turso's periodic batch checkpoint)",
        max_age=timedelta(days=90),
    ),
}


def check_at(at: datetime, provider: str, now: datetime | None = None) -> datetime:
    """``at`` if the provider's history can hold it: refuses a time in the future, or older than
    the longest window the provider offers (UsageError, one line)."""
    now = now or datetime.now(UTC)
    if at > now:
        raise UsageError(f"--at {iso(at)} is in the future (now {iso(now)})",
                         "give a past time: the provider's history ends now")
    window = GUARANTEES[provider].max_age
    if window is not None and now - at > window:
        raise UsageError(f"--at {iso(at)} is older than {provider}'s history keeps ({window.days} days on its "
                         f"longest plan)", "restore it from a dbre repository instead (dbre restore --repo)")
    return at


@dataclass
class ProviderRestore:
    """One restore from a provider's history, worked out before anything is asked of the provider.

    ``source`` names the database (a namespace, or ORG/DB); exactly one of ``to`` (a file) and
    ``into`` (a new namespace or database, left in place) is set. A restore to a file goes through
    ``scratch``: a temporary namespace or database created at ``at``, read, then deleted."""

    provider: str
    endpoint: str
    source: str
    at: datetime
    to: Path | None = None
    into: str | None = None
    scratch: str | None = None
    force: bool = False
    replaces: bool = False
    guarantee: Guarantee = field(init=False)

    def __post_init__(self) -> None:
        self.guarantee = GUARANTEES[self.provider]

    @property
    def created(self) -> str:
        """The namespace or database the provider creates at ``at``."""
        name = self.into or self.scratch
        assert name is not None
        return name

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "endpoint": self.endpoint,
            "source": self.source,
            "at": iso(self.at),
            "to": str(self.to) if self.to else None,
            "into": self.into,
            "scratch": self.scratch,
            "replaces_existing": self.replaces,
            "retention": self.guarantee.retention,
            "granularity": self.guarantee.granularity,
        }

    def text(self) -> str:
        """The plan in one paragraph (--dry-run)."""
        kind = "namespace" if self.provider == "sqld" else "database"
        head = f"would restore {kind} {self.source} as it was at {iso(self.at)} from {self.provider}'s history"
        if self.to is not None:
            replacing = " (replacing the existing file)" if self.replaces else ""
            body = (f"into a temporary {kind} {self.scratch}, read it to {self.to}{replacing}, then delete "
                    f"{self.scratch}")
        else:
            body = f"into the new {kind} {self.into} (left in place)"
        return f"{head} ({self.endpoint}) {body}; granularity: {self.guarantee.granularity}"


@dataclass
class ProviderResult:
    """What a provider restore did, with its timings (``create_seconds``: the fork or seeded create)."""

    plan: ProviderRestore
    create_seconds: float
    read_seconds: float | None = None
    tables: int | None = None
    size: int | None = None
    url: str | None = None
    cleanup_error: str | None = None
    seconds: float = 0.0
    plan_note: str | None = None  # what the provider's plan allows, when it was looked up (not in ``summary``)

    def summary(self) -> dict[str, Any]:
        return {
            **self.plan.describe(),
            "tables": self.tables,
            "size": self.size,
            "url": self.url,
            "create_seconds": round(self.create_seconds, 3),
            "read_seconds": None if self.read_seconds is None else round(self.read_seconds, 3),
            "seconds": round(self.seconds, 3),
            "cleanup_error": self.cleanup_error,
        }


def count_tables(conn: apsw.Connection) -> int:
    """Tables, views, indexes and triggers in a database's schema (0: it holds nothing)."""
    row = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    return int(row[0]) if row else 0


def write_database(conn: apsw.Connection, target: Path, force: bool) -> int:
    """Copy the database open in ``conn`` to ``target``: into a flocked temp file beside it (the name
    a killed restore's leftover has, so the next restore removes it), fsync, then renamed over it the
    way `dbre restore` does (never over a file a process has open). Returns the size written."""
    from dbre.restore.full import _replace, open_temp_beside  # (the same rails as restore from a repository)

    tmp, fd = open_temp_beside(target)
    closed = False

    def release() -> None:
        nonlocal closed
        if not closed:
            closed = True
            os.close(fd)

    try:
        dest = apsw.Connection(str(tmp))
        try:
            with dest.backup("main", conn, "main") as b:
                while not b.done:
                    b.step(1024)
            dest.execute("PRAGMA journal_mode=DELETE")
            problems = [r[0] for r in dest.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise RestoreError(f"restore to {target}: the copy fails quick_check: {problems[0]}",
                                   "retry; nothing was written at the target")
        finally:
            dest.close()
        os.fsync(fd)
        size = os.fstat(fd).st_size
        _replace(tmp, target, force, release)
    except BaseException:
        release()
        tmp.unlink(missing_ok=True)
        raise
    release()
    return size
