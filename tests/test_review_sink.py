"""Review of compact page maps (PageSink, ParentIndex, SeenPages, the numpy census; 9829eeb..1d83146).

Each finding of the review is a test (all fixed since);
the others pin properties worth keeping. Real SQLite files and real repositories on local disk.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
import xxhash

import dbre.repository.backup as engine
import dbre.repository.sink as sinkmod
from dbre.repository.backup import _parent_records, backup, load_records, read_run
from dbre.repository.manifest import RECORD
from dbre.repository.pack import PackWriter
from dbre.repository.repo import Repository, pack_key
from dbre.repository.retention import KeepPolicy, forget
from dbre.repository.sink import PageSink
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from tests.dbfactory import change_rows, make_db

# -- finding 1: a page the backup API writes twice keeps the first write's record ---------------


# review finding 1 (fixed): a page written twice while its run is open keeps ...
@pytest.mark.parametrize("second", ["parent", "moved"])
def test_page_written_twice_takes_the_last_write(tmp_path: Path, second: str) -> None:
    """PageSink.take says "the backup API may write a page twice". The old sink reset each page to
    the parent's record before looking at it, so the last write won. Now the run's records start
    as the parent's once, and a second write that equals the parent's page at that place (not in
    ``todo``) leaves the first write's record; one that is found elsewhere in the parent gets that
    record's hash but keeps the first write's pending location (a record pointing at the wrong
    bytes: restore and verify refuse the snapshot)."""
    src = make_db(tmp_path / "a.db", mb=0.2, journal="delete")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    parent_m = backup(repo, LocalFileSource(src), "x").manifest
    parent = load_records(repo, parent_m)
    ps, n = parent_m.page_size, parent_m.page_count
    data = src.read_bytes()
    pages = [data[i * ps : (i + 1) * ps] for i in range(n)]
    assert n > 8 and pages[3] != pages[5]
    writer = PackWriter(repo.store, repo.sealer)
    sink = PageSink(repo, writer, parent, ps, n, None, parent_runs=parent_m.runs)
    for i in range(1, n):  # as _SinkVFS hands them over: page 1 last
        if i == 3:
            sink.page(i * ps, os.urandom(ps))  # first write: new content
            sink.page(i * ps, pages[3] if second == "parent" else pages[5])  # written again
        else:
            sink.page(i * ps, pages[i])
    sink.add(0, pages[0])
    runs, _ = sink.finish()
    writer.finish()
    raw = b"".join(read_run(repo, parent_m, r) for r in runs)
    got = raw[3 * RECORD.size : 4 * RECORD.size]
    assert got == (parent[3] if second == "parent" else parent[5])


# -- finding 2: the backup API path holds a whole run of pages --------------------------------


# review finding 2 (fixed): the backup API path buffers every page of a run ...
def test_backup_api_path_memory_does_not_follow_the_run_size(tmp_path: Path) -> None:
    """PageSink.page buffers consecutive pages until a run boundary (or the end): with 64 KiB pages
    a run is 256 MiB, so a database under 256 MiB is held whole. 9829eeb took each page as it came
    (16 MiB traced peak for this 40 MiB database; now ~50 MiB)."""
    src = tmp_path / "big-pages.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=65536")
    con.execute("PRAGMA journal_mode=delete")
    con.execute("CREATE TABLE t(v BLOB)")
    con.executemany("INSERT INTO t VALUES(?)", ((os.urandom(3000),) for _ in range(40 * 1024 * 1024 // 3000)))
    con.commit()
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    tracemalloc.start()
    try:
        result = backup(repo, LocalFileSource(src), "x", checksums=False, direct=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.manifest.stats["read"].startswith("backup API")
    size = src.stat().st_size / 2**20
    assert peak < 24 * 1024 * 1024, f"traced peak {peak / 2**20:.0f} MiB for a {size:.0f} MiB database"


# -- finding 3: a run written beside page batches pins that pack once its pages are dead -------


# review finding 3 (fixed): a page-map run stored in a data pack keeps the ...
def test_a_reused_run_does_not_keep_a_dead_data_pack(tmp_path: Path) -> None:
    """Runs now go into the packs of page batches as they complete. A run of a static stretch,
    once rewritten (here because repacking avoided the pack it was in), lands in the pack of that
    backup's new pages; the next backups reuse it unchanged while those pages die. The pack then
    has no live page, so `_repack` (which only counts packs records point into) never touches
    it, and prune keeps it for the run: a whole data pack per static run. 9829eeb wrote the page
    map after the data (`writer.flush(min_bytes=4 MiB)`), so a run pinned at most a small pack."""
    src = tmp_path / "s.db"
    con = sqlite3.connect(src, isolation_level=None)
    con.execute("PRAGMA page_size=512")
    con.execute("PRAGMA journal_mode=delete")
    con.execute("CREATE TABLE s(id INTEGER PRIMARY KEY, v BLOB)")  # static: runs 0-1 (page 1 changes anyway)
    con.execute("BEGIN")
    con.executemany("INSERT INTO s(v) VALUES(?)", ((os.urandom(400),) for _ in range(8000)))
    while con.execute("PRAGMA page_count").fetchone()[0] < 8192:
        con.execute("INSERT INTO s(v) VALUES(?)", (os.urandom(400),))
    con.execute("COMMIT")
    con.execute("CREATE TABLE h(v BLOB)")  # hot: rewritten before every backup

    def churn() -> None:
        con.execute("BEGIN")
        con.execute("DELETE FROM h")
        con.executemany("INSERT INTO h VALUES(?)", ((os.urandom(400),) for _ in range(16000)))
        con.execute("COMMIT")

    churn()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, LocalFileSource(src), "x", checksums=False)
    con.execute("UPDATE s SET v = ? WHERE id = 7000", (os.urandom(400),))  # the static run changes once
    for _ in range(4):
        churn()
        last = backup(repo, LocalFileSource(src), "x", checksums=False)
    con.close()
    forget(repo, KeepPolicy(last=1), "x", prune=True, grace=0)
    live_packs = {r[16:32].hex() for r in load_records(repo, last.manifest)}
    live = dead = 0
    for f in (tmp_path / "repo" / "packs").rglob("*"):
        if f.is_file():
            if f.name in live_packs:
                live += f.stat().st_size
            else:
                dead += f.stat().st_size
    assert dead <= 0.5 * live, f"{dead / 2**20:.1f} MiB in packs without a live page, {live / 2**20:.1f} MiB live"


# -- finding 4: a snapshot of an empty database stops every later backup --------------------


# review finding 4 (fixed): after a snapshot of a 0-page database every backup ...
def test_backup_after_a_snapshot_of_an_empty_database(tmp_path: Path) -> None:
    """A database file exists but is still empty (sqlite3 creates 0 bytes until the first write);
    the scheduled backup takes a 0-page snapshot. 9829eeb then backed up the first table as usual;
    now `column()` builds a strided view at offset 16 of an empty buffer and every later backup
    of that database raises ValueError ("strides is incompatible ...") until `--full`."""
    src = tmp_path / "new.db"
    sqlite3.connect(src).close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    assert backup(repo, LocalFileSource(src), "x").manifest.page_count == 0
    con = sqlite3.connect(src)
    con.execute("CREATE TABLE t(v)")
    con.commit()
    con.close()
    result = backup(repo, LocalFileSource(src), "x")
    assert result.manifest.page_count == 2
    apply_restore(repo, plan_restore(repo, "x", tmp_path / "out.db", snapshot=result.manifest.id))
    assert (tmp_path / "out.db").read_bytes() == src.read_bytes()


# -- finding 5: one lost data pack now breaks the chain and stores every page again ----------


# review finding 5 (fixed): runs now live in data packs, so losing one data pack ...
def test_one_lost_data_pack_costs_its_pages_not_the_whole_database(tmp_path: Path) -> None:
    """FORMAT.md: records into a lost pack are not reused (those pages are stored again); a parent
    whose page map lies in a lost pack is not reused at all. 9829eeb wrote the page map after the
    data, into a pack of its own, so losing a data pack of a large backup cost that pack's pages
    (`repaired_pages`). Now every data pack holds some runs: losing any one of them makes the next
    backup a full one (`stats.full`, parent null, here 24,406 pages instead of ~11,000)."""
    src = make_db(tmp_path / "s.db", mb=70, row_bytes=3000)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, LocalFileSource(src), "x", checksums=False)
    change_rows(src, 5)
    second = backup(repo, LocalFileSource(src), "x", checksums=False)
    use: dict[str, int] = {}
    for r in load_records(repo, second.manifest):
        use[r[16:32].hex()] = use.get(r[16:32].hex(), 0) + 1
    data_packs = [(n, p) for p, n in use.items() if p in first.manifest.packs]
    # a data pack of the first backup that also holds one of the second's runs, if there is one
    with_runs = [(n, p) for n, p in data_packs if any(r.pack == p for r in second.manifest.runs)]
    n, lost = max(with_runs or data_packs)
    assert n < 0.6 * second.manifest.page_count
    repo.store.delete(pack_key(lost))
    third = backup(repo, LocalFileSource(src), "x", checksums=False)
    assert "full" not in third.manifest.stats, third.manifest.stats.get("full")
    assert third.manifest.parent == second.manifest.id
    assert third.pages_added <= n + 4096  # that pack's pages (and at most one run's worth more)


# -- properties that hold: the page map against a naive model, on random histories -------------


def _mk(path: Path, rng: random.Random) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA page_size=512")
    con.execute("PRAGMA journal_mode=delete")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO t VALUES(?,?)",
                    ((i, rng.randbytes(rng.choice([50, 300, 900]))) for i in range(rng.randrange(2000, 6000))))
    con.execute("COMMIT")
    con.close()


def _mutate(path: Path, rng: random.Random, op: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    (top,) = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()
    if op == "update":
        con.execute("BEGIN")
        for _ in range(rng.randrange(1, 200)):
            con.execute("UPDATE t SET v = randomblob(length(v)) WHERE id = ?", (rng.randrange(top + 1),))
        con.execute("COMMIT")
    elif op == "grow":
        con.execute("BEGIN")
        con.executemany("INSERT INTO t(v) VALUES(?)", ((rng.randbytes(300),) for _ in range(rng.randrange(100, 4000))))
        con.execute("COMMIT")
    elif op == "shrink":
        con.execute("DELETE FROM t WHERE id > ?", (top // 2,))
        con.execute("VACUUM")
    elif op == "move":  # VACUUM moves most pages to other page numbers
        con.execute("DELETE FROM t WHERE id % 7 = 0")
        con.execute("VACUUM")
    elif op == "duplicates":  # zeroed free pages: many equal pages in one snapshot
        con.execute("PRAGMA secure_delete=ON")
        con.execute("DELETE FROM t WHERE id % 3 = 0")
    elif op == "page size":
        (ps,) = con.execute("PRAGMA page_size").fetchone()
        con.execute(f"PRAGMA page_size={1024 if ps == 512 else 512}")
        con.execute("VACUUM")
    con.close()


def _check(repo: Repository, src: Path, result: engine.BackupResult, model: tuple[list[bytes], int] | None,
           out: Path) -> None:
    """The snapshot against the source file and a naive model of dedup."""
    m = result.manifest
    data = src.read_bytes()
    ps, n = m.page_size, m.page_count
    assert len(data) == ps * n
    records = list(load_records(repo, m))
    fast = b"".join(read_run(repo, m, r, 16) for r in m.fast_runs)
    hashes = [repo.page_hash(data[i * ps : (i + 1) * ps]) for i in range(n)]
    for i in range(n):
        assert records[i][:16] == hashes[i], f"page {i + 1}: record of other content"
        assert fast[16 * i : 16 * i + 16] == xxhash.xxh3_128_digest(data[i * ps : (i + 1) * ps])
    packs = {r[16:32].hex() for r in records} | {r.pack for r in m.runs} | {r.pack for r in m.fast_runs}
    packs.discard(bytes(16).hex())
    assert packs <= set(m.packs), "the manifest misses a pack its page map points into"
    if model is not None and model[1] == ps:
        where: dict[bytes, set[bytes]] = {}
        for r in model[0]:
            if r[:16] != bytes(16):  # LOST and REPACK markers are never reused
                where.setdefault(r[:16], set()).add(r[16:])
        for i in range(n):
            if hashes[i] in where:  # unchanged or moved: one of the parent's own locations
                assert records[i][16:] in where[hashes[i]], f"page {i + 1}: not reused from the parent"
        expect = {h for h in hashes if h not in where}
    else:
        expect = set(hashes)
    assert result.pages_added == len(expect)  # each new content stored once (dedup within the snapshot)
    apply_restore(repo, plan_restore(repo, m.db, out, snapshot=m.id))
    assert out.read_bytes() == data
    out.unlink()


@pytest.mark.parametrize("seed", [3, 12])
def test_page_maps_match_a_naive_model_on_random_histories(tmp_path: Path, seed: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Grow, shrink, moved pages, equal pages, page size changes, lost packs and repacking, by
    either read path, with small runs, batches and the early-seal limit so every path of the sink
    runs: each snapshot's records hold the keyed hash of the source's page, its fast runs the
    xxh3, its manifest lists every pack it points into, pages the parent has are reused from the
    parent's locations and each other content is stored once, restore is byte-identical, and
    `verify --read-data` finds nothing."""
    monkeypatch.setattr(sinkmod, "RUN_PAGES", 256)
    monkeypatch.setattr(sinkmod, "BATCH_BYTES", 512 * 7)
    monkeypatch.setattr(sinkmod, "MAX_WAITING_RUNS", 1)
    monkeypatch.setattr(engine, "REPACK_BELOW", 0.95)
    rng = random.Random(seed)
    src = tmp_path / "s.db"
    _mk(src, rng)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    ops = ["update", "grow", "shrink", "move", "duplicates", "page size"]
    for step in range(5):
        parent = repo.newest_snapshot("x")
        if parent is not None and rng.random() < 0.4:
            runs = {r.pack for r in parent.runs} | {r.pack for r in parent.fast_runs}
            spare = [p for p in parent.packs if p not in runs]
            if spare:
                repo.store.delete(pack_key(rng.choice(spare)))
        model = None
        if parent is not None:
            records, _ = _parent_records(repo, parent, False, True)
            model = (list(records), parent.page_size) if records is not None else None
        result = backup(repo, LocalFileSource(src), "x", direct=rng.random() < 0.6)
        _check(repo, src, result, model, tmp_path / f"restored-{step}.db")
        assert f"x/{result.manifest.id}" not in verify(repo, "x", read_data=True).damaged
        _mutate(src, rng, ops[(seed + step) % len(ops)] if step < 3 else rng.choice(ops))
