"""`make demo` and `make bench` still run: the demo end to end (as Prefect flow runs, and through the CLI
alone), the benchmark as a tiny smoke test."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dbre import demo
from tests.dbfactory import pack_files

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the demo's own Prefect: a temporary server on PREFECT_HOME under --out, not a server of the session's
    # (conftest's PREFECT_HOME has no profiles.toml, so no developer's profile sends the runs elsewhere)
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end_as_flow_runs(tmp_path: Path) -> None:
    """`make demo`: each backup, verify and restore a Prefect flow run on a temporary API server.

    A 0.3-scale database (~14 MiB): the server's start (15-30 s) is most of the time anyway, and the
    full-size demo (~55 s alone) would take this file past 90 s."""
    out = tmp_path / "demo"
    proc = _run(["-m", "dbre.demo", "--scale", "0.3", "--out", str(out)], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "comparison passed" in proc.stdout and "demo passed" in proc.stdout
    assert (out / "restored-latest.db").exists() and (out / "restored-first.db").exists()
    assert "temporary API server" in proc.stdout and f"PREFECT_HOME={out / 'prefect'}" in proc.stdout
    for line in ("flow run backup shop of dbre-backup: Completed", "of dbre-verify: Completed",
                 "flow run restore shop @ newest of dbre-restore: Completed", "artifact backup-shop-summary (markdown)",
                 "artifact verify-table (table): 1 row", "artifact restore-shop-summary (markdown)",
                 "5 flow runs, all Completed"):
        assert line in proc.stdout, line
    packs = len(pack_files(out / "repo"))
    assert packs >= 2 and f"read {packs} packs" in proc.stdout  # verify read every byte, not a week's share

    # the runs and their artifacts are in the Prefect database under --out, for a server started later
    db = sqlite3.connect(out / "prefect" / "prefect.db")
    try:
        runs = db.execute("SELECT f.name, r.state_type, r.id FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                          "ORDER BY r.start_time").fetchall()
        keys = {k for (k,) in db.execute("SELECT key FROM artifact")}
    finally:
        db.close()
    assert [(name, state) for name, state, _ in runs] == [
        ("dbre-backup", "COMPLETED"), ("dbre-backup", "COMPLETED"), ("dbre-verify", "COMPLETED"),
        ("dbre-restore", "COMPLETED"), ("dbre-restore", "COMPLETED")]
    assert {"backup-shop-summary", "backup-shop-table", "verify-summary", "verify-table", "restore-shop-summary",
            "restore-shop-table"} <= keys
    assert not [k for k in keys if k and "-link" in k]  # locations are in the summaries, not one key per link


def test_demo_cli_path_never_imports_prefect(tmp_path: Path) -> None:
    """--cli: the old path through the dbre CLI, no Prefect in the process (a small database: quick)."""
    out = tmp_path / "demo"
    script = ("import sys\n"
              "from dbre import demo\n"
              "assert 'prefect' not in sys.modules, 'import dbre.demo imported prefect'\n"
              f"code = demo.main(['--cli', '--scale', '0.1', '--out', {str(out)!r}])\n"
              "assert 'prefect' not in sys.modules, 'the --cli path imported prefect'\n"
              "sys.exit(code)\n")
    proc = _run(["-c", script], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    words = " ".join(proc.stdout.split())  # (the demo wraps its lines at 140 columns, the tmp path's length varies)
    assert "through the dbre CLI" in words and "demo passed" in words
    assert "$ dbre backup shop.db" in proc.stdout and "$ dbre restore" in proc.stdout
    assert "flow run" not in proc.stdout and not (out / "prefect").exists()
    assert "customers 4,000" in proc.stdout  # --scale 0.1


def test_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("not the demo's")
    proc = _run(["-m", "dbre.demo", "--out", str(tmp_path)], tmp_path, timeout=60)
    assert proc.returncode == 1
    assert keep.read_text() == "not the demo's"


def test_demo_finds_the_users_prefect_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PREFECT_API_URL from the environment, else from the active profile; else none (a temporary server)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert demo.configured_api_url() is None
    (home / "profiles.toml").write_text('active = "work"\n[profiles.local]\n[profiles.work]\n'
                                        'PREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    assert demo.configured_api_url() == "http://prefect.internal:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert demo.configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert demo.configured_api_url() == "http://127.0.0.1:4200/api"


def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench-output"
    # no warm-up round: this checks that the benchmark runs, not what it measures
    proc = _run(["-m", "benchmarks", "--quick", "--size-mb", "20", "--warmup", "0", "--out", str(out)], tmp_path,
                timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert {"created", "machine", "config", "targets", "results"} <= doc.keys()
    assert doc["config"]["runs"] == 1
    (result,) = doc["results"]
    assert result["size_mib"] == 20
    assert {"sqlite_backup", "cp_fsync", "full_backup", "full_backup_checksums", "incremental_backup",
            "restore", "full_backup_defaults", "incremental_backup_defaults",
            "parent_readback"} == result["seconds"].keys()
    # with the defaults (checksums on at this size) the incremental reuses the leaves that did not change
    assert result["ratios"]["incremental_vs_full_defaults"] < 1
    assert all(v > 0 for v in result["seconds"].values())
    assert set(doc["targets"]) == set(result["checks"])
    for check in result["checks"].values():
        assert {"value", "target", "pass"} <= check.keys()
    assert result["pages"]["changed_pages"] > 0
    assert 0 < result["bytes"]["subpage_delta_zstd"] <= result["bytes"]["changed_page_bytes"]
    assert result["restore_size_ok"]
    assert "full / .backup" in proc.stdout
    # the default-settings figures the README states: engine and whole commands (wall time >= engine time)
    ratios = result["ratios"]
    assert ratios["full_vs_sqlite_backup_defaults_command"] >= ratios["full_vs_sqlite_backup_defaults"] > 0
    assert ratios["restore_vs_cp_fsync_command"] >= ratios["restore_vs_cp_fsync"] > 0
    # the cost side of sub-page deltas: the incremental plus reading the parent's changed pages back
    assert ratios["incremental_with_readback_vs_full"] > ratios["incremental_vs_full"]


def test_demo_comparison_without_sqldiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    ctx = demo.DemoContext(out=tmp_path, dbre=[])
    conn = sqlite3.connect(ctx.db_path)
    conn.executescript(demo.SCHEMA)
    conn.execute("INSERT INTO customers VALUES (1, 'A B', 'a@example.com', 'X', '1 Road', '2024-01-01')")
    conn.commit()
    conn.close()
    shutil.copyfile(ctx.db_path, tmp_path / "restored-latest.db")
    ctx.counts_now = demo.row_counts(ctx.db_path)
    report = demo.StepReport()
    demo.compare_with_source(ctx, report)
    assert "comparison passed" in report.lines[-1]

    conn = sqlite3.connect(tmp_path / "restored-latest.db")
    conn.execute("UPDATE customers SET city='Y'")
    conn.commit()
    conn.close()
    with pytest.raises(demo.DemoError, match="customers"):
        demo.compare_with_source(ctx, demo.StepReport())
