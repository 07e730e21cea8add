"""Restore's memory and requests do not follow the database's pages or the snapshot's packs (issue 9,
"Flat cost as history, size and churn grow"): page maps in compact arrays, no Python object per
page; one request per small pack, its index and the blobs used in it together."""

from __future__ import annotations

import os
import sqlite3
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from dbre.repository import pack, verify
from dbre.repository.backup import backup
from dbre.repository.pack import PACK_SLOTS, PackWriter, read_index_tail
from dbre.repository.repo import Repository
from dbre.restore import full
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage.base import Store
from tests.stores import PassThroughStore


def _db(path: Path, rows: int) -> Path:
    """512-byte pages (many pages for few bytes) of compressible rows: the page batches read back
    are small, so what grows with the database is the page map, not the data in flight."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=512")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, f"{i:09d}" + "a" * 191) for i in range(rows)))
    con.commit()
    con.close()
    return path


def _restore_peak(repo: Repository, db: str, out: Path) -> int:
    tracemalloc.start()
    try:
        apply_restore(repo, plan_restore(repo, db, out))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_restore_memory_per_page_is_a_few_dozen_bytes(store: Store, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-traced peak memory of plan + apply grows by under 100 bytes per page between a
    database and one 4x larger (each page's keyed hash, 16 bytes, its xxh3, 16, its number and slot,
    6, and the growth of those buffers). Per-page tuples of (page, slot, hash) and index hashes as
    lists of `bytes` cost ~320. What is bounded whatever the size is set to its least, so that it
    does not blur the figure while the smaller database has not filled it: one pack index and
    one span in flight, small packs, no blobs kept with their index."""
    monkeypatch.setattr(full, "FETCHERS", 1, raising=False)
    monkeypatch.setattr(verify, "READERS", 1)
    monkeypatch.setattr(verify, "KEEP_BYTES", 0, raising=False)
    monkeypatch.setattr(pack, "PACK_SLOTS", 4096, raising=False)
    repo = Repository.open_or_init(store)
    peaks = []
    for rows in (60000, 240000):
        src = _db(tmp_path / f"src{rows}.db", rows)
        m = backup(repo, LocalFileSource(src), f"db{rows}", checksums=False).manifest
        out = tmp_path / f"out{rows}.db"
        peaks.append((_restore_peak(repo, f"db{rows}", out), m.page_count))
        assert out.read_bytes() == src.read_bytes()
    (small, n_small), (big, n_big) = peaks
    assert n_big > 3 * n_small > 20000
    per_page = (big - small) / (n_big - n_small)
    assert per_page < 100, f"{per_page:.0f} bytes per page"


class PackReads(PassThroughStore):
    """Counts the reads of each pack."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.reads: Counter[str] = Counter()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key.startswith("packs/"):
            self.reads[key] += 1
        return self.inner.get_range(key, offset, length)

    def get(self, key: str) -> bytes:
        if key.startswith("packs/"):
            self.reads[key] += 1
        return self.inner.get(key)


def test_restore_reads_each_small_pack_once(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot whose pages lie in many small packs (small incrementals) is restored with one
    read per pack, its index and the blobs it uses together; the snapshot's own pack is read
    also for its page-map and fast runs. Reading the tail, then the blobs, took two per pack."""
    from dbre.repository import backup as engine

    monkeypatch.setattr(engine, "SMALL_PACKS_MAX", 16)  # (the backup would merge them at 4)
    src = tmp_path / "src.db"
    con = sqlite3.connect(src)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES (?, randomblob(3000))", ((i,) for i in range(60)))
    con.commit()
    repo = Repository.open_or_init(store)
    for i in range(6):
        if i:
            con.execute("UPDATE t SET v = randomblob(3000) WHERE id = ?", (i * 7,))
            con.commit()
        m = backup(repo, LocalFileSource(src), "app", checksums=False).manifest
    con.close()
    assert len(m.packs) >= 5
    counting = PackReads(store)
    again = Repository.open(counting)  # type: ignore[arg-type]
    out = tmp_path / "out.db"
    apply_restore(again, plan_restore(again, "app", out))
    assert out.read_bytes() == src.read_bytes()
    own = {r.pack for r in m.runs} | {r.pack for r in m.fast_runs}
    assert set(counting.reads) == {f"packs/{p[:2]}/{p}" for p in m.packs}
    for key, n in counting.reads.items():
        assert n <= (3 if key.rsplit("/", 1)[1] in own else 1), (key, n)


def test_a_pack_index_is_read_in_one_request_however_well_its_pages_compress(store: Store) -> None:
    """A pack is closed at PACK_SLOTS page slots, not only at 32 MiB of sealed bytes: page batches
    that compress to almost nothing (512-byte pages of near-identical rows, zeroed pages that differ
    in a few bytes) would otherwise fill one pack with ~570,000 slots, whose 9 MiB index every reader
    refuses as planted (over MAX_INDEX) and which takes many tail reads below that."""
    repo = Repository.open_or_init(store)
    writer = PackWriter(repo.store, repo.sealer)
    tiny = repo.sealer.seal(bytes(512 * 4096), "page-batch")  # 4096 pages of 512 bytes, sealed in a few hundred
    for _ in range(140):
        writer.add(b"d", tiny, [os.urandom(16) for _ in range(4096)])
    packs = writer.finish()
    assert len(packs) >= 140 * 4096 // PACK_SLOTS
    counting = PackReads(store)
    for pack_id in packs:
        blobs = read_index_tail(counting, repo.sealer, pack_id)  # type: ignore[arg-type]
        assert 0 < sum(len(b.hashes) for b in blobs) <= PACK_SLOTS
    assert sum(counting.reads.values()) == len(packs)
