"""Lost continuity starts a new generation by itself, and restores stay exact on both sides of it:
the WAL restarted while no replicator ran, VACUUM while one runs, the database file replaced."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

from dbre.replicate.segment import list_generations, read_base
from dbre.repository.repo import Repository
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

BASE_ROWS = 2000  # ~150 pages: a VACUUM rewrites far more than the replicator's threshold (64)


def _restores(repo: Repository, tmp_path: Path, log: Path, unwatched: list[tuple[float, float]], n: int = 12,
              seed: int = 3) -> None:
    commits, _ = read_log(log)
    rng = random.Random(seed)
    lo, hi = commits[0].before, commits[-1].after + 0.5
    times = sorted(rng.uniform(lo, hi) for _ in range(n)) + [hi]
    for i, at in enumerate(times):
        out = tmp_path / f"r{i}.db"
        restore_at(repo, "app", utc(at), out)
        watched = not any(a <= at <= b for a, b in unwatched)
        top = check_oracle(out, commits, at, BASE_ROWS, watched=watched)
        if at == hi:
            assert top == commits[-1].seq
        out.unlink()


def test_wal_restarted_while_stopped_starts_a_generation(tmp_path: Path) -> None:
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url)
    wait_for_generation(repo_url, proc=rep)
    assert start_writer(src, log, 1.5, start_seq=BASE_ROWS).wait(timeout=60) == 0
    time.sleep(1.2)
    code, err = stop_replicator(rep)
    assert code == 0, err
    stopped = time.time()
    # while nobody watches: commits, and TRUNCATE checkpoints that restart the WAL
    commits, _ = read_log(log)
    assert start_writer(src, log, 1.5, start_seq=commits[-1].seq, ckpt_every=60).wait(timeout=60) == 0
    rep = start_replicator(src, repo_url)
    try:
        wait_for_generation(repo_url, proc=rep)
        time.sleep(0.5)
        while len(check_chains(Repository.open(repo_url))) < 2:
            time.sleep(0.2)
        resumed = time.time()
        commits, _ = read_log(log)
        assert start_writer(src, log, 1.5, start_seq=commits[-1].seq).wait(timeout=60) == 0
        time.sleep(1.2)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert "a new generation starts" in err and "restarted" in err, err
    repo = Repository.open(repo_url)
    assert len(check_chains(repo)) == 2
    _restores(repo, tmp_path, log, [(stopped - 0.3, resumed)])


def test_vacuum_starts_a_generation(tmp_path: Path) -> None:
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url)
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 1.5, start_seq=BASE_ROWS).wait(timeout=60) == 0
        c = sqlite3.connect(src, isolation_level=None)
        c.execute("VACUUM")
        c.close()
        commits, _ = read_log(log)
        assert start_writer(src, log, 1.5, start_seq=commits[-1].seq).wait(timeout=60) == 0
        # the VACUUM's base: at once, or, when the writer kept the write lock busy through its
        # snapshot (a loaded machine, seen in CI), put off and retried within 5 s once idle
        deadline = time.monotonic() + 30
        while len(list_generations(Repository.open(repo_url), "app")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.2)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    repo = Repository.open(repo_url)
    chains = check_chains(repo)
    assert len(chains) == 2, (chains, err)
    _restores(repo, tmp_path, log, [])


def test_replaced_file_starts_a_generation(tmp_path: Path) -> None:
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url)
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 1.5, start_seq=BASE_ROWS).wait(timeout=60) == 0
        time.sleep(1.2)
        # the application swaps in a copy (as a restore over it would): same rows, another file
        copy = tmp_path / "copy.db"
        a, b = sqlite3.connect(src), sqlite3.connect(copy)
        a.backup(b)
        a.close()
        b.execute("PRAGMA journal_mode=WAL")
        b.close()
        replaced = time.time()
        os.replace(copy, src)
        for suffix in ("-wal", "-shm"):  # the old file's (the replicator still has them open)
            Path(str(src) + suffix).unlink(missing_ok=True)
        commits, _ = read_log(log)
        while len(check_chains(Repository.open(repo_url))) < 2:
            time.sleep(0.2)
        assert start_writer(src, log, 1.5, start_seq=commits[-1].seq).wait(timeout=60) == 0
        time.sleep(1.2)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert "replaced" in err, err
    repo = Repository.open(repo_url)
    assert len(check_chains(repo)) == 2
    _restores(repo, tmp_path, log, [(replaced - 0.3, replaced + 0.3)])


def test_long_generation_gets_a_fresh_base(tmp_path: Path) -> None:
    """After GENERATION_SEGMENTS segments a new base snapshot starts a generation that continues the
    old one exactly (so a restore reads a bounded number of segments); restores stay exact."""
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "4"})
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 3.0, start_seq=BASE_ROWS, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    repo = Repository.open(repo_url)
    chains = check_chains(repo)
    assert len(chains) >= 3, chains
    gens = list_generations(repo, "app")
    assert all(len(names) <= 5 for names in gens.values())  # (+1: the catch-up to the new base)
    # each generation starts exactly where the previous one ended
    ends = list(chains.values())
    for gen_id, prev_end in zip(list(gens)[1:], ends, strict=False):
        assert read_base(repo, "app", gen_id).base_txid == prev_end
    _restores(repo, tmp_path, log, [])
