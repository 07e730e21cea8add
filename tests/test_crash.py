"""Crash safety: `dbre backup`, `copy` and `forget --prune` killed with SIGKILL at any moment leave
a repository whose every snapshot verifies (`verify --read-data`) and restores; the garbage a
killed run leaves (unreferenced packs, temp files, its lock) goes with the next prune.

Each command runs as a real process and is killed at random delays spread over its normal
duration, and also at chosen moments (a pack just uploaded, the first file deleted) found by
watching the repository directory.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dbre.repository.repo import Repository
from tests.dbfactory import (
    assert_same_db,
    cli,
    dbre_env,
    execute_script,
    integrity,
    make_db,
    pack_files,
    query,
    snapshot_files,
)

KILLS = 6
FINGERPRINT = "SELECT count(*), sum(n), max(id), sum(length(payload)) FROM items"
# Runs the CLI with every store delete slowed down, so a kill can land between two deletes.
SLOW_DELETES = (
    "import time, dbre.storage.local as L\n"
    "delete = L.LocalStore.delete\n"
    "def slow(self, key):\n"
    "    time.sleep(0.03)\n"
    "    delete(self, key)\n"
    "L.LocalStore.delete = slow\n"
    "from dbre.cli import main\n"
    "main()\n"
)


def start(args: list[str | Path], *, code: str | None = None, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "dbre.cli"]
    with open(log, "ab") as err:
        return subprocess.Popen([*argv, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, env=dbre_env())


def wait_for_work(proc: subprocess.Popen[bytes], locks: Path, timeout: float = 60) -> None:
    """Wait until ``proc`` takes a lock in the repository (its work begins) or ends.

    Kill moments are counted from here: interpreter start-up takes longer than the work itself
    on a busy machine, and a kill during start-up tests nothing.
    """
    before = set(locks.iterdir()) if locks.is_dir() else set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if locks.is_dir() and set(locks.iterdir()) - before:
            return
        time.sleep(0.001)


def kill_after(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` seconds; True if it was still running."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def kill_when(proc: subprocess.Popen[bytes], moment: Callable[[], bool], timeout: float = 60) -> bool:
    """SIGKILL ``proc`` as soon as ``moment()`` is true; True if it was still running then."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if moment():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def work_seconds(args: list[str | Path], locks: Path, log: Path, code: str | None = None) -> float:
    """How long a complete run works, from taking its lock to its exit."""
    proc = start(args, code=code, log=log)
    wait_for_work(proc, locks)
    started = time.monotonic()
    assert proc.wait(timeout=120) == 0, log.read_text()
    return time.monotonic() - started


