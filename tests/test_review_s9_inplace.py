"""Cold review of `repair-rows` / `restore-table` reading the past state in place (issue 13), session 9.

Each test names a finding: what an operator on a bad day (a slow or failing store, a paused VM) or an
attacker with write access to the repository but no key could see. The repository is a real local one;
where a store must be slow or fail, a pass-through wrapper of its real store breaks one call (tests/stores.py):
nothing about the store's own behaviour is mocked. Whether the live file is write-locked is probed with
apsw (the SQLite the apply uses): a probe through another SQLite library in the same process would drop
the apply's POSIX locks when it closes its descriptor.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.repository import lock as lock_mod
from dbre.repository.backup import backup
from dbre.repository.lock import LockLostError
from dbre.repository.repo import Repository
from dbre.restore.rows import apply_row_repair, plan_row_repair
from dbre.restore.table import apply_table_restore, plan_table_restore
from dbre.sources import open_source
from dbre.storage.base import TransientError
from tests.sqld import SqldServer, sqld  # noqa: F401 - the session's sqld
from tests.stores import PassThroughStore


@dataclass
class Shop:
    repo: Repository
    url: str
    src: Path


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    """``big`` (~24 MiB; its index, built after the rows, sits at the end of the file, so a plan that counts
    the rows reads the index and few of the table's pages) and ``small``."""
    tmp = tmp_path_factory.mktemp("review_s9")
    src = tmp / "src.db"
    c = sqlite3.connect(src, isolation_level=None)
    c.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, t INTEGER, p BLOB)")
    c.execute("WITH RECURSIVE k(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM k WHERE v < 60000) "
              "INSERT INTO big SELECT v, v % 7, randomblob(400) FROM k")
    c.execute("CREATE INDEX big_t ON big(t)")
    c.execute("CREATE TABLE small(id INTEGER PRIMARY KEY, v TEXT)")
    c.executemany("INSERT INTO small VALUES (?, ?)", [(i, f"v{i}") for i in range(200)])
    c.close()
    url = str(tmp / "repo")
    repo = Repository.open_or_init(url, None)
    backup(repo, open_source(str(src)), "shop", checksums=False)
    return Shop(repo, url, src)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(path)
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


def write_locked(live: Path) -> bool:
    """Another writer of ``live`` would be refused now (its write lock is held). Asked three times 10 ms apart:
    a connection taking a shared lock holds the PENDING byte for a moment (rollback journal), which refuses a
    writer too but is no write lock; a write transaction holds its lock across the read being watched."""
    conn = apsw.Connection(str(live))
    try:
        for _ in range(3):
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return False
            except apsw.BusyError:
                time.sleep(0.01)
        return True
    finally:
        conn.close()


class WatchedStore(PassThroughStore):
    """Counts the reads of packs (and those made while ``live`` is write-locked); ``fail_packs`` makes
    every pack read fail as a store that has given up does (its retry budget spent)."""

    def __init__(self, inner: Any, live: Path) -> None:
        super().__init__(inner)
        self.live = live
        self.fail_packs = False
        self.locked_reads = 0
        self.reads = 0

    def _watch(self, key: str) -> None:
        if not key.startswith("packs/"):
            return
        self.reads += 1
        if self.fail_packs:
            raise TransientError(f"get {key}: connection reset by peer (gave up after 5 attempts in 120 s)")
        if write_locked(self.live):
            self.locked_reads += 1

    def get(self, key: str) -> bytes:
        self._watch(key)
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._watch(key)
        return super().get_range(key, offset, length)


def watched(shop: Shop, live: Path) -> tuple[Repository, WatchedStore]:
    store = WatchedStore(shop.repo.store, live)
    return Repository(store, shop.repo.config, shop.repo.sealer, shop.repo.raw_config), store


def live_copy(shop: Shop, tmp: Path) -> Path:
    live = tmp / "live.db"
    shutil.copy(shop.src, live)
    return live


