"""Predicted RTO between drills (issue 13): the last passed drill's fixed and size-proportional
phases, scaled to the database's size now; `dbre status` warns when it crosses the RTO target."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

from dbre.metrics import compute_status, prometheus_text
from dbre.policy import parse_policy
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources import open_source
from dbre.validate.drill import DrillTargets, run_drill
from dbre.validate.rto import estimate_rto
from tests.dbfactory import cli
from tests.test_status import policy_for
from tests.test_validate import make_shop


def _drill(passed: bool, size: int, rto: float, restore: float, checks: float, gx: float | None,
           gx_import: float | None) -> dict[str, object]:
    return {"started_at": "2026-11-01T00:00:00Z", "passed": passed, "rto_seconds": rto, "size": size,
            "phases": {"restore_seconds": restore, "checks_seconds": checks, "expectations_seconds": gx,
                       "gx_import_seconds": gx_import}}


def test_estimate_splits_fixed_and_proportional_costs() -> None:
    """10 s to a validated restore of 1 GB: 4 s restoring, 1 s checking, 4 s of suites of which 3 s
    importing the library; 1 s unaccounted (process start). At 4 GB the 6 s of restore, checks and
    suites (less the import) grow fourfold, the 4 s of import and start do not."""
    rec = _drill(True, 10**9, 10.0, 4.0, 1.0, 4.0, 3.0)
    est = estimate_rto([rec], 4 * 10**9)
    assert est is not None
    assert (est.fixed_seconds, est.proportional_seconds) == (4.0, 6.0)
    assert est.seconds == 4.0 + 4 * 6.0
    assert est.at_size(10**9) == 10.0  # at the drill's own size: what the drill took


def test_estimate_uses_the_last_passed_drill_only() -> None:
    old = _drill(True, 10**6, 2.0, 1.0, 0.5, None, None)
    failed = _drill(False, 10**6, 50.0, 40.0, 5.0, None, None)
    est = estimate_rto([old, failed], 2 * 10**6)
    assert est is not None and est.seconds == 0.5 + 2 * 1.5
    assert estimate_rto([failed], 10**6) is None
    assert estimate_rto([{"passed": True, "rto_seconds": 3.0}], 10**6) is None  # a record without phases
    assert estimate_rto([old], None) is None


def test_status_warns_when_the_database_grew_past_its_rto(tmp_path: Path) -> None:
    """A real drill of a small shop database (~20 KB, well under a second), then the database grows
    ~500x: the prediction grows with it, the drill alone would say all is well with a 1 s RTO, and
    `status` warns (exit 1, Prometheus gauge)."""
    src = make_shop(tmp_path / "shop.db", customers=40, orders=80)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, open_source(str(src)), "shop")
    run_drill(repo, "shop", targets=DrillTargets(3600, 600))
    drills = repo.records("drills", "shop")
    assert drills and drills[-1]["passed"], drills
    drill = drills[-1]
    con = sqlite3.connect(src)
    con.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, b BLOB)")
    rows = drill["size"] * 500 // 3000
    con.executemany("INSERT INTO blobs VALUES (?, randomblob(3000))", ((i,) for i in range(rows)))
    con.commit()
    con.close()
    grown = backup(repo, open_source(str(src)), "shop").manifest
    assert grown.size > 400 * drill["size"]

    expected = estimate_rto(drills, grown.size)
    assert expected is not None and expected.seconds > drill["rto_seconds"]
    # an RTO the drill met, which the grown database no longer would (policies count whole seconds)
    rto = 1
    assert drill["rto_seconds"] < rto < expected.seconds, (drill, expected)
    policy = policy_for(tmp_path / "repo")
    policy["databases"][0]["rto"] = rto
    policy["databases"][0]["rpo"] = "1d"
    st = compute_status(repo, policy=parse_policy(policy))
    d = st.databases[0]
    assert d.predicted_rto_seconds == expected.seconds
    assert [a.event for a in d.alerts] == ["rto_at_risk"]
    assert "would now take about" in d.alerts[0].message and "run a drill" in d.alerts[0].message
    gauge = [line for line in prometheus_text(st).splitlines() if line.startswith("dbre_predicted_rto_seconds{")]
    assert len(gauge) == 1 and 'db="shop"' in gauge[0] and gauge[0].endswith(f"}} {expected.seconds!r}"), gauge
    assert any(line.startswith("dbre_alert{") and 'event="rto_at_risk"' in line
               for line in prometheus_text(st).splitlines())

    # the CLI: exit 1, the alert on stderr, the column in the table
    pol = tmp_path / "policy.yaml"
    pol.write_text(json.dumps(policy))
    res = cli("status", "--repo", str(tmp_path / "repo"), "--policy", str(pol), env={"COLUMNS": "200"})
    assert res.returncode == 1, res.stderr
    assert "ALERT rto_at_risk (warning): shop:" in res.stderr
    assert "RTO predicted" in res.stdout
    # a target the grown database still meets: no alert
    policy["databases"][0]["rto"] = math.ceil(expected.seconds * 2)
    assert compute_status(repo, policy=parse_policy(policy)).databases[0].alerts == []
