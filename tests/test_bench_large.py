"""The 8 GiB ratio benchmark (benchmarks/large.py) runs end to end on a small database and reports each
command and ratio from the rounds it measured."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks import large


def test_large_benchmark_measures_each_command_and_ratio(tmp_path: Path) -> None:
    lines: list[str] = []
    res = large.measure(tmp_path, lines.append, gib=0.02, runs=2)
    assert res["restored_size_ok"] and res["runs"] == 2 and res["pages"] > 4000
    for k in ("sqlite_backup", "cp_fsync", "full_backup", "incremental_backup", "restore"):
        assert len(res["samples"][k]) == 2 and res["wall"][k] > 0
    for k in ("full_backup", "incremental_backup"):  # a child's wall time includes its engine's seconds
        assert res["wall"][k] >= res["seconds"][k]
    # each ratio is the median of the rounds' own ratios (no timing bound here: the machine may be busy)
    s = res["samples"]
    for key, (num, den) in {"incremental_vs_full": ("incremental_backup", "full_backup"),
                            "restore_vs_cp_fsync": ("restore", "cp_fsync")}.items():
        want = statistics.median(a / b for a, b in zip(s[num], s[den], strict=True))
        assert res["ratios"][key]["command"] == pytest.approx(want, rel=0.01) and res["ratios"][key]["engine"] > 0
    large.print_result(res, lines.append)
    assert any("incremental_vs_full" in line and "target <= 0.35" in line for line in lines)
    assert not list(tmp_path.glob("tmp*"))  # the rounds' outputs are gone
