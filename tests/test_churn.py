"""Repacking through backup: under churn with retention and prune, the repository stays near what the
kept snapshots need, every kept snapshot restores byte-identical, the per-backup budget holds, and a
repacking backup killed with SIGKILL leaves every earlier snapshot whole. Local disk and S3.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from dbre.repository import backup as engine
from dbre.repository.backup import BackupResult, _parent_records, backup
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy, forget
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage.base import Store
from dbre.storage.local import LocalStore
from tests.dbfactory import make_db, pack_files, snapshot_files
from tests.test_crash import kill_after, kill_when, spread, start, wait_for_work, work_seconds

DB = "churn"
ROUNDS = 10
KEEP = 2
LIMIT = 1.6


def churn(src: Path, share: float, seed: int) -> None:
    """New payloads for random rows, so about ``share`` of the table's pages change, scattered."""
    rng = random.Random(seed)
    conn = sqlite3.connect(src, isolation_level=None)
    try:
        (rows,) = conn.execute("SELECT max(id) FROM items").fetchone()
        per_page = 9  # 400-byte payloads in 4 KiB pages
        n = int(rows * (1 - (1 - share) ** (1 / per_page)))
        ids = rng.sample(range(1, rows + 1), n)
        conn.execute("BEGIN")
        conn.executemany("UPDATE items SET payload = ? WHERE id = ?", [(rng.randbytes(400), i) for i in ids])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def stored_bytes(store: Store) -> int:
    return sum(len(store.get(k)) for prefix in ("packs/", "snapshots/") for k in store.list(prefix))


def restored(repo: Repository, snapshot_id: str, to: Path) -> bytes:
    to.unlink(missing_ok=True)
    apply_restore(repo, plan_restore(repo, DB, to, snapshot=snapshot_id))
    data = to.read_bytes()
    to.unlink()
    return data


def dense_bytes(repo: Repository, tmp: Path) -> int:
    """What the kept snapshots need: each restored, then backed up into a new repository, oldest first."""
    fresh_store = LocalStore(tmp / "dense")
    fresh = Repository.open_or_init(fresh_store)
    for m in sorted(repo.snapshots(), key=lambda m: m.time):
        out = tmp / "replay.db"
        out.write_bytes(restored(repo, m.id, tmp / "r.db"))
        backup(fresh, LocalFileSource(out), DB)
        out.unlink()
    size = stored_bytes(fresh_store)
    shutil.rmtree(tmp / "dense")
    return size


def rounds(store: Store, tmp: Path, *, repack: bool, n: int = ROUNDS) -> tuple[Repository, dict[str, bytes],
                                                                                 list[BackupResult]]:
    """A 2 MiB database backed up once, then ``n`` rounds of 15% churn, backup, forget keep-last
    2 with prune (grace 0). Returns the repository, the file each snapshot was taken from (by id),
    and the backups."""
    tmp.mkdir()
    src = make_db(tmp / "src.db", mb=2.0, seed=5)
    repo = Repository.open_or_init(store)
    files: dict[str, bytes] = {}
    results = []
    for r in range(n + 1):
        if r:
            churn(src, 0.15, seed=r)
        result = backup(repo, LocalFileSource(src), DB, repack=repack)
        files[result.manifest.id] = src.read_bytes()
        results.append(result)
        forget(repo, KeepPolicy(last=KEEP), DB, prune=True, grace=0)
    return repo, files, results


def test_repack_keeps_the_repository_near_what_retention_keeps(store: Store, tmp_path: Path) -> None:
    repo, files, results = rounds(store, tmp_path / "on", repack=True)
    size = stored_bytes(store)
    dense = dense_bytes(repo, tmp_path)
    assert sum(r.manifest.stats.get("repacked_pages", 0) for r in results) > 0
    for r in results:  # a repacking backup says why it added unchanged pages
        n = r.manifest.stats.get("repacked_pages", 0)
        assert (f"{n} of the added pages are unchanged pages of" in (r.summary()["note"] or "")) == (n > 0), r.summary()
    assert size <= LIMIT * dense, f"{size} bytes stored, {dense} needed: {size / dense:.2f}x"
    kept = repo.snapshots()
    assert len(kept) == KEEP
    for m in kept:  # byte-identical to the file each was taken from
        assert restored(repo, m.id, tmp_path / "check.db") == files[m.id]
    report = verify(repo, read_data=True)
    assert report.ok and not report.problems

    # the same rounds without repacking: the test can fail
    off_store = LocalStore(tmp_path / "off-repo")
    off, _, _ = rounds(off_store, tmp_path / "off", repack=False)
    off_size, off_dense = stored_bytes(off_store), dense_bytes(off, tmp_path)
    assert off_size > LIMIT * off_dense, f"without repack: {off_size / off_dense:.2f}x"


def changed_pages(before: bytes, after: bytes, page_size: int = 4096) -> int:
    """Pages that differ between two files (pages only one of them has count as changed)."""
    n = max(len(before), len(after)) // page_size
    return sum(before[i * page_size : (i + 1) * page_size] != after[i * page_size : (i + 1) * page_size]
               for i in range(n))


