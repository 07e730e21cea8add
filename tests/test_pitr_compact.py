"""Compaction merges a generation's old small segments into larger ones that keep every transaction:
restores at random times are the same, exact, with the small segments still there (a crash before
prune), with both forms, and after prune deleted the small ones; never applied twice."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from dbre.replicate.check import verify_segments
from dbre.replicate.compact import compact_segments
from dbre.replicate.segment import list_generations, parse_key
from dbre.repository.repo import Repository
from dbre.repository.retention import prune
from tests.replication import (
    check_chains,
    check_oracle,
    make_source,
    read_log,
    restore_at,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 2000


def _segment_keys(repo: Repository) -> set[str]:
    return {k for k in repo.store.list("segments/app/") if parse_key(k) is not None}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compaction_keeps_every_transaction(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    repo_url = str(tmp_path / "repo") if where == "local" else request.getfixturevalue("s3_repo_url")
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="100ms")
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 3.0, start_seq=BASE_ROWS, ckpt_every=100).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    repo = Repository.open(repo_url)
    small = _segment_keys(repo)
    assert len(small) >= 12, len(small)
    commits, _ = read_log(log)
    rng = random.Random(9)
    hi = commits[-1].after + 0.3
    times = sorted(rng.uniform(commits[0].before, hi) for _ in range(6)) + [hi]

    def restores(label: str) -> list[int]:
        tops = []
        for i, at in enumerate(times):
            out = tmp_path / f"{label}{i}.db"
            restore_at(repo, "app", utc(at), out)
            tops.append(check_oracle(out, commits, at, BASE_ROWS))
            out.unlink()
        assert tops[-1] == commits[-1].seq
        return tops

    before = restores("a")
    with repo.lock("compact app"):
        done = compact_segments(repo, "app", older_than=0, group=5)
    assert len(done.merged) >= 2 and done.replaced >= 2 * len(done.merged)
    both = _segment_keys(repo)
    assert small < both  # the small ones stay until prune (a crash here leaves both forms)
    (names,) = list_generations(repo, "app").values()
    assert {n.key for n in names} == both - small | (small - _covered(small, done.merged))
    assert restores("b") == before  # never applied twice
    assert verify_segments(repo, "app")[1] == []

    if where == "local":
        # a rotten (or planted) merged segment: prune keeps every small one it would replace
        path = Path(repo_url) / done.merged[0]
        good = path.read_bytes()
        path.chmod(0o644)
        path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
        held = prune(repo, grace=0)
        assert held.segments[0].superseded == [] and held.segments[0].unverified == [names[0].generation]
        assert _segment_keys(repo) == both
        path.write_bytes(good)
    pruned = prune(repo, grace=0)
    assert sum(len(s.superseded) for s in pruned.segments) == done.replaced
    after = _segment_keys(repo)
    assert after == {n.key for n in names} and len(after) < len(small)
    assert restores("c") == before
    check_chains(repo)
    assert verify_segments(repo, "app")[1] == []
    # the generation's last segment is never merged (the replicator resumes from it)
    assert max(small) in after


def _covered(small: set[str], merged: list[str]) -> set[str]:
    ranges = [parse_key(k) for k in merged]
    out = set()
    for k in small:
        n = parse_key(k)
        assert n is not None
        if any(m is not None and m.first <= n.first and n.last <= m.last for m in ranges):
            out.add(k)
    return out
