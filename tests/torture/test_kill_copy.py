"""kill -9 of `dbre copy` at random instants, local to local and S3 to S3: the offsite repository shows
only whole snapshots (each restores to the content its source snapshot was taken with, verify
--read-data is clean), snapshots already there stay, the source repository is untouched, and the
next copy completes the job at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.dbfactory import make_db
from tests.test_crash import rewrite_rows
from tests.torture.harness import Oracle, Tally, Trial, cli, content_digest, rng_for, trials
from tests.torture.launcher import Launcher

FRESH_EVERY = 3  # every third kill copies a new source into a new, empty offsite repository (the most work)
NEXT_RUN_BOUND = 30.0  # s


def test_kill_copy(backend: str, repo_url: Callable[[str], str], launcher: Launcher, tally: Tally,
                   tmp_path: Path) -> None:
    cell = tally.cell("copy", backend)
    rng = rng_for("copy", backend)
    began = time.monotonic()
    src = make_db(tmp_path / "src.db", mb=rng.uniform(2, 3), journal="delete", seed=rng.randrange(1 << 30))
    source = offsite = Oracle("", tmp_path, cell)

    def backup() -> None:
        rewrite_rows(src, rng.uniform(0.2, 0.6), seed=rng.randrange(1 << 30))
        before = source.ids()
        r = cli("backup", src, "--repo", source.url)
        assert r.returncode == 0, r
        (new,) = source.ids() - before
        source.expect(new, content_digest(src))

    estimate = 0.0  # a copy of a new source's snapshots into an empty repository
    for i in range(trials("copy", backend)):
        if i % FRESH_EVERY == 0:  # a new source of 3 snapshots, copied into a new, empty offsite
            if source.url:
                with Trial("copy", backend, i - 1, note=" (its source)").checking():
                    source.check()  # the source repository was never written by a copy
            source = Oracle(repo_url(f"source-{i}"), tmp_path, cell)
            for _ in range(3):
                backup()
            if not estimate:
                timing = launcher.start(["copy", "--repo", source.url, "--to", repo_url("timing")])
                assert timing.finish() == 0, timing
                estimate = time.monotonic() - timing.started
            offsite = Oracle(repo_url(f"offsite-{i}"), tmp_path, cell)
            scale = 1.0
        else:
            backup()  # one new snapshot to copy
            scale = 0.4
        offsite.digests = dict(source.digests)  # a copied snapshot keeps its id and content
        before = offsite.ids()
        trial = Trial("copy", backend, i, rng.uniform(0, 1.3) * scale * estimate)
        run = launcher.start(["copy", "--repo", source.url, "--to", offsite.url])
        cut = run.kill_after(trial.delay)
        cell.trials += 1
        cell.kills += cut
        cell.finished_first += not cut
        with trial.checking():
            assert cut or run.returncode == 0, run
            if offsite.exists():
                there = offsite.ids()
                assert before <= there <= set(source.digests), f"before {before}, there {there}"
                # whatever appeared is whole: verify clean, every snapshot there restores exactly
                offsite.gone = set(source.digests) - there
                offsite.check()
            else:
                assert not before, "the offsite repository's config disappeared"
            again = launcher.start(["copy", "--repo", source.url, "--to", offsite.url])
            assert again.finish(NEXT_RUN_BOUND) == 0, again
            cell.next_run_max_s = max(cell.next_run_max_s, time.monotonic() - again.started)
            assert offsite.ids() == set(source.digests)
            offsite.gone = set()
            offsite.check(only_new=True)
    with Trial("copy", backend, -1, note=" (its source)").checking():
        source.check()
    cell.seconds += time.monotonic() - began
    assert cell.kills >= cell.trials // 3, f"only {cell.kills} of {cell.trials} runs were cut by the kill"
