"""Review of the numpy page sink (64d74fb: PageSink.take/_keyed/feed/_store, SeenPages, PageImage.views).

Each test pins a property the rewrite must keep: every record of a new snapshot holds the keyed
hash of its page and a location (pack, blob, slot) whose bytes are that page, whatever the path
(direct image with WAL-only tail pages, backup API with pages written again, repacked "cold"
pages in negative-numbered batches, duplicates within and across runs, the last short run), and
a restore is byte-identical. Real SQLite files and real repositories (local, and S3 once).
No bug of the rewrite was reproduced; each test here fails under a one-line mutation of the code it
covers (slot masked to 8 bits, SeenPages not confirming the second 8 bytes or sorting levels by
them, pending index without the run offset, written-again pages left pending, file bytes used over
the WAL overlay in ``views``).
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest
import xxhash

import dbre.repository.backup as engine
import dbre.repository.sink as sinkmod
from dbre.repository.backup import backup, load_records, read_run
from dbre.repository.entries import Entries
from dbre.repository.hashindex import SeenPages
from dbre.repository.manifest import RECORD
from dbre.repository.pack import PackWriter
from dbre.repository.repo import Repository, pack_key
from dbre.repository.sink import LOST, REPACK, PageSink
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.image import PageImage
from dbre.sources.local import LocalFileSource

SIZE = RECORD.size


# -- SeenPages against a dict: hashes sharing their first 8 bytes, levels merging, FLUSH ------------


@pytest.mark.parametrize("seed", range(4))
def test_seen_pages_answers_like_a_dict(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many hashes share their first 8 bytes (a handful of prefixes, so the confirming loop over
    equal uint64 keys runs, across several levels and the recent dict); FLUSH is small so levels
    merge again and again. Every lookup, hit or miss, answers exactly as a plain dict would,
    including hashes that equal a stored one in the first or the last 8 bytes only."""
    monkeypatch.setattr(SeenPages, "FLUSH", 7)
    rng = random.Random(seed)
    prefixes = [rng.randbytes(8) for _ in range(3)] + [bytes(8), b"\xff" * 8]
    suffixes = [rng.randbytes(8) for _ in range(40)] + [bytes(8), b"\xff" * 8]
    seen = SeenPages()
    model: dict[bytes, int] = {}
    value = -70000  # negative values too (cold batches)
    for _ in range(300):
        batch = [rng.choice(prefixes) + rng.choice(suffixes) if rng.random() < 0.8 else rng.randbytes(16)
                 for _ in range(rng.randrange(1, 12))]
        found = seen.find(batch)
        assert found == [model.get(h) for h in batch]
        for h in batch:  # as PageSink.take fills it: straight into recent, counted once
            if model.get(h) is None and seen.recent.get(h) is None:
                model[h] = seen.recent[h] = value
                seen.count += 1
                value += rng.randrange(1, 70000)
        seen.settle()
        assert len(seen) == len(model)
    assert len(seen.levels) >= 2
    probe = list(model) + [h[:8] + rng.randbytes(8) for h in model] + [rng.randbytes(8) + h[8:] for h in model]
    assert seen.find(probe) == [model.get(h) for h in probe]


# -- the sink itself, driven directly: every record's location holds its page ------------------------


def _mk(path: Path, rng: random.Random, pages: int, journal: str = "delete") -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA page_size=512")
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO t VALUES(?,?)", ((i, rng.randbytes(rng.choice([60, 200, 450])))
                                                  for i in range(pages * 2)))
    con.execute("COMMIT")
    con.close()


def _read_page(repo: Repository, rec: bytes, ps: int) -> bytes:
    """The bytes a record points at, read from its pack as restore would (all zero: a zero page)."""
    if rec[16:] == bytes(30):
        return bytes(ps)
    pack = rec[16:32].hex()
    off, length = int.from_bytes(rec[32:40], "little"), int.from_bytes(rec[40:44], "little")
    slot = int.from_bytes(rec[44:46], "little")
    raw = repo.sealer.unseal(repo.store.get_range(pack_key(pack), off, length), "page-batch")
    assert len(raw) % ps == 0 and slot < len(raw) // ps, f"slot {slot} past the blob's {len(raw) // ps} pages"
    return raw[slot * ps : (slot + 1) * ps]


