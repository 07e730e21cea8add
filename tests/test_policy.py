"""The policy file: the documented example loads, and each kind of mistake gets one line naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbre.errors import UsageError
from dbre.policy import Policy, Tier, format_duration, load_policy, parse_duration, parse_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "policy.example.yaml"

MINIMAL: dict[str, Any] = {
    "repositories": {"primary": "/var/lib/dbre/repo"},
    "databases": [{"name": "orders", "source": "/data/orders.db", "rpo": "1h", "rto": "15m"}],
    "retention": {"keep_daily": 7},
}


def _error(data: Any) -> str:
    with pytest.raises(UsageError) as info:
        parse_policy(data, "policy p.yaml")
    text = str(info.value)
    assert "\n" not in text
    return text


def _with(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with one value set at a dotted path (list indices as numbers)."""
    data = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return data


def test_example_loads_with_everything_filled_in() -> None:
    policy = load_policy(EXAMPLE)
    orders = policy.database("orders")
    assert (orders.rpo, orders.rto, orders.tier) == (3600, 900, Tier.critical)
    assert policy.database("analytics").rpo == 86400
    assert policy.repositories.offsite == ["s3://acme-dbre-dr-eu-west/copy"]
    assert policy.repositories.encryption_key == "env:DBRE_ENCRYPTION_KEY"
    assert policy.database("customers").auth_token == "env:TURSO_AUTH_TOKEN"
    scheds = dict(policy.schedules.items())
    assert scheds["drill_monthly"].cron == "0 3 1 * *"
    assert scheds["backup_hourly"].timezone == "Europe/Berlin"  # the section default
    assert scheds["report_quarterly"].timezone == "UTC"  # its own
    assert policy.retention.keep_policy().daily == 14
    assert policy.fleet.max_concurrency == 4


def test_minimal_policy_gets_defaults() -> None:
    policy = parse_policy(MINIMAL)
    assert policy.repositories.offsite == []
    assert all(s.timezone == "UTC" for _, s in policy.schedules.items())
    assert policy.databases[0].checksums is None  # dbre decides by the database's size
    assert [d.name for d in policy.select(None)] == ["orders"]


def test_offsite_may_be_one_url() -> None:
    assert parse_policy(_with("repositories.offsite", "s3://b/copy")).repositories.offsite == ["s3://b/copy"]


@pytest.mark.parametrize("ref", ["env:DBRE_KEY", "prefect-secret:dbre-key"])
def test_secret_references_are_accepted(ref: str) -> None:
    assert parse_policy(_with("repositories.encryption_key", ref)).repositories.encryption_key == ref
    assert parse_policy(_with("databases.0.auth_token", ref)).databases[0].auth_token == ref


@pytest.mark.parametrize(
    ("path", "value"),
    [("repositories.encryption_key", "hunter2-correct-horse"), ("databases.0.auth_token", "eyJhbGciOiJFZERTQSJ9.x.y")],
)
def test_literal_secrets_are_refused_without_echoing_them(path: str, value: str) -> None:
    text = _error(_with(path, value))
    field = path.replace(".0.", "[0].")
    assert text.startswith(f"policy p.yaml: {field}: a literal secret is not allowed")
    assert "env:VARIABLE" in text
    assert value not in text


def test_malformed_reference_is_named() -> None:
    text = _error(_with("repositories.encryption_key", "prefect-secret:Has Spaces"))
    assert "repositories.encryption_key: malformed secret reference" in text


@pytest.mark.parametrize("url", ["libsql://db.turso.io?authToken=abc", "https://user:pw@db.example.com"])
def test_credentials_in_source_urls_are_refused(url: str) -> None:
    text = _error(_with("databases.0.source", url))
    assert "databases[0].source:" in text
    assert "abc" not in text and "pw@" not in text


def test_webhook_accepts_url_or_reference() -> None:
    ok = parse_policy(_with("alerts", [{"name": "a", "url": "https://hooks.example.com/x"},
                                       {"name": "b", "url": "env:HOOK"}]))
    assert [a.url for a in ok.alerts] == ["https://hooks.example.com/x", "env:HOOK"]
    assert "alerts[0].url: must be an http(s) URL" in _error(_with("alerts", [{"name": "a", "url": "ftp://x"}]))
    assert "alerts[0]: a webhook channel needs url" in _error(_with("alerts", [{"name": "a"}]))


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("databases.0.rpo", "soon", "databases[0].rpo: cannot parse duration 'soon'"),
        ("databases.0.rto", "0m", "databases[0].rto: must be longer than zero"),
        ("databases.0.tier", "gold", "databases[0].tier: Input should be 'critical', 'high', 'standard' or 'low'"),
        ("databases.0.name", "bad name", "databases[0].name: database name 'bad name' is not allowed"),
        ("databases.0.colour", "red", "databases[0].colour: is not a known field"),
        ("retention", {"keep_daily": 0}, "retention: keeps nothing"),
        ("retention.keep_daily", -1, "retention.keep_daily: Input should be greater than or equal to 0"),
        ("schedules.timezone", "Mars/Olympus", "schedules.timezone: unknown time zone 'Mars/Olympus'"),
        ("schedules.verify_weekly", {"cron": "every sunday"}, "schedules.verify_weekly.cron: not a 5-field cron"),
        ("schedules.backup_hourly", {"cron": "0 * * * *", "timezone": "Nowhere"},
         "schedules.backup_hourly.timezone: unknown time zone"),
        ("fleet.max_concurrency", 0, "fleet.max_concurrency: Input should be greater than or equal to 1"),
        ("fleet.task_runner", "ray", "fleet.task_runner: Input should be 'thread' or 'dask'"),
        ("version", 2, "version: Input should be 1"),
        ("databases.0.namespace", "bad ns!", "databases[0].namespace: String should match pattern"),
    ],
)
def test_invalid_fields_are_named(path: str, value: Any, expected: str) -> None:
    assert expected in _error(_with(path, value))


def test_missing_and_duplicate_databases() -> None:
    data = copy.deepcopy(MINIMAL)
    del data["databases"][0]["rpo"]
    assert "databases[0].rpo: is required" in _error(data)
    data = copy.deepcopy(MINIMAL)
    data["databases"].append(dict(data["databases"][0]))
    assert "databases: database 'orders' appears twice" in _error(data)
    data = copy.deepcopy(MINIMAL)
    del data["retention"]
    assert "retention: is required" in _error(data)


def test_several_problems_are_counted_on_one_line() -> None:
    data = _with("databases.0.rpo", "x")
    data["databases"][0]["rto"] = "y"
    assert _error(data).endswith("(and 1 more problem) (see docs/policy.example.yaml)")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("repositories:\n  primary: [unclosed\n")
    with pytest.raises(UsageError, match=r"invalid YAML at line \d+, column \d+"):
        load_policy(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        load_policy(scalar)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert isinstance(load_policy(good), Policy)
    bad_field = tmp_path / "field.yaml"
    bad_field.write_text(yaml.safe_dump(_with("databases.0.rpo", "soon")))
    with pytest.raises(UsageError, match=rf"^policy {bad_field}: databases\[0\]\.rpo: cannot parse"):
        load_policy(bad_field)


def test_unknown_database_lists_known_ones() -> None:
    with pytest.raises(UsageError, match="known databases: orders"):
        parse_policy(MINIMAL).database("nope")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800), ("90", 90),
     (45, 45), ("1.5h", 5400), (" 1H ", 3600)],
)
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "1 hour", "1h 2x", "-5m", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (45, 900, 5400, 90000, 0)] == ["45s", "15m", "1h30m", "1d1h", "0s"]