def no_locks(shop: Shop) -> bool:
    return not list(Path(shop.url, "locks").glob("*"))


# ------------------------------------------------------------------ the live write lock and the network


def test_restore_table_reads_no_repository_while_it_holds_the_live_write_lock(shop: Shop, tmp_path: Path) -> None:
    """Finding (medium): the copy read the table's pages from the repository inside BEGIN IMMEDIATE, so the
    application's writers waited on the network (27 ranged reads of ~24 MiB here; on S3 each can take the
    store's retry budget, 120 s). The rows are now staged from the past state into a temporary table
    first, and the write transaction reads local pages only."""
    live = live_copy(shop, tmp_path)
    repo, store = watched(shop, live)
    plan = plan_table_restore(repo, "shop", live, ["big"])
    planned = store.reads
    apply_table_restore(plan)
    assert store.reads > planned, "the apply read nothing: the test no longer exercises the copy"
    assert store.locked_reads == 0, f"{store.locked_reads} pack reads while the live database was write-locked"
    assert rows(live, "SELECT count(*), sum(t), sum(length(p)) FROM big_restored") == \
        rows(shop.src, "SELECT count(*), sum(t), sum(length(p)) FROM big")
    assert rows(live, "SELECT id, t, p FROM big_restored WHERE id IN (1, 30000, 60000) ORDER BY id") == \
        rows(shop.src, "SELECT id, t, p FROM big WHERE id IN (1, 30000, 60000) ORDER BY id")
    assert no_locks(shop)


def test_repair_rows_reads_no_repository_while_it_holds_the_live_write_lock(shop: Shop, tmp_path: Path) -> None:
    """Holds (guard): the rows a repair writes were read by its plan; the apply finds them in the state's
    cache and reads nothing from the repository under the live write lock."""
    live = live_copy(shop, tmp_path)
    c = sqlite3.connect(live, isolation_level=None)
    c.execute("DELETE FROM big WHERE id IN (5, 31000)")
    c.execute("UPDATE big SET p = x'00' WHERE id = 59000")
    c.close()
    repo, store = watched(shop, live)
    with plan_row_repair(repo, "shop", live, "big", "id IN (5, 31000, 59000)") as plan:
        assert plan.counts()["insert"] == 2 and plan.counts()["update"] == 1
        apply_row_repair(plan, safety=False)
    assert store.locked_reads == 0
    assert rows(live, "SELECT * FROM big WHERE id IN (5, 31000, 59000) ORDER BY id") == \
        rows(shop.src, "SELECT * FROM big WHERE id IN (5, 31000, 59000) ORDER BY id")


def test_a_store_that_gives_up_during_the_apply_is_one_line_and_changes_nothing(shop: Shop, tmp_path: Path) -> None:
    """Finding (low): a store error met while the apply read the past state came out as the store's bare
    message ("get packs/...: connection reset"), not saying which operation or that nothing was changed.
    It now reads "restore-table into LIVE: ...; rolled back, nothing was changed", keeps its class (a
    transient error may be retried: nothing was written), and the live file is byte-identical."""
    live = live_copy(shop, tmp_path)
    before, audits = sha(live), len(shop.repo.records("audits", "shop"))
    repo, store = watched(shop, live)
    plan = plan_table_restore(repo, "shop", live, ["big"])
    store.fail_packs = True  # every pack read from now on: the store has given up
    with pytest.raises(TransientError) as err:
        apply_table_restore(plan)
    message = err.value.message
    assert message.startswith(f"restore-table into {live}: get packs/") and \
        message.endswith("rolled back, nothing was changed"), message
    assert "\n" not in message and sha(live) == before and no_locks(shop)
    assert len(shop.repo.records("audits", "shop")) == audits


# ------------------------------------------------------------------ a plan that waited too long


