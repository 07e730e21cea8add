"""`dbre restore --provider turso`: a CONTRACT test. Turso Cloud is out of reach here, so a local
HTTP server stands in for the Platform API: it checks every request against the documented one
(method, path, query, ``Authorization: Bearer``, JSON body) and answers with the documented response
shapes (docs.turso.tech api-reference/databases/{retrieve,create,create-token,delete} and
features/point-in-time-recovery). What it cannot show is that Turso restores the right state: the
"new database" it hands out is a real sqld (with a JWT), whatever the timestamp. The read of that
database (a minted read-only token, then /dump) is real."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import apsw
import pytest

from dbre.repository.manifest import iso
from tests.dbfactory import assert_one_line_error, cli
from tests.sqld import SqldServer, sqld_auth  # noqa: F401 - the session fixture

API_TOKEN = "platform-api-token-0123456789-must-never-show"
ORG = "acme"
_RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@dataclass
class FakePlatform:
    """The Platform API as documented, for one organization with one database ``shop`` (group
    ``default``). ``calls``: (method, path) of every request; ``violations``: what did not match."""

    db_host: str
    db_jwt: str
    existing: set[str] = field(default_factory=lambda: {"shop"})
    calls: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    seed_error: tuple[int, str] | None = None  # answer the create with this (status, error)
    url: str = ""
    plan_id: str = "developer"  # the organization's plan (GET /v1/organizations/{org}): a 10-day window

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        self.calls.append((method, path))
        if headers.get("authorization") != f"Bearer {API_TOKEN}":
            return 401, {"error": "unauthorized"}
        if method == "GET" and path == f"/v1/organizations/{ORG}":  # api-reference/organizations/retrieve
            if raw or parts.query:
                self.violations.append(f"organization lookup with a body or query: {raw_path}")
            return 200, {"organization": {"name": ORG, "slug": ORG, "type": "team", "overages": False,
                                          "blocked_reads": False, "blocked_writes": False, "plan_id": self.plan_id,
                                          "plan_timeline": "monthly", "platform": ""}}
        prefix = f"/v1/organizations/{ORG}/databases"
        body: Any = None
        if raw:
            if headers.get("content-type") != "application/json":
                self.violations.append(f"{method} {path}: a body without Content-Type: application/json")
            body = json.loads(raw)
        self.bodies.append(body)
        m = re.fullmatch(re.escape(prefix) + r"/([a-z0-9-]+)(/auth/tokens)?", path)
        if method == "GET" and m and not m.group(2):
            name = m.group(1)
            if name not in self.existing:
                return 404, {"error": f"database {name} not found"}
            return 200, {"database": {"Name": name, "DbId": "0eb771dd-6906-11ee-8553-eaa7715aeaf2",
                                      "Hostname": f"{name}-{ORG}.turso.io", "group": "default",
                                      "primaryRegion": "ams", "regions": ["ams"], "type": "logical",
                                      "version": "0.24.32", "is_schema": False, "schema": "",
                                      "block_reads": False, "block_writes": False, "allow_attach": False,
                                      "sleeping": False}}
        if method == "POST" and path == prefix:
            if not isinstance(body, dict) or set(body) != {"name", "group", "seed"}:
                self.violations.append(f"create: body {body!r} is not name, group, seed")
                return 400, {"error": "bad body"}
            seed = body["seed"]
            if not (isinstance(seed, dict) and set(seed) == {"type", "name", "timestamp"} and seed["type"] == "database"
                    and seed["name"] == "shop" and _RFC3339_Z.match(str(seed["timestamp"]))):
                self.violations.append(f"create: seed {seed!r} is not {{type: database, name, RFC 3339 timestamp}}")
                return 400, {"error": "bad seed"}
            if body["group"] != "default":
                self.violations.append(f"create: group {body['group']!r}, not the source's")
            if self.seed_error:
                return self.seed_error[0], {"error": self.seed_error[1]}
            if body["name"] in self.existing:
                return 409, {"error": f"database with name {body['name']} already exists"}
            self.existing.add(body["name"])
            return 200, {"database": {"DbId": "1fc882ee-7a17-22ff-9664-fbb8826bfbf3", "Hostname": self.db_host,
                                      "Name": body["name"]}}
        if method == "POST" and m and m.group(2):
            if query != {"expiration": ["1h"], "authorization": ["read-only"]}:
                self.violations.append(f"token: query {query!r}, not a short read-only token")
            if m.group(1) not in self.existing:
                return 404, {"error": "database not found"}
            return 200, {"jwt": self.db_jwt}
        if method == "DELETE" and m and not m.group(2):
            if m.group(1) == "shop":
                self.violations.append("the source database was deleted")
            self.existing.discard(m.group(1))
            return 200, {"database": m.group(1)}
        self.violations.append(f"undocumented request {method} {raw_path}")
        return 404, {"error": "not found"}


@pytest.fixture
def platform(sqld_auth: SqldServer) -> Iterator[FakePlatform]:  # noqa: F811
    assert sqld_auth.token
    fake = FakePlatform(db_host=sqld_auth.url.removeprefix("http://"), db_jwt=sqld_auth.token)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out = fake.handle(self.command, self.path, headers, raw)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _env(platform: FakePlatform, token: str | None = API_TOKEN) -> dict[str, str | None]:
    return {"TURSO_API_BASE_URL": platform.url, "TURSO_API_TOKEN": token}


def _args(*more: str) -> list[str]:
    return ["restore", "--provider", "turso", "--org", ORG, "--database", "shop", *more]


def _an_hour_ago() -> str:
    return iso(datetime.fromtimestamp(time.time() - 3600, UTC))


def test_to_file_creates_reads_with_a_read_only_token_and_deletes(platform: FakePlatform, sqld_auth: SqldServer,  # noqa: F811
                                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                   ) -> None:
    sqld_auth.pipeline(["DROP TABLE IF EXISTS turso_contract", "CREATE TABLE turso_contract(i INTEGER PRIMARY KEY)",
                        "INSERT INTO turso_contract VALUES (1), (2), (3)"])
    out = tmp_path / "shop.db"
    caplog.set_level(logging.DEBUG)
    r = cli(*_args("--at", _an_hour_ago(), "--to", str(out), "--json"), env=_env(platform))
    assert r.returncode == 0, r
    assert platform.violations == []
    s = json.loads(r.stdout)
    scratch = s["scratch"]
    assert re.fullmatch(r"dbre-pitr-[0-9a-f]{8}", scratch)
    assert [c for c in platform.calls] == [
        ("GET", f"/v1/organizations/{ORG}"),  # the plan: the time is checked against its window first
        ("GET", f"/v1/organizations/{ORG}/databases/shop"),
        ("POST", f"/v1/organizations/{ORG}/databases"),
        ("POST", f"/v1/organizations/{ORG}/databases/{scratch}/auth/tokens"),
        ("DELETE", f"/v1/organizations/{ORG}/databases/{scratch}"),
    ]
    assert platform.bodies[1]["name"] == scratch and platform.existing == {"shop"}  # the scratch one is gone
    conn = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert [r[0] for r in conn.execute("SELECT i FROM turso_contract ORDER BY i")] == [1, 2, 3]
    finally:
        conn.close()
    assert s["size"] == out.stat().st_size and s["cleanup_error"] is None
    for text in (r.stdout, r.stderr, caplog.text):  # neither token shows anywhere
        assert API_TOKEN not in text and platform.db_jwt not in text


def test_into_creates_the_database_and_leaves_it(platform: FakePlatform) -> None:
    at = "2026-11-30T09:46:08.750Z"
    r = cli(*_args("--at", at, "--into", "shop-restored"), env=_env(platform))
    assert r.returncode == 0, r
    assert platform.violations == []
    assert platform.calls == [("GET", f"/v1/organizations/{ORG}"), ("GET", f"/v1/organizations/{ORG}/databases/shop"),
                              ("POST", f"/v1/organizations/{ORG}/databases")]
    assert platform.bodies[1] == {"name": "shop-restored", "group": "default",
                                  "seed": {"type": "database", "name": "shop", "timestamp": "2026-11-30T09:46:08Z"}}
    assert "into the new database shop-restored" in r.stdout and f"libsql://{platform.db_host}" in r.stdout
    assert "shop-restored" in platform.existing
    # a name that is taken: Turso answers 409, dbre one line, exit 2
    again = cli(*_args("--at", at, "--into", "shop-restored"), env=_env(platform))
    assert_one_line_error(again, 2, "already exists", "choose a new name for --into")


def test_refusals_are_one_line_and_never_show_the_token(platform: FakePlatform, tmp_path: Path) -> None:
    out = str(tmp_path / "x.db")
    wrong = "a-wrong-token-that-must-not-show"
    r = cli(*_args("--at", _an_hour_ago(), "--to", out), env=_env(platform, wrong))
    line = assert_one_line_error(r, 1, "token was refused (HTTP 401)", "TURSO_API_TOKEN")
    assert wrong not in line and API_TOKEN not in line
    # Turso refuses a time outside the plan's window: its words are passed on
    platform.seed_error = (400, "timestamp is outside of the retention window of your plan")
    r = cli(*_args("--at", _an_hour_ago(), "--to", out), env=_env(platform))
    assert_one_line_error(r, 1, "HTTP 400", "outside of the retention window", "turso plan show")
    platform.seed_error = None
    r = cli(*_args("--at", _an_hour_ago(), "--to", out), env=_env(platform, None))
    assert_one_line_error(r, 2, "needs a Platform API token in TURSO_API_TOKEN")
    r = cli("restore", "--provider", "turso", "--org", ORG, "--database", "nosuch", "--at", _an_hour_ago(),
            "--to", out, env=_env(platform))
    assert_one_line_error(r, 2, "not found", "check --org and --database")
    for args, needles in [
        (_args("--at", iso(datetime(2026, 1, 1, tzinfo=UTC)), "--to", out), ["older than turso's history", "90 days"]),
        (_args("--at", iso(datetime(2030, 1, 1, tzinfo=UTC)), "--to", out), ["in the future"]),
        (_args("--at", _an_hour_ago(), "--to", out, "--into", "x"), ["either to a file (--to) or into a new database"]),
        (_args("--at", _an_hour_ago(), "--into", "x", "--force"), ["--force with --into"]),
        (_args("--at", _an_hour_ago(), "--into", "shop"), ["--into names the database being restored"]),
        (_args("--at", _an_hour_ago(), "--into", "Bad_Name"), ["is not a turso database"]),
        (_args("--at", _an_hour_ago(), "--into", "x", "--namespace", "n"), ["--namespace cannot be used with"]),
        (["restore", "--provider", "turso", "--org", ORG, "--at", _an_hour_ago(), "--to", out], ["needs --database"]),
    ]:
        r = cli(*args, env=_env(platform))
        assert_one_line_error(r, 2, *needles)
        assert API_TOKEN not in r.stdout + r.stderr
    assert not list(tmp_path.iterdir())
    assert platform.violations == []


def test_dry_run_sends_nothing(platform: FakePlatform, tmp_path: Path) -> None:
    r = cli(*_args("--at", _an_hour_ago(), "--to", str(tmp_path / "x.db"), "--dry-run"), env=_env(platform, None))
    assert r.returncode == 0, r
    assert platform.calls == []
    assert "would restore database acme/shop as it was at" in r.stdout and "temporary database dbre-pitr-" in r.stdout
    assert "gap of up to 15 s" in r.stdout


def test_a_failed_read_still_deletes_the_scratch_database(platform: FakePlatform, tmp_path: Path) -> None:
    platform.db_jwt = "not-a-valid-jwt"  # the database refuses the minted token
    out = tmp_path / "x.db"
    r = cli(*_args("--at", _an_hour_ago(), "--to", str(out)), env=_env(platform))
    assert_one_line_error(r, 1, "reading dbre-pitr-", "refused the token")
    assert platform.calls[-1][0] == "DELETE" and platform.existing == {"shop"}
    assert not out.exists() and "not-a-valid-jwt" not in r.stderr


def test_client_repr_hides_the_token() -> None:
    from dbre.provider.turso import TursoPlatform
    from dbre.secrets import Secret

    api = TursoPlatform(ORG, Secret(API_TOKEN), base_url="http://127.0.0.1:1")
    assert API_TOKEN not in repr(api) and API_TOKEN not in str(vars(api))


def test_a_time_outside_the_plans_window_is_refused_before_anything_is_created(platform: FakePlatform,
                                                                               tmp_path: Path) -> None:
    """The CLI looks the organization's plan up (documented: GET /v1/organizations/{org}, plan_id) and refuses a
    time older than the plan keeps (free: 24 h), one line, before any database is created."""
    platform.plan_id = "free"
    two_days_ago = iso(datetime.fromtimestamp(time.time() - 2 * 86400, UTC))
    r = cli(*_args("--at", two_days_ago, "--to", str(tmp_path / "x.db")), env=_env(platform))
    line = assert_one_line_error(r, 2, "free")
    assert API_TOKEN not in line
    assert platform.calls == [("GET", f"/v1/organizations/{ORG}")] and platform.existing == {"shop"}
    assert not list(tmp_path.iterdir()) and platform.violations == []
