"""kill -9 of `dbre forget --keep-last 3 --prune --grace 0` at random instants, local and S3, in a
repository under churn: each round rewrites a quarter to a half of the rows, so backups repack
sparse packs (FORMAT.md, *Churn*) and prune has whole packs to delete. After each kill: verify
--read-data is clean, every snapshot the policy keeps is there, every snapshot still listed
restores to exactly its content, and the next run finishes the job at once (the killed run's
exclusive lock names a dead pid of this host: stale at once)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.dbfactory import make_db
from tests.test_crash import garbage, rewrite_rows
from tests.torture.harness import Oracle, Tally, Trial, cli, content_digest, rng_for, trials
from tests.torture.launcher import Launcher

KEEP = 3
NEXT_RUN_BOUND = 30.0  # s
FORGET = ["forget", "--keep-last", str(KEEP), "--prune", "--grace", "0"]


def test_kill_forget_prune(backend: str, repo_url: Callable[[str], str], launcher: Launcher, tally: Tally,
                           tmp_path: Path) -> None:
    cell = tally.cell("forget --prune", backend)
    rng = rng_for("forget --prune", backend)
    began = time.monotonic()
    src = make_db(tmp_path / "src.db", mb=rng.uniform(1.5, 2.5), journal="wal", seed=rng.randrange(1 << 30))
    url = repo_url("repo")
    oracle = Oracle(url, tmp_path, cell)
    taken: list[str] = []  # snapshot ids, oldest first
    repacked = [0]  # pages the churn's backups stored again to empty sparse packs

    def churn() -> None:
        rewrite_rows(src, rng.uniform(0.25, 0.5), seed=rng.randrange(1 << 30))
        before = oracle.ids()
        r = cli("backup", src, "--repo", url)
        assert r.returncode == 0, r
        (new,) = oracle.ids() - before
        oracle.expect(new, content_digest(src))
        taken.append(new)
        repo = oracle.open()
        assert repo is not None
        (manifest,) = [m for m in repo.snapshots() if m.id == new]
        repacked[0] += int(manifest.stats.get("repacked_pages") or 0)

    def packs() -> set[str]:
        repo = oracle.open()
        assert repo is not None
        return set(repo.store.list("packs/"))

    for _ in range(KEEP + 1):
        churn()
    estimate = 0.0
    packs_deleted = 0
    for i in range(trials("forget --prune", backend)):
        for _ in range(2):
            churn()
        before = oracle.ids()
        keep = set(taken[-KEEP:])
        packs_before = packs()
        trial = Trial("forget --prune", backend, i, rng.uniform(0, 1.3) * (estimate or 0.5))
        run = launcher.start([*FORGET, "--repo", url])
        cut = run.kill_after(trial.delay)
        cell.trials += 1
        cell.kills += cut
        cell.finished_first += not cut
        if not cut:  # it finished first: its own time says how long the work takes
            estimate = 0.7 * estimate + 0.3 * run.seconds if estimate else run.seconds
        with trial.checking():
            assert cut or run.returncode == 0, run
            after = oracle.ids()
            assert keep <= after <= before, f"kept {keep}, before {before}, after {after}"
            oracle.gone |= before - after
            oracle.check()  # whatever is left verifies and restores exactly
            again = launcher.start([*FORGET, "--repo", url])
            assert again.finish(NEXT_RUN_BOUND) == 0, again
            took = time.monotonic() - again.started
            cell.next_run_max_s = max(cell.next_run_max_s, took)
            if after == before:  # the killed run had forgotten nothing: this one did all the work
                estimate = 0.7 * estimate + 0.3 * took if estimate else took
            assert oracle.ids() == keep
            oracle.gone |= after - keep
            # the next run's deletions took nothing a kept snapshot needs: verify reads every page of
            # every pack they use (on S3, where a restore costs 4x, the next kill's check restores them)
            oracle.check(only_new=backend == "s3")
            packs_deleted += len(packs_before - packs())
            if backend == "local":
                assert garbage(Path(url)) == (0, 0), "unreferenced packs or temp files after a full prune"
    print(f"\nforget --prune on {backend}: {packs_deleted} packs deleted; backups repacked {repacked[0]} pages")
    assert packs_deleted >= cell.trials, "prune had too little to delete: the test does not exercise it"
    assert repacked[0] > 0, "no backup repacked: the churn does not make sparse packs"
    cell.seconds += time.monotonic() - began
    assert cell.kills >= cell.trials // 3, f"only {cell.kills} of {cell.trials} runs were cut by the kill"
