"""kill -9 of `dbre backup` at random instants, local and S3: after each kill the repository verifies
(--read-data), every snapshot taken so far restores to exactly the content it was taken with, a
snapshot the killed run committed holds the source as it was, and the next backup succeeds at once
(the killed run's lock names a dead pid of this host: stale at once, no `dbre unlock` needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.dbfactory import make_db
from tests.test_crash import garbage, rewrite_rows
from tests.torture.harness import Oracle, Tally, Trial, cli, content_digest, full_check, rng_for, trials
from tests.torture.launcher import Launcher

PER_REPOSITORY = 5  # kills into one repository before a fresh one (keeps each check cheap)
NEXT_RUN_BOUND = 30.0  # s: the next run after a kill; waiting out a stale lock would take 600 s


def test_kill_backup(backend: str, repo_url: Callable[[str], str], launcher: Launcher, tally: Tally,
                     tmp_path: Path) -> None:
    cell = tally.cell("backup", backend)
    rng = rng_for("backup", backend)
    began = time.monotonic()
    src = make_db(tmp_path / "src.db", mb=rng.uniform(2, 4), journal="wal", seed=rng.randrange(1 << 30))
    oracle: Oracle | None = None
    url = ""
    estimate = 0.0  # seconds of work of a complete backup of these changes, learnt as we go
    for i in range(trials("backup", backend)):
        if i % PER_REPOSITORY == 0:
            if oracle is not None:
                finish_repository(url, oracle, backend)
            url = repo_url(f"repo-{i}")
            oracle = Oracle(url, tmp_path, cell)
            first = launcher.start(["backup", src, "--repo", url])
            assert first.finish() == 0, first
            (only,) = oracle.ids()
            oracle.expect(only, content_digest(src))
            if not estimate:  # learnt from an incremental: the first run also creates the repository,
                rewrite_rows(src, 0.25, seed=rng.randrange(1 << 30))  # and on S3 takes twice as long
                warm = launcher.start(["backup", src, "--repo", url])
                assert warm.finish() == 0, warm
                estimate = time.monotonic() - warm.started
                (second,) = oracle.ids() - {only}
                oracle.expect(second, content_digest(src))
        assert oracle is not None
        rewrite_rows(src, rng.uniform(0.05, 0.5), seed=rng.randrange(1 << 30))
        digest = content_digest(src)
        full = ["--full"] if rng.random() < 0.15 else []
        trial = Trial("backup", backend, i, rng.uniform(0, 1.3) * estimate, " --full" if full else "")
        before = oracle.ids()
        run = launcher.start(["backup", src, "--repo", url, *full])
        cut = run.kill_after(trial.delay)
        cell.trials += 1
        cell.kills += cut
        cell.finished_first += not cut
        if not cut:  # it finished first: its own time says how long the work takes
            estimate = 0.5 * estimate + 0.5 * run.seconds
        with trial.checking():
            assert cut or run.returncode == 0, run
            after = oracle.ids()
            assert before <= after and len(after - before) <= 1, f"before {before}, after {after}"
            for snap in after - before:  # committed before the kill: the source as it is
                oracle.expect(snap, digest)
            # the next run works at once, without anyone clearing the killed run's lock
            again = launcher.start(["backup", src, "--repo", url])
            assert again.finish(NEXT_RUN_BOUND) == 0, again
            took = time.monotonic() - again.started
            cell.next_run_max_s = max(cell.next_run_max_s, took)
            if after == before:  # it did the killed run's work
                estimate = 0.7 * estimate + 0.3 * took
            (new,) = oracle.ids() - after
            oracle.expect(new, digest)
            oracle.check(only_new=not full_check(backend, i))
    assert oracle is not None
    finish_repository(url, oracle, backend)
    cell.seconds += time.monotonic() - began
    assert cell.kills >= cell.trials // 3, f"only {cell.kills} of {cell.trials} runs were cut by the kill"


def finish_repository(url: str, oracle: Oracle, backend: str) -> None:
    """What the kills left is garbage only: a prune (grace 0) removes it, and everything still restores."""
    pruned = cli("forget", "--repo", url, "--keep-last", "100000", "--prune", "--grace", "0", "--json")
    assert pruned.returncode == 0, pruned
    if backend == "local":
        assert garbage(Path(url)) == (0, 0), "prune left unreferenced packs or temp files"
    oracle.check()
