"""Recovery drills end to end: against a local repository (through the CLI) and against S3 with a real
sqld as the source; failures named with table and column; targets; the report, screenshotted."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from datetime import timedelta
from pathlib import Path

import apsw
import pytest
from typer.testing import CliRunner

from dbre.cli import app
from dbre.repository.backup import backup
from dbre.repository.manifest import iso, now_utc
from dbre.repository.repo import Repository, pack_key
from dbre.sources import open_source
from dbre.validate.drill import DrillTargets, pick_snapshot, run_drill
from dbre.validate.namespace import NamespaceTarget
from dbre.validate.profile import profile_database, write_suites
from tests.sqld import SqldServer, sqld, sqld_namespaces  # noqa: F401 - the session fixtures
from tests.test_validate import make_shop

# screenshots replace the README's only when asked (DBRE_UPDATE_SCREENSHOTS=1): a test run leaves the tree clean
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


@pytest.fixture
def shop(tmp_path: Path) -> dict[str, Path]:
    """A shop database, a local repository with one snapshot of it, and its profiled suites."""
    src = make_shop(tmp_path / "shop.db")
    repo = tmp_path / "repo"
    backup(Repository.open_or_init(str(repo)), open_source(str(src)), "shop")
    with apsw.Connection(str(src)) as conn:
        write_suites(profile_database(conn, "shop"), tmp_path / "expectations" / "shop")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
version: 1
repositories:
  primary: {repo}
databases:
  - name: shop
    source: {src}
    rpo: 1h
    rto: 10m
    expectations: {tmp_path / "expectations"}
retention:
  keep_last: 10
""")
    return {"src": src, "repo": repo, "expectations": tmp_path / "expectations", "policy": policy,
            "reports": tmp_path / "reports", "dir": tmp_path}


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_drill_through_the_cli_passes_and_reports(shop: dict[str, Path]) -> None:
    code, out, err = _cli("drill", "--repo", str(shop["repo"]), "--db", "shop", "--policy", str(shop["policy"]),
                          "--report-dir", str(shop["reports"]), "--json")
    assert code == 0, err
    rec = json.loads(out)
    for field in ("schema", "db", "snapshot", "started_at", "rto_seconds", "rpo_seconds", "ok", "failed_checks"):
        assert field in rec
    assert rec["ok"] and rec["failed_checks"] == [] and rec["rto_met"] and rec["rpo_met"]
    assert rec["rto_target_seconds"] == 600 and rec["rpo_target_seconds"] == 3600
    assert 0 < rec["rto_seconds"] < 600 and 0 <= rec["rpo_seconds"] < 3600
    assert rec["expectations"]["expectations"] > 15 and rec["expectations"]["failed"] == 0
    folder = Path(rec["report"]).parent
    assert {p.name for p in folder.iterdir()} >= {"index.html", "report.md", "results.json", "history.png",
                                                  "expectations.png", "data-docs"}
    html = (folder / "index.html").read_text()
    assert "PASSED" in html and "data:image/png;base64," in html
    assert "http://" not in html.replace('href="data-docs', "") and "https://" not in html  # no CDN, nothing remote
    # GX's Data Docs are self-contained too: no page loads a script, stylesheet or font from a CDN (offline they
    # rendered an empty index), and the index is plain HTML linking every result and suite page
    docs = folder / "data-docs"
    pages = list(docs.rglob("*.html"))
    assert len(pages) > 2, pages
    for page in pages:
        text = page.read_text()
        assert not re.search(r"<(script|link)\b[^>]*(src|href)=[\"']?(https?:)?//", text), page
        assert "self-contained Data Docs" in text, page
    index = (docs / "index.html").read_text()
    links = re.findall(r'href="([^"]+[.]html)"', index)
    assert len(links) == len(pages) - 1 and all((docs / link).exists() for link in links), links
    assert "shop.customers" in index and 'class="ok"' in index and 'class="failed"' not in index, index
    stored = Repository.open(str(shop["repo"])).records("drills", "shop")
    assert [r["record_id"] for r in stored] == [rec["record_id"]]
    assert not list(shop["dir"].glob("dbre-drill-*")), "scratch is removed"


def test_drill_fails_naming_each_failed_expectation(shop: dict[str, Path]) -> None:
    conn = sqlite3.connect(shop["src"])
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("UPDATE customers SET country = NULL WHERE id % 9 = 0")
    conn.execute("UPDATE orders SET customer_id = 99999 WHERE id <= 4")
    conn.commit()
    conn.close()
    backup(Repository.open(str(shop["repo"])), open_source(str(shop["src"])), "shop")
    code, out, err = _cli("drill", "--repo", str(shop["repo"]), "--db", "shop", "--policy", str(shop["policy"]),
                          "--no-data-docs", "--report-dir", str(shop["reports"]))
    assert code == 1
    assert "drill of shop FAILED" in out
    assert "gx.expect_column_values_to_not_be_null on customers.country" in err
    assert "gx.unexpected_rows_expectation on orders.customer_id" in err
    assert "foreign_key_check on orders.customer_id: 4 rows refer to missing rows of customers" in err
    html = next(shop["reports"].glob("drill-shop-*/index.html")).read_text()
    assert "FAILED" in html and "Why it failed" in html


