"""Cold review of session 7 (restore --follow in place, PITR read-ahead and page holding, repair-rows
undo, 500 ms default interval). Each finding reproduced here; one not yet fixed is a strict xfail
with the reproduction in its docstring."""

from __future__ import annotations

import shlex
import sqlite3
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dbre.replicate.segment import (
    Segment,
    Transaction,
    WalPos,
    chain_step,
    list_generations,
    micros,
    read_base,
    write_segment,
)
from dbre.repository.repo import Repository
from dbre.restore.pitr import apply_pitr, plan_pitr
from tests.dbfactory import cli
from tests.test_restore_scenarios import make_shop, rows, snapshot_of, sql
from tests.test_review_restore_pitr import replicating

PS = 4096


def _compressible_generation(tmp: Path, segments: int, pages: int) -> Repository:
    """A generation whose ``segments`` segments each rewrite the same ``pages`` pages (the overflow
    pages of one zeroblob row, with the bytes they already hold: the database stays valid). Such
    pages compress ~1000x, so each segment is a few KiB stored and ``pages`` x 4 KiB decoded."""
    src = tmp / "src.db"
    c = sqlite3.connect(src, isolation_level=None)
    c.execute(f"PRAGMA page_size={PS}")
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(seq INTEGER PRIMARY KEY, pad BLOB)")
    c.execute("CREATE TABLE counter(n INTEGER)")
    c.execute("INSERT INTO counter VALUES (0)")
    c.execute("INSERT INTO t VALUES (1, zeroblob(?))", ((pages + 1) * PS,))
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    repo = Repository.open_or_init(str(tmp / "repo"))
    with replicating(repo, src):
        pass
    (gid,) = list_generations(repo, "app")
    gen = read_base(repo, "app", gid)
    data = src.read_bytes()
    count = len(data) // PS
    written = {p: data[(p - 1) * PS : p * PS] for p in range(3, 3 + pages)}
    state, txid = bytes.fromhex(gen.state), gen.base_txid
    t0 = micros(datetime.now(UTC)) + 1000
    pos = WalPos(b"\0" * 8, 0)
    for i in range(segments):
        txid += 1
        tx = Transaction(txid, t0 + i, count, written)
        after = chain_step(repo.page_hash, state, tx)
        write_segment(repo, Segment("app", gid, PS, state, after, pos, pos, gen.file_id, [tx]))
        state = after
    return repo