@pytest.mark.parametrize("seed", range(6))
def test_sink_records_point_at_their_pages(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent snapshot of a real database, some of its records turned into REPACK (cold path,
    batches -1, -2, ...) or LOST markers; then a new image of random length (not a multiple of the
    run) made of unchanged pages, moved parent pages, duplicated new pages (within one run and
    across runs) and zero pages, fed either as a direct image whose tail pages (and some others)
    are only in the WAL overlay, or through the backup API path with some pages written twice
    (the "again" path, pending_at/pending_where). Small runs, batches, FLUSH and early sealing so
    every branch runs many times; page hashes squeezed to a few 8-byte prefixes, so SeenPages
    confirms on the second half constantly. Each final record: hash of the last write, location
    whose slot holds exactly those bytes; the fast runs are the xxh3 of each page; each new
    content is stored once (direct path)."""
    rng = random.Random(seed)
    monkeypatch.setattr(sinkmod, "RUN_PAGES", rng.choice([64, 100]))
    monkeypatch.setattr(sinkmod, "BATCH_BYTES", 512 * rng.choice([3, 5, 17]))
    monkeypatch.setattr(sinkmod, "MAX_WAITING_RUNS", rng.choice([0, 1, 3]))
    monkeypatch.setattr(SeenPages, "FLUSH", rng.choice([4, 16]))
    src = tmp_path / "p.db"
    _mk(src, rng, 900)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    pm = backup(repo, LocalFileSource(src), "x", checksums=False).manifest
    ps, n0 = pm.page_size, pm.page_count
    data = src.read_bytes()
    parent_pages = [data[i * ps : (i + 1) * ps] for i in range(n0)]
    recs = bytearray(load_records(repo, pm).buf)
    fast = Entries(b"".join(read_run(repo, pm, r, 16) for r in pm.fast_runs), 16)
    marked = rng.sample(range(n0), n0 // 4)
    for i in marked:
        recs[i * SIZE : (i + 1) * SIZE] = REPACK if rng.random() < 0.8 else LOST
    parent = Entries(recs, SIZE)

    n = rng.randrange(n0 // 2, n0 * 3 // 2)
    pool = [os.urandom(ps) for _ in range(40)]
    pages: list[bytes] = []
    for i in range(n):
        r = rng.random()
        if i < n0 and r < 0.45:
            pages.append(parent_pages[i])  # unchanged (or a marker's page, stored again)
        elif r < 0.65:
            pages.append(parent_pages[rng.randrange(n0)])  # moved from elsewhere in the parent
        elif r < 0.85:
            pages.append(rng.choice(pool))  # new, repeated within and across runs
        elif r < 0.9:
            pages.append(bytes(ps))
        else:
            pages.append(os.urandom(ps))
    writer = PackWriter(repo.store, repo.sealer)
    sink = PageSink(repo, writer, parent, ps, n, None, fast, parent_runs=pm.runs, parent_fast_runs=pm.fast_runs)
    real = repo.page_hash
    squeeze = seed % 3 == 0
    if squeeze:  # few distinct 8-byte prefixes among the new pages (the parent's keep their real hashes)
        sink.page_hash = lambda b: (lambda h: h[:1] + bytes(7) + h[8:])(real(b))
    direct = seed % 2 == 0
    if direct:
        file_pages = rng.randrange(n // 3, n)  # the rest only in the WAL
        in_wal = sorted(set(range(file_pages, n)) | set(rng.sample(range(file_pages), file_pages // 5)))
        db = bytearray(b"".join(pages[:file_pages]))
        for i in in_wal[: len(in_wal) // 2]:
            if i < file_pages:  # the file's copy is stale: the WAL's wins
                db[i * ps : (i + 1) * ps] = os.urandom(ps)
        wal = bytearray(os.urandom(24))
        overlay = {}
        for i in in_wal:
            overlay[i] = len(wal)
            wal += pages[i] + os.urandom(24)
        wal_file = tmp_path / f"wal-{seed}"  # the image reads overlaid pages from the WAL's descriptor
        wal_file.write_bytes(bytes(wal))
        wal_fd = os.open(wal_file, os.O_RDONLY)
        try:
            image = PageImage(ps, n, overlay, memoryview(bytes(db)), wal_fd, file_pages, in_wal)
            assert [bytes(v) for v in image.views(0, n) or []] == pages
            sink.feed(image)
        finally:
            os.close(wal_fd)
    else:
        for i in range(1, n):
            last = (i + 1) % sinkmod.RUN_PAGES == 0 or i == n - 1  # (its run would be stored in between)
            if rng.random() < 0.08 and not last:  # written twice: the last write wins
                sink.page(i * ps, rng.choice([os.urandom(ps), rng.choice(pool), parent_pages[rng.randrange(n0)]]))
            sink.page(i * ps, pages[i])
        sink.add(0, pages[0])
    runs, fast_runs = sink.finish()
    writer.finish()
    raw = b"".join(repo.read_blob(r.pack, r.offset, r.length, f"run {r.hash}") for r in runs)
    xx = b"".join(repo.read_blob(r.pack, r.offset, r.length, f"run {r.hash}") for r in fast_runs)
    assert len(raw) == n * SIZE and len(xx) == 16 * n
    for i in range(n):
        rec = raw[i * SIZE : (i + 1) * SIZE]
        assert rec[:16] in (real(pages[i]), sink.page_hash(pages[i])), f"page {i + 1}: hash of other content"
        assert _read_page(repo, rec, ps) == pages[i], f"page {i + 1}: location holds other bytes"
        assert xx[16 * i : 16 * i + 16] == xxhash.xxh3_128_digest(pages[i])
    if direct and not squeeze:
        reusable = {sink.page_hash(parent_pages[i]) for i in range(n0) if parent[i][:16] != bytes(16)}
        assert sink.pages_added == len({sink.page_hash(p) for p in pages} - reusable)
    assert sink.cold_no <= -3, "fewer than two cold (REPACK) batches"
    assert sink.batch_no >= 3 and sink.new_pages.levels, "too few batches, or SeenPages never settled"


# -- real WAL databases: tail pages only in the WAL, > RUN_PAGES pages of 512 bytes ------------------


def _wal_step(repo: Repository, src: Path, rng: random.Random, op: str, out: Path,
              direct: bool = True) -> engine.BackupResult:
    """Change ``src`` with ``op`` through a writer that keeps its WAL (no checkpoint) and stays open
    during the backup, so the snapshot's newest pages, and its last pages, are only in the WAL; then
    close the writer (the checkpoint makes the file the snapshot's image) and restore."""
    w = sqlite3.connect(src, isolation_level=None)
    w.execute("PRAGMA wal_autocheckpoint=0")
    (top,) = w.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()
    w.execute("BEGIN")
    if op in ("grow", "dup"):
        blob = rng.randbytes(1500)
        w.executemany("INSERT INTO t(v) VALUES(?)",
                      ((blob if op == "dup" else rng.randbytes(rng.choice([100, 400, 1500])),)
                       for _ in range(rng.randrange(1500, 3000))))
    if op in ("update", "grow"):
        for _ in range(300):
            w.execute("UPDATE t SET v = randomblob(length(v)) WHERE id = ?", (rng.randrange(1, top + 1),))
    if op == "zero":  # freed pages zeroed: many equal pages within and across runs
        w.execute("PRAGMA secure_delete=ON")
        w.execute("DELETE FROM t WHERE id % 3 = 0")
    w.execute("COMMIT")
    if op == "move":  # every page rewritten at other numbers, into the WAL
        w.execute("DELETE FROM t WHERE id % 5 = 0")
        w.execute("VACUUM")
    ps = w.execute("PRAGMA page_size").fetchone()[0]
    count = w.execute("PRAGMA page_count").fetchone()[0]
    result = backup(repo, LocalFileSource(src), "x", checksums=False, direct=direct)
    m = result.manifest
    assert m.stats["read"] == "direct" and m.stats["wal_pages"] > 0 if direct else m.stats["read"] != "direct", m.stats
    assert m.page_count == count
    if op in ("grow", "dup"):
        assert os.path.getsize(src) // ps < count, "the last pages are not only in the WAL"
    w.close()  # the last connection: checkpoints, so the file is now exactly the snapshot
    assert os.path.getsize(src) == ps * count and not Path(str(src) + "-wal").exists()
    apply_restore(repo, plan_restore(repo, "x", out, snapshot=m.id))
    assert out.read_bytes() == src.read_bytes(), f"{op}: restore differs from the source"
    out.unlink()
    return result


def _wal_source(path: Path, rng: random.Random, rows: int) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA page_size=512")
    con.execute("PRAGMA journal_mode=wal")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO t(v) VALUES(?)", ((rng.randbytes(rng.choice([60, 300, 900])),) for _ in range(rows)))
    con.execute("COMMIT")
    con.close()


def test_wal_tail_chain_restores_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """512-byte pages, over two real 4096-page runs (the last one short): a chain of direct backups,
    each taken while the newest and the last pages are only in the WAL, through growth, updates,
    duplicated content (one 1,500-byte blob repeated: equal last overflow pages across runs), zeroed
    free pages (equal pages in one run; this step through the backup API path), VACUUM (moved
    pages) and forced repacking (cold batches); batches of 4096 slots, so slots past 255. Each
    restores byte-identical to the checkpointed source, and `verify --read-data` finds nothing.
    Then a data pack of the newest snapshot is deleted: the next backup (LOST markers) stores those
    pages again and is itself whole."""
    monkeypatch.setattr(engine, "REPACK_BELOW", 0.95)  # a parent pack under 95% live is re-stored: cold path
    rng = random.Random(7)
    src = tmp_path / "w.db"
    _wal_source(src, rng, 6000)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    results = [_wal_step(repo, src, rng, op, tmp_path / "out.db", direct=op != "zero")
               for op in ["grow", "dup", "zero", "move", "update"]]
    assert results[-1].manifest.page_count > 2 * sinkmod.RUN_PAGES
    assert results[1].manifest.page_count % sinkmod.RUN_PAGES
    assert max(int.from_bytes(r[44:46], "little") for r in load_records(repo, results[0].manifest)) > 255
    assert any(r.manifest.stats.get("repacked_pages") for r in results), [r.manifest.stats for r in results]
    report = verify(repo, "x", read_data=True)
    assert not report.problems, report.problems
    # someone with write access to the bucket deletes one of the newest snapshot's data packs: the
    # next backup stores those pages again (LOST markers), restores byte-identical, and verifies clean
    m = results[-1].manifest
    run_packs = {r.pack for r in m.runs} | {r.pack for r in m.fast_runs}
    use = {p: 0 for p in m.packs if p not in run_packs}
    for r in load_records(repo, m):
        if r[16:32].hex() in use:
            use[r[16:32].hex()] += 1
    lost = max(use, key=lambda p: use[p])
    repo.store.delete(pack_key(lost))
    last = _wal_step(repo, src, rng, "update", tmp_path / "out.db").manifest
    assert last.stats.get("missing_packs") == [lost] and last.stats.get("repaired_pages", 0) > 0, last.stats
    assert f"x/{last.id}" not in verify(repo, "x", read_data=True).damaged


def test_wal_tail_chain_on_s3(tmp_path: Path, s3_repo_url: str) -> None:
    """The same on S3 (moto): a full backup and two incrementals (moved and duplicated pages), tail
    pages only in the WAL, each restored byte-identical; `verify --read-data` clean."""
    rng = random.Random(11)
    src = tmp_path / "s.db"
    _wal_source(src, rng, 5000)
    repo = Repository.open_or_init(s3_repo_url)
    for op in ["grow", "move", "dup"]:
        _wal_step(repo, src, rng, op, tmp_path / "out.db")
    report = verify(repo, "x", read_data=True)
    assert not report.problems, report.problems


# -- the lock-byte page past 1 GiB, with the last pages only in the WAL ------------------------------


def _same_file(a: Path, b: Path) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def test_lock_byte_page_with_wal_tail(tmp_path: Path) -> None:
    """64 KiB pages; the file is grown sparse to 16,380 pages (header page count set to match: the
    pages between are zero, unused), then a writer adds pages past the lock-byte page (page 16,385,
    at 1 GiB, which SQLite never writes) into the WAL and stays open. The backup (the image has a
    page in neither file nor WAL, so the backup API path) records the lock-byte page as a zero page;
    after the checkpoint a direct backup reads it from the file's hole (same page hashes). The first
    restores byte-identical to the checkpointed source."""
    ps = 65536
    src = tmp_path / "big.db"
    con = sqlite3.connect(src, isolation_level=None)
    con.execute(f"PRAGMA page_size={ps}")
    con.execute("PRAGMA journal_mode=wal")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    con.execute("INSERT INTO t(v) VALUES(randomblob(1000))")
    con.close()
    with open(src, "r+b") as f:
        f.truncate(16380 * ps)
        f.seek(28)
        f.write((16380).to_bytes(4, "big"))
    w = sqlite3.connect(src, isolation_level=None)
    w.execute("PRAGMA wal_autocheckpoint=0")
    w.execute("BEGIN")
    for _ in range(12):
        w.execute("INSERT INTO t(v) VALUES(randomblob(?))", (ps - 200,))
    w.execute("INSERT INTO t(v) VALUES(zeroblob(?))", (3 * ps,))
    w.execute("COMMIT")
    count = w.execute("PRAGMA page_count").fetchone()[0]
    assert count > 16385 + 8
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, LocalFileSource(src), "x", checksums=False).manifest
    assert first.page_count == count and "neither in the file nor in the WAL" in first.stats["read"], first.stats
    w.close()
    assert os.path.getsize(src) == count * ps
    second = backup(repo, LocalFileSource(src), "x", checksums=False).manifest
    assert second.stats["read"] == "direct"
    lock = load_records(repo, first)[16384]  # (run 4 begins with it, beside new pages waiting for a batch)
    assert lock[:16] == repo.page_hash(bytes(ps)) and lock[16:] == bytes(30)
    out = tmp_path / "out.db"
    apply_restore(repo, plan_restore(repo, "x", out, snapshot=first.id))
    assert _same_file(out, src)
    # the direct read of the checkpointed file: the same pages, the lock-byte page read from the hole
    assert [r[:16] for r in load_records(repo, second)] == [r[:16] for r in load_records(repo, first)]
    assert _read_page(repo, load_records(repo, second)[16384], ps) == bytes(ps)