def test_targets_missed_fail_the_drill(shop: dict[str, Path]) -> None:
    repo = Repository.open(str(shop["repo"]))
    out = run_drill(repo, "shop", targets=DrillTargets(rpo_seconds=1e-6, rto_seconds=1e-6), write=False)
    rec = out.record
    assert rec["validated"] and not rec["passed"] and not rec["rto_met"] and not rec["rpo_met"]
    assert any(f.startswith("RTO target missed") for f in rec["failures"])
    assert any(f.startswith("RPO target missed") for f in rec["failures"])
    assert repo.records("drills", "shop") == []  # write=False


def test_a_restore_that_fails_is_a_failed_drill(shop: dict[str, Path]) -> None:
    repo = Repository.open(str(shop["repo"]))
    pack = repo.snapshots("shop")[-1].packs[0]
    (shop["repo"] / pack_key(pack)).unlink()
    out = run_drill(repo, "shop", targets=DrillTargets(3600, 600))
    assert not out.record["passed"] and not out.record["validated"] and not out.record["rto_met"]
    assert out.record["failures"][0].startswith("drill: ")
    assert repo.records("drills", "shop")[-1]["passed"] is False


def test_drill_targets_newest_random_or_a_time(shop: dict[str, Path]) -> None:
    repo = Repository.open(str(shop["repo"]))
    first = repo.snapshots("shop")[-1]
    backup(repo, open_source(str(shop["src"])), "shop")
    newest = repo.snapshots("shop")[-1]
    assert pick_snapshot(repo, "shop", "newest").id == newest.id
    assert pick_snapshot(repo, "shop", first.taken_at).id == first.id
    assert {pick_snapshot(repo, "shop", "random", seed=s).id for s in range(20)} == {first.id, newest.id}
    code, _, err = _cli("drill", "--repo", str(shop["repo"]), "--db", "shop", "--target", "yesterday-ish")
    assert code == 2 and "drill target 'yesterday-ish'" in err


def test_drill_against_s3_with_a_real_sqld_source(sqld: SqldServer, s3_repo_url: str,  # noqa: F811
                                                  tmp_path: Path) -> None:
    sqld.pipeline([
        "DROP TABLE IF EXISTS drill_items", "DROP TABLE IF EXISTS drill_kinds",
        "CREATE TABLE drill_kinds (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        "CREATE TABLE drill_items (id INTEGER PRIMARY KEY, kind_id INTEGER NOT NULL REFERENCES drill_kinds(id), "
        "qty INTEGER NOT NULL, created_at TEXT NOT NULL DEFAULT (datetime('now')))",
        "INSERT INTO drill_kinds (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
        "INSERT INTO drill_items (id, kind_id, qty) SELECT i, i % 3 + 1, i % 17 FROM n",
    ])
    source = open_source(sqld.url)
    repo = Repository.open_or_init(s3_repo_url)
    backup(repo, source, "remote")
    with source.connect() as conn:
        suites = profile_database(conn, "remote")
    write_suites({t: s for t, s in suites.items() if t.startswith("drill_")}, tmp_path / "exp" / "remote")
    out = run_drill(repo, "remote", expectations=tmp_path / "exp", targets=DrillTargets(3600, 600),
                    scratch_dir=tmp_path / "scratch")
    rec = out.record
    assert rec["passed"], rec["failures"]
    assert rec["repository"].startswith("s3://") and rec["expectations"]["suites"] == 2
    assert Repository.open(s3_repo_url).records("drills", "remote")[-1]["snapshot"] == rec["snapshot"]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_drill_into_a_new_sqld_namespace(sqld_namespaces: SqldServer, shop: dict[str, Path]) -> None:  # noqa: F811
    repo = Repository.open(str(shop["repo"]))
    assert sqld_namespaces.admin_url
    target = NamespaceTarget(sqld_namespaces.admin_url, sqld_namespaces.url, "drill-shop-1")
    rec = run_drill(repo, "shop", targets=DrillTargets(3600, 600), namespace=target).record
    assert rec["passed"], rec["failures"]
    assert rec["namespace"]["namespace"] == "drill-shop-1" and rec["namespace"]["deleted"]
    assert rec["phases"]["namespace_seconds"] > 0 and rec["checks"]["total"] >= 9  # 2 namespace row counts
    with pytest.raises(Exception):  # noqa: B017 - gone: sqld answers with an HTTP error
        sqld_namespaces.execute("SELECT count(*) FROM orders", namespace="drill-shop-1")
    target = NamespaceTarget(sqld_namespaces.admin_url, sqld_namespaces.url, "drill-shop-2", keep=True)
    rec = run_drill(repo, "shop", namespace=target).record
    assert sqld_namespaces.execute("SELECT count(*) FROM orders", namespace="drill-shop-2") == [[4000]]
    sqld_namespaces.delete_namespace("drill-shop-2")


def _screenshot(html: Path, out: Path, height: int = 1000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--virtual-time-budget=5000", f"--window-size=1400,{height}", f"--screenshot={out}",
                    html.as_uri()], check=True, capture_output=True, timeout=120)
    assert out.stat().st_size > 20_000  # a rendered page, not a blank one


