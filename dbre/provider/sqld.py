"""A self-hosted sqld's own history: bottomless (its WAL shipped to S3) restored by forking a
namespace at a time through the admin API, then, for a file, read back over HTTP and deleted.

What sqld does (libsql-server 0.24, checked against the binary the tests run):
``POST /v1/namespaces/<ns>/fork/<new>`` with ``{"timestamp": "<naive UTC>"}`` restores the
namespace's newest bottomless generation started at or before the time, plus every WAL batch whose
upload second is at or before it (a batch uploaded up to 1 s after it counts). The timestamp must
be a naive date-time (``2026-12-01T12:00:00``):
sqld reads the body as ``Option<Json<..>>``, so a value it cannot parse (``...Z``, ``+00:00``) is
silently dropped and the fork is of the *current* state. A time before the first generation forks an
empty database (no error), which this module reports instead of handing it over. The admin API takes
``Authorization: basic <key>`` when sqld runs with ``--admin-auth-key`` (``LIBSQL_ADMIN_AUTH_KEY``).

A point-in-time fork stops the *source* namespace's own backups (observed with that binary, bottomless
on an S3-compatible server; see tests/test_drill_cross_check.py): after a fork with a timestamp, sqld
uploads no further WAL batch of the source namespace, however many commits follow, until sqld restarts
(which starts a new generation). A fork without a timestamp does not. ``FORK_WARNING`` says so after
every restore through a fork.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dbre.errors import RestoreError, SourceError, UsageError
from dbre.provider.plan import ProviderRestore, ProviderResult, count_tables, write_database
from dbre.secrets import Secret

__all__ = ["SqldAdmin", "plan_sqld", "restore_sqld", "ADMIN_KEY_ENV"]

ADMIN_KEY_ENV = "LIBSQL_ADMIN_AUTH_KEY"
FORK_WARNING = ("sqld (0.24) uploads no further bottomless batch of namespace {ns} after a point-in-time fork "
                "until it restarts: restart sqld to resume that namespace's own history")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def check_namespace(name: str, option: str) -> str:
    if not _NAMESPACE.match(name):
        raise UsageError(f"{option} {name!r} is not a namespace name",
                         "use letters, digits, '-' and '_' (at most 63)")
    return name


def fork_timestamp(at: datetime) -> str:
    """The time sent for ``at``: naive UTC (an aware time would be dropped, see above), one whole second
    before ``at``'s second. sqld keeps a batch when its upload second is at or before the time, i.e.
    uploaded before that second + 1 s: asked for ``floor(at) - 1 s`` it keeps only batches uploaded
    before ``floor(at)``, so no commit after ``at`` is restored (the price: up to 2 s more of gap)."""
    naive = at.astimezone(UTC).replace(tzinfo=None, microsecond=0) - timedelta(seconds=1)
    return naive.isoformat()


class SqldAdmin:
    """The admin API of one sqld (``--admin-listen-addr``): fork and delete namespaces.

    Every method raises RestoreError (sqld refused or failed, unreachable), or UsageError when the
    request names something wrong (no such namespace, the new one exists). The key never appears in
    a message or repr."""

    def __init__(self, admin_url: str, auth_key: Secret | None = None, *, timeout: float = 600.0) -> None:
        if not admin_url.startswith(("http://", "https://")):
            raise UsageError(f"--admin-url {admin_url!r} is not an http(s) URL",
                             "give sqld's --admin-listen-addr as http://HOST:PORT")
        self.url = admin_url.rstrip("/")
        self._key = auth_key
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"SqldAdmin({self.url!r}, key={'set' if self._key else 'none'})"

    def fork(self, namespace: str, new: str, at: datetime | None) -> None:
        """Create ``new`` as ``namespace`` was at ``at`` (from bottomless), or now (None)."""
        body = {"timestamp": fork_timestamp(at)} if at is not None else None
        self._call("POST", f"/v1/namespaces/{namespace}/fork/{new}", body, what=f"fork {namespace} into {new}")

    def create(self, namespace: str) -> None:
        """Create the new, empty namespace ``namespace`` (UsageError if it exists)."""
        self._call("POST", f"/v1/namespaces/{namespace}/create", {}, what=f"create namespace {namespace}")

    def delete(self, namespace: str) -> None:
        self._call("DELETE", f"/v1/namespaces/{namespace}", None, what=f"delete namespace {namespace}")

    def _call(self, method: str, path: str, body: dict[str, str] | None, *, what: str) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "dbre"}
        if self._key:
            key = self._key.reveal()
            headers["Authorization"] = "basic " + (key.decode() if isinstance(key, bytes) else key)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            detail = _error_text(err)
            if err.code == 401:
                raise RestoreError(f"sqld admin {self.url}: {what}: refused (HTTP 401)",
                                   f"set {ADMIN_KEY_ENV} to sqld's --admin-auth-key") from None
            if err.code == 404:
                raise UsageError(f"sqld admin {self.url}: {what}: {detail}", "check --namespace") from None
            if "already exists" in detail:
                raise UsageError(f"sqld admin {self.url}: {what}: {detail}",
                                 "choose a new name (a fork never replaces a namespace)") from None
            if "backup service not configured" in detail:
                raise RestoreError(f"sqld admin {self.url}: {what}: {detail}", "this sqld runs without "
                                   "--enable-bottomless-replication: it keeps no history") from None
            raise RestoreError(f"sqld admin {self.url}: {what}: HTTP {err.code}: {detail}",
                               "see sqld's log") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise RestoreError(f"sqld admin {self.url}: {what}: cannot reach it: {reason}",
                               "check --admin-url (sqld's --admin-listen-addr) and that sqld is up") from None


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read(500).decode("utf-8", "replace")
        return str(json.loads(raw).get("error", raw)) if raw.startswith("{") else (raw or str(err.reason))
    except (OSError, ValueError, AttributeError):
        return str(err.reason)


def plan_sqld(admin_url: str, namespace: str, at: datetime, *, to: Path | None, into: str | None,
              force: bool) -> ProviderRestore:
    """The plan of a fork of ``namespace`` at ``at``: to a file (through a scratch namespace) or into ``into``."""
    from dbre.restore.full import check_target

    check_namespace(namespace, "--namespace")
    target = None
    if into is not None:
        check_namespace(into, "--into-namespace")
        if into == namespace:
            raise UsageError("--into-namespace names the namespace being restored",
                             "a fork creates a new namespace: choose another name")
    else:
        assert to is not None
        target = check_target(to, force)
    return ProviderRestore("sqld", admin_url.rstrip("/"), namespace, at, to=target, into=into,
                           scratch=None if into else f"dbre-restore-{secrets.token_hex(4)}", force=force,
                           replaces=target is not None and target.exists())


def restore_sqld(plan: ProviderRestore, admin: SqldAdmin, url: str | None, token: Secret | None) -> ProviderResult:
    """Fork, then (to a file) read the fork over sqld's HTTP API at ``url`` and delete it. A fork that
    holds no table (the time is before the namespace's history) is deleted and refused."""
    from dbre.sources.remote import RemoteLibsqlSource

    started = time.monotonic()
    admin.fork(plan.source, plan.created, plan.at)
    result = ProviderResult(plan, create_seconds=time.monotonic() - started)
    try:
        if url is not None and plan.to is None:  # (a look at the new namespace's schema, not a read of it)
            result.tables = schema_objects(url, plan.created, token)
            if not result.tables:
                raise RestoreError(f"restore of namespace {plan.source} at {plan.describe()['at']}: sqld's history "
                                   "holds no table then (the time is before its first bottomless backup, or it was "
                                   "empty)", "give a later --at; the empty fork was deleted")
        elif url is not None:
            read_started = time.monotonic()
            source = RemoteLibsqlSource(url, token, method="dump", namespace=plan.created)
            try:
                with source.connect() as conn:
                    result.tables = count_tables(conn)
                    if not result.tables:
                        raise RestoreError(
                            f"restore of namespace {plan.source} at {plan.describe()['at']}: sqld's history holds "
                            "no table then (the time is before its first bottomless backup, or it was empty)",
                            "give a later --at; nothing was written")
                    assert plan.to is not None
                    result.size = write_database(conn, plan.to, plan.force)
            except SourceError as err:
                raise RestoreError(f"restore of namespace {plan.source}: reading the fork failed: {err.message}",
                                   err.hint) from None
            result.read_seconds = time.monotonic() - read_started
    except BaseException:
        if plan.into is not None:  # (a refused or unread fork is not left behind under the asked name)
            _delete_quietly(admin, plan.into)
        raise
    finally:
        if plan.scratch is not None:
            result.cleanup_error = _delete_quietly(admin, plan.scratch)
    result.seconds = time.monotonic() - started
    return result


def schema_objects(url: str, namespace: str, token: Secret | None) -> int:
    """How many schema objects (tables, indexes, views, triggers) ``namespace`` holds, by one Hrana query."""
    import base64

    from dbre.sources.remote import RemoteLibsqlSource

    base = RemoteLibsqlSource(url, token, namespace=namespace).base_url
    headers = {"Content-Type": "application/json", "User-Agent": "dbre",
               "x-namespace-bin": base64.b64encode(namespace.encode()).decode().rstrip("=")}
    if token:
        value = token.reveal()
        headers["Authorization"] = "Bearer " + (value.decode() if isinstance(value, bytes) else value)
    body = {"baton": None, "requests": [{"type": "execute", "stmt": {"sql": "SELECT count(*) FROM sqlite_schema"}},
                                        {"type": "close"}]}
    req = urllib.request.Request(base + "/v2/pipeline", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        first = out["results"][0]
        if first.get("type") != "ok":
            raise RestoreError(f"sqld {base}: namespace {namespace}: {first.get('error', {}).get('message')}",
                               "check --url names the same sqld as --admin-url")
        return int(first["response"]["result"]["rows"][0][0]["value"])
    except urllib.error.HTTPError as err:
        raise RestoreError(f"sqld {base}: namespace {namespace}: HTTP {err.code}: {_error_text(err)}",
                           "check --url (and LIBSQL_AUTH_TOKEN) names the same sqld as --admin-url") from None
    except (urllib.error.URLError, OSError) as err:
        raise RestoreError(f"sqld {base}: cannot reach it: {getattr(err, 'reason', None) or err}",
                           "check --url (sqld's --http-listen-addr)") from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise RestoreError(f"sqld {base}: namespace {namespace}: unexpected answer to a query",
                           "check --url names sqld's HTTP API") from None


def _delete_quietly(admin: SqldAdmin, namespace: str) -> str | None:
    try:
        admin.delete(namespace)
    except (RestoreError, UsageError) as err:
        return str(err)
    return None
