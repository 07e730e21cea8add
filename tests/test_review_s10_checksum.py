"""Review of table checksums version 3 and their per-page partial sums (session 10, issue 14).

What a backup records must be what a from-scratch ``table_stats`` gives on the same source state,
and nothing in a database's schema may make the backup fail where it did not before. Each test
uses a real SQLite file and a real local repository.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import apsw
import pytest

from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from tests.checksums import backup_change_backup, fresh_stats, recorded, run_sql


def _backup(repo: Repository, src: Path) -> Manifest:
    return backup(repo, LocalFileSource(src), "db").manifest




def test_a_table_named_json_each_does_not_stop_the_backup(tmp_path: Path) -> None:
    """The ranged re-read joins ``json_each(?)``: a user table of that name shadows the function
    ("'json_each' is not a function"), which failed the whole backup ("SQLite could not read the
    source") of a database dbre backed up before version 3. Such a database is read whole instead."""
    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=1024")
    con.execute("CREATE TABLE json_each(key TEXT, value TEXT)")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i} " + "x" * 40) for i in range(2000)])
    con.executemany("INSERT INTO json_each VALUES (?, ?)", [(f"k{i}", f"v{i}") for i in range(50)])
    con.commit()
    con.close()
    backup_change_backup(tmp_path / "repo", src, "UPDATE t SET v = 'changed' WHERE id = 1500")


@pytest.mark.parametrize("kind", ["VIRTUAL", "STORED"])
def test_a_generated_column_named_rowid(tmp_path: Path, kind: str) -> None:
    """``PRAGMA table_info`` does not list generated columns, so a generated column named rowid
    looked free and ``t.rowid`` in the ranged re-read was that column, not the rowid: the leaves'
    partial sums were assigned by its values and the second backup recorded a checksum that is
    not the rows' (a restore of it failed validation)."""
    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=1024")
    con.execute(f"CREATE TABLE g(a INTEGER, v TEXT, rowid INTEGER AS (-a) {kind})")
    con.executemany("INSERT INTO g(a, v) VALUES (?, ?)", [(i, f"row {i} " + "x" * 30) for i in range(2000)])
    con.commit()
    con.close()
    backup_change_backup(tmp_path / "repo", src, "UPDATE g SET v = 'new' WHERE a = 1500")


# XXH3's default secret, bytes 16..31 (public: xxhash.h's kSecret). In a long input's stripe s, lane
# i, SQLite's page bytes d (8, little-endian) add d to one accumulator and lo32(d ^ k) * hi32(d ^ k)
# to another, k the secret's 8 bytes at 8 * (s + i): with lo32(d) = lo32(k) the product is 0, so
# adding 1 to one lane's high half and taking 1 from another's (same lane, another stripe of the
# same 1 KiB block) keeps every accumulator, and the page's xxh3-128, as it was.
_SECRET_16_32 = bytes.fromhex("ded46de9839097db7240a4a4b7b3671f")


def _lane(key: bytes, high: int) -> bytes:
    return (high << 32 | int.from_bytes(key[:4], "little")).to_bytes(8, "little")


