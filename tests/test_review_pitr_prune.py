"""Review of the code that deletes or merges replicated data: the PITR window and segment pruning
(248c427), compaction (5758a86) and the offsite copy of segments (6726985). Findings as strict xfail
tests; passing tests pin what holds (real writer, real replicator, real repositories)."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from dbre.replicate.compact import compact_segments
from dbre.replicate.segment import list_generations, parse_key
from dbre.repository.copy import copy_snapshots
from dbre.repository.repo import Repository
from dbre.repository.retention import prune
from tests.replication import (
    check_chains,
    check_exact,
    dbre_cmd,
    make_source,
    observed_times,
    read_log,
    restore_at,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 500


def _replicate(tmp_path: Path, repo_url: str, seconds: float = 2.5, env: dict[str, str] | None = None) -> Path:
    """One generation of ~10+ small segments (200 ms interval) of a real writer; the writer's log."""
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms", env=env)
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, seconds, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    return log


def _segments(repo: Repository) -> list[str]:
    (names,) = list_generations(repo, "app").values()
    return [n.key for n in names]


def _age(repo: Repository, keys: list[str], seconds: float) -> None:
    """Make local objects look ``seconds`` old (as segments written hours ago are)."""
    t = time.time() - seconds
    for k in keys:
        os.utime(repo.store._path(k), (t, t))  # type: ignore[attr-defined]


def _newest_restores(repo: Repository, log: Path, tmp_path: Path, name: str) -> None:
    commits, _ = read_log(log)
    observed = observed_times(repo, BASE_ROWS)
    out = tmp_path / name
    restore_at(repo, "app", utc(commits[-1].after + 1.0), out)
    assert check_exact(out, commits, observed, commits[-1].after + 1.0, BASE_ROWS) == commits[-1].seq
    out.unlink()


@pytest.mark.parametrize("how", ["planted", "damaged"])
def test_prune_deletes_small_segments_only_for_a_verified_cover(tmp_path: Path, how: str) -> None:
    """Review finding 1, fixed during the review (be2e786); pinned here. An attacker who can write to
    the bucket but holds no key plants one object named like a merged
    segment over a generation's whole txid range (or a real merged segment rots). list_generations
    drops every small segment inside that range as superseded, and prune deletes them once they are
    older than the grace period, without unsealing or chain-checking the object that 'covers' them:
    the only good copy of the chain goes, irreversibly, and nothing inside the PITR window of that
    generation restores any more. (The planted name alone also makes every restore of that
    generation fail before any prune: list_generations hides the real segments behind it.)"""
    repo_url = str(tmp_path / "repo")
    _replicate(tmp_path, repo_url)
    repo = Repository.open(repo_url)
    small = _segments(repo)
    assert len(small) >= 4, small
    (gen,) = list_generations(repo, "app")
    if how == "planted":
        first, last = small[0].split("/")[-1].split("-"), small[-2].split("/")[-1].split("-")
        cover = f"segments/app/{gen}/{first[0]}-{last[1]}-{first[2]}-{last[3]}"
        repo.store.put(cover, os.urandom(4096))  # no key needed
    else:
        done = compact_segments(repo, "app", older_than=0, group=4)  # real merged segments
        cover = done.merged[0]
        p = repo.store._path(cover)  # type: ignore[attr-defined]
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x40  # one flipped bit: rot, or a write-only attacker
        p.write_bytes(bytes(raw))
    _age(repo, small, 3 * 3600)  # the small ones are hours old; the cover is brand new
    prune(repo)  # default grace (2 h)
    gone = [k for k in small if not repo.store.exists(k)]
    assert gone == [], f"prune deleted {len(gone)} of {len(small)} verified segments for an unverified {cover}"


