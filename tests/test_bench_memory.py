"""The memory benchmark (benchmarks/memory.py) runs end to end on small databases and reports
what README quotes: peak RSS per command and size, growth per GiB, and whether restores matched."""

from __future__ import annotations

from pathlib import Path

from benchmarks import memory


def test_memory_benchmark_measures_each_command_at_each_size(tmp_path: Path) -> None:
    lines: list[str] = []
    res = memory.measure(tmp_path, lines.append, sizes=(0.01, 0.03))
    assert [round(p["bytes"] / memory.GIB, 2) for p in res["points"]] == [0.01, 0.03]
    for p in res["points"]:
        assert p["restored_size_ok"]
        assert p["incremental_pages_added"] > 0
        assert set(p["rss_mb"]) == {"full_backup", "incremental_backup", "restore"}
        assert all(20 < mb < 1000 for mb in p["rss_mb"].values())  # a real child process's peak
    assert set(res["growth_mb_per_gib"]) == {"full_backup", "incremental_backup", "restore"}
    assert res["pass"] is True, (res["peak_mb"], [p["rss_mb"] for p in res["points"]])
    memory.print_result(res, lines.append)
    assert any("limit 300 MB" in line for line in lines)
    assert (tmp_path / "memory-0.01gib.db").exists() and (tmp_path / "memory-0.01gib-updated.db").exists()