# review s7 finding 2 (fixed)
def test_pitr_read_ahead_memory_is_bounded_by_decoded_segments(tmp_path: Path) -> None:
    """Reproduction: 20 segments, each one transaction rewriting the same 1024 pages (4 MiB decoded,
    ~4 KiB stored: zeroblob overflow pages), restored with `restore --at`.

    Since e69d449 the reader threads unseal and *decode* each segment ahead of the caller
    (`checked_segments` -> `_open_within`), but what they may read ahead is still bounded by the
    *sealed* (compressed) bytes: each fetch ahead may take twice the largest sealed segment so far
    (at least 1 MiB) and 64 MiB of them, capped at SEGMENTS_AHEAD = 16. Decoded, that is 16 whole
    segments held at once: measured traced peak 65-71 MiB here against 8.3 MiB at e69d449^ (RSS
    152-156 vs 57 MiB); 20 segments of 16 MiB pages: RSS 457 MiB vs 84 MiB. With segments of
    64 MiB of compressible pages (the cap) that is ~1 GiB decoded plus 8 decodes in flight, and a
    transaction stored in parts is decoded ahead whole (its parts are read inside `_unseal_body`,
    outside any allowance), against FORMAT.md's "64 MiB ... plus the segment being checked".
    Expected: the read-ahead bound counts decoded bytes (or the threads only fetch and unseal and
    decoding stays at its turn), so the peak stays a few segments."""
    repo = _compressible_generation(tmp_path, 20, 1024)
    plan = plan_pitr(repo, "app", tmp_path / "out.db", at=datetime.now(UTC) + timedelta(hours=1))
    assert plan is not None and len(plan.segments) == 20
    one = 1024 * PS
    tracemalloc.start()
    try:
        apply_pitr(repo, plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    c = sqlite3.connect(tmp_path / "out.db")
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        c.close()
    assert peak < 4 * one, f"peak {peak / 2**20:.1f} MiB for segments of {one / 2**20:.0f} MiB decoded"


# review s7 finding 3 (fixed)
def test_repair_rows_undo_keeps_rows_written_after_the_repair(tmp_path: Path) -> None:
    """Reproduction: repair-rows --where "id <= 20 OR id > 300" --delete-extra --apply (puts ids
    11..20 back, drops id 301), then the application inserts order 302 (it matches the WHERE, as
    new rows of a time- or id-range selection do), then the operator pastes the printed undo.

    The undo is `repair-rows --snapshot SAFETY --where <same> --delete-extra --apply`: a diff of the
    whole selection against the safety snapshot, applied at once (no dry run in between). Every row
    that matches the WHERE now but was not in the database before the repair is an "extra" and is
    deleted: order 302, written by the application after the repair, is lost, and so is any change
    the application made since to selected rows (updated back). Expected: the undo touches only
    the rows the repair changed (their keys are in the audit record), or is printed without
    --apply so its dry run shows what it would delete."""
    live = make_shop(tmp_path / "shop.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snapshot_of(repo, live)
    sql(live, "DELETE FROM orders WHERE id BETWEEN 11 AND 20")
    sql(live, "INSERT INTO orders(customer_id, total) VALUES (3, 9)")  # id 301
    done = cli("repair-rows", "--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
               "--where", "id <= 20 OR id > 300", "--delete-extra", "--apply")
    assert done.returncode == 0, done
    undo = shlex.split(done.stdout.strip().splitlines()[-1].strip())
    assert undo[:2] == ["dbre", "repair-rows"] and "--apply" in undo
    sql(live, "INSERT INTO orders(id, customer_id, total, note) VALUES (302, 4, 12, 'after the repair')")
    back = cli(*undo[1:])
    assert back.returncode == 0, back
    assert 301 in [r[0] for r in rows(live, "orders", "id")]  # the repair's own change is undone
    assert sql(live, "SELECT note FROM orders WHERE id = 302") == [("after the repair",)], back.stdout


def test_repair_rows_undo_quotes_a_where_with_quotes_and_a_relative_repo(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked sound: a WHERE holding both quote kinds and a repository given as a relative path
    come back exactly in the printed undo (shlex-quoted, the repository made absolute), and the
    undo, run from another directory, puts the rows back."""
    live = make_shop(tmp_path / "shop.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snapshot_of(repo, live)
    before = rows(live, "orders", "id")
    sql(live, "UPDATE orders SET note = 'it''s \"x\"' WHERE id = 5")
    where = "id = 5 OR note = 'it''s \"x\"'"
    monkeypatch.chdir(tmp_path)
    done = cli("repair-rows", "--repo", "repo", "--db", "shop", "--live", "shop.db", "--table", "orders",
               "--where", where, "--apply")
    assert done.returncode == 0, done
    undo = shlex.split(done.stdout.strip().splitlines()[-1].strip())
    assert undo[undo.index("--where") + 1] == f'({where}) AND "id" IN (5)'  # the repair's own rows only
    assert undo[undo.index("--repo") + 1] == str(tmp_path / "repo")
    assert rows(live, "orders", "id") == before
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    back = cli(*undo[1:])
    assert back.returncode == 0, back
    assert sql(live, "SELECT note FROM orders WHERE id = 5") == [("it's \"x\"",)]


def _follow_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import dbre.replicate.shipper as shipper
    from tests.replication import make_source

    monkeypatch.setattr(shipper, "GENERATION_SEGMENTS", 3)  # a periodic base every 3 segments
    src = tmp_path / "src.db"
    make_source(src, 500)
    return src, Repository.open_or_init(str(tmp_path / "repo"))


def _commit(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(300))", (seq,))
    conn.execute("UPDATE counter SET n = ?", (seq,))
    conn.execute("COMMIT")


def _catch_up(follower, repo: Repository, want: int) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + 30
    while follower.stats.last_txid < want or follower.gen.id != list(list_generations(repo, "app"))[-1]:
        assert time.monotonic() < deadline, (follower.stats, want)
        follower.poll()
        time.sleep(0.05)


# review s7 finding 1 (fixed)
def test_follow_in_place_never_repairs_a_standby_that_differs_from_the_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproduction: a follower restores the standby; then something writes to it (an operator's
    `sqlite3 standby.db "UPDATE ..."` on a bad day, a tool that opened it read-write; a page that
    rotted): row 1's blob changes, same size, same page count. The replicator then starts periodic
    generations (every 3 segments here, every 600 by default).

    `Follower._continue` accepts each newer generation in place on metadata alone (file_id, WAL
    position, base_txid, the *size* of the standby, the base snapshot's manifest), never on the
    standby's bytes, although the base snapshot's page map holds a keyed hash of every page it
    claims the standby holds. Before 56f7cc1 each newer generation was restored whole, so a drift
    lasted at most one generation (5 min of writes); now it lasts for ever and later segments are
    applied over it (pages of two histories in one file). Expected: the in-place continuation
    checks the standby's pages against the base's page map (a local read, no download) and
    restores whole when one differs."""
    from dbre.restore.follow import Follower

    src, repo = _follow_setup(tmp_path, monkeypatch)
    standby = tmp_path / "sb.db"
    conn = sqlite3.connect(src, isolation_level=None)
    follower = Follower(repo, "app", standby, 0.1)
    try:
        with replicating(repo, src, interval=0.1):
            _commit(conn, 501)
            import time

            time.sleep(0.5)
            follower._restore(None)
            c = sqlite3.connect(standby, isolation_level=None)
            c.execute("UPDATE t SET pad = zeroblob(300) WHERE seq = 1")  # the drift: same size, same pages
            c.close()
            for seq in range(502, 520):
                _commit(conn, seq)
                time.sleep(0.15)
        last = max(n.last for ns in list_generations(repo, "app").values() for n in ns)
        _catch_up(follower, repo, last)
        # fixed: the drifted page differs from the next base's: that generation is restored whole
        assert follower.stats.restores >= 2, follower.stats
        got = sqlite3.connect(standby).execute("SELECT count(*), max(seq) FROM t").fetchone()
        assert got == (519, 519)
        want = conn.execute("SELECT pad FROM t WHERE seq = 1").fetchone()
        have = sqlite3.connect(standby).execute("SELECT pad FROM t WHERE seq = 1").fetchone()
        assert have == want, "the standby still holds the stray write after the new generations"
    finally:
        conn.close()
        if follower.standby is not None:
            follower.standby.close()


# review s7 finding 4 (fixed)
def test_repair_rows_undo_of_a_fire_triggers_repair_restores_the_row_exactly(tmp_path: Path) -> None:
    """Reproduction: orders has `AFTER UPDATE OF total ... SET updated_at = 'touched'`. Order 7 is
    (total 999, updated_at 'app-time') in live; repair-rows --where "id = 7" --fire-triggers --apply
    puts the snapshot's total back and the trigger stamps it 'touched'. The printed undo carries
    --fire-triggers too (`undo_command` copies `plan.fire_triggers`): it sets total 999 and
    updated_at 'app-time' back, then the trigger fires and stamps 'touched' again, so the row is
    not as it was before the repair. An undo puts back exact stored values (they come from the
    safety snapshot, which already holds whatever the triggers did before): it should always run
    with triggers suspended. (What the repair's triggers wrote into other tables, e.g. `changes`,
    no row undo of this table removes; the safety snapshot still holds them.)"""
    live = make_shop(tmp_path / "shop.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snapshot_of(repo, live)
    sql(live, "UPDATE orders SET total = 999 WHERE id = 7")
    sql(live, "UPDATE orders SET updated_at = 'app-time' WHERE id = 7")
    before = sql(live, "SELECT total, updated_at FROM orders WHERE id = 7")
    assert before == [(999.0, "app-time")]
    done = cli("repair-rows", "--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
               "--where", "id = 7", "--fire-triggers", "--apply")
    assert done.returncode == 0, done
    assert sql(live, "SELECT updated_at FROM orders WHERE id = 7") == [("touched",)]
    undo = shlex.split(done.stdout.strip().splitlines()[-1].strip())
    back = cli(*undo[1:])
    assert back.returncode == 0, back
    assert sql(live, "SELECT total, updated_at FROM orders WHERE id = 7") == before, undo


# review s7 finding 5 (fixed)
def test_follow_behind_two_generations_reaches_the_newest_after_a_forget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproduction: the follower holds generation A (paused, slow, a VM stopped for 10 minutes:
    two periodic bases at the default 5 min of writes); meanwhile generations B, C, ... were
    started and `forget --keep-last 1` ran: B is outside the PITR window, so forget dropped its
    base snapshot, and prune keeps B's base object and segments until its grace period is over.

    The next poll lists B first (`poll`: the first newer key), and `_continue(B)` calls
    `base_snapshot(B)`, which raises "base snapshot ... is missing": the follower exits 1
    (and, the standby now existing, a restart without --force is refused). Before 56f7cc1 the same
    poll restored the newest generation whole. Continuing in place needs none of the base
    snapshot's pages: a base snapshot that is missing or not the generation's should make
    `_continue` answer False (restore the newest whole), not stop the standby."""
    from dbre.errors import DbreError
    from dbre.restore.follow import Follower
    from dbre.restore.pitr import base_snapshot

    src, repo = _follow_setup(tmp_path, monkeypatch)
    standby = tmp_path / "sb.db"
    conn = sqlite3.connect(src, isolation_level=None)
    follower = Follower(repo, "app", standby, 0.1)
    try:
        import time

        with replicating(repo, src, interval=0.1):
            _commit(conn, 501)
            time.sleep(0.5)
            follower._restore(None)
            for seq in range(502, 520):
                _commit(conn, seq)
                time.sleep(0.15)
        gens = list(list_generations(repo, "app"))
        mine = gens.index(follower.gen.id)
        assert len(gens) >= mine + 3, gens
        done = cli("forget", "--repo", tmp_path / "repo", "--db", "app", "--keep-last", "1")
        assert done.returncode == 0, done
        with pytest.raises(DbreError, match="is missing"):
            base_snapshot(repo, read_base(repo, "app", gens[mine + 1]))  # B: its base snapshot forgotten
        last = max(n.last for ns in list_generations(repo, "app").values() for n in ns)
        _catch_up(follower, repo, last)
        got = sqlite3.connect(standby).execute("SELECT count(*), max(seq) FROM t").fetchone()
        assert got == (519, 519)
    finally:
        conn.close()
        if follower.standby is not None:
            follower.standby.close()


SHORT_WRITE = r'''
import os, resource, signal, sys
from pathlib import Path
from dbre.restore.follow import Standby
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sb = Standby(path, 4096)
size = path.stat().st_size
count = size // 4096
real_unlink = Path.unlink
def unlink(self, *a, **k):  # kill -9 at the instant before the commit (the journal's deletion)
    if str(self).endswith("-journal"):
        os._exit(9)
    return real_unlink(self, *a, **k)
Path.unlink = unlink
# the disk "fills" at the standby's own size: the journal (its pages plus headers) does not fit
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
sb.apply({p: bytes([p % 251]) * 4096 for p in range(2, count + 1)}, count)
'''


# review s7 finding 6 (fixed)
def test_follow_apply_journal_cut_by_a_full_disk_never_tears_the_standby(tmp_path: Path) -> None:
    """Reproduction: `Standby.apply` writes the rollback journal with one `os.write(jfd, ...)` and
    does not look at the count it returns. When the disk fills (here RLIMIT_FSIZE at the standby's
    size, which makes write(2) return short exactly as ENOSPC does) the journal is cut, fsynced, and
    the pages are overwritten anyway (they fit: the file does not grow). A kill -9 (or power loss)
    before the journal's deletion leaves a hot journal whose last records are missing: the next
    reader rolls back only the pages it holds, and the standby is a mix of two states
    (integrity_check fails). Expected: a short write (or any write error) of the journal stops the
    apply before the file is touched."""
    import subprocess
    import sys

    standby = tmp_path / "sb.db"
    c = sqlite3.connect(standby, isolation_level=None)
    c.execute("PRAGMA page_size=4096")
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 40)
    c.close()
    original = standby.read_bytes()
    proc = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(standby)], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    journal = Path(f"{standby}-journal")
    pages = len(original) // 4096
    assert 0 < journal.stat().st_size < 512 + pages * (4096 + 8), "the journal was not cut"
    c = sqlite3.connect(standby)
    try:
        ok = c.execute("PRAGMA integrity_check").fetchone()[0]  # a reader: rolls the hot journal back
    except sqlite3.DatabaseError as err:
        ok = str(err)
    finally:
        c.close()
    assert (ok, standby.read_bytes() == original) == ("ok", True), f"journal {journal}: {ok}"


def test_repair_rows_audit_record_holds_the_undo_and_writers_are_not_held_by_the_safety_snapshot(
        tmp_path: Path) -> None:
    """Review s7 finding 7 (fixed) and a low note: the safety snapshot is taken before the repair's
    write transaction (a writer is never blocked by its backup), and the audit record carries the
    undo command as printed."""
    import dbre.restore.table as table_mod

    live = make_shop(tmp_path / "shop.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snapshot_of(repo, live)
    sql(live, "DELETE FROM orders WHERE id BETWEEN 11 AND 20")
    seen: list[str] = []
    real = table_mod.safety_snapshot

    def probing(*a, **k):  # type: ignore[no-untyped-def]
        c = sqlite3.connect(live, timeout=0)  # another writer, while the safety snapshot is taken
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute("ROLLBACK")
            seen.append("writer got the lock")
        except sqlite3.OperationalError as err:
            seen.append(str(err))
        finally:
            c.close()
        return real(*a, **k)

    table_mod.safety_snapshot = probing
    try:
        done = cli("repair-rows", "--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
                   "--where", "id <= 20", "--apply")
    finally:
        table_mod.safety_snapshot = real
    assert done.returncode == 0, done
    assert seen == ["writer got the lock"]
    audit = repo.records("audits", "shop")[-1]
    printed = done.stdout.strip().splitlines()[-1].strip()
    assert audit["undo"] == printed and audit["safety_snapshot"] in printed