# review finding 2 (fixed in 99b5949): copies compacted on their own schedule overlapped and failed every restore
def test_copy_after_compaction_on_both_sides_keeps_the_copy_restorable(tmp_path: Path) -> None:
    """Compaction groups a repository's listed segments from the first (60 per object by default), so
    two repositories whose prunes ran at different times (the offsite copy is pruned by its own
    forget schedule) merge different runs: e.g. the copy's prune merged s1..s60 when it held 61
    old ones, later [1..60]+s61..s119 -> [1..119]; the source's first merges s1..s60, s61..s120.
    The next `dbre copy` ships
    the source's [61..120] (not there yet) into the copy, which now lists [1..119] and [61..120]:
    neither inside the other, so list_generations keeps both and check_contiguous refuses the
    generation (overlap) -- every restore --at inside it fails on the offsite copy. Reproduced with
    small groups (3 on the copy, 4 on the source) instead of 60-segment histories."""
    src_url, dst_url = str(tmp_path / "repo"), str(tmp_path / "offsite")
    log = _replicate(tmp_path, src_url)
    out = subprocess.run(dbre_cmd("copy", "--repo", src_url, "--to", dst_url), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    src, dst = Repository.open(src_url), Repository.open(dst_url)
    assert len(_segments(dst)) >= 9
    compact_segments(dst, "app", older_than=0, group=3)  # the copy's own prune, earlier
    compact_segments(src, "app", older_than=0, group=4)  # the source's, later
    check_chains(src)
    check_chains(dst)  # each side alone is fine
    plan, _ = copy_snapshots(src, dst)
    assert plan.ok, plan.problems
    check_chains(dst)  # IntegrityError: overlap
    _newest_restores(dst, log, tmp_path, "offsite.db")


def test_compaction_keeps_every_transaction_whichever_forms_exist(tmp_path: Path) -> None:
    """Holds: merged segments keep per-transaction stamps; restores at random stamps are exact with
    only the small form, with both forms, with a random part of the small ones deleted (a prune cut
    short), and with only the merged form after prune; no transaction applied twice or skipped."""
    repo_url = str(tmp_path / "repo")
    log = _replicate(tmp_path, repo_url)
    repo = Repository.open(repo_url)
    commits, _ = read_log(log)
    observed = observed_times(repo, BASE_ROWS)
    rng = random.Random(3)
    stamps = sorted(observed.values())
    small = _segments(repo)

    def exact(tag: str, n: int = 4) -> None:
        for i, t in enumerate(rng.sample(stamps, n) + [stamps[-1]]):
            out = tmp_path / f"{tag}{i}.db"
            restore_at(repo, "app", utc(t), out)
            check_exact(out, commits, observed, t, BASE_ROWS)
            out.unlink()

    done = compact_segments(repo, "app", older_than=0, group=4)
    assert done.replaced >= len(small) - 2 and len(done.merged) >= 2
    assert observed_times(repo, BASE_ROWS) == observed  # the merged form, read back: same stamps
    exact("both")
    # a prune cut short deletes only small segments a merged one holds (the newest few stay unmerged: a
    # group of 4 needs 4; deleting one of those made a real gap, under load, when the leftovers were 2 or 3)
    spans = [(n.generation, n.first, n.last) for n in map(parse_key, done.merged) if n is not None]
    held = [k for k in small if (n := parse_key(k)) is not None
            and any(g == n.generation and a <= n.first and n.last <= b for g, a, b in spans)]
    assert len(held) == done.replaced
    for k in rng.sample(held, len(held) // 2):
        repo.store.delete(k)
    exact("part")
    plan = prune(repo, grace=0)
    assert plan.segments[0].delete == []
    listed = _segments(repo)
    assert [k for k in small if k not in listed and repo.store.exists(k)] == []  # the superseded went
    assert set(done.merged) <= set(listed) and listed[-1] == small[-1]
    exact("merged")


# review finding 3 (fixed): the replicator holds the repository lock only while it starts a generation
def test_prune_runs_while_a_replicator_runs(tmp_path: Path) -> None:
    """Was: `dbre replicate` held a shared repository lock for its whole run and forget/prune need the
    exclusive one, so a prune fails at once (LockedError) for as long as the replicator runs. The
    deployment docs/replication.md describes (a systemd unit or a sidecar, always on) therefore
    never prunes: no PITR window is ever enforced, no generation or pack is deleted, and no segment
    is ever compacted (restores keep reading up to 601 small segments per generation, object counts
    grow without bound) unless the operator stops replication (losing RPO) around every prune.
    Now the prune runs (exit 0) beside it, and the replicator goes on shipping into its generation."""
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms")
    try:
        wait_for_generation(repo_url, proc=rep)
        repo = Repository.open(repo_url)
        deadline = time.time() + 30
        while list(repo.store.list("locks/")) and time.time() < deadline:
            time.sleep(0.05)  # the generation started: the replicator lets its lock go
        assert list(repo.store.list("locks/")) == [], "the replicator still holds the repository lock"
        writer = start_writer(src, log, 2.0, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0)
        out = subprocess.run(dbre_cmd("forget", "--repo", repo_url, "--db", "app", "--keep-last", "1",
                                     "--prune", "--grace", "0"), capture_output=True,
                             timeout=120)
        assert writer.wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert out.returncode == 0, out.stderr.decode()
    check_chains(repo)
    _newest_restores(repo, log, tmp_path, "newest.db")  # every commit, also those shipped during the prune


def test_listing_that_fails_half_way_deletes_nothing(tmp_path: Path) -> None:
    """Holds: a segment listing that yields some keys and then fails aborts prune before any deletion
    (an unrestorable generation that would go stays, every object stays)."""
    from dbre.errors import RepositoryError

    repo_url = str(tmp_path / "repo")
    _replicate(tmp_path, repo_url, env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "3"})
    repo = Repository.open(repo_url)
    gens = list(list_generations(repo, "app"))
    assert len(gens) >= 2, gens
    from dbre.replicate.segment import read_base

    oldest = read_base(repo, "app", gens[0])
    repo.store.delete(repo.manifest_key(repo.find_snapshot("app", oldest.snapshot)))
    before = set(repo.store.list(""))
    real = repo.store.list

    def flaky(prefix: str, *a: object, **kw: object):  # type: ignore[no-untyped-def]
        it = real(prefix, *a, **kw)  # type: ignore[arg-type]
        if not prefix.startswith("segments/"):
            yield from it
            return
        for i, k in enumerate(it):
            if i == 3:
                raise RepositoryError(f"list {prefix}: connection reset", "try again")
            yield k

    repo.store.list = flaky  # type: ignore[method-assign]
    with pytest.raises(RepositoryError, match="connection reset"):
        prune(repo, grace=0)
    repo.store.list = real  # type: ignore[method-assign]
    assert set(repo.store.list("")) - {k for k in repo.store.list("") if k.startswith("locks/")} \
        >= before - {k for k in before if k.startswith("locks/")}
    plan = prune(repo, grace=0)  # and a prune whose listings succeed deletes it
    assert [g.id for g in plan.segments[0].delete] == [gens[0]]
