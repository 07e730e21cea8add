"""`dbre copy` ships replicated generations offsite: bases and segments copied as stored, each checked
first, incrementally while replicate runs; restores at random times in the copy (S3) are exact, and
a damaged segment is reported and not copied (the chain before it is)."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

from dbre.replicate.check import verify_segments
from dbre.replicate.segment import list_generations
from dbre.repository.copy import copy_snapshots
from dbre.repository.repo import Repository
from tests.replication import (
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

BASE_ROWS = 2000


def test_copy_ships_segments_to_s3(tmp_path: Path, s3_repo_url: str) -> None:
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "5"})
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 2.0, start_seq=BASE_ROWS, ckpt_every=100).wait(timeout=60) == 0
        # a copy while the replicator runs (both hold shared locks), by the CLI
        out = subprocess.run(dbre_cmd("copy", "--repo", repo_url, "--to", s3_repo_url), capture_output=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr.decode()
        assert b"segments of replication" in out.stdout, out.stdout
        commits, _ = read_log(log)
        assert start_writer(src, log, 2.0, start_seq=commits[-1].seq, ckpt_every=100).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    a, b = Repository.open(repo_url), Repository.open(s3_repo_url)
    first = {k for k in b.store.list("segments/")}
    assert first and first < set(a.store.list("segments/"))
    # the second copy sends only what is new
    plan, copied = copy_snapshots(a, b)
    assert plan.ok, plan.problems
    assert plan.segments == len([k for k in set(a.store.list("segments/")) - first if not k.endswith("/base")])
    assert set(b.store.list("segments/")) == set(a.store.list("segments/"))
    assert len(list_generations(b, "app")) >= 2
    again, _ = copy_snapshots(a, b)
    assert again.segments == 0 and again.generations == 0 and again.ok
    assert verify_segments(b, "app")[1] == []

    commits, _ = read_log(log)
    rng = random.Random(4)
    hi = commits[-1].after + 0.3
    for i, at in enumerate(sorted(rng.uniform(commits[0].before, hi) for _ in range(6)) + [hi]):
        out_db = tmp_path / f"r{i}.db"
        restore_at(b, "app", utc(at), out_db)
        top = check_oracle(out_db, commits, at, BASE_ROWS)
        if at == hi:
            assert top == commits[-1].seq
        out_db.unlink()

    # a segment damaged in the primary: reported, not copied; the segments before it are
    gens = list_generations(a, "app")
    gen_id, names = max(gens.items(), key=lambda kv: len(kv[1]))
    assert len(names) >= 3
    bad = names[len(names) // 2]
    path = Path(repo_url) / bad.key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    c = Repository.init_copy_of(a, str(tmp_path / "offsite2"), None)
    plan, _ = copy_snapshots(a, c)
    assert not plan.ok and any(bad.key in p for p in plan.problems), plan.problems
    copied_names = list_generations(c, "app")[gen_id]
    assert copied_names == names[: names.index(bad)]
    assert verify_segments(c, "app")[1] == []


def test_copy_between_differently_compacted_repositories(tmp_path: Path) -> None:
    """The source and its copy compact on their own schedules (different runs merged): after the next
    copy the copy holds partly overlapping merged segments, and restores still read one contiguous
    chain through them, exact; prune then drops what that chain does not use."""
    from dbre.replicate.compact import compact_segments
    from dbre.repository.retention import prune

    src_url, dst_url, src, log = str(tmp_path / "repo"), str(tmp_path / "offsite"), tmp_path / "s.db", tmp_path / "w"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, src_url, interval="100ms")
    try:
        wait_for_generation(src_url, proc=rep)
        assert start_writer(src, log, 2.5, start_seq=BASE_ROWS, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    a = Repository.open(src_url)
    b = Repository.init_copy_of(a, dst_url, None)
    assert copy_snapshots(a, b)[0].ok
    with b.lock("compact"):
        compact_segments(b, "app", older_than=0, group=3)
    with a.lock("compact"):
        compact_segments(a, "app", older_than=0, group=4)
    plan, _ = copy_snapshots(a, b)
    assert plan.ok and plan.segments > 0, plan.problems
    keys = {k for k in b.store.list("segments/app/") if not k.endswith("/base")}
    (names,) = list_generations(b, "app").values()
    assert len(names) < len(keys)  # overlapping forms stored, one chain listed
    assert verify_segments(b, "app")[1] == []
    commits, _ = read_log(log)
    rng = random.Random(6)
    hi = commits[-1].after + 0.3
    for i, at in enumerate(sorted(rng.uniform(commits[0].before, hi) for _ in range(4)) + [hi]):
        out_db = tmp_path / f"x{i}.db"
        restore_at(b, "app", utc(at), out_db)
        top = check_oracle(out_db, commits, at, BASE_ROWS)
        assert at != hi or top == commits[-1].seq
        out_db.unlink()
    prune(b, grace=0)
    assert {k for k in b.store.list("segments/app/") if not k.endswith("/base")} == {n.key for n in names}
