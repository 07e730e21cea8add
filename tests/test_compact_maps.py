"""Compact page maps (issue 9, Size): lookups by hash without per-page objects, and a backup's
memory that grows by a few dozen bytes per page of the database, not by Python objects per page."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dbre.repository.backup import backup, load_records
from dbre.repository.entries import Entries
from dbre.repository.hashindex import NO_HASH, ParentIndex, SeenPages
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource


def _record(h: bytes, tag: int) -> bytes:
    return h + tag.to_bytes(30, "little")


def test_parent_index_confirms_the_whole_hash_when_prefixes_collide() -> None:
    """Hashes that share their first 8 bytes are told apart by the other 8; a hash with trailing
    zero bytes is found as itself; the markers' all-zero hash is never found."""
    same_prefix = [b"\x07" * 8 + os.urandom(8) for _ in range(5)]
    trailing = os.urandom(10) + bytes(6)
    hashes = [*same_prefix, trailing, NO_HASH, *(os.urandom(16) for _ in range(2000))]
    records = Entries(bytearray(b"".join(_record(h, i) for i, h in enumerate(hashes))), 46)
    index = ParentIndex(records)
    found = index.find(hashes)
    for i, (h, rec) in enumerate(zip(hashes, found, strict=True)):
        if h == NO_HASH:
            assert rec is None
        else:
            assert rec == _record(h, i)
    assert index.find([b"\x07" * 8 + os.urandom(8), bytes(15) + b"\x01"]) == [None, None]


def test_seen_pages_finds_entries_across_merged_levels() -> None:
    seen = SeenPages()
    seen.FLUSH = 64  # small levels, so several merges happen
    keys = [os.urandom(16) for _ in range(1000)] + [os.urandom(12) + bytes(4)]
    for i, k in enumerate(keys):
        seen.add(k, i - 500)  # negative values too (cold batches)
        seen.settle()
    assert len(seen.levels) >= 2
    assert seen.find(keys) == [i - 500 for i in range(len(keys))]
    assert seen.find([os.urandom(16), keys[-1][:12] + b"\x00\x00\x00\x01"]) == [None, None]
    assert len(seen) == len(keys)


def _db(path: Path, rows: int) -> Path:
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=512")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(200)) for i in range(rows)))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


_PEAK = r"""
import sys, tracemalloc
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
repo = Repository.open(sys.argv[1])
tracemalloc.start()
backup(repo, LocalFileSource(sys.argv[2]), "x", checksums=False)
print(tracemalloc.get_traced_memory()[1])
"""


def _peak(repo: Path, src: Path) -> tuple[int, Path]:
    """The smaller traced peak of two runs of the same backup, each in a process of its own and on
    its own copy of the repository (in a test process, other tests' threads allocate during the
    window too; under load the pipeline's queues hold more pages at the peak of one run, up to
    ~1 MB: 139 bytes per page once in CI). Returns the peak and one copy holding the backup."""
    peaks = []
    for i in range(2):
        copy = repo.with_name(f"{repo.name}-run{i}")
        shutil.copytree(repo, copy)
        out = subprocess.run([sys.executable, "-c", _PEAK, str(copy), str(src)], capture_output=True,
                             text=True, timeout=300, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    return min(peaks), copy


@pytest.mark.parametrize("incremental", [False, True])
def test_backup_memory_per_page_is_a_few_dozen_bytes(tmp_path: Path, incremental: bool) -> None:
    """Python-traced peak memory of a backup grows by under 150 bytes per page of the database
    between a small and a 4x larger one (the parent's record, 46 bytes, its fast hash, 16, and the
    sorted lookups; the dict of recent hashes is capped at 32,768 entries, which the small one does
    not fill: 120.1 measured for a first backup in a process of its own). Page maps as lists of
    `bytes` cost ~190 bytes per page and more. Measured in a subprocess: in the test process other
    tests' threads allocate during the window too (it failed 3 of 4 suite runs at 121-139). Quiet,
    121 in 4 of 4 runs; with other tests using both cores, the pipeline's queues are full at the peak
    of the larger backup and not of the smaller (up to ~1 MB more): 140 twice in CI, the smaller of two
    runs. 150 leaves that margin and still fails a page map of per-page objects."""
    peaks = []
    for rows in (40000, 160000):
        src = _db(tmp_path / f"src{rows}.db", rows)
        repo_dir = tmp_path / f"repo{rows}"
        repo = Repository.open_or_init(str(repo_dir))
        if incremental:
            backup(repo, LocalFileSource(src), "x", checksums=False)
            con = sqlite3.connect(src)
            con.execute("UPDATE t SET v = randomblob(200) WHERE id % 50 = 0")
            con.commit()
            con.close()
        peak, done = _peak(repo_dir, src)
        after = Repository.open(str(done))
        peaks.append((peak, len(load_records(after, after.newest_snapshot("x")))))
    (small, n_small), (big, n_big) = peaks
    assert n_big > 3 * n_small > 0
    per_page = (big - small) / (n_big - n_small)
    assert per_page < 150, f"{per_page:.0f} bytes per page"
