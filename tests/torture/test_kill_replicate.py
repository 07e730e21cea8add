"""kill -9 of `dbre replicate` at random instants while a writer commits (with its own PASSIVE,
RESTART and TRUNCATE checkpoints, so a restart sometimes finds the WAL restarted and takes a new
generation's base snapshot), into a local and an S3 repository. After each kill:

- the newest state restores to one committed state of the source (a consistent prefix of the
  writer's commits), at or after the last one the killed replicator reported shipped (its "shipped"
  line's last txid, restored with --txid), and no later than the writer's last commit;
- points in the PITR window, drawn at random, each restore to a consistent prefix holding no commit
  begun after that point, and later points never restore less;
- verify --read-data is clean (segments included) and every base snapshot restores to the content
  it first restored to;
- the next replicator ships its first segment within a bound (a dead holder's lease on this host is
  stale at once: nobody clears it).
At the end a replicator stopped with SIGTERM has shipped every commit.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.replication import (
    check_oracle,
    make_source,
    read_log,
    restore_at,
    restored_seq,
    start_writer,
    utc,
)
from tests.torture.harness import (
    Cell,
    Oracle,
    Tally,
    Trial,
    cli,
    content_digest,
    full_check,
    remove_db,
    rng_for,
    trials,
)
from tests.torture.launcher import Launcher, Run

BASE_ROWS = 200
# the writer's run in each trial: the kill lands inside it, the checks run beside it (S3: a new
# generation's base snapshot takes ~1 s there, and the next replicator must still find commits to ship)
WRITE_SECONDS = {"local": 1.6, "s3": 2.5}
FIRST_SHIP_BOUND = 20.0  # s from a replicator's start to its first shipped segment
POINTS = 3  # point-in-time restores checked after each kill


def shipped_txids(run: Run) -> list[int]:
    """The last txid of every segment the run reported shipped, in order."""
    out = []
    for line in run.out().splitlines():
        if line.startswith("shipped "):
            out.append(int(line.split("/")[-1].split("-")[1], 16))
    return out


# The known finding of test_replicate_busy_source.py (strict xfail): a base the busy source forced
# onto the backup API stops the replicator. Under load it can happen here; the trial then starts the
# replicator again, as its message asks (and a supervisor would), and counts it in the figures.
BUSY_BASE = "the snapshot's WAL position is unknown"


def wait_first_ship(run: Run, bound: float, cell: Cell, launcher: Launcher,
                    writer: subprocess.Popen[bytes]) -> tuple[Run, float | None]:
    """The run (restarted once after the known busy-base exit) and the seconds from the first start to
    its first "shipped" line, or None when the writer ended first with nothing shipped (a new
    generation's base, slow under load, took in every commit); fails past ``bound``."""
    first = run.started
    while time.monotonic() < first + bound:
        if shipped_txids(run):
            return run, time.monotonic() - first
        if not run.running() and run.returncode == 1 and BUSY_BASE in run.err() and not cell.busy_base_exits:
            cell.busy_base_exits += 1
            run = launcher.start(run.argv)
            continue
        assert run.running(), f"the replicator ended before shipping: {run}"
        if writer.poll() is not None:
            time.sleep(0.5)  # a last interval for what the writer committed at the end
            if not shipped_txids(run):
                return run, None
        time.sleep(0.02)
    raise AssertionError(f"no segment shipped within {bound} s of the start: {run}")


def test_kill_replicate(backend: str, repo_url: Callable[[str], str], launcher: Launcher, tally: Tally,
                        tmp_path: Path) -> None:
    cell = tally.cell("replicate", backend)
    rng = rng_for("replicate", backend)
    began = time.monotonic()
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    url = repo_url("repo")
    oracle = Oracle(url, tmp_path, cell)
    log = tmp_path / "writer.log"
    out = tmp_path / "restored.db"
    args: list[str | Path] = ["replicate", src, "--repo", url, "--db", "app", "--interval", "200ms"]
    last_seq = BASE_ROWS
    reported = 0  # the highest txid any replicator reported shipped
    window_start: float | None = None
    for i in range(trials("replicate", backend)):
        writer = start_writer(src, log, WRITE_SECONDS[backend], start_seq=last_seq, pause=0.01, ckpt_every=150)
        try:
            run = launcher.start(args)
            early = rng.random() < 0.25  # during start-up and the base snapshot
            trial = Trial("replicate", backend, i, rng.uniform(0, 0.8 if early else 1.0), " early" if early else "")
            with trial.checking():
                if not early:
                    run, took = wait_first_ship(run, FIRST_SHIP_BOUND, cell, launcher, writer)
                    if took is not None:
                        cell.next_run_max_s = max(cell.next_run_max_s, took)
                        window_start = window_start or time.time()
                        trial.delay += took
                cut = run.kill_after(trial.delay)
                cell.trials += 1
                cell.kills += cut
                cell.finished_first += not cut
                assert cut, f"the replicator ended by itself: {run}"
                reported = max([reported, *shipped_txids(run)])
                # the writer goes on meanwhile: its log is read after each restore
                check_after_kill(oracle, url, log, out, reported, window_start, rng, not full_check(backend, i))
        finally:
            assert writer.wait(timeout=60) == 0
        commits, _ = read_log(log)
        last_seq = commits[-1].seq
    # the end: a replicator that is let run and stopped with SIGTERM ships every commit
    with Trial("replicate", backend, -1, note=" (SIGTERM at the end)").checking():
        writer = start_writer(src, log, WRITE_SECONDS[backend], start_seq=last_seq, pause=0.01, ckpt_every=150)
        run = launcher.start(args)
        try:
            run, _ = wait_first_ship(run, FIRST_SHIP_BOUND, cell, launcher, writer)
        finally:
            assert writer.wait(timeout=60) == 0
            commits, _ = read_log(log)
            deadline = time.monotonic() + FIRST_SHIP_BOUND  # until the last commit is shipped (or in a base)
            while time.monotonic() < deadline and run.running():
                remove_db(out)
                if cli("restore", "--repo", url, "--db", "app", "--to", out).returncode == 0 and \
                        restored_seq(out)[1] == commits[-1].seq:
                    break
                time.sleep(0.3)
            code = run.terminate()
        assert code == 0, run
        remove_db(out)
        r = cli("restore", "--repo", url, "--db", "app", "--to", out)
        assert r.returncode == 0, r
        count, top, n = restored_seq(out)
        assert count == top == n == commits[-1].seq, f"restored {count}, {top}, {n}; last commit {commits[-1].seq}"
        oracle.check()
    cell.seconds += time.monotonic() - began


def check_after_kill(oracle: Oracle, url: str, log: Path, out: Path, reported: int, window_start: float | None,
                     rng: random.Random, only_new: bool) -> None:
    cell = oracle.cell
    if not oracle.ids():  # killed before its first base snapshot
        assert not reported, "segments were reported but the repository has no snapshot"
        return
    # the newest state: one committed state, at or after the last one reported shipped
    remove_db(out)
    r = cli("restore", "--repo", url, "--db", "app", "--to", out)
    assert r.returncode == 0, r
    count, top, n = restored_seq(out)
    assert count == top == n, f"not one consistent state: {count} rows, max seq {top}, counter {n}"
    commits, _ = read_log(log)
    assert top <= commits[-1].seq, f"restored seq {top} past the writer's last commit {commits[-1].seq}"
    if reported:
        remove_db(out)
        r = cli("restore", "--repo", url, "--db", "app", "--txid", str(reported), "--to", out)
        assert r.returncode == 0, r
        _, shipped_top, _ = restored_seq(out)
        if top < shipped_top:
            cell.data_lost += 1
        assert top >= shipped_top, f"newest restores seq {top}, txid {reported} was shipped with {shipped_top}"
    # points of the PITR window: consistent, nothing from after the point, never going back
    if window_start is not None:
        tops = []
        repo = oracle.open()
        assert repo is not None
        for at in sorted(rng.uniform(window_start, time.time()) for _ in range(POINTS)):
            remove_db(out)
            restore_at(repo, "app", utc(at), out)
            commits, _ = read_log(log)
            tops.append(check_oracle(out, commits, at, BASE_ROWS, watched=False))
            cell.points_restored += 1
        assert tops == sorted(tops), f"a later point restored less: {tops}"
    # base snapshots: each restores to one consistent state, and later to the same content
    for snap in oracle.ids() - set(oracle.digests):
        remove_db(out)
        r = cli("restore", "--repo", url, "--db", "app", "--snapshot", snap, "--to", out)
        assert r.returncode == 0, r
        count, top, n = restored_seq(out)
        assert count == top == n, f"base snapshot {snap} is not one consistent state"
        oracle.expect(snap, content_digest(out))
    oracle.check(only_new=only_new)
    remove_db(out)
