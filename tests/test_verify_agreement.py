"""verify and restore agree: damage one thing at a time in a small repository and check that
`verify --read-data` names exactly the snapshots whose restore fails (and the structure check
alone exactly those for damage it can see without reading page data), on a local disk and on S3.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from dbre.errors import RepositoryError
from dbre.repository.backup import BackupResult, backup, load_records
from dbre.repository.manifest import RECORD, RunRef
from dbre.repository.pack import BlobInfo, PackWriter, read_index_tail
from dbre.repository.repo import Repository, pack_key
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage.base import Store

DB = "agree"
ROWS = 40


def _make_source(path: Path) -> None:
    """One 3000-byte random blob per 4 KiB page: updating a row changes exactly one page, and every
    such one-page batch compresses to the same length (random bytes do not compress)."""
    rng = random.Random(11)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, rng.randbytes(3000)) for i in range(1, ROWS + 1)])
        conn.execute("COMMIT")
    finally:
        conn.close()


def _update(path: Path, row: int, seed: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("UPDATE t SET b = ? WHERE id = ?", (random.Random(seed).randbytes(3000), row))
    finally:
        conn.close()


class World:
    """A small repository of four snapshots of one database, and each snapshot's exact bytes."""

    def __init__(self, store: Store, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        self.repo = Repository.open_or_init(store)
        src = tmp / "src.db"
        _make_source(src)
        self.snaps: list[BackupResult] = []
        self.expected: dict[str, bytes] = {}
        for step, row in enumerate([0, 5, 17, 30]):
            if row:
                _update(src, row, seed=step)
            result = backup(self.repo, LocalFileSource(src), DB)
            self.snaps.append(result)
            self.expected[self.name(result)] = src.read_bytes()

    @staticmethod
    def name(result: BackupResult) -> str:
        return f"{DB}/{result.manifest.id}"

    def own_pack(self, i: int) -> str:
        """The pack snapshot ``i`` wrote (its new pages and its runs)."""
        (pack,) = {r.pack for r in self.snaps[i].manifest.runs}
        return pack

    def index(self, pack: str) -> list[BlobInfo]:
        return read_index_tail(self.store, self.repo.sealer, pack)

    def blob(self, pack: str, kind: bytes) -> BlobInfo:
        return next(b for b in self.index(pack) if b.kind == kind)

    def flip(self, pack: str, offset: int) -> None:
        data = bytearray(self.store.get(pack_key(pack)))
        data[offset] ^= 0x40
        self.store.put(pack_key(pack), bytes(data))

    def fresh(self) -> Repository:
        """The repository opened again: nothing cached from before the damage."""
        return Repository.open(self.store)

    def restore_fails(self, repo: Repository, result: BackupResult) -> bool:
        to = self.tmp / f"restored-{result.manifest.id}.db"
        to.unlink(missing_ok=True)
        try:
            apply_restore(repo, plan_restore(repo, DB, to, snapshot=result.manifest.id))
        except RepositoryError:
            assert not to.exists()
            return True
        assert to.read_bytes() == self.expected[self.name(result)], "a restore returned wrong bytes"
        return False


# -- one kind of damage each ---------------------------------------------------------------------


def batch_byte(w: World) -> None:
    b = w.blob(w.own_pack(1), b"d")
    w.flip(w.own_pack(1), b.offset + b.length // 2)


def index_byte(w: World) -> None:
    pack = w.own_pack(2)
    size = len(w.store.get(pack_key(pack)))
    w.flip(pack, size - 12 - 5)  # inside the sealed index, before its length and the magic


def run_byte(w: World) -> None:
    b = w.blob(w.own_pack(3), b"r")
    w.flip(w.own_pack(3), b.offset + b.length // 2)


def trailer_byte(w: World) -> None:
    pack = w.own_pack(2)
    size = len(w.store.get(pack_key(pack)))
    w.flip(pack, size - 12)  # the index length


def truncate_pack(w: World) -> None:
    key = pack_key(w.own_pack(1))
    data = w.store.get(key)
    w.store.put(key, data[: len(data) // 2])


def delete_pack(w: World) -> None:
    w.store.delete(pack_key(w.own_pack(0)))


def swap_batches(w: World) -> None:
    """Two one-page batches of equal length trade places between packs. The checksum stays
    valid (a page batch is sealed under the same name wherever it lies): only the page hashes
    against the index and the records tell them apart."""
    batches = [(p, w.blob(p, b"d")) for p in (w.own_pack(1), w.own_pack(2), w.own_pack(3))]
    pairs = [(a, b) for i, a in enumerate(batches) for b in batches[i + 1 :] if a[1].length == b[1].length]
    assert pairs, f"no two batches of equal length: {[b.length for _, b in batches]}"
    (pa, a), (pb, b) = pairs[0]
    da, db = bytearray(w.store.get(pack_key(pa))), bytearray(w.store.get(pack_key(pb)))
    ba, bb = bytes(da[a.offset : a.offset + a.length]), bytes(db[b.offset : b.offset + b.length])
    assert ba != bb
    da[a.offset : a.offset + a.length], db[b.offset : b.offset + b.length] = bb, ba
    w.store.put(pack_key(pa), bytes(da))
    w.store.put(pack_key(pb), bytes(db))


def wrong_slot(w: World) -> None:
    """A record of the first snapshot's page map points at another slot of its batch. Only a plain
    repository can be edited so (run re-sealed, manifest re-sealed with the new run hash and root):
    the record's page hash no longer matches the index at that slot."""
    repo = w.repo
    m = w.snaps[0].manifest
    records = load_records(repo, m)
    i = next(i for i, r in enumerate(records) if RECORD.unpack(r)[4] == 3)  # the page in slot 3
    h, pack, off, length, slot = RECORD.unpack(records[i])
    records[i] = RECORD.pack(h, pack, off, length, 4)
    raw = b"".join(records)
    run_hash = repo.page_hash(raw).hex()
    writer = PackWriter(w.store, repo.sealer)
    new_pack, new_off, new_len = writer.add(b"r", repo.sealer.seal(raw, f"run {run_hash}"), [bytes.fromhex(run_hash)])
    writer.finish()
    (old,) = m.runs
    key = repo.manifest_key(m)
    m.runs = [RunRef(hash=run_hash, pack=new_pack, offset=new_off, length=new_len, pages=old.pages)]
    m.packs = sorted((set(m.packs) - {old.pack}) | {new_pack, pack.hex()})
    w.store.delete(key)
    repo.write_manifest(m)


DAMAGE: dict[str, tuple[Callable[[World], None], bool]] = {
    # name: (damage, whether the structure check alone sees it)
    "page batch byte": (batch_byte, False),
    "pack index byte": (index_byte, True),
    "run blob byte": (run_byte, True),
    "pack trailer byte": (trailer_byte, True),
    "truncated pack": (truncate_pack, True),
    "deleted pack": (delete_pack, True),
    "swapped page batches": (swap_batches, False),
    "record at a wrong slot": (wrong_slot, True),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_verify_names_exactly_the_snapshots_restore_refuses(store: Store, tmp_path: Path, case: str) -> None:
    w = World(store, tmp_path)
    before = verify(w.fresh(), read_data=True)
    assert before.ok, before.summary()
    assert not any(w.restore_fails(w.fresh(), s) for s in w.snaps)

    damage, structural = DAMAGE[case]
    damage(w)

    repo = w.fresh()
    failed = {w.name(s) for s in w.snaps if w.restore_fails(repo, s)}
    assert failed, f"{case}: the damage broke no restore (the test damaged nothing that matters)"
    full = verify(w.fresh(), read_data=True)
    assert not full.ok
    assert full.damaged == failed, (case, full.summary())
    structure = verify(w.fresh())
    assert structure.damaged == (failed if structural else set()), (case, structure.summary())
    assert structure.ok == (not structural)