def test_repack_budget_holds(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of 5% of the pages, no backup stores more than the changed pages plus 5% of
    the pages, and the budget is reached (it binds), so repacking takes several backups."""
    monkeypatch.setattr(engine, "REPACK_BUDGET", 0.05)
    repo, files, results = rounds(store, tmp_path / "w", repack=True)
    contents = list(files.values())  # in backup order
    binding = 0
    for prev, cur, before, after in zip(results, results[1:], contents, contents[1:], strict=False):
        budget = int(0.05 * prev.manifest.page_count)
        repacked = cur.manifest.stats.get("repacked_pages", 0)
        assert repacked <= budget
        assert cur.pages_added <= changed_pages(before, after) + budget
        binding += repacked == budget
    assert binding >= 2, [r.manifest.stats.get("repacked_pages", 0) for r in results]
    for m in repo.snapshots():
        assert restored(repo, m.id, tmp_path / "check.db") == files[m.id]
    assert verify(repo, read_data=True).ok


def test_kill_repacking_backup(tmp_path: Path) -> None:
    """A backup that repacks, killed with SIGKILL at random moments and while/after a pack is
    written: the earlier snapshot still restores byte-identical, verify --read-data is clean, and
    the next backup succeeds (and restores to the source)."""
    src = make_db(tmp_path / "src.db", mb=8.0, seed=3)
    base = tmp_path / "base"
    repo = Repository.open_or_init(str(base))
    earlier = {}
    for seed, share in ((1, 0.6), (2, 0.1)):
        m = backup(repo, LocalFileSource(src), DB).manifest
        earlier[m.id] = src.read_bytes()
        churn(src, share, seed=seed)
    # the second snapshot uses ~40% of the first one's pack: the next backup repacks it
    _, chain = _parent_records(repo, m, False)
    assert chain.repacked, "the next backup must repack"
    log = tmp_path / "dbre.log"
    args = ["backup", src, "--db", DB, "--repo"]
    durations = []
    for k in range(2):  # the quicker of two complete runs: a busy machine only ever adds time
        timing = shutil.copytree(base, tmp_path / f"timing-{k}")
        durations.append(work_seconds([*args, timing], timing / "locks", log))
        done = Repository.open(str(timing)).newest_snapshot(DB)
        assert done is not None and done.stats.get("repacked_pages", 0) > 0  # the run that is killed below
    duration = min(durations)
    plan: list[tuple[str, float | None]] = [(f"after {d:.2f} s", d) for d in spread(duration, 4, seed=11)]
    plan += [("while a pack is written", None), ("once a pack is stored", None)]
    killed = targeted = 0
    for i, (label, delay) in enumerate(plan):
        root = tmp_path / f"r{i}"
        shutil.copytree(base, root)
        packs_before = {p.name for p in pack_files(root)}
        proc = start([*args, root], log=log)
        if delay is None:
            if label.startswith("while"):
                moment = lambda: (root / ".tmp").is_dir() and any((root / ".tmp").iterdir())  # noqa: E731, B023
            else:
                moment = lambda: bool({p.name for p in pack_files(root)} - packs_before)  # noqa: E731, B023
            was_running = kill_when(proc, moment)
            targeted += was_running
        else:
            wait_for_work(proc, root / "locks")
            was_running = kill_after(proc, delay)
        killed += was_running
        snaps = len(snapshot_files(root))
        assert snaps in (2, 3), label
        r = Repository.open(str(root))
        for snapshot_id, data in earlier.items():
            assert restored(r, snapshot_id, tmp_path / "check.db") == data, label
        report = verify(r, read_data=True)
        assert report.ok, (label, report.problems)
        if snaps == 3:  # it finished: a repacking backup, whole
            newest = r.newest_snapshot(DB)
            assert newest is not None and newest.id not in earlier
            assert newest.stats.get("repacked_pages", 0) > 0, label
            assert restored(r, newest.id, tmp_path / "check.db") == src.read_bytes(), label
        # the next backup succeeds, and prune then keeps exactly what it needs
        after = backup(r, LocalFileSource(src), DB)
        if snaps == 2:
            assert after.manifest.stats.get("repacked_pages", 0) > 0, label
        forget(r, KeepPolicy(last=1), DB, prune=True, grace=0)
        assert restored(r, after.manifest.id, tmp_path / "check.db") == src.read_bytes(), label
        assert verify(r, read_data=True).ok, label
        assert {p.name for p in pack_files(root)} == set(after.manifest.packs), label
        shutil.rmtree(root)
    assert targeted == 2, plan
    assert killed - targeted >= 1, f"only {killed - targeted} random kills landed before the backup finished"


def _packs_of(repo: Repository, manifest: object) -> set[bytes]:
    from dbre.repository.backup import load_records

    return {r[16:32] for r in load_records(repo, manifest)} - {bytes(16)}  # type: ignore[arg-type]


@pytest.mark.parametrize("repack", [True, False])
def test_pack_spread_stays_bounded_over_a_long_history(store: Store, tmp_path: Path, repack: bool) -> None:
    """Many small incrementals each leave a small, fully live pack: with repacking, the packs one
    snapshot's pages lie in stay bounded (the smallest are merged), so a restore and the next
    backup's parent check read a bounded number of pack tails; without, they grow with history."""
    repo = Repository.open_or_init(store)
    src = make_db(tmp_path / "src.db", mb=2)
    rounds = engine.SMALL_PACKS_MAX + 14
    made = backup(repo, LocalFileSource(src), DB, repack=repack)
    for i in range(rounds):
        churn(src, 0.01, seed=100 + i)
        made = backup(repo, LocalFileSource(src), DB, repack=repack)
        assert made.manifest.stats.get("repacked_pages", 0) <= engine.REPACK_BUDGET * made.manifest.page_count + 1
    packs = _packs_of(repo, made.manifest)
    if repack:
        assert len(packs) <= engine.SMALL_PACKS_MAX + 2, len(packs)
        assert restored(repo, made.manifest.id, tmp_path / "out.db") == src.read_bytes()
        assert verify(repo, read_data=True).ok
    else:
        assert len(packs) > engine.SMALL_PACKS_MAX + 2, len(packs)  # the test can fail