def test_an_apply_after_the_lock_went_stale_refuses_and_says_plan_again(
        shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (low): a plan held across a pause longer than the lock's stale limit (a VM paused 20
    minutes) lets another host judge its shared lock stale and prune the packs it reads; the apply then
    either wrote from what it had cached or failed with "missing ...: restore the pack from the offsite
    copy", sending the operator after repository damage that is not there. The apply now checks the lock
    first and refuses with LockLostError ("plan again"); nothing is changed."""
    monkeypatch.setattr(lock_mod, "STALE_SECONDS", 3.0)
    monkeypatch.setattr(lock_mod, "SAFETY_SECONDS", 2.0)
    monkeypatch.setattr(lock_mod, "REFRESH_SECONDS", 600.0)  # the paused host refreshes nothing
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id < 5")
    before = sha(live)
    for make, apply in ((lambda: plan_row_repair(shop.repo, "shop", live, "small", "id < 10"), apply_row_repair),
                        (lambda: plan_table_restore(shop.repo, "shop", live, ["small"], mode="replace"),
                         apply_table_restore)):
        plan: Any = make()
        time.sleep(1.3)  # past stale - safety (1 s): another host may judge it stale soon
        with pytest.raises(LockLostError, match="plan again|nothing was changed"):
            apply(plan)
        assert sha(live) == before and no_locks(shop)


# ------------------------------------------------------------------ kill -9 in the write transaction

_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from dbre.repository.repo import Repository
from dbre.restore import table
original = table._restore_one

def stop_here(*args, **kwargs):
    original(*args, **kwargs)  # the rows are in the live file's pages (spilled past the cache) or its WAL
    Path({signal!r}).write_text("in the transaction")
    time.sleep(120)

table._restore_one = stop_here
repo = Repository.open({repo!r})
table.apply_table_restore(table.plan_table_restore(repo, "shop", {live!r}, ["big"]))
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_kill_9_in_the_write_transaction_leaves_the_live_database_as_before(
        shop: Shop, tmp_path: Path, journal: str) -> None:
    """Holds: a restore-table killed (SIGKILL) after it copied ~24 MiB of rows into the live file, inside its
    write transaction: the next opener finds the live database as before (rollback journal: the hot
    journal is rolled back; WAL: the uncommitted frames are ignored). The past state, attached read-only
    and immutable, and the staging database, only read in the transaction, add no super-journal."""
    import os
    import signal
    import subprocess
    import sys

    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute(f"PRAGMA journal_mode={journal}")
    before = rows(live, "SELECT type, name, sql FROM sqlite_schema ORDER BY name")
    counts = rows(live, "SELECT (SELECT count(*) FROM big), (SELECT sum(t) FROM big), (SELECT count(*) FROM small)")
    flag = tmp_path / "in-transaction"
    repo_copy = tmp_path / "repo"  # (the killed child leaves its lock object behind, as a crash does)
    shutil.copytree(shop.url, repo_copy)
    code = _CHILD.format(root=str(Path(__file__).parent.parent), signal=str(flag), repo=str(repo_copy),
                         live=str(live))
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the child never reached the write transaction"
            time.sleep(0.05)
        assert write_locked(live)
        if journal == "delete":  # the transaction's rows went into the file itself, its old pages to the journal
            assert Path(f"{live}-journal").stat().st_size > 0
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert rows(live, "PRAGMA integrity_check") == [("ok",)]
    assert rows(live, "SELECT type, name, sql FROM sqlite_schema ORDER BY name") == before
    assert rows(live, "SELECT (SELECT count(*) FROM big), (SELECT sum(t) FROM big), "
                      "(SELECT count(*) FROM small)") == counts
    assert not Path(f"{live}-journal").exists() or Path(f"{live}-journal").stat().st_size == 0


# ------------------------------------------------------------------ what an apply leaves behind


def test_nothing_is_left_registered_or_running_after_an_apply_or_a_failed_one(shop: Shop, tmp_path: Path) -> None:
    """Holds (guard): the state's VFS is unregistered, its reader threads and the lock's refresh thread
    stopped, no lock object left, no temp file named, after an apply and after one that failed."""
    import tempfile
    import threading

    def dbre_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith(("dbre-query", "dbre-lock"))]

    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id < 5")
    with plan_table_restore(shop.repo, "shop", live, ["small"]) as plan:
        assert [v for v in apsw.vfs_names() if v.startswith("dbre-query-")] and dbre_threads()
        apply_table_restore(plan)
    repo, store = watched(shop, live)
    plan = plan_row_repair(repo, "shop", live, "small", "id < 10")
    store.fail_packs = True
    plan.past.past.source._batches.clear()  # noqa: SLF001 - the apply must read again, and fails
    with pytest.raises(TransientError, match="nothing was changed"):
        apply_row_repair(plan, safety=False)
    assert not [v for v in apsw.vfs_names() if v.startswith("dbre-query-")]
    assert not dbre_threads() and no_locks(shop)
    assert {p for p in Path(tempfile.gettempdir()).iterdir() if "dbre" in p.name} <= temp_before


def test_restore_table_replace_writes_no_repository_while_it_holds_the_live_write_lock(
        shop: Shop, tmp_path: Path) -> None:
    """Finding (medium, older than the in-place change): restore-table --replace took its safety snapshot (a
    backup of the whole live file, uploaded to the repository) inside the live write transaction, so the
    application's writers waited on the upload. It is now taken before the write lock and kept when no
    other connection committed before BEGIN IMMEDIATE (PRAGMA data_version; see the next test)."""
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id < 5")
    repo, store = watched(shop, live)
    puts: list[str] = []
    inner_put = store.put

    def put(key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(("packs/", "snapshots/")) and write_locked(live):
            puts.append(key)
        inner_put(key, data, if_absent=if_absent)

    store.put = put  # type: ignore[method-assign]
    with plan_table_restore(repo, "shop", live, ["small"], mode="replace") as plan:
        result = apply_table_restore(plan)
    assert result.safety_snapshot
    assert puts == [], f"{len(puts)} repository writes while the live database was write-locked"


def test_a_commit_after_the_safety_snapshot_has_it_taken_again_under_the_lock(
        shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: when another connection commits between the safety snapshot taken before the write lock and the
    lock, the snapshot is taken again under the lock: the undo puts back what was replaced, the late commit
    included."""
    from dbre.restore import table

    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id < 5")
    taken: list[str] = []
    original = table.safety_snapshot

    def then_a_commit(*args: Any) -> str:
        taken.append(original(*args))
        if len(taken) == 1:  # an application's write, just after the first snapshot read the file
            conn = apsw.Connection(str(live))
            conn.execute("UPDATE small SET v = 'late' WHERE id = 100")
            conn.close()
        return taken[-1]

    monkeypatch.setattr(table, "safety_snapshot", then_a_commit)
    with plan_table_restore(shop.repo, "shop", live, ["small"], mode="replace") as plan:
        result = apply_table_restore(plan)
    assert len(taken) == 2 and result.safety_snapshot == taken[1]
    assert rows(live, "SELECT v FROM small WHERE id = 100") == [("v100",)]  # replaced from the snapshot
    with plan_table_restore(shop.repo, "shop", live, ["small"], snapshot=taken[1], mode="replace",
                            suffix="_undo") as undo:
        apply_table_restore(undo)
    assert rows(live, "SELECT v FROM small WHERE id = 100") == [("late",)]  # the undo has the late commit
    assert rows(live, "SELECT count(*) FROM small")[0][0] == 195


