"""A drill's cross-check: the provider's own history (sqld bottomless, Turso) restored at the drill's
time T beside dbre's restore, the same checks run on both, and where they disagree named per table.

dbre and the provider keep their histories independently (different code, different storage, a
different path from the database), so a table with the same row count and content checksum in
both restores is confirmed by two systems that share no failure mode but the database itself:
stronger evidence than either restore alone. A disagreement means one of them is wrong, or the two
did not capture the same moment: the provider's granularity (sqld: its WAL batches, up to
LIBSQL_BOTTOMLESS_BATCH_INTERVAL_SECS + 2 s before T; Turso: up to 15 s) is said beside it.

The provider copy is forked at T into a scratch namespace or database, read to a file in the drill's
scratch folder, and the scratch namespace deleted (dbre/provider). It then gets what dbre's restore
got: `run_checks` (integrity_check, foreign_key_check and, for a snapshot, the schema and equivalence
checks against dbre's manifest) and the drill's GX suites; the two copies' tables are compared by
`table_stats` (dbre's per-table row count and xxh3 checksum)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.errors import DbreError, UsageError
from dbre.repository.manifest import iso
from dbre.secrets import Secret
from dbre.validate.checks import CheckResult, failed, open_restored, run_checks

if TYPE_CHECKING:
    from dbre.provider.plan import ProviderResult
    from dbre.repository.manifest import Manifest
    from dbre.validate.suites import Suite, SuiteRun

AGREEMENT = ("Two independent backup systems that agree are stronger evidence than either alone: dbre and "
             "{provider} keep their histories with different code, in different storage, along different paths "
             "from the database, so a table both restore with the same rows and checksum is confirmed twice, and "
             "a fault of one shows as a disagreement instead of passing unseen.")


@dataclass
class CrossCheckTarget:
    """The provider history a drill cross-checks against. sqld: its admin API, the namespace and its
    HTTP URL (to read the fork); turso: the organization and database. Keys and tokens are Secrets."""

    provider: str
    admin_url: str | None = None
    namespace: str | None = None
    url: str | None = None
    org: str | None = None
    database: str | None = None
    token: Secret | None = None  # sqld: LIBSQL_AUTH_TOKEN, to read the fork
    admin_key: Secret | None = None  # sqld: LIBSQL_ADMIN_AUTH_KEY; turso: TURSO_API_TOKEN
    api_url: str | None = None  # turso: TURSO_API_BASE_URL (tests)

    def __post_init__(self) -> None:
        need = {"sqld": (("--provider-admin-url", self.admin_url), ("--provider-namespace", self.namespace),
                         ("--provider-url", self.url)),
                "turso": (("--provider-org", self.org), ("--provider-database", self.database))}
        if self.provider not in need:
            raise UsageError(f"unknown --cross-check {self.provider!r}", "use sqld or turso")
        missing = [name for name, value in need[self.provider] if not value]
        if missing:
            raise UsageError(f"--cross-check {self.provider} needs {', '.join(missing)}", "see 'dbre drill --help'")
        other = need["turso" if self.provider == "sqld" else "sqld"]
        extra = [name for name, value in other if value and name != "--provider-url"]
        if extra:
            raise UsageError(f"{', '.join(extra)} cannot be used with --cross-check {self.provider}", "drop them")
        if self.provider == "turso" and self.admin_key is None:
            raise UsageError("--cross-check turso needs a Platform API token in TURSO_API_TOKEN",
                             "create one with `turso auth api-tokens mint dbre`")

    @property
    def source(self) -> str:
        return str(self.namespace if self.provider == "sqld" else f"{self.org}/{self.database}")

    def restore(self, at: datetime, to: Path) -> ProviderResult:
        """The provider's history at ``at`` to the new file ``to`` (through a scratch fork, deleted)."""
        from dbre.provider.plan import check_at

        check_at(at, self.provider)
        if self.provider == "sqld":
            from dbre.provider.sqld import SqldAdmin, plan_sqld, restore_sqld

            assert self.admin_url and self.namespace
            admin = SqldAdmin(self.admin_url, self.admin_key)
            plan = plan_sqld(admin.url, self.namespace, at, to=to, into=None, force=False)
            return restore_sqld(plan, admin, self.url, self.token)
        from dbre.provider.turso import TursoPlatform, plan_turso, restore_turso

        assert self.org and self.database and self.admin_key
        api = TursoPlatform(self.org, self.admin_key, base_url=self.api_url)
        tplan = plan_turso(api.base_url, self.org, self.database, at, to=to, into=None, force=False)
        return restore_turso(tplan, api)


@dataclass
class TableAgreement:
    table: str
    dbre_rows: int | None
    provider_rows: int | None
    dbre_checksum: str | None
    provider_checksum: str | None

    @property
    def agree(self) -> bool:
        return self.dbre_rows == self.provider_rows and self.dbre_checksum == self.provider_checksum

    @property
    def how(self) -> str:
        if self.agree:
            return "same rows and checksum"
        if self.provider_rows is None:
            return "only in dbre's restore"
        if self.dbre_rows is None:
            return "only in the provider's restore"
        if self.dbre_rows != self.provider_rows:
            return f"{self.dbre_rows} rows in dbre's restore, {self.provider_rows} in the provider's"
        return f"same {self.dbre_rows} rows, different contents (checksums differ)"

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "dbre_rows": self.dbre_rows, "provider_rows": self.provider_rows,
                "dbre_checksum": self.dbre_checksum, "provider_checksum": self.provider_checksum,
                "agree": self.agree, "how": self.how}


