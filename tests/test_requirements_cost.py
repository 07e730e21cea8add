"""Cost per RPO: the model against hand-computed numbers, and measured on the segments of a real `dbre replicate` run.

The real run: a WAL source, `dbre replicate --interval 1s` as a subprocess, a writer process
committing for a few seconds, SIGTERM. The report then measures those segments (their count and
transactions from the names, their stored bytes from the files) and prices the options from them;
report.md and report.html both carry the table.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest

from dbre.policy import load_policy
from dbre.replicate.segment import SegmentName, list_generations
from dbre.report.requirements import analyze
from dbre.report.requirements_cost import (
    CostInputs,
    SegmentRate,
    active_intervals,
    backup_option,
    measure_segments,
    replication_option,
)
from dbre.report.requirements_docs import write_documents
from dbre.report.requirements_model import GIB, Prices, StorageProjection
from dbre.repository.repo import Repository
from tests.replication import (
    make_source,
    read_log,
    start_replicator,
    start_writer,
    stop_replicator,
    wait_for_generation,
)
from tests.test_requirements import _backup_at

S = 1_000_000  # µs


def _name(first: int, last: int, t0: float, t1: float) -> SegmentName:
    return SegmentName("app", "0000000000000001-00000000", first, last, round(t0 * S), round(t1 * S))


def test_active_intervals_by_hand() -> None:
    names = [_name(1, 5, 0.2, 0.9), _name(6, 6, 1.1, 1.5),
             _name(7, 9, 30.0, 95.0),  # compacted: 3 transactions over 65 s
             _name(10, 11, 95.5, 96.2)]
    # 1 s: [0.2,1.2) [1.2,2.2) | 3 of the 66 windows from 30 s | [96,97)
    assert active_intervals(names, 1.0) == 1 + 1 + 3 + 1
    # 10 s: [0.2,10.2) takes A and B; 3 of the 7 windows of C, [30,100) covering D
    assert active_intervals(names, 10.0) == 1 + 3
    assert active_intervals([], 1.0) == 0


def _projection(interval: float) -> StorageProjection:
    return StorageProjection(
        retention="last 24", retention_assumed=False, interval_seconds=interval, kept=24, window_days=1.0,
        compression_ratio=0.5, change_bytes_per_day=0.0, stored_full_now=GIB / 2, stored_full_12m=GIB / 2,
        bytes_kept_now=GIB, bytes_kept_12m=GIB, copies=2, backups_per_month=720.0, puts_per_backup=10.0,
        gets_per_backup=5.0, storage_cost_month_now=2 * 0.023, storage_cost_month_12m=2 * 0.023,
        request_cost_month=0.0, cost_next_12_months=0.0)


INPUTS = CostInputs(prices=Prices(0.023, 0.005, 0.0004), copies=2, window_days=7.0,
                    change_bytes_per_day=100 * 1024**2, snapshot_restore_gets=20.0, restores_per_month=1.0,
                    backup_p95=60.0)


def test_backup_option_by_hand() -> None:
    o = backup_option(_projection(3600.0), INPUTS, current=True)
    assert o.rpo_seconds == 3660 and o.current and o.label == "backups every 1 h"
    assert o.bytes_kept == 2 * GIB
    assert o.puts_per_month == 720 * 10 * 2
    assert o.gets_per_month == 720 * 5 + 20
    assert o.total_month == pytest.approx(0.046 + (14400 * 0.005 + 3620 * 0.0004) / 1000)


def test_replication_option_without_segments_by_hand() -> None:
    """10 s, nothing measured: a segment every interval (8,640 a day), the snapshots' change rate."""
    o = replication_option(10.0, _projection(3600.0), INPUTS, None)
    assert o.rpo_seconds == 10 and o.kind == "replication"
    seg_kept = 100 * 1024**2 * (7 + 600 / 8640 / 2)  # window + half a generation of 600 segments
    assert o.bytes_kept == pytest.approx(2 * GIB + 2 * seg_kept)
    # segments x 2 copies, lease every 20 s, 14.4 bases of 11 PUTs, a compaction PUT per 60
    puts = 30.44 * (8640 * 2 + 4320 + 14.4 * 11 + 8640 / 60) + 1  # and a restore's LIST
    gets = 30.44 * (3 * 4320 + 14.4 * 17 + 8640 * 2) + 602  # lease HEADs, bases, compaction + copy reads; a restore
    assert o.puts_per_month == pytest.approx(14400 + puts)
    assert o.gets_per_month == pytest.approx(3620 + gets)
    storage = 0.046 + 2 * seg_kept / GIB * 0.023
    assert o.storage_cost_month == pytest.approx(storage)
    assert o.total_month == pytest.approx(storage + ((14400 + puts) * 0.005 + (3620 + gets) * 0.0004) / 1000)