@pytest.mark.parametrize("checksums", [None, False])
def test_a_crafted_xxh3_collision_in_a_busy_table(tmp_path: Path, checksums: bool | None) -> None:
    """Someone who can write a blob through the application (here: incremental blob I/O, as an
    app that patches uploads in place does) changes 16 of its bytes so that its overflow page keeps
    its xxh3-128. The backup keeps the parent's page (the documented residual of fast runs) and,
    since version 3, the parent's partial sum of the leaf, while other leaves of the same table
    changed and are read again. Without more, the recorded checksum would be the stale rows', a
    restore would validate, and the change would be hidden for up to 24 backups (before version 3
    a table with any changed page was read whole, so the next drill failed). Fixed: a leaf keeps
    its sum only when its and its overflow pages' keyed hashes equal the parent's records, so the
    rows are read again and the stale page fails validation. The knowledge needed is far less than FORMAT.md's
    threat model says ("knows every byte of a page's previous version and writes every byte of
    its new one"): only where the blob's bytes fall in its page, and the public secret.

    Since session 12 a backup that carries partial sums (table checksums on, the default up to
    256 MiB) tells unchanged pages by the keyed hash in the sink: the crafted page is stored, the
    snapshot restores byte for byte and validates. With table checksums off the residual stays
    (FORMAT.md, *Fast runs*): the sink keeps the old page, and nothing checks rows."""
    import random

    import xxhash

    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=1024")  # (rollback journal: each commit is in the file)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?, NULL)", [(i, f"row {i} " + "x" * 40) for i in range(2000)])
    blob = random.Random(7).randbytes(3000)
    con.execute("UPDATE t SET b = ? WHERE id = 1000", (blob,))
    con.commit()
    (page,) = con.execute("SELECT pageno FROM dbstat WHERE name = 't' AND pagetype = 'overflow' "
                          "ORDER BY path LIMIT 1").fetchone()
    con.close()

    def overflow_page() -> bytes:
        with open(src, "rb") as f:
            f.seek((page - 1) * 1024)
            return f.read(1024)

    at = blob.find(overflow_page()[128:160])  # where page bytes 128.. are in the blob
    assert at > 0

    def patch(h1: int, h2: int) -> None:
        conn = apsw.Connection(str(src))
        with conn.blob_open("main", "t", "b", 1000, True) as b:
            b.seek(at)
            b.write(_lane(_SECRET_16_32[0:8], h1))  # page bytes 128..135: stripe 2, lane 0
            b.seek(at + 64)
            b.write(_lane(_SECRET_16_32[8:16], h2))  # page bytes 192..199: stripe 3, lane 0
        conn.close()

    patch(1000, 2000)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, LocalFileSource(src), "db", checksums=checksums).manifest
    if checksums is None:
        assert recorded(first) == fresh_stats(src)
    before = xxhash.xxh3_128_digest(overflow_page())
    patch(1001, 1999)  # the blob's content changed...
    assert xxhash.xxh3_128_digest(overflow_page()) == before  # ...its page's xxh3 did not
    run_sql(src, "UPDATE t SET v = 'busy' WHERE id = 10")  # another leaf of the same table changes
    second = backup(repo, LocalFileSource(src), "db", checksums=checksums).manifest
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.validate.checks import equivalence_check, failed

    target = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, second.db, target, snapshot=second.id))
    if checksums is False:  # the residual: the old bytes of that one page
        restored, now = target.read_bytes(), src.read_bytes()
        assert restored != now and restored[: (page - 1) * 1024] == now[: (page - 1) * 1024]
        assert restored[page * 1024 :] == now[page * 1024 :]
        return
    assert second.stats["checksum_leaves"]["read"] >= 1  # (the table was not kept whole)
    assert recorded(second) == fresh_stats(src)
    assert target.read_bytes() == src.read_bytes()  # the crafted page was stored
    conn = apsw.Connection(str(target))
    try:
        assert failed(equivalence_check(conn, second)) == []
    finally:
        conn.close()


def test_a_page_sum_run_does_not_keep_a_dead_data_pack(tmp_path: Path) -> None:
    """A small backup puts its runs in its last data pack. A page-sum run that stays the same (no
    rowid leaf's sum changed: here only a WITHOUT ROWID table is written) was reused from there
    after every page of that pack had died, so the pack, page data no snapshot uses, was never
    pruned: ``_sparse_run_packs`` looked at the page-map and fast runs' packs only."""
    from dbre.repository.backup import load_records
    from dbre.repository.keep import KeepPolicy
    from dbre.repository.pack import read_index_tail
    from dbre.repository.retention import forget, prune

    src = tmp_path / "live.db"
    con = sqlite3.connect(src)
    con.execute("PRAGMA page_size=1024")
    con.execute("CREATE TABLE s(id INTEGER PRIMARY KEY, v TEXT)")
    con.execute("CREATE TABLE w(k INTEGER PRIMARY KEY, v TEXT) WITHOUT ROWID")
    con.executemany("INSERT INTO s VALUES (?, ?)", [(i, "static") for i in range(5)])
    con.executemany("INSERT INTO w VALUES (?, ?)", [(i, "a" * 40) for i in range(2000)])
    con.commit()
    con.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    for r in range(4):  # every page of w written again, the page count the same
        run_sql(src, "UPDATE w SET v = ?", chr(ord("b") + r) * 40)
        m = _backup(repo, src)
        assert recorded(m) == fresh_stats(src)
    forget(repo, KeepPolicy(last=1))
    prune(repo, grace=0)
    (kept,) = repo.snapshots()
    records = load_records(repo, kept)
    live = {bytes(records.buf[i * records.size + 16 : i * records.size + 32]).hex() for i in range(kept.page_count)}
    dead = [p for p in repo.pack_ids() if p not in live
            and any(b.kind == b"d" for b in read_index_tail(repo.store, repo.sealer, p))]
    assert dead == []  # (a pack with page data none of whose pages the only snapshot uses)