@dataclass
class CrossCheck:
    """What the cross-check found: the provider's restore, its checks, and the per-table agreement."""

    target: CrossCheckTarget
    at: datetime
    seconds: float = 0.0
    restore: dict[str, Any] | None = None
    tables: list[TableAgreement] = field(default_factory=list)
    dbre_checks: list[CheckResult] = field(default_factory=list)
    provider_checks: list[CheckResult] = field(default_factory=list)
    dbre_gx: SuiteRun | None = None
    provider_gx: SuiteRun | None = None
    error: str | None = None

    @property
    def gx_differ(self) -> list[str]:
        """Expectations (suite: expectation on table.column) that passed on one copy and failed on the other."""
        if self.dbre_gx is None or self.provider_gx is None:
            return []

        def key(o: Any) -> str:
            return f"{o.expectation} on {o.table}" + (f".{o.column}" if o.column else "")

        mine = {key(o): o.success for o in self.dbre_gx.outcomes}
        theirs = {key(o): o.success for o in self.provider_gx.outcomes}
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))

    @property
    def checks_differ(self) -> list[str]:
        """Checks that failed on one copy only (by check and place)."""
        a = {f"{c.check} on {c.where}" for c in failed(self.dbre_checks)}
        b = {f"{c.check} on {c.where}" for c in failed(self.provider_checks)}
        return sorted(f"{k} fails on {'dbre' if k in a else 'the provider'}'s restore only" for k in a ^ b)

    @property
    def warning(self) -> str | None:
        """What the provider restore did to the provider (sqld: a fork stops the source's own uploads)."""
        if self.target.provider != "sqld" or self.restore is None:
            return None
        from dbre.provider.sqld import FORK_WARNING

        return FORK_WARNING.format(ns=self.target.namespace)

    @property
    def agree(self) -> bool:
        return (self.error is None and all(t.agree for t in self.tables) and not self.gx_differ
                and not failed(self.provider_checks))

    def failures(self) -> list[str]:
        """One line per disagreement, for the drill's failures."""
        p = self.target.provider
        if self.error:
            return [f"cross-check with {p}: {self.error}"]
        out = [f"cross-check with {p} at {iso(self.at)}: table {t.table}: {t.how}" for t in self.tables if not t.agree]
        out += [f"cross-check with {p}: {c.describe()} on the provider's restore" for c in failed(self.provider_checks)]
        out += [f"cross-check with {p}: GX {k}: passes on one restore, fails on the other" for k in self.gx_differ]
        if out and any(not t.agree for t in self.tables):
            from dbre.provider.plan import GUARANTEES

            out.append(f"cross-check with {p}: if those tables were written shortly before {iso(self.at)}, the "
                       f"provider's granularity may explain it ({GUARANTEES[p].granularity}); else one of the two "
                       "backups is wrong")
        return out

    def summary(self) -> dict[str, Any]:
        def gx(run: SuiteRun | None) -> dict[str, int] | None:
            return None if run is None else {"expectations": len(run.outcomes),
                                             "failed": sum(not o.success for o in run.outcomes)}

        return {
            "provider": self.target.provider,
            "source": self.target.source,
            "at": iso(self.at),
            "agree": self.agree,
            "seconds": round(self.seconds, 3),
            "restore": self.restore,
            "tables": [t.to_dict() for t in self.tables],
            "tables_agree": sum(t.agree for t in self.tables),
            "tables_differ": [t.table for t in self.tables if not t.agree],
            "checks": {"dbre": {"total": len(self.dbre_checks), "failed": len(failed(self.dbre_checks))},
                       "provider": {"total": len(self.provider_checks),
                                    "failed": len(failed(self.provider_checks))}},
            "checks_differ": self.checks_differ,
            "expectations": {"dbre": gx(self.dbre_gx), "provider": gx(self.provider_gx),
                             "differ": self.gx_differ},
            "error": self.error,
            "statement": AGREEMENT.format(provider=self.target.provider),
            "warning": self.warning,
        }


def cross_check(restored: Path, at: datetime, target: CrossCheckTarget, scratch: Path, *,
                manifest: Manifest | None, dbre_checks: list[CheckResult], suites: list[Suite] | None,
                dbre_gx: SuiteRun | None) -> CrossCheck:
    """Restore the provider's history at ``at`` into ``scratch``, run the same checks as dbre's restore
    had (``dbre_checks``, ``dbre_gx``) on it, compare the two copies table by table. A provider that
    cannot restore is recorded as the cross-check's error, not raised (UsageError is)."""
    started = time.monotonic()
    cc = CrossCheck(target, at, dbre_checks=list(dbre_checks), dbre_gx=dbre_gx)
    theirs = scratch / "provider.db"
    try:
        result = target.restore(at, theirs)
        cc.restore = {k: v for k, v in result.summary().items()
                      if k in ("at", "scratch", "tables", "size", "create_seconds", "read_seconds", "seconds",
                               "granularity", "cleanup_error")}
        cc.provider_checks = run_checks(theirs, manifest)
        if suites:
            from dbre.validate.suites import run_suites

            cc.provider_gx = run_suites(theirs, suites, snapshot_time=at)
        mine_stats, their_stats = _stats(restored), _stats(theirs)
        for name in sorted(mine_stats.keys() | their_stats.keys()):
            a, b = mine_stats.get(name), their_stats.get(name)
            cc.tables.append(TableAgreement(name, a[0] if a else None, b[0] if b else None,
                                            a[1] if a else None, b[1] if b else None))
    except UsageError:
        raise
    except DbreError as err:
        cc.error = str(err)
    finally:
        theirs.unlink(missing_ok=True)
    cc.seconds = time.monotonic() - started
    return cc


def _stats(path: Path) -> dict[str, tuple[int, str | None]]:
    from dbre.repository.tables import table_stats

    conn = open_restored(path)
    try:
        return table_stats(conn, with_checksums=True)
    finally:
        conn.close()
