"""Restore's plan groups a snapshot's page map by blob with numpy (verify.snapshot_blobs) and checks
each blob against its pack index in one comparison (verify.check_blob_pages): both against a
page-by-page oracle, on real incremental chains whose page maps point into many blobs out of
order, and against a pack index whose slot was changed by someone with write access."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from dbre.errors import IntegrityError
from dbre.repository.backup import backup, iter_records
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.verify import check_blob_pages, each_index, snapshot_blobs
from dbre.sources.local import LocalFileSource

Blobs = dict[tuple[str, int, int], list[tuple[int, int]]]


def _oracle(repo: Repository, manifest: Manifest) -> tuple[Blobs, bytes, int]:
    """Per blob (pack, offset, length): its (page, slot) pairs in page order; all hashes; zero pages."""
    blobs: Blobs = {}
    hashes, zero = bytearray(), 0
    for n, (h, pack, off, length, slot) in enumerate(iter_records(repo, manifest)):
        hashes += h
        if pack == bytes(16) and not length:
            zero += 1
            continue
        blobs.setdefault((pack.hex(), off, length), []).append((n, slot))
    return blobs, bytes(hashes), zero


def _chain(tmp_path: Path, rounds: int) -> tuple[Repository, list[Manifest]]:
    src = tmp_path / "src.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=512")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(150)) for i in range(12_000)))  # > 1 run
    con.commit()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    rng = random.Random(7)
    out = []
    for r in range(rounds):
        out.append(backup(repo, LocalFileSource(src), "x", checksums=False).manifest)
        ids = rng.sample(range(12_000 + 500 * r), 300)
        con.executemany("UPDATE t SET v = ? WHERE id = ?", ((os.urandom(150), i) for i in ids))
        con.executemany("INSERT INTO t VALUES (?, ?)", ((12_000 + 500 * r + i, bytes(150)) for i in range(500)))
        con.execute("DELETE FROM t WHERE id % 97 = ?", (r,))
        con.commit()
        if r % 2:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return repo, out


def test_grouping_matches_a_page_by_page_oracle_on_an_incremental_chain(tmp_path: Path) -> None:
    repo, manifests = _chain(tmp_path, 4)
    for m in manifests:
        got = snapshot_blobs(repo, m)
        want, hashes, zero = _oracle(repo, m)
        assert got.zero == zero
        assert bytes(got.hashes.buf) == hashes
        assert [(b.pack, b.offset, b.length) for b in got.blobs] == list(want)  # order of first page
        for b in got.blobs:
            assert list(zip(b.pages, b.slots, strict=True)) == want[(b.pack, b.offset, b.length)]
    later = snapshot_blobs(repo, manifests[-1])
    # (scattered blobs: the grouping's and the check's non-trivial paths)
    assert len(later.blobs) > 3 and any(b.pages[-1] - b.pages[0] >= len(b.pages) for b in later.blobs)


def test_a_changed_slot_is_named_at_the_first_page_it_breaks(tmp_path: Path) -> None:
    repo, manifests = _chain(tmp_path, 3)
    m = manifests[-1]
    pages = snapshot_blobs(repo, m)
    scattered = next(b for b in pages.blobs if b.pages[-1] - b.pages[0] >= len(b.pages) and len(b.pages) > 2)
    (pack, index, _), = list(each_index(repo, {scattered.pack: 0}))
    assert not isinstance(index, Exception)
    check_blob_pages(index, scattered, pages, m)  # holds as stored
    i = len(scattered.pages) // 2
    tampered = type(scattered)(scattered.pack, scattered.offset, scattered.length,
                               scattered.pages, type(scattered.slots)("H", scattered.slots))
    tampered.slots[i] = (tampered.slots[i] + 1) % len(index[scattered.offset].hashes)
    with pytest.raises(IntegrityError, match=f"slot {tampered.slots[i]} \\(page {scattered.pages[i] + 1} "):
        check_blob_pages(index, tampered, pages, m)
    tampered.slots[i] = 65535  # past the batch's end
    with pytest.raises(IntegrityError, match="another page at offset"):
        check_blob_pages(index, tampered, pages, m)


def test_verify_names_exactly_the_records_whose_slot_the_index_does_not_hold(tmp_path: Path) -> None:
    """verify's per-blob comparison (``_mismatched``) against the page-by-page rule, on a real page
    map whose records were changed in memory (a forged run cannot be stored without the key)."""
    import numpy as np

    from dbre.repository.backup import load_records
    from dbre.repository.verify import _mismatched, blob_groups, record_mismatch

    repo, manifests = _chain(tmp_path, 3)
    m = manifests[-1]
    raw = bytearray(load_records(repo, m).buf)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 46)
    groups, _ = blob_groups(rows)
    key, at = max(groups, key=lambda g: len(g[1]))
    pack = key[:16].hex()
    (_, index, _), = list(each_index(repo, {pack: 0}))
    assert not isinstance(index, Exception)
    off, length = int.from_bytes(key[16:24], "little"), int.from_bytes(key[24:28], "little")
    assert _mismatched(index, off, length, rows, at) == []
    rng = random.Random(3)
    broken = sorted(rng.sample(at.tolist(), 5))
    for i in broken[:4]:
        slot = int.from_bytes(raw[i * 46 + 44 : i * 46 + 46], "little")
        raw[i * 46 + 44 : i * 46 + 46] = ((slot + 1) % len(index[off].hashes)).to_bytes(2, "little")
    raw[broken[4] * 46 + 44 : broken[4] * 46 + 46] = (65535).to_bytes(2, "little")
    got = _mismatched(index, off, length, rows, at)
    assert got == broken
    assert all(record_mismatch(index, off, length, int.from_bytes(raw[i * 46 + 44 : i * 46 + 46], "little"),
                               bytes(raw[i * 46 : i * 46 + 16])) for i in got)
    assert _mismatched(index, off + 1, length, rows, at) == at.tolist()  # no such blob: every record