def spread(duration: float, n: int, seed: int) -> list[float]:
    """n random delays covering [0, duration]: one in each of n equal slices, shuffled."""
    rng = random.Random(seed)
    delays = [duration * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(delays)
    return delays


def used_packs(repo: Path) -> set[str]:
    return set().union(set(), *(m.packs for m in Repository.open(str(repo)).snapshots()))


def garbage(repo: Path) -> tuple[int, int]:
    """(unreferenced packs, temp files) in a local repository."""
    present = {p.name for p in pack_files(repo)}
    tmp = repo / ".tmp"
    return len(present - used_packs(repo)), len(list(tmp.iterdir())) if tmp.is_dir() else 0


class Checker:
    """Verifies a repository and restores each snapshot once (snapshots never change)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.restored: set[str] = set()

    def check(self, repo: Path, expect: Path | None = None, *, exact: bool = False,
              newest_only: bool = False) -> list[dict[str, object]]:
        """verify --read-data passes; every snapshot not seen before restores healthy.

        With ``expect``, the newest snapshot restored must hold that database's rows (a cheap
        fingerprint; ``exact`` compares everything with sqldiff). ``newest_only`` restores only
        the newest (for a copy whose packs are byte copies of packs already restored from).
        """
        verified = cli("verify", "--repo", repo, "--read-data", "--json")
        assert verified.returncode == 0, verified
        assert json.loads(verified.stdout)["ok"]
        listed = cli("snapshots", "--repo", repo, "--json")
        assert listed.returncode == 0, listed
        snaps: list[dict[str, object]] = json.loads(listed.stdout)["snapshots"]
        for i, snap in enumerate(snaps):
            key = f"{repo}:{snap['id']}"
            newest = i == len(snaps) - 1
            if (key in self.restored or newest_only) and not (newest and (expect is not None or newest_only)):
                continue
            target = self.tmp / "check.db"
            r = cli("restore", "--repo", repo, "--db", str(snap["db"]), "--snapshot", str(snap["id"]),
                    "--to", target, "--force")
            assert r.returncode == 0, r
            assert integrity(target) == "ok"
            if expect is not None and i == len(snaps) - 1:
                if exact:
                    assert_same_db(expect, target)
                else:
                    assert query(target, FINGERPRINT) == query(expect, FINGERPRINT)
            self.restored.add(key)
            target.unlink()
        return snaps


def prune_all(repo: Path) -> None:
    """Prune without forgetting anything: only garbage goes (at once: --grace 0)."""
    r = cli("forget", "--repo", repo, "--keep-last", "100000", "--prune", "--grace", "0", "--json")
    assert r.returncode == 0, r


def rewrite_rows(src: Path, share: float, seed: int) -> None:
    """Give a contiguous ``share`` of the rows new payloads (that share of the pages changes)."""
    rng = random.Random(seed)
    ((rows,),) = query(src, "SELECT max(id) FROM items")
    assert isinstance(rows, int)
    span = int(rows * share)
    first = rng.randrange(1, rows - span + 2)
    execute_script(src, f"UPDATE items SET payload = randomblob(400), n = n + 1 "
                        f"WHERE id BETWEEN {first} AND {first + span - 1};")


# --------------------------------------------------------------------------- backup


def test_kill_backup(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=20, journal="wal")
    repo = tmp_path / "repo"
    log = tmp_path / "dbre.log"
    assert cli("backup", src, "--repo", repo).returncode == 0
    checker = Checker(tmp_path)
    checker.check(repo, src)
    durations = []
    for seed in (1000, 1001):  # the quicker of two runs: a busy machine only ever adds time
        rewrite_rows(src, 0.25, seed=seed)
        durations.append(work_seconds(["backup", src, "--repo", repo], repo / "locks", log))
    duration = min(durations)

    packs_now = lambda: {p.name for p in pack_files(repo)}  # noqa: E731

    def new_pack_appears() -> Callable[[], bool]:
        before = packs_now()
        return lambda: bool(packs_now() - before)

    def temp_file_appears() -> Callable[[], bool]:
        return lambda: any((repo / ".tmp").iterdir())

    killed = targeted = 0
    outcomes: list[str] = []
    plan: list[tuple[str, float | None]] = [(f"after {d:.2f} s", d) for d in spread(duration, KILLS, seed=7)]
    plan += [("while a pack is written", None), ("once a pack is stored", None)]
    for i, (label, delay) in enumerate(plan):
        rewrite_rows(src, 0.25, seed=i)
        before = len(snapshot_files(repo))
        proc = start(["backup", src, "--repo", repo], log=log)
        if delay is None:
            was_running = kill_when(proc, temp_file_appears() if label.startswith("while") else new_pack_appears())
            targeted += was_running
        else:
            wait_for_work(proc, repo / "locks")
            was_running = kill_after(proc, delay)
        killed += was_running
        after = len(snapshot_files(repo))
        assert after in (before, before + 1), label
        outcomes.append(f"{label}: {'killed' if was_running else 'finished'}, "
                        f"{'new snapshot' if after > before else 'no snapshot'}, garbage {garbage(repo)}")
        # either the old state or the new one: if the snapshot exists, it is the database now
        checker.check(repo, src if after > before else None)
    print(f"\nbackup works {duration:.2f} s; kills:\n  " + "\n  ".join(outcomes))
    assert targeted == 2, outcomes
    assert killed - targeted >= KILLS // 4, f"only {killed - targeted} runs were killed before they finished"

    packs, temps = garbage(repo)
    prune_all(repo)
    assert garbage(repo) == (0, 0), f"prune left garbage (had {packs} packs, {temps} temp files)"
    assert {p.name for p in pack_files(repo)} == used_packs(repo)
    # a killed run leaves its lock; it blocks nothing (its pid is dead) and unlock removes it
    unlocked = cli("unlock", "--repo", repo)
    assert unlocked.returncode == 0 and unlocked.stdout.startswith("removed "), unlocked
    assert not list((repo / "locks").iterdir())
    checker.check(repo)
    # and the repository still takes backups
    rewrite_rows(src, 0.1, seed=99)
    assert cli("backup", src, "--repo", repo).returncode == 0
    checker.check(repo, src, exact=True)


# --------------------------------------------------------------------------- copy


def test_kill_copy(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=10, journal="delete")
    repo = tmp_path / "repo"
    for i in range(3):
        assert cli("backup", src, "--repo", repo).returncode == 0
        rewrite_rows(src, 0.6, seed=i)
    assert cli("backup", src, "--repo", repo).returncode == 0
    log = tmp_path / "dbre.log"
    duration = work_seconds(["copy", "--repo", repo, "--to", tmp_path / "timing"], repo / "locks", log)
    checker = Checker(tmp_path)

    checker.check(repo)  # every snapshot restores from the source repository
    killed = 0
    outcomes: list[str] = []
    plan: list[float | None] = [*spread(duration, 4, seed=3), None]
    for i, delay in enumerate(plan):
        offsite = tmp_path / f"offsite-{i}"
        proc = start(["copy", "--repo", repo, "--to", offsite], log=log)
        if delay is None:  # right after the first pack arrives
            was_running = kill_when(proc, lambda: bool(pack_files(offsite)))  # noqa: B023
        else:
            wait_for_work(proc, repo / "locks")
            was_running = kill_after(proc, delay)
        killed += was_running
        there = len(snapshot_files(offsite))
        if (offsite / "config").exists():
            assert len(checker.check(offsite, newest_only=True)) == there <= 4
        outcomes.append(f"{'killed' if was_running else 'finished'} after {delay or 0:.2f} s: "
                        f"{there} snapshots there, garbage {garbage(offsite) if offsite.exists() else None}")
        # a second copy finishes the job; prune then removes nothing a snapshot needs
        done = cli("copy", "--repo", repo, "--to", offsite, "--json")
        assert done.returncode == 0, done
        assert json.loads(done.stdout)["snapshots_already_there"] == there
        prune_all(offsite)
        assert garbage(offsite) == (0, 0)
        assert len(checker.check(offsite, src, newest_only=True)) == 4
        shutil.rmtree(offsite)
    print(f"\ncopy works {duration:.2f} s; kills:\n  " + "\n  ".join(outcomes))
    assert killed >= 3


# --------------------------------------------------------------------------- forget --prune


@pytest.fixture
def many_snapshots(tmp_path: Path) -> tuple[Path, Path]:
    """A repository of 8 snapshots of a 3 MiB database, each rewriting most of it (8+ packs)."""
    src = make_db(tmp_path / "src.db", mb=3, journal="delete")
    repo = tmp_path / "repo"
    for i in range(8):
        rewrite_rows(src, 0.7, seed=100 + i)
        assert cli("backup", src, "--repo", repo).returncode == 0
    assert len(pack_files(repo)) >= 8
    return src, repo


def test_kill_forget_prune(tmp_path: Path, many_snapshots: tuple[Path, Path]) -> None:
    src, base = many_snapshots
    log = tmp_path / "dbre.log"
    args: list[str | Path] = ["forget", "--keep-last", "3", "--prune", "--grace", "0"]
    durations = []
    checker = Checker(tmp_path)
    for k in range(2):  # the quicker of two runs: a busy machine only ever adds time
        timing = tmp_path / f"timing-{k}"
        shutil.copytree(base, timing)
        durations.append(work_seconds([*args, "--repo", timing], timing / "locks", log, code=SLOW_DELETES))
    duration = min(durations)
    checker.check(timing, src)

    n_snaps, n_packs = len(snapshot_files(base)), len(pack_files(base))
    forgotten = n_snaps - 3
    # random moments, then chosen ones: the first manifest gone, all forgotten manifests gone
    # (between forget and prune), the first pack gone
    plan: list[tuple[str, float | int]] = [(f"after {d:.2f} s", d) for d in spread(duration, 3, seed=5)]
    plan += [(f"after {k} deletions", k) for k in (1, forgotten, forgotten + 1)]
    killed = targeted = 0
    outcomes: list[str] = []
    for i, (label, when) in enumerate(plan):
        repo = tmp_path / f"r{i}"
        shutil.copytree(base, repo)
        proc = start([*args, "--repo", repo], code=SLOW_DELETES, log=log)
        if isinstance(when, float):
            wait_for_work(proc, repo / "locks")
            was_running = kill_after(proc, when)
        else:
            deleted = lambda: n_snaps - len(snapshot_files(repo)) + n_packs - len(pack_files(repo))  # noqa: E731, B023
            was_running = kill_when(proc, lambda: deleted() >= when)  # noqa: B023
            targeted += was_running
        killed += was_running
        left = len(snapshot_files(repo))
        assert 3 <= left <= n_snaps, label
        outcomes.append(f"{label}: {'killed' if was_running else 'finished'}, {left} snapshots, "
                        f"{len(pack_files(repo))} packs left, garbage {garbage(repo)}")
        # whatever is left verifies and restores, the newest equal to the database
        checker.check(repo, src)
        # finishing the job later works, and leaves exactly what the kept snapshots use
        again = cli(*args, "--repo", repo)
        assert again.returncode == 0, again
        assert len(snapshot_files(repo)) == 3
        assert {p.name for p in pack_files(repo)} == used_packs(repo)
        assert garbage(repo) == (0, 0)
        checker.check(repo, src, newest_only=True)
        shutil.rmtree(repo)
    print(f"\nforget --prune works {duration:.2f} s ({n_snaps} snapshots, {n_packs} packs); kills:\n  "
          + "\n  ".join(outcomes))
    assert targeted == 3, outcomes
    assert killed - targeted >= 1, outcomes
