"""Concurrency (issue 11): on one repository, local and S3, at once and at random offsets: two backups of
the same database, a backup of another, `forget --prune --grace 0`, `copy` to an offsite repository,
while `replicate` ships a third database that a writer commits to, and a second prune runs through
the replicated segments. Runs take `--retry-lock 2m` (as a scheduler would), so each one either waits
for a conflicting lock or takes it: every run exits 0.

After every round: `verify --read-data` is clean on both repositories; every snapshot listed restores
to a state its database really had (the content recorded when the round's backups ran); the newest
snapshot of each backed-up database is that round's state; the copy holds only whole snapshots;
and at the end every commit the writer made restores, at its own time and as the newest state.
"""

# test-group: heavy

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dbre.repository.repo import Repository
from tests.dbfactory import dbre_env, make_db
from tests.replication import make_source, read_log, restore_at, restored_seq, start_writer, utc, wait_for_generation
from tests.test_crash import rewrite_rows
from tests.torture.harness import content_digest, list_snapshots, restore_digest, verify_clean

ROUNDS = 3
RETRY = "2m"


def _start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dbre.cli", "--retry-lock", RETRY, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dbre_env())


def test_concurrent_runs_on_one_repository(backend: str, repo_url: Callable[[str], str], tmp_path: Path) -> None:
    rng = random.Random(f"concurrency:{backend}")
    url, offsite = repo_url("repo"), repo_url("offsite")
    a, b = make_db(tmp_path / "a.db", mb=1.5, seed=1), make_db(tmp_path / "b.db", mb=1.0, seed=2)
    c, log = tmp_path / "c.db", tmp_path / "writer.log"
    make_source(c, 200)
    states: dict[str, set[str]] = {"a": set(), "b": set()}  # every content each database had at a backup
    rep = subprocess.Popen([sys.executable, "-m", "dbre.cli", "replicate", str(c), "--repo", url, "--db", "c",
                            "--interval", "200ms", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=dbre_env())
    try:  # the replicator creates the repository: forget and copy need it from the first round
        wait_for_generation(url, "c", timeout=120, proc=rep)
    except BaseException:
        rep.kill()
        rep.wait()
        raise
    writer = start_writer(c, log, 5.0 * ROUNDS + 5, start_seq=200, pause=0.02)
    try:
        for round_ in range(ROUNDS):
            rewrite_rows(a, rng.uniform(0.1, 0.5), seed=rng.randrange(1 << 30))
            rewrite_rows(b, rng.uniform(0.1, 0.5), seed=rng.randrange(1 << 30))
            states["a"].add(content_digest(a))
            states["b"].add(content_digest(b))
            runs = {
                "backup a (1)": ["backup", a, "--repo", url, "--db", "a"],
                "backup a (2)": ["backup", a, "--repo", url, "--db", "a"],
                "backup b": ["backup", b, "--repo", url, "--db", "b"],
                "forget --prune": ["forget", "--repo", url, "--keep-last", "2", "--prune", "--grace", "0"],
                "copy": ["copy", "--repo", url, "--to", offsite],
            }
            started: dict[str, subprocess.Popen[str]] = {}
            for name in rng.sample(list(runs), len(runs)):
                time.sleep(rng.uniform(0, 0.4))
                started[name] = _start(*runs[name])
            for name, proc in started.items():
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, f"{backend} round {round_}: {name} exited {proc.returncode}: {err}"
            assert rep.poll() is None, f"{backend}: the replicator stopped: {rep.stderr.read() if rep.stderr else ''}"
            for repo in (url, offsite):
                verify_clean(repo)
            r = Repository.open(url)
            for db, path in (("a", a), ("b", b)):
                snaps = [s for s in list_snapshots(url, db=db) if "safety" not in (s.get("tags") or [])]
                assert snaps[-1]["id"] and restore_digest(r, db, snaps[-1]["id"], tmp_path / "n.db") == \
                    content_digest(path), f"{backend} round {round_}: the newest snapshot of {db} is not its state"
                for snap in snaps:
                    got = restore_digest(r, db, snap["id"], tmp_path / "s.db")
                    assert got in states[db], f"{backend} round {round_}: snapshot {snap['id']} of {db} " \
                                              "restores to a state the database never had"
            o = Repository.open(offsite)
            for snap in list_snapshots(offsite):  # a copy that ran before a round's backups has none of them
                db = snap["db"]
                if db in states:
                    assert restore_digest(o, db, snap["id"], tmp_path / "o.db") in states[db], \
                        f"{backend} round {round_}: the copy of {snap['id']} is not whole"
        assert writer.wait(timeout=120) == 0
        time.sleep(1.0)
    finally:
        for p in (writer, rep):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        writer.wait(timeout=30)
        try:
            _, err = rep.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # (never leave it running; its stderr says where it was)
            rep.kill()
            _, err = rep.communicate()
            raise AssertionError(f"{backend}: replicate did not exit within 60 s of SIGTERM: {err}") from None
    assert rep.returncode == 0, f"{backend}: replicate exited {rep.returncode}: {err}"
    commits, _ = read_log(log)
    r = Repository.open(url)
    newest = tmp_path / "c-newest.db"
    restore_at(r, "c", utc(time.time() + 1), newest)
    assert restored_seq(newest)[1] == commits[-1].seq, f"{backend}: commits lost beside backups and prunes"
    for commit in rng.sample(commits[len(commits) // 2:], 3):  # prune keeps the window of the newest generation
        out = tmp_path / f"c-{commit.seq}.db"
        restore_at(r, "c", utc(commit.after + 0.3), out)
        assert restored_seq(out)[1] >= commit.seq, f"{backend}: commit {commit.seq} does not restore at its time"
