"""The restore form's provider source: a restore from the provider's own history (`dbre restore --provider`)
started from the Prefect UI. The Turso path is a CONTRACT test against the local HTTP server of
tests/test_provider_turso.py (it checks every request against the documented Platform API and hands out a
real sqld as the "new database"), which here also answers the documented organization lookup
(api-reference/organizations/retrieve: the plan_id the flow checks the time against); the sqld path (one test,
slow) forks a real sqld with bottomless on the S3 test server. Flows run under the session's
``prefect_test_harness``."""

from tests.prefect_fixtures import artifacts_of  # noqa: I001 - sets Prefect's environment first

# isort: split

import json
import re
import time
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import apsw
import pytest
import yaml
from prefect import get_client

from dbre.errors import UsageError
from dbre.policy import parse_policy
from deployments.serve import load_flow
from flows.references import REFUSED, SECRET_REF_PATTERN
from flows.restore import RestoreRequest, restore_flow, run_name
from tests.sqld import SqldServer, sqld_auth, start_sqld  # noqa: F401 - the session fixture
from tests.test_provider_sqld import ADMIN_KEY, _admin, _restorable_after
from tests.test_provider_turso import API_TOKEN, ORG, FakePlatform, platform  # noqa: F401 - the contract server

TOKEN_ENV = "DBRE_FLOW_TEST_TURSO_TOKEN"
LITERAL = "tur-literal-api-token-typed-into-the-form-7c1d"


@pytest.fixture
def turso(platform: FakePlatform) -> FakePlatform:  # noqa: F811
    """The contract server, also answering ``GET /v1/organizations/{org}`` as documented, with the plan in
    ``turso.plan_id`` (default developer: 10 days)."""
    documented = platform.handle
    platform.plan_id = "developer"  # type: ignore[attr-defined]

    def handle(method: str, raw_path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        path = urlsplit(raw_path).path
        if not (method == "GET" and path == f"/v1/organizations/{ORG}"):
            return documented(method, raw_path, headers, raw)
        platform.calls.append((method, path))
        if raw or urlsplit(raw_path).query:
            platform.violations.append(f"organization lookup with a body or query: {raw_path}")
        if headers.get("authorization") != f"Bearer {API_TOKEN}":
            return 401, {"error": "unauthorized"}
        return 200, {"organization": {"name": ORG, "slug": ORG, "type": "team", "overages": False,
                                      "blocked_reads": False, "blocked_writes": False,
                                      "plan_id": platform.plan_id, "plan_timeline": "monthly",  # type: ignore
                                      "platform": ""}}

    platform.handle = handle  # type: ignore[method-assign]
    return platform


def _policy(tmp_path: Path, provider: dict[str, Any] | None) -> str:
    db: dict[str, Any] = {"name": "shop", "source": str(tmp_path / "shop.db"), "rpo": "1h", "rto": "15m"}
    if provider is not None:
        db["provider"] = provider
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"repositories": {"primary": str(tmp_path / "repo")}, "databases": [db],
                                    "retention": {"keep_last": 2}}))
    return str(path)


def _turso_policy(tmp_path: Path) -> str:
    return _policy(tmp_path, {"kind": "turso", "org": ORG, "database": "shop", "api_token": f"env:{TOKEN_ENV}"})


def _an_hour_ago() -> datetime:
    return datetime.fromtimestamp(time.time() - 3600, UTC).replace(second=0, microsecond=0)


def _summary(state: Any, key: str) -> str:
    found = [a for a in artifacts_of(state.state_details.flow_run_id) if a.key == key]
    assert found, [a.key for a in artifacts_of(state.state_details.flow_run_id)]
    return str(found[0].data)


def _with(request: RestoreRequest, **fields: Any) -> RestoreRequest:
    """The request with other fields, validated again."""
    return RestoreRequest.model_validate({**request.model_dump(), **fields})


def _run(state: Any) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


# --------------------------------------------------------------------------- the policy and the form, no server