def test_report_screenshots(shop: dict[str, Path], tmp_path: Path) -> None:
    """docs/img/drill-report.png (a passing drill with history) and drill-report-failed.png (named failures)."""
    img = DOCS_IMG if os.environ.get("DBRE_UPDATE_SCREENSHOTS") == "1" else tmp_path
    repo = Repository.open(str(shop["repo"]))
    from dbre.report.drill import write_drill_report

    now = now_utc()
    for k, (rto, rpo, passed) in enumerate([(95.0, 1500, True), (130.0, 2900, True), (88.0, 4100, False),
                                            (102.0, 1200, True), (76.0, 2400, True)]):  # five monthly drills
        repo.put_record("drills", "shop", {
            "started_at": iso(now - timedelta(days=30 * (5 - k))), "snapshot": "0" * 16, "rto_seconds": rto,
            "rpo_seconds": rpo, "rto_target_seconds": 600, "rpo_target_seconds": 3600, "passed": passed,
            "rto_met": True, "rpo_met": passed, "failures": [] if passed else ["RPO target missed"]})
    ok = run_drill(repo, "shop", expectations=shop["expectations"], targets=DrillTargets(3600, 600))
    paths = write_drill_report(shop["reports"], ok.record, repo.records("drills", "shop"), ok.checks, ok.suite_run)
    _screenshot(Path(paths["html"]), img / "drill-report.png", 2600)
    conn = sqlite3.connect(shop["src"])
    conn.execute("UPDATE orders SET status = 'lost' WHERE id % 11 = 0")
    conn.execute("UPDATE customers SET country = NULL WHERE id % 5 = 0")
    conn.commit()
    conn.close()
    backup(repo, open_source(str(shop["src"])), "shop")
    bad = run_drill(repo, "shop", expectations=shop["expectations"], targets=DrillTargets(3600, 600))
    assert not bad.record["passed"]
    paths = write_drill_report(shop["reports"], bad.record, repo.records("drills", "shop"), bad.checks,
                               bad.suite_run)
    _screenshot(Path(paths["html"]), img / "drill-report-failed.png", 1400)


def test_a_report_folder_that_cannot_be_written_is_refused_before_the_drill(shop: dict[str, Path]) -> None:
    """A --report-dir the drill cannot write (here: under a file; as root no mode bit stops a write)
    is refused in one line with exit 2 before any restore: no drill record, no scratch left."""
    blocker = shop["dir"] / "not-a-folder"
    blocker.write_text("x")
    code, out, err = _cli("drill", "--repo", str(shop["repo"]), "--db", "shop", "--policy", str(shop["policy"]),
                          "--no-data-docs", "--report-dir", str(blocker / "reports"))
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "cannot be written" in err and "--report-dir" in err
    assert Repository.open(str(shop["repo"])).records("drills", "shop") == []
    assert not list(shop["dir"].glob("dbre-drill-*"))


def test_a_report_that_fails_to_write_after_the_drill_keeps_its_verdict(shop: dict[str, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the drill runs: writing its report fails, and the drill still prints its
    verdict, exits by it (0: passed) and keeps its record in the repository, with one warning line."""
    import errno

    import dbre.report.drill as report_mod

    def full(*args: object, **kwargs: object) -> dict[str, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_mod, "write_drill_report", full)
    code, out, err = _cli("drill", "--repo", str(shop["repo"]), "--db", "shop", "--policy", str(shop["policy"]),
                          "--no-data-docs", "--report-dir", str(shop["reports"]))
    assert code == 0, err
    assert "drill of shop passed" in out
    assert "warning: the drill report could not be written" in err and "No space left on device" in err
    assert len(Repository.open(str(shop["repo"])).records("drills", "shop")) == 1
