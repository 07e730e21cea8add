"""The S3 restore benchmark (benchmarks/s3restore.py) runs end to end on a small database against
a real moto_server and reports what README quotes: seconds, throughput and peak RSS of restores
from S3 and from a local repository, beside cp + fsync."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import s3restore


def test_s3_restore_benchmark_restores_from_both_and_reports(tmp_path: Path) -> None:
    lines: list[str] = []
    res = s3restore.measure(tmp_path, runs=1, log=lines.append, size_mib=4)
    assert res["bytes"] >= 4 * 1024 * 1024 * 0.9
    assert set(res["seconds"]) == {"local", "s3", "cp_fsync"}
    assert all(v > 0 for v in res["seconds"].values())
    # the ratio is of the unrounded medians, the seconds are rounded to milliseconds: equal to 0.01
    assert res["s3_over_local"] == pytest.approx(res["seconds"]["s3"] / res["seconds"]["local"], abs=0.011)
    assert all(20 < mb < 1000 for mb in res["rss_mb"].values())  # each a real child process's peak
    assert res["pass"] is True
    s3restore.print_result(res, lines.append)
    assert any("S3 / local" in line and "limit 300 MB" in line for line in lines)
    assert any("warm-up" in line for line in lines)