def test_repair_rows_reads_no_repository_under_the_live_write_lock_when_its_rows_left_the_cache(
        shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (low): a repair whose rows no longer sat in the state's cache (a selection larger than the
    64 MiB of batches it keeps; here the cache is made 1 MiB) read them again from the repository inside
    BEGIN IMMEDIATE. The rows to write are now staged into a private temporary database before the lock."""
    from dbre.restore import query

    monkeypatch.setitem(query.PastState.__init__.__kwdefaults__, "cache_bytes", 1 << 20)
    live = live_copy(shop, tmp_path)
    keys = [1, 9000, 21000, 33000, 45000, 59999]
    c = sqlite3.connect(live, isolation_level=None)
    c.execute(f"DELETE FROM big WHERE id IN ({', '.join(map(str, keys[:3]))})")
    c.execute(f"UPDATE big SET t = -1 WHERE id IN ({', '.join(map(str, keys[3:]))})")
    c.close()
    repo, store = watched(shop, live)
    where = f"id IN ({', '.join(map(str, keys))})"
    with plan_row_repair(repo, "shop", live, "big", where) as plan:
        assert plan.counts()["insert"] == 3 and plan.counts()["update"] == 3
        apply_row_repair(plan, safety=False)
    assert store.locked_reads == 0, f"{store.locked_reads} pack reads while the live database was write-locked"
    select = f"SELECT * FROM big WHERE {where} ORDER BY id"
    assert rows(live, select) == rows(shop.src, select)


def test_a_remote_repair_reads_no_repository_once_the_server_transaction_is_open(
        sqld: SqldServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Finding (low): against a libSQL server, the rows to write were read from the past state inside the
    server's interactive transaction (its write lock): rows that had left the state's cache meant network
    reads from the repository there (each up to the store's retry budget). They are now staged locally before
    the transaction opens: once it is open, every pack read fails, and the repair still succeeds."""
    import uuid

    from dbre.restore import query
    from dbre.restore import rows as rows_mod
    from dbre.sources.remote import RemoteLibsqlSource

    monkeypatch.setitem(query.PastState.__init__.__kwdefaults__, "cache_bytes", 1 << 16)
    t = "rv9_" + uuid.uuid4().hex[:8]
    sqld.pipeline([f"CREATE TABLE {t}(id INTEGER PRIMARY KEY, v TEXT, p BLOB)",  # ~6 MiB: several sealed batches
                   f"WITH RECURSIVE k(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM k WHERE v < 4000) "
                   f"INSERT INTO {t} SELECT v, 'v' || v, randomblob(1500) FROM k"])
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, RemoteLibsqlSource(sqld.url, cache_dir=tmp_path / "cache", method="dump"), "remote")
    original = [tuple(r) for r in sqld.execute(f"SELECT * FROM {t} ORDER BY id")]
    sqld.pipeline([f"DELETE FROM {t} WHERE id IN (3, 1500, 3900)", f"UPDATE {t} SET v = 'x' WHERE id IN (700, 2600)"])
    store = WatchedStore(repo.store, tmp_path / "unused.db")
    counted = Repository(store, repo.config, repo.sealer, repo.raw_config)
    in_tx: list[int] = []

    class Watched(rows_mod.RemoteDb):
        def __init__(self, target: Any, label: str) -> None:
            super().__init__(target, label)
            if hasattr(target, "commit"):  # a transaction: from now on the server holds its write lock
                in_tx.append(store.reads)
                store.fail_packs = True  # a read the transaction waits on fails it (a read-ahead's is dropped)

    monkeypatch.setattr(rows_mod, "RemoteDb", Watched)
    audit = rows_mod.write_audit

    def after_the_commit(*args: Any) -> str:
        store.fail_packs = False  # (the audit record is written to the repository after the commit)
        return audit(*args)

    monkeypatch.setattr(rows_mod, "write_audit", after_the_commit)
    with plan_row_repair(counted, "remote", sqld.url, t, "id IN (3, 700, 1500, 2600, 3900)") as plan:
        assert plan.counts()["insert"] == 3 and plan.counts()["update"] == 2
        apply_row_repair(plan)
    assert in_tx, "no server transaction was seen"
    assert [tuple(r) for r in sqld.execute(f"SELECT * FROM {t} ORDER BY id")] == original
