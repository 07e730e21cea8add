"""`make demo` and `make bench` still run: the demo end to end, the benchmark as a tiny smoke test."""

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

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _run(["-m", "dbre.demo", "--out", str(out)], tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "comparison passed" in proc.stdout
    assert "demo passed" in proc.stdout
    assert (out / "restored-latest.db").exists() and (out / "restored-first.db").exists()


def test_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path: Path) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("not the demo's")
    proc = _run(["-m", "dbre.demo", "--out", str(tmp_path)], tmp_path, timeout=60)
    assert proc.returncode == 1
    assert keep.read_text() == "not the demo's"


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
            "restore"} == result["seconds"].keys()
    assert all(v > 0 for v in result["seconds"].values())
    assert set(doc["targets"]) == set(result["checks"])
    for check in result["checks"].values():
        assert {"value", "target", "pass"} <= check.keys()
    assert result["pages"]["changed_pages"] > 0
    assert 0 < result["bytes"]["subpage_delta_zstd"] <= result["bytes"]["changed_page_bytes"]
    assert result["restore_size_ok"]
    assert "full / .backup" in proc.stdout


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
