"""forget/prune with a PITR window: the bases a window needs stay, the generations it does not need go,
every time inside the window restores exactly, earlier times are refused, and a kill -9 during prune
leaves the window restorable (local and S3)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbre.errors import UsageError
from dbre.replicate.check import verify_segments
from dbre.replicate.segment import list_generations, read_base
from dbre.replicate.window import read_pruned
from dbre.repository.keep import KeepPolicy
from dbre.repository.repo import Repository
from dbre.repository.retention import forget
from tests.replication import (
    SecondsWindow,
    check_chains,
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



def _replicate(tmp_path: Path, repo_url: str, generations: int = 5) -> Path:
    """Replicate a writer, with a fresh base every 3 segments, until there are ``generations``."""
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "3"})
    try:
        wait_for_generation(repo_url, proc=rep)
        seq, deadline = BASE_ROWS, time.time() + 30
        while len(list_generations(Repository.open(repo_url), "app")) < generations and time.time() < deadline:
            assert start_writer(src, log, 1.0, start_seq=seq, ckpt_every=0).wait(timeout=60) == 0
            seq = read_log(log)[0][-1].seq
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    return log


def _window(repo: Repository) -> tuple[list[str], float, SecondsWindow]:
    """Generations oldest first; a window starting midway between the 3rd and 4th bases."""
    gens = list(list_generations(repo, "app"))
    assert len(gens) >= 4, gens
    times = [read_base(repo, "app", g).time.timestamp() for g in gens]
    latest = max(m.time.timestamp() for m in repo.snapshots("app"))
    start = (times[2] + times[3]) / 2
    return gens, start, SecondsWindow(within="1h", seconds=latest - start)


def _restores_in_window(repo: Repository, tmp_path: Path, log: Path, lo: float, n: int, seed: int) -> None:
    commits, _ = read_log(log)
    rng = random.Random(seed)
    hi = commits[-1].after + 0.3
    for i, at in enumerate(sorted(rng.uniform(lo, hi) for _ in range(n)) + [lo, hi]):
        out = tmp_path / f"r{i}.db"
        restore_at(repo, "app", utc(at), out)
        top = check_oracle(out, commits, at, BASE_ROWS)
        if at == hi:
            assert top == commits[-1].seq
        out.unlink()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_forget_prune_keeps_the_window(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    repo_url = str(tmp_path / "repo") if where == "local" else request.getfixturevalue("s3_repo_url")
    log = _replicate(tmp_path, repo_url)
    repo = Repository.open(repo_url)
    gens, start, policy = _window(repo)
    bases = {g: read_base(repo, "app", g) for g in gens}
    keys = set(repo.store.list("segments/"))

    # the dry run names what goes and deletes nothing
    plan, pplan = forget(repo, policy, "app", dry_run=True, prune=True, grace=0)
    assert set(repo.store.list("segments/")) == keys
    (seg,) = plan.segments
    assert [g["generation"] for g in seg["prune_deletes_generations"]] == gens[:2]
    kept_by = {m.id: r for m, r in plan.keep}
    assert f"pitr base {gens[2]}" in kept_by[bases[gens[2]].snapshot]  # older than the window, still needed
    assert {m.id for m in plan.remove} == {bases[gens[0]].snapshot, bases[gens[1]].snapshot}
    assert pplan is not None
    assert [g.id for g in pplan.segments[0].delete] == gens[:2]

    forget(repo, policy, "app", prune=True, grace=0)
    left = list(list_generations(repo, "app"))
    assert left == gens[2:]
    assert not any(k.startswith((f"segments/app/{gens[0]}/", f"segments/app/{gens[1]}/"))
                   for k in repo.store.list("segments/"))
    assert read_pruned(repo, "app") == bases[gens[2]].time
    assert verify_segments(repo, "app")[1] == []
    # inside the window (and back to the oldest kept base): exact; before it: refused, one line
    _restores_in_window(repo, tmp_path, log, bases[gens[2]].time.timestamp(), 6, seed=11)
    assert bases[gens[2]].time.timestamp() <= start
    before = bases[gens[1]].time + (bases[gens[2]].time - bases[gens[1]].time) / 2
    with pytest.raises(UsageError, match="were pruned"):
        restore_at(repo, "app", before, tmp_path / "old.db")
    assert not (tmp_path / "old.db").exists()

    # a second forget/prune with the same window has nothing more to delete
    _, again = forget(repo, policy, "app", prune=True, grace=0)
    assert again is not None and again.segments[0].delete == []
    # without keep-within only "now" is the window: the newest generation's base stays; the grace
    # period keeps the older (now unrestorable) generations until their objects are old enough
    plan, young = forget(repo, KeepPolicy(last=1), "app", prune=True, grace=3600)
    assert bases[left[-1]].snapshot in {m.id for m, _ in plan.keep}
    assert young is not None and young.segments[0].delete == []
    assert [g.id for g in young.segments[0].grace_kept] == left[:-1]
    assert list(list_generations(repo, "app")) == left
    # the CLI's plan says what the window keeps and what goes (dry run: nothing deleted)
    out = subprocess.run(dbre_cmd("forget", "--repo", repo_url, "--db", "app", "--keep-last", "1", "--dry-run"),
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert f"the next prune deletes {len(left) - 1} generations" in out.stdout.decode(), out.stdout.decode()
    out = subprocess.run(dbre_cmd("forget", "--repo", repo_url, "--db", "app", "--keep-last", "1", "--prune",
                                  "--grace", "0", "--dry-run"), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert f"prune: app: would delete {len(left) - 1} generations" in out.stdout.decode(), out.stdout.decode()
    assert list(list_generations(repo, "app")) == left
    _, old = forget(repo, KeepPolicy(last=1), "app", prune=True, grace=0)
    assert old is not None and [g.id for g in old.segments[0].delete] == left[:-1]
    assert list(list_generations(repo, "app")) == left[-1:]
    assert verify_segments(repo, "app")[1] == []


PRUNE = r'''
import sys, time
from dbre.repository.repo import Repository
from dbre.repository.retention import forget
from tests.replication import SecondsWindow

repo = Repository.open(sys.argv[1])
delete = repo.store.delete
def slow_delete(key):
    time.sleep(0.03)  # (the kill lands between deletions)
    delete(key)
repo.store.delete = slow_delete
print("start", flush=True)
forget(repo, SecondsWindow(within="1h", seconds=float(sys.argv[2])), "app", prune=True, grace=0)
print("done", flush=True)
'''


def test_kill_during_prune_leaves_the_window_restorable(tmp_path: Path) -> None:
    repo_url = str(tmp_path / "repo")
    log = _replicate(tmp_path, repo_url, generations=6)
    repo = Repository.open(repo_url)
    gens, start, policy = _window(repo)
    oldest_kept = read_base(repo, "app", gens[2]).time.timestamp()
    segs = sum(len(v) for g, v in list_generations(repo, "app").items() if g in gens[:2])
    proc = subprocess.Popen([sys.executable, "-c", PRUNE, repo_url, str(policy.seconds)],
                            stdout=subprocess.PIPE, env={**os.environ})
    assert proc.stdout is not None and proc.stdout.readline() == b"start\n"
    deadline = time.time() + 30
    while read_pruned(repo, "app") is None and time.time() < deadline:  # prune's first write
        time.sleep(0.005)
    time.sleep(random.Random(5).uniform(0.01, 0.02 * segs))  # amid its deletions (0.03 s each)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    repo = Repository.open(repo_url)
    remaining = list(list_generations(repo, "app"))
    assert read_pruned(repo, "app") is not None
    print("left after the kill:", {g: len(v) for g, v in list_generations(repo, "app").items()}, "of", segs)
    assert remaining[-len(gens) + 2:] == gens[2:]
    # a cut-short prune leaves bases with a prefix of their chains, no hole: verify finds nothing
    # but the generations whose base snapshot forget already removed (the ones prune deletes)
    problems = verify_segments(repo, "app")[1]
    assert all(obj.split("/")[2] in gens[:2] and "base snapshot" in why for obj, why in problems), problems
    check_chains(repo)
    _restores_in_window(repo, tmp_path, log, oldest_kept, 4, seed=7)
    # run again: it finishes
    forget(repo, policy, "app", prune=True, grace=0)
    assert list(list_generations(repo, "app")) == gens[2:]
    assert verify_segments(repo, "app")[1] == []
    _restores_in_window(repo, tmp_path, log, start, 3, seed=8)


def test_unrestorable_generation_amid_kept_ones_stays(tmp_path: Path) -> None:
    """A generation whose base snapshot went (an older forget) but that lies between restorable ones is
    not pruned: a restore inside it fails loudly instead of falling back to the one before."""
    from dbre.errors import IntegrityError
    from dbre.repository.retention import prune

    repo_url = str(tmp_path / "repo")
    _replicate(tmp_path, repo_url, generations=4)
    repo = Repository.open(repo_url)
    gens = list(list_generations(repo, "app"))
    middle = read_base(repo, "app", gens[1])
    repo.store.delete(repo.manifest_key(repo.find_snapshot("app", middle.snapshot)))
    plan = prune(repo, grace=0)
    assert [g.id for g in plan.segments[0].unrestorable] == [gens[1]] and plan.segments[0].delete == []
    assert list(list_generations(repo, "app")) == gens
    at = middle.time + (read_base(repo, "app", gens[2]).time - middle.time) / 2
    with pytest.raises(IntegrityError, match="is missing"):
        restore_at(repo, "app", at, tmp_path / "mid.db")
