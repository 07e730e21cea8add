"""Turso Cloud's own history through its Platform API: a new database seeded from a database at a
timestamp (what ``turso db create --from-db DB --timestamp T`` does), then, for a file, read with a
short-lived read-only token and deleted.

The requests, as docs.turso.tech documents them (api-reference/databases/*, features/point-in-time-recovery):

- ``GET /v1/organizations/{org}/databases/{db}`` -> ``{"database": {"Name", "DbId", "Hostname", "group", ...}}``
- ``POST /v1/organizations/{org}/databases`` with ``{"name", "group", "seed": {"type": "database", "name":
  <source>, "timestamp": "<RFC 3339>"}}`` -> ``{"database": {"DbId", "Hostname", "Name"}}`` (409: the name is taken)
- ``POST /v1/organizations/{org}/databases/{db}/auth/tokens?expiration=..&authorization=read-only`` -> ``{"jwt"}``
- ``DELETE /v1/organizations/{org}/databases/{db}`` -> ``{"database": <name>}``
- ``GET /v1/organizations/{org}`` -> ``{"organization": {"name", "slug", "type", "plan_id", "plan_timeline", ...}}``
  (api-reference/organizations/retrieve): the plan's name only. No endpoint gives the plan's point-in-time
  window (``/plans`` lists quotas of rows, storage, databases, locations, groups, bytes synced, not it), so
  ``PLAN_WINDOWS`` holds the windows features/point-in-time-recovery documents per plan name.

Every request carries ``Authorization: Bearer <TURSO_API_TOKEN>``; errors come as ``{"error": "..."}``.
``TURSO_API_BASE_URL`` points the client elsewhere (contract tests, an on-prem API); a plain-http base
URL means plain-http databases too (``libsql://HOST?tls=0``)."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dbre.errors import RestoreError, SourceError, UsageError
from dbre.provider.plan import ProviderRestore, ProviderResult, count_tables, write_database
from dbre.secrets import Secret

__all__ = ["TursoPlatform", "TursoDatabase", "plan_turso", "restore_turso", "API_TOKEN_ENV", "API_URL_ENV"]

API_TOKEN_ENV = "TURSO_API_TOKEN"
API_URL_ENV = "TURSO_API_BASE_URL"
DEFAULT_API_URL = "https://api.turso.tech"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_READ_TOKEN_LIFETIME = "1h"  # long enough to read the new database, short if it leaks
_READ_ATTEMPTS = 6  # a database created a moment ago may not answer at once
# How far back each plan restores (docs.turso.tech features/point-in-time-recovery; "starter" is the free
# plan's older name). A plan not listed (enterprise, a new one) is not checked here: Turso refuses for it.
PLAN_WINDOWS = {"free": timedelta(days=1), "starter": timedelta(days=1), "developer": timedelta(days=10),
                "scaler": timedelta(days=30), "pro": timedelta(days=90)}


def check_name(name: str, option: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"{option} {name!r} is not a Turso database or organization name",
                         "use lowercase letters, digits and '-'")
    return name


def seed_timestamp(at: datetime) -> str:
    """RFC 3339 UTC to the second, as the documented examples (``2024-01-01T00:00:00Z``): the fraction is
    dropped, i.e. the restore is at the whole second before ``at``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TursoDatabase:
    """A database as the Platform API describes it (only the fields dbre uses)."""

    name: str
    hostname: str
    db_id: str
    group: str | None = None