def test_policy_provider_entry_is_validated_in_one_line() -> None:
    base = {"repositories": {"primary": "/r"}, "retention": {"keep_last": 1}}

    def policy(provider: Any) -> Any:
        return parse_policy({**base, "databases": [{"name": "app", "source": "/a.db", "rpo": "1h", "rto": "1h",
                                                    "provider": provider}]})

    ok = policy({"kind": "sqld", "admin_url": "http://127.0.0.1:9090/", "admin_key": "env:K"})
    assert ok.databases[0].provider is not None and ok.databases[0].provider.admin_url == "http://127.0.0.1:9090"
    for provider, needle in [
        ({"kind": "sqld"}, "databases[0].provider: kind sqld needs admin_url"),
        ({"kind": "turso", "org": ORG}, "databases[0].provider: kind turso needs database"),
        ({"kind": "sqld", "admin_url": "http://x", "org": "a"}, "org is not a sqld setting"),
        ({"kind": "turso", "org": ORG, "database": "shop", "api_token": LITERAL},
         "databases[0].provider.api_token: a literal secret is not allowed"),
        ({"kind": "turso", "org": "Acme", "database": "shop"}, "databases[0].provider.org"),
        ({"kind": "nope"}, "databases[0].provider.kind"),
    ]:
        with pytest.raises(UsageError) as err:
            policy(provider)
        line = str(err.value)
        assert needle in line and "\n" not in line and LITERAL not in line, line


def test_form_schema_shows_the_provider_fields_described() -> None:
    schema = load_flow("flows/restore.py:restore_flow").parameters.model_dump()
    req = schema["definitions"]["RestoreRequest"]["properties"]
    assert req["source"]["enum"] == ["repository", "provider"] and req["source"]["default"] == "repository"
    assert "provider" in req["source"]["description"] and req["provider"]["description"]
    assert req["provider"]["$ref"] == "#/definitions/ProviderSource"
    section = schema["definitions"]["ProviderSource"]["properties"]
    assert set(section) == {"kind", "admin_url", "namespace", "url", "into_namespace", "admin_key", "token", "org",
                            "turso_database", "into", "api_token"}
    assert section["kind"]["enum"] == ["policy", "sqld", "turso"]
    for name, field in section.items():
        assert field.get("description"), f"provider.{name} has no description"
        assert {"type": "null"} not in field.get("anyOf", []) and field.get("default", "") is not None, name
    for name in ("admin_key", "token", "api_token"):  # references only: a Secret block or secret:NAME / env:NAME
        branches = section[name]["anyOf"]
        assert [b.get("type") for b in branches] == [None, "string"], branches
        assert branches[1]["pattern"] == SECRET_REF_PATTERN and "reference" in section[name]["description"]
    assert "database" not in section  # (serve.py turns every model's `database` into the policy's names)
    at = "2026-12-01T02:14:00Z"
    req_sqld = RestoreRequest(database="app", source="provider", at=at, target="x.db", provider={"kind": "sqld"})
    assert run_name(req_sqld) == "dry run: provider restore of app @ 2026-12-01T02:14Z (sqld)"
    into = RestoreRequest(database="app", source="provider", at=at, dry_run=False, provider={"into": "app-copy"})
    assert run_name(into, "turso") == "provider restore of app @ 2026-12-01T02:14Z (turso)"
    # each wrong combination: one message naming the fields
    for fields, needle in [
        ({"source": "provider", "target": "x.db"}, "source provider needs at"),
        ({"source": "provider", "at": at}, "either to the file at target or into a new namespace"),
        ({"source": "provider", "at": at, "target": "x.db", "provider": {"into": "n"}}, "either to the file"),
        ({"source": "provider", "at": at, "provider": {"into": "n"}, "force": True}, "untick force"),
        ({"source": "provider", "at": at, "target": "x", "snapshot": "ab12"}, "not a snapshot or txid"),
        ({"source": "provider", "at": at, "target": "x", "scenario": "table", "tables": ["t"]}, "scenario whole"),
        ({"source": "provider", "at": at, "target": "x", "provider": {"kind": "sqld", "org": ORG}},
         "provider.org cannot be used with provider kind sqld"),
        ({"target": "x.db", "provider": {"org": ORG}}, "the provider section is filled in but source is repository"),
        ({}, "target is required"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)) as err:
            RestoreRequest.model_validate({"database": "app", **fields})
        assert "input_value" not in str(err.value)  # (hide_input_in_errors: a typed token is never repeated)
    literal = RestoreRequest(database="app", source="provider", at=at, target="x", provider={"api_token": LITERAL})
    assert literal.provider.api_token == REFUSED and LITERAL not in literal.model_dump_json()


# --------------------------------------------------------------------------- Turso: the contract server