def test_replication_option_uses_the_measured_rate() -> None:
    """Measured: 2,000 transactions over half a day, 3,000 B each, 500 shipments at 1 s."""
    rate = SegmentRate(segments=500, generations=1, transactions=2000, span_days=0.5, sampled=10,
                       sampled_bytes=60_000, sampled_transactions=20, ships_per_day={"1": 1000.0})
    assert rate.bytes_per_day == 3000 * 4000
    o = replication_option(1.0, _projection(3600.0), INPUTS, rate)
    seg_kept = 12_000_000 * (7 + 600 / 1000 / 2)
    assert o.bytes_kept == pytest.approx(2 * GIB + 2 * seg_kept)
    assert o.puts_per_month == pytest.approx(14400 + 30.44 * (1000 * 2 + 4320 + 1000 / 600 * 11 + 1000 / 60) + 1)


def _policy(root: Path, repo: Path, src: Path, rpo: str, replicate: bool) -> Path:
    p = root / "dbre.yaml"
    p.write_text(f"""
version: 1
repositories: {{primary: {repo}}}
databases:
  - {{name: app, source: {src}, tier: critical, rpo: {rpo}, rto: 15m, replicate: {str(replicate).lower()}}}
retention: {{keep_within: 2d, keep_daily: 7}}
costs: {{storage_gb_month: 0.023, put_per_1000: 0.005, get_per_1000: 0.0004}}
""")
    return p


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A repository filled by a real `dbre replicate` run (1 s) while a writer commits for ~4 s."""
    root = tmp_path_factory.mktemp("cost")
    src, repo = root / "app.db", root / "repo"
    make_source(src)
    proc = start_replicator(src, str(repo), interval="1s")
    wait_for_generation(str(repo), proc=proc)
    writer = start_writer(src, root / "log", 4.0, start_seq=200, pause=0.01, ckpt_every=0)
    assert writer.wait(60) == 0
    time.sleep(1.5)
    code, err = stop_replicator(proc)
    assert code == 0, err
    commits, _ = read_log(root / "log")
    # a backup dated a day before the replicator's base: a snapshot interval of a day to check
    r = Repository.open(str(repo))
    _backup_at(r, src, "app", r.snapshots("app")[0].time - timedelta(days=1))
    return root, repo, len(commits)


def test_segments_of_a_real_run_are_measured(replicated: tuple[Path, Path, int]) -> None:
    root, repo_dir, commits = replicated
    repo = Repository.open(str(repo_dir))
    names = [n for g in list_generations(repo, "app").values() for n in g]
    rate = measure_segments(repo, "app")
    assert rate is not None and commits > 50
    assert rate.segments == len(names) >= 3 and rate.generations == 1
    assert rate.transactions == commits  # every writer commit came after the base: one transaction each
    assert rate.sampled == rate.segments  # fewer than the sample: all read
    on_disk = sum((repo_dir / n.key).stat().st_size for n in names)
    assert rate.sampled_bytes == on_disk
    span = (max(n.last_us for n in names) - min(n.first_us for n in names)) / S
    assert rate.span_days == pytest.approx(span / 86400)
    assert rate.bytes_per_day == pytest.approx(on_disk / span * 86400)
    # one segment a second while the writer ran: the 1 s windows are the segments, give or take a stall
    ships = rate.ships_per_day["1"] * rate.span_days
    assert abs(ships - len(names)) <= max(1, 0.25 * len(names)), (ships, len(names))
    assert rate.ships_per_day["10"] < rate.ships_per_day["1"]
    # a sample of 2: the counts still come from every name, the bytes from those two segments
    small = measure_segments(repo, "app", sample=2)
    assert small is not None and small.sampled == 2 and small.sampled_transactions < rate.transactions
    assert (small.segments, small.transactions, small.ships_per_day) == (rate.segments, rate.transactions,
                                                                       rate.ships_per_day)
    sizes = [(repo_dir / n.key).stat().st_size for n in names]
    pairs = {sizes[i] + sizes[j] for i in range(len(sizes)) for j in range(i + 1, len(sizes))}
    assert small.sampled_bytes < on_disk and small.sampled_bytes in pairs


def test_report_prices_the_measured_segments_in_both_documents(replicated: tuple[Path, Path, int]) -> None:
    root, repo_dir, _ = replicated
    policy_path = _policy(root, repo_dir, root / "app.db", "5m", replicate=False)
    policy = load_policy(policy_path)
    repo = Repository.open(str(repo_dir))
    report = analyze(repo, policy=policy, policy_path=str(policy_path), restore_throughput=5e7,
                     expectations_dir=None)
    d = report.databases[0]
    costs = d.cost_per_rpo
    assert costs is not None and costs.measured is not None
    labels = [o.label for o in costs.options]
    assert labels[:3] == ["replication every 750 ms + backups every 1 d", "replication every 1 s + backups every 1 d",
                          "replication every 10 s + backups every 1 d"]  # dbre replicate's default first
    assert {"backups every 15 min", "backups every 1 h", "backups every 1 d"} <= set(labels)
    assert [o.label for o in costs.options if o.current] == ["backups every 1 d"]  # the snapshots' interval
    rep1 = costs.options[1]
    rate = costs.measured
    base = next(o for o in costs.options if o.current)
    # the measured shipments, not one a second: PUTs = backups + segments + lease + bases + compaction
    ships = rate.ships_per_day["1"]
    assert rep1.puts_per_month - base.puts_per_month == pytest.approx(
        30.44 * (ships + 4320 + ships / 600 * 11 + ships / 60) + 30.44 / 31)  # a restore's LIST per drill
    seg_kept = rate.bytes_per_day * (2 + 600 / ships / 2)
    assert rep1.bytes_kept - base.bytes_kept == pytest.approx(seg_kept)
    assert any(a.startswith(f"segments measured: {rate.segments:,} in 1 generation") for a in costs.assumptions)
    # a 5 min RPO is below what a backup every 15 min gives: the recommendation is replication
    assert any("replicate it continuously" in r.text and "--interval 10s" in r.text for r in d.recommendations)

    paths = write_documents(report, root / "out", policy)
    md, html = paths["report.md"].read_text(), paths["report.html"].read_text()
    assert "## Cost per RPO" in md and "| Option | RPO | Stored |" in md
    assert "| replication every 1 s + backups every 1 d |" in md
    assert "| backups every 1 d **(now)** |" in md
    assert "<h2>Cost per RPO</h2>" in html and "<td>replication every 10 s + backups every 1 d</td>" in html
    assert "segments measured:" in md and "segments measured:" in html
    assert "charts/cost-app.png" in md and (root / "out" / "charts" / "cost-app.png").stat().st_size > 5000
    assert 'alt="Cost per RPO of app"' in html


def test_replicated_policy_marks_replication_current(replicated: tuple[Path, Path, int], tmp_path: Path) -> None:
    root, repo_dir, _ = replicated
    policy = load_policy(_policy(tmp_path, repo_dir, root / "app.db", "5s", replicate=True))
    report = analyze(Repository.open(str(repo_dir)), policy=policy, restore_throughput=5e7, expectations_dir=None)
    costs = report.databases[0].cost_per_rpo
    assert costs is not None
    assert [o.label for o in costs.options if o.current] == ["replication every 750 ms + backups every 1 d"]
    assert any("replicate: true" in a for a in costs.assumptions)


def test_segments_on_s3_are_measured(tmp_path: Path, s3_repo_url: str) -> None:
    """The same measurement on a real S3 server: names from one listing, bytes from the objects read."""
    src = tmp_path / "app.db"
    make_source(src)
    Repository.open_or_init(s3_repo_url)
    proc = start_replicator(src, s3_repo_url, interval="1s")
    wait_for_generation(s3_repo_url, proc=proc)
    writer = start_writer(src, tmp_path / "log", 2.5, start_seq=200, pause=0.01, ckpt_every=0)
    assert writer.wait(60) == 0
    time.sleep(1.5)
    code, err = stop_replicator(proc)
    assert code == 0, err
    commits, _ = read_log(tmp_path / "log")
    repo = Repository.open(s3_repo_url)
    names = [n for g in list_generations(repo, "app").values() for n in g]
    rate = measure_segments(repo, "app")
    assert rate is not None and rate.segments == len(names) >= 2 and rate.transactions == len(commits)
    assert rate.sampled_bytes == sum(len(repo.store.get(n.key)) for n in names)