class TursoPlatform:
    """A client of Turso's Platform API for one organization. Raises RestoreError (refused, failed,
    unreachable) or UsageError (no such database, the new name is taken). The token is a Secret and
    never appears in a message or repr."""

    def __init__(self, org: str, token: Secret, *, base_url: str | None = None, timeout: float = 120.0) -> None:
        self.org = check_name(org, "--org")
        self.base_url = (base_url or DEFAULT_API_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise UsageError(f"{API_URL_ENV} {self.base_url!r} is not an http(s) URL",
                             f"unset {API_URL_ENV} to use {DEFAULT_API_URL}")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"TursoPlatform(org={self.org!r}, base_url={self.base_url!r}, token=**redacted**)"

    def database_url(self, db: TursoDatabase) -> str:
        return f"libsql://{db.hostname}" + ("?tls=0" if self.base_url.startswith("http://") else "")

    def get_database(self, name: str) -> TursoDatabase:
        out = self._call("GET", f"/databases/{name}", what=f"look up database {name}")
        return _database(out, name)

    def create_from_timestamp(self, name: str, group: str, source: str, at: datetime) -> TursoDatabase:
        """Create ``name`` in ``group`` as ``source`` was at ``at`` (Turso's point-in-time recovery)."""
        body = {"name": name, "group": group,
                "seed": {"type": "database", "name": source, "timestamp": seed_timestamp(at)}}
        out = self._call("POST", "/databases", body, what=f"create {name} from {source} at {seed_timestamp(at)}")
        return _database(out, name, group)

    def create_read_token(self, name: str) -> Secret:
        query = urllib.parse.urlencode({"expiration": _READ_TOKEN_LIFETIME, "authorization": "read-only"})
        out = self._call("POST", f"/databases/{name}/auth/tokens?{query}", {}, what=f"create a token for {name}")
        jwt = out.get("jwt")
        if not isinstance(jwt, str) or not jwt:
            raise RestoreError(f"Turso API: create a token for {name}: the answer has no jwt",
                               "check TURSO_API_BASE_URL points at the Platform API")
        return Secret(jwt)

    def plan_id(self) -> str | None:
        """The organization's plan (``plan_id`` of GET /v1/organizations/{org}), None if the answer has none."""
        out = self._call("GET", "", what=f"look up organization {self.org}")
        org = out.get("organization")
        plan = org.get("plan_id") if isinstance(org, dict) else None
        return plan if isinstance(plan, str) and plan else None

    def delete_database(self, name: str) -> None:
        self._call("DELETE", f"/databases/{name}", what=f"delete database {name}")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str) -> dict[str, Any]:
        token = self._token.reveal()
        headers = {"Authorization": "Bearer " + (token.decode() if isinstance(token, bytes) else token),
                   "Accept": "application/json", "User-Agent": "dbre"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = f"{self.base_url}/v1/organizations/{self.org}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err, what) from None
        except (urllib.error.URLError, OSError) as err:
            reason = self._scrub(str(getattr(err, "reason", None) or err))
            raise RestoreError(f"Turso API: {what}: cannot reach {self.base_url}: {reason}",
                               "check the network (or TURSO_API_BASE_URL)") from None
        try:
            out = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise RestoreError(f"Turso API: {what}: the answer is not JSON", "check TURSO_API_BASE_URL") from None
        if not isinstance(out, dict):
            raise RestoreError(f"Turso API: {what}: unexpected answer", "check TURSO_API_BASE_URL")
        return out

    def _http_error(self, err: urllib.error.HTTPError, what: str) -> RestoreError | UsageError:
        try:
            raw = err.read(500).decode("utf-8", "replace")
            detail = str(json.loads(raw).get("error", raw)) if raw.startswith("{") else raw
        except (OSError, ValueError, AttributeError):
            detail = ""
        detail = self._scrub(detail) or str(err.reason)
        if err.code in (401, 403):
            return RestoreError(f"Turso API: {what}: the token was refused (HTTP {err.code})",
                                f"check {API_TOKEN_ENV} (a Platform API token: turso auth api-tokens mint)")
        if err.code == 404:
            return UsageError(f"Turso API: {what}: not found: {detail}", "check --org and --database")
        if err.code == 409:
            return UsageError(f"Turso API: {what}: {detail}", "choose a new name for --into")
        return RestoreError(f"Turso API: {what}: HTTP {err.code}: {detail}",
                            "a time outside your plan's window is refused: see `turso plan show`")

    def _scrub(self, text: str) -> str:
        token = self._token.reveal()
        token = token.decode() if isinstance(token, bytes) else token
        text = text.replace(token, "**redacted**") if token else text
        return " ".join(text.split())[:300]


def _database(out: dict[str, Any], name: str, group: str | None = None) -> TursoDatabase:
    db = out.get("database")
    if not isinstance(db, dict) or not isinstance(db.get("Hostname"), str):
        raise RestoreError(f"Turso API: database {name}: the answer has no database.Hostname",
                           "check TURSO_API_BASE_URL points at the Platform API")
    return TursoDatabase(name=str(db.get("Name", name)), hostname=db["Hostname"], db_id=str(db.get("DbId", "")),
                         group=db.get("group", group))


def plan_turso(base_url: str, org: str, database: str, at: datetime, *, to: Path | None, into: str | None,
               force: bool) -> ProviderRestore:
    """The plan: a new database ``into`` at ``at``, or a scratch one read to the file ``to``, then deleted."""
    from dbre.restore.full import check_target

    check_name(org, "--org")
    check_name(database, "--database")
    target = None
    if into is not None:
        check_name(into, "--into")
        if into == database:
            raise UsageError("--into names the database being restored",
                             "Turso restores into a new database: choose another name")
    else:
        assert to is not None
        target = check_target(to, force)
    return ProviderRestore("turso", base_url.rstrip("/"), f"{org}/{database}", at, to=target, into=into,
                           scratch=None if into else f"dbre-pitr-{secrets.token_hex(4)}", force=force,
                           replaces=target is not None and target.exists())


def check_plan_window(api: TursoPlatform, at: datetime, now: datetime | None = None) -> str:
    """Look up the organization's plan and refuse a time outside its window (UsageError, before anything is
    created); returns what was found, in a sentence. A lookup that fails is said, not raised: Turso checks too."""
    try:
        plan_id = api.plan_id()
    except (RestoreError, UsageError) as err:
        return f"the organization's plan could not be looked up ({err.message}): Turso checks the window itself"
    window = PLAN_WINDOWS.get((plan_id or "").lower())
    if window is None:
        return f"plan {plan_id or '(none given)'}: its window is not documented to dbre: Turso checks it itself"
    now = now or datetime.now(UTC)
    days = f"{window.days} days" if window.days > 1 else "24 hours"
    if now - at > window:
        raise UsageError(f"Turso: {seed_timestamp(at)} is older than the {days} organization {api.org}'s {plan_id} "
                         "plan restores", "give a later time, or restore it from a dbre repository")
    return f"plan {plan_id}: restores the last {days}; the time is inside it"


def restore_turso(plan: ProviderRestore, api: TursoPlatform, *, plan_window: bool = False) -> ProviderResult:
    """Create the database at the time; to a file: mint a read-only token, read it, delete it. ``plan_window``:
    first look up the organization's plan and refuse a time outside its window (``ProviderResult.plan_note``)."""
    from dbre.sources.remote import RemoteLibsqlSource

    source_name = plan.source.split("/", 1)[1]
    note = check_plan_window(api, plan.at) if plan_window else None
    started = time.monotonic()
    src = api.get_database(source_name)
    new = api.create_from_timestamp(plan.created, src.group or "default", source_name, plan.at)
    result = ProviderResult(plan, create_seconds=time.monotonic() - started, url=api.database_url(new), plan_note=note)
    if plan.to is None:
        result.seconds = time.monotonic() - started
        return result
    try:
        read_started = time.monotonic()
        token = api.create_read_token(new.name)
        remote = RemoteLibsqlSource(result.url or "", token, method="dump")
        for attempt in range(_READ_ATTEMPTS):
            try:
                with remote.connect() as conn:
                    result.tables = count_tables(conn)
                    result.size = write_database(conn, plan.to, plan.force)
                break
            except SourceError as err:
                if attempt == _READ_ATTEMPTS - 1 or "cannot reach" not in err.message:
                    raise RestoreError(f"restore of {plan.source}: reading {new.name} failed: {err.message}",
                                       err.hint) from None
                time.sleep(min(2.0 ** attempt, 10.0))
        result.read_seconds = time.monotonic() - read_started
    finally:
        try:
            api.delete_database(new.name)
        except (RestoreError, UsageError) as err:
            result.cleanup_error = str(err)
    result.seconds = time.monotonic() - started
    return result