@pytest.mark.usefixtures("prefect_harness")
def test_turso_dry_run_then_restore_to_a_file(turso: FakePlatform, sqld_auth: SqldServer,  # noqa: F811
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sqld_auth.pipeline(["DROP TABLE IF EXISTS flow_contract", "CREATE TABLE flow_contract(i INTEGER PRIMARY KEY)",
                        "INSERT INTO flow_contract VALUES (7), (8)"])
    monkeypatch.setenv("TURSO_API_BASE_URL", turso.url)
    monkeypatch.setenv(TOKEN_ENV, API_TOKEN)
    monkeypatch.delenv("TURSO_API_TOKEN", raising=False)
    policy = _turso_policy(tmp_path)
    at = _an_hour_ago()
    target = tmp_path / "shop-restored.db"
    request = RestoreRequest(database="shop", source="provider", at=at, target=str(target))  # kind: the policy's
    dry = restore_flow(request, policy=policy, return_state=True)
    assert dry.is_completed(), dry.message
    assert turso.calls == [] and not target.exists()  # a dry run asks the provider nothing
    assert _run(dry).name == f"dry run: provider restore of shop @ {at:%Y-%m-%dT%H:%M}Z (turso)"
    plan = dry.result()["plan"]
    assert plan["source"] == f"{ORG}/shop" and re.fullmatch(r"dbre-pitr-[0-9a-f]{8}", plan["scratch"])
    md = _summary(dry, "restore-shop-provider-summary")
    assert md.startswith("# Dry run: provider restore of `shop` (turso)") and "dry_run* unticked" in md
    assert f"to `{target}` through a temporary database" in md and "gap of up to 15 s" in md
    table = json.loads(_summary(dry, "restore-shop-provider-table"))
    assert [r["step"] for r in table] == ["plan"] and table[0]["to"] == str(target)

    done = restore_flow(request.model_copy(update={"dry_run": False}), policy=policy, return_state=True)
    assert done.is_completed(), done.message
    assert turso.violations == []
    scratch = done.result()["result"]["scratch"]
    assert turso.calls == [("GET", f"/v1/organizations/{ORG}"),  # the plan, checked before anything is created
                              ("GET", f"/v1/organizations/{ORG}/databases/shop"),
                              ("POST", f"/v1/organizations/{ORG}/databases"),
                              ("POST", f"/v1/organizations/{ORG}/databases/{scratch}/auth/tokens"),
                              ("DELETE", f"/v1/organizations/{ORG}/databases/{scratch}")]
    assert turso.bodies[1]["seed"]["timestamp"] == f"{at:%Y-%m-%dT%H:%M:%S}Z" and turso.existing == {"shop"}
    conn = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert [r[0] for r in conn.execute("SELECT i FROM flow_contract ORDER BY i")] == [7, 8]
    finally:
        conn.close()
    assert _run(done).name == f"provider restore of shop @ {at:%Y-%m-%dT%H:%M}Z (turso)"
    md = _summary(done, "restore-shop-provider-summary")
    assert md.startswith("# Provider restore of `shop` (turso)") and "integrity_check and foreign_key_check pass" in md
    assert "Turso plan developer: restores the last 10 days; the time is inside it." in md
    assert [r["step"] for r in json.loads(_summary(done, "restore-shop-provider-table"))] == ["plan", "restore",
                                                                                             "validate"]
    everything = json.dumps(_run(done).parameters) + md + str(done.message)
    assert API_TOKEN not in everything and turso.db_jwt not in everything
    # the same file again without force: refused before the provider is asked, with what to do
    calls = len(turso.calls)
    again = restore_flow(request.model_copy(update={"dry_run": False}), policy=policy, return_state=True)
    assert again.is_failed() and "already exists" in (again.message or "") and len(turso.calls) == calls
    failed = _summary(again, "restore-shop-provider-failed-summary")
    assert "What to do:" in failed and "force" in failed and "--force" not in failed


@pytest.mark.usefixtures("prefect_harness")
def test_turso_into_a_new_database_from_the_form_alone(turso: FakePlatform, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No policy: everything from the form, the token as a reference to an environment variable."""
    monkeypatch.setenv("TURSO_API_BASE_URL", turso.url)
    monkeypatch.setenv(TOKEN_ENV, API_TOKEN)
    at = _an_hour_ago()
    request = RestoreRequest(database="shop", source="provider", at=at, dry_run=False, provider={
        "kind": "turso", "org": ORG, "turso_database": "shop", "into": "shop-before", "api_token": f"env:{TOKEN_ENV}"})
    done = restore_flow(request, return_state=True)
    assert done.is_completed(), done.message
    assert turso.calls == [("GET", f"/v1/organizations/{ORG}"), ("GET", f"/v1/organizations/{ORG}/databases/shop"),
                              ("POST", f"/v1/organizations/{ORG}/databases")] and turso.violations == []
    assert "shop-before" in turso.existing
    md = _summary(done, "restore-shop-provider-summary")
    assert "into the new database `shop-before` (left in place)" in md and f"libsql://{turso.db_host}" in md
    # Turso refuses (the name is taken now): the run fails with one line and an artifact saying what to do
    taken = restore_flow(request, return_state=True)
    assert taken.is_failed()
    assert (taken.message or "").startswith("Turso API: create shop-before from shop at") and "already exists" in (
        taken.message or "") and "\n" not in (taken.message or "")
    failed = _summary(taken, "restore-shop-provider-failed-summary")
    assert "What to do:" in failed and "Choose a new name for provider.into" in failed
    # Turso refuses a time outside the plan's window: its words, and the other way back (dbre's own backups)
    turso.seed_error = (400, "timestamp is outside of the retention window of your plan")
    window = restore_flow(request.model_copy(update={"provider": request.provider.model_copy(
        update={"into": "shop-before-2"})}), return_state=True)
    assert window.is_failed() and "outside of the retention window" in (window.message or "")
    failed = _summary(window, "restore-shop-provider-failed-summary")
    assert "turso plan show" in failed and "source* to repository" in failed and "dbre-pitr-" in failed
    assert API_TOKEN not in failed + (window.message or "")
    # the organization's plan keeps less than asked: refused after the lookup, before anything is created
    turso.seed_error = None
    turso.plan_id = "free"  # type: ignore[attr-defined]
    del turso.calls[:]
    two_days_ago = datetime.fromtimestamp(time.time() - 2 * 86400, UTC)
    old = restore_flow(_with(request, at=two_days_ago, provider={**request.provider.model_dump(), "into": "shop-old"}),
                       return_state=True)
    assert old.is_failed() and "older than the 24 hours organization acme's free plan restores" in (old.message or "")
    assert turso.calls == [("GET", f"/v1/organizations/{ORG}")] and "shop-old" not in turso.existing
    # a plan dbre has no documented window for: said, and Turso is left to check
    turso.plan_id = "enterprise"  # type: ignore[attr-defined]
    ent = restore_flow(_with(request, at=two_days_ago, provider={**request.provider.model_dump(), "into": "shop-old"}),
                       return_state=True)
    assert ent.is_completed(), ent.message
    assert "plan enterprise: its window is not documented to dbre" in _summary(ent, "restore-shop-provider-summary")
    assert turso.violations == []


@pytest.mark.usefixtures("prefect_harness")
def test_form_errors_are_one_line_and_a_literal_token_is_refused_before_any_work(
        platform: FakePlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("TURSO_API_BASE_URL", platform.url)
    monkeypatch.delenv("TURSO_API_TOKEN", raising=False)
    at = _an_hour_ago()
    target = tmp_path / "x.db"
    # a token typed into the form, passed as a mapping (as the API does): refused, stored as a reference only
    literal = restore_flow({"database": "shop", "source": "provider", "at": at.isoformat(), "target": str(target),
                            "dry_run": False, "provider": {"kind": "turso", "org": ORG, "turso_database": "shop",
                                                           "api_token": LITERAL}}, return_state=True)
    assert literal.is_failed()
    assert (literal.message or "").startswith("restore: the provider.api_token parameter is not a reference")
    run = _run(literal)
    assert run.parameters["request"]["provider"]["api_token"] == REFUSED
    assert LITERAL not in json.dumps(run.parameters) + (literal.message or "")
    assert any(a.key == "restore-refused-summary" for a in artifacts_of(run.id))
    # kind policy, but the policy has no provider entry: says how to fix it
    no_entry = _policy(tmp_path, None)
    request = RestoreRequest(database="shop", source="provider", at=at, target=str(target))
    state = restore_flow(request, policy=no_entry, return_state=True)
    assert state.is_failed()
    assert state.message == ("restore: provider.kind is policy, but the policy has no provider entry for shop (choose "
                             "sqld or turso in the provider section, or add a provider entry to the database in the "
                             "policy)")
    assert "What to do:" in _summary(state, "restore-shop-provider-failed-summary")
    # missing fields: named
    missing = restore_flow(_with(request, provider={"kind": "turso", "org": ORG}), policy=no_entry,
                           return_state=True)
    assert missing.is_failed() and (missing.message or "").startswith(
        "restore: a turso provider restore needs provider.turso_database")
    sqld = restore_flow(_with(request, provider={"kind": "sqld", "admin_url": "http://127.0.0.1:1"}),
                        policy=no_entry, return_state=True)
    assert sqld.is_failed() and "needs provider.namespace and provider.url" in (sqld.message or "")
    # no token anywhere: refused before the provider is asked (a dry run needs none)
    request = RestoreRequest(database="shop", source="provider", at=at, target=str(target), dry_run=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    unset = restore_flow(request, policy=_turso_policy(tmp_path), return_state=True)  # the policy names a variable
    assert unset.is_failed() and unset.message == (f"secret env:{TOKEN_ENV}: environment variable {TOKEN_ENV} is not "
                                                   "set (set it in the environment of the worker or serve process)")
    no_token = restore_flow(request, policy=_policy(tmp_path, {"kind": "turso", "org": ORG, "database": "shop"}),
                            return_state=True)
    assert no_token.is_failed() and "Platform API token" in (no_token.message or "") and "env:NAME" in (
        no_token.message or "")
    # a cross-field error of the form (a request without at): Prefect refuses the parameters, nothing runs
    bad = restore_flow({"database": "shop", "source": "provider", "target": str(target)}, return_state=True)
    assert bad.is_failed() and "source provider needs at" in (bad.message or "")
    assert platform.calls == [] and not target.exists()


# --------------------------------------------------------------------------- sqld: a real one, with bottomless


@pytest.mark.usefixtures("prefect_harness")
def test_sqld_fork_at_a_time_to_a_file_and_into_a_namespace(moto_server: str, s3_client: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """sqld (namespaces, admin key, bottomless every second on the S3 test server): state 1 committed and
    uploaded, its time taken, then state 2; the form restores the time of state 1, exactly."""
    bucket = f"flow-bottomless-{int(time.time() * 1000) % 10**9}"
    s3_client.create_bucket(Bucket=bucket)
    env = {"BUCKET": bucket, "ENDPOINT": moto_server, "DATABASE_ID": "dbre-flow-test", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "BATCH_INTERVAL_SECS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(f"LIBSQL_BOTTOMLESS_{k}", v)
    server = start_sqld(tmp_path / "sqld", namespaces=True, admin=True,
                        extra_args=["--enable-bottomless-replication", "--admin-auth-key", ADMIN_KEY])
    try:
        assert server.admin_url
        _admin(server, "POST", "/v1/namespaces/app/create")
        seen: dict[str, int] = {}
        server.pipeline(["CREATE TABLE t(i INTEGER PRIMARY KEY)", "INSERT INTO t VALUES (1)"], namespace="app")
        t1 = _restorable_after(s3_client, bucket, seen)
        time.sleep(max(0.0, t1 + 0.3 - time.time()))
        server.pipeline(["INSERT INTO t VALUES (2)"], namespace="app")
        _restorable_after(s3_client, bucket, seen)
        monkeypatch.setenv("DBRE_FLOW_TEST_ADMIN_KEY", ADMIN_KEY)
        policy = _policy(tmp_path, {"kind": "sqld", "admin_url": server.admin_url, "namespace": "app",
                                    "url": server.url, "admin_key": "env:DBRE_FLOW_TEST_ADMIN_KEY"})
        at = datetime.fromtimestamp(t1, UTC)
        target = tmp_path / "app-at-1.db"
        request = RestoreRequest(database="shop", source="provider", at=at, target=str(target))
        dry = restore_flow(request, policy=policy, return_state=True)
        assert dry.is_completed(), dry.message
        assert not target.exists() and _run(dry).name.endswith("(sqld)")
        assert "temporary namespace `dbre-restore-" in _summary(dry, "restore-shop-provider-summary")
        with pytest.raises(urllib.error.HTTPError):  # the dry run forked nothing: no such namespace
            server.execute("SELECT 1", namespace=dry.result()["plan"]["scratch"])
        done = restore_flow(_with(request, dry_run=False), policy=policy, return_state=True)
        assert done.is_completed(), done.message
        conn = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            assert [r[0] for r in conn.execute("SELECT i FROM t ORDER BY i")] == [1]  # not the later commit
        finally:
            conn.close()
        md = _summary(done, "restore-shop-provider-summary")
        assert "integrity_check and foreign_key_check pass" in md and "restart sqld" in md
        # into a new namespace, from the form (target empty); the fork stays
        into = restore_flow(_with(request, target="", dry_run=False, provider={"into_namespace": "app-before"}),
                            policy=policy, return_state=True)
        assert into.is_completed(), into.message
        assert server.execute("SELECT i FROM t ORDER BY i", namespace="app-before") == [[1]]
        assert ADMIN_KEY not in json.dumps(_run(done).parameters) + md
    finally:
        server.stop()
