"""The oracle test of `dbre replicate` + `dbre restore --at`: a writer commits numbered, timestamped
transactions (a few hundred a second) and checkpoints (PASSIVE, RESTART, TRUNCATE) while the
replicator runs as a subprocess; restores at many random times each hold exactly the commits up to
that time, on a local repository and on S3 (moto).

Boundary: a transaction is stamped when the replicator first reads it, one poll (20 ms) plus a
read after it committed. So a restore at T must hold every commit that returned at least
PRECISION before T, none that began after T, and always one consistent prefix (PRECISION: see
tests/replication.py; the measured lag of every commit is printed, its median asserted <= 50 ms
and its 99th percentile within the allowance).
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from dbre.replicate.segment import list_generations, open_segment, read_base
from dbre.repository.repo import Repository
from tests.replication import (
    PRECISION,
    check_oracle,
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 200
WRITE_SECONDS = 20.0
RESTORES = 30


@pytest.mark.parametrize("where", ["local", "s3"])
def test_restore_at_random_times_is_exact(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repo_url = str(tmp_path / "repo") if where == "local" else request.getfixturevalue("s3_repo_url")
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    log = tmp_path / "writer.log"
    rep = start_replicator(src, repo_url)
    try:
        wait_for_generation(repo_url, proc=rep)
        writer = start_writer(src, log, WRITE_SECONDS, start_seq=BASE_ROWS)
        assert writer.wait(timeout=WRITE_SECONDS + 60) == 0
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    commits, ckpts = read_log(log)
    assert len(commits) > 1500, f"the writer managed only {len(commits)} commits"
    assert {m for m, _, _ in ckpts} == {"PASSIVE", "RESTART", "TRUNCATE"}
    worst_ckpt = max(s for _, s, _ in ckpts)
    print(f"\n{where}: {len(commits)} commits, {len(ckpts)} checkpoints (worst {worst_ckpt * 1000:.0f} ms); "
          f"{err.strip()}")

    repo = Repository.open(repo_url)
    # every commit shipped, with its observation lag
    gens = list_generations(repo, "app")
    lags = []
    by_seq = {c.seq: c for c in commits}
    for gen_id, names in gens.items():
        base = read_base(repo, "app", gen_id)
        state = bytes.fromhex(base.state)
        for name in names:
            seg = open_segment(repo, name, state)
            state = seg.state_after
            for tx in seg.transactions:
                # the writer's transaction number is base_rows + (txid - base_txid): one commit per txid
                c = by_seq.get(BASE_ROWS + tx.txid - base.base_txid)
                if c is not None and len(gens) == 1:
                    lags.append(tx.observed_us / 1e6 - c.after)
    assert len(gens) == 1 and len(lags) == len(commits), "every commit shipped, in one generation"
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)]
    print(f"observation lag after commit returned: median {lags[len(lags) // 2] * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")
    assert lags[len(lags) // 2] <= 0.05 and p99 <= PRECISION, "observation lag past the allowance"

    rng = random.Random(7)
    lo, hi = commits[0].before - 0.2, commits[-1].after + 0.5
    times = sorted(rng.uniform(lo, hi) for _ in range(RESTORES))
    times[-1] = hi  # the newest state
    for i, at in enumerate(times):
        out = tmp_path / f"r{i}.db"
        restore_at(repo, "app", utc(at), out)
        top = check_oracle(out, commits, at, BASE_ROWS)
        if at >= hi:
            assert top == commits[-1].seq  # nothing committed is lost at the end
        out.unlink()

    # the CLI spelling the benchmark drives
    at = utc(times[len(times) // 2])
    out = tmp_path / "cli.db"
    res = subprocess.run(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--at", at.isoformat(),
                                  "--to", str(out)), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    check_oracle(out, commits, at.timestamp(), BASE_ROWS)
