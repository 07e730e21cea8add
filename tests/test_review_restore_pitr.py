"""Cold review of restore without per-page objects, point-in-time restore from segments, and FileMap.

Each reproduced finding is an xfail(strict=True) test: it fails today for the reason given and
will pass once fixed. Replicators run in-process (threads) on small WAL databases to keep the file
short; the tamper, oracle and crash suites already cover the long-running paths.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import dbre.replicate.segment as segment_mod
from dbre.errors import DbreError
from dbre.replicate.check import verify_segments
from dbre.replicate.segment import list_generations, open_segment, read_base, to_time
from dbre.replicate.shipper import Replicator
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.pitr import apply_pitr, plan_pitr
from tests.replication import make_source, restore_at, restored_seq
from tests.replication import replicating as shared_replicating

BASE_ROWS = 50


def LATER() -> datetime:  # noqa: N802 - a time after every commit of these tests
    return datetime.now(UTC) + timedelta(hours=2)


def replicating(repo: Repository, src: Path, interval: float = 0.3) -> AbstractContextManager[None]:
    """tests.replication.replicating of database "app" at this file's default interval."""
    return shared_replicating(repo, src, "app", interval)


def commit(conn: sqlite3.Connection, seq: int, pad: int = 300) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(?))", (seq, pad))
    conn.execute("UPDATE counter SET n = ?", (seq,))
    conn.execute("COMMIT")


def transactions(repo: Repository, gen_id: str) -> list[tuple[str, int, int]]:
    """(segment key, txid, observed µs) of every transaction of a generation, chain-checked."""
    base = read_base(repo, "app", gen_id)
    state = bytes.fromhex(base.state)
    out = []
    for name in list_generations(repo, "app")[gen_id]:
        seg = open_segment(repo, name, state)
        state = seg.state_after
        out.extend((name.key, tx.txid, tx.observed_us) for tx in seg.transactions)
    return out


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, Path]:
    """A local repository with one generation of a few segments (rows BASE_ROWS+1..BASE_ROWS+6)."""
    tmp = tmp_path_factory.mktemp("review_pitr")
    src = tmp / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        for seq in range(BASE_ROWS + 1, BASE_ROWS + 7):
            commit(conn, seq)
            time.sleep(0.2)
    conn.close()
    return repo, tmp


# --------------------------------------------------------------------------- finding 1


# review finding 1 (fixed): a resumed replicator's stamps start from the last segment's; times checked across segments
def test_resumed_replicator_with_clock_behind_keeps_restore_at_exact(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)  # kept open: no checkpoint-on-close between runs
    with replicating(repo, src, interval=1.0):
        for seq in range(BASE_ROWS + 1, BASE_ROWS + 5):  # a segment of several transactions
            commit(conn, seq)
            time.sleep(0.08)
    # the same database replicated again after a restart on a host (or after a clock step) 1 h behind
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 3600 * 10**9)
    with replicating(repo, src, interval=1.0):
        commit(conn, BASE_ROWS + 5)
        commit(conn, BASE_ROWS + 6)
    monkeypatch.undo()
    conn.close()
    gens = list_generations(repo, "app")
    assert len(gens) == 1, "the second run resumed the generation"
    txs = transactions(repo, next(iter(gens)))
    first_run = [t for t in txs if t[1] <= txs[0][1] + 3]
    # T: the second transaction of the first run's last segment (its later ones are after T)
    last_key = first_run[-1][0]
    in_last = [t for t in first_run if t[0] == last_key]
    assert len(in_last) >= 2 and in_last[0][2] < in_last[-1][2]
    t_obs = in_last[0][2]
    expected = BASE_ROWS + 4 - (len(in_last) - 1)  # rows up to that transaction
    out = tmp_path / "at.db"
    restore_at(repo, "app", to_time(t_obs), out)
    count, top, n = restored_seq(out)
    assert (count, top, n) == (expected, expected, expected), (count, top, n)


# --------------------------------------------------------------------------- finding 2


def _live_wal_db(path: Path) -> sqlite3.Connection:
    """An application's database at ``path``: WAL mode, a commit still only in its -wal, held open."""
    app = sqlite3.connect(path, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA wal_autocheckpoint=0")
    app.execute("CREATE TABLE precious(x)")
    app.execute("INSERT INTO precious VALUES ('do not lose me')")
    return app


# review finding 2 (fixed): restore --at without --force replaced a database created at the target after planning
def test_pitr_without_force_never_replaces_a_target_created_after_planning(
        replicated: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, _ = replicated
    target = tmp_path / "app.db"
    plan = plan_pitr(repo, "app", target, at=LATER())
    assert plan is not None
    app = _live_wal_db(target)  # e.g. the application started and created a fresh database there
    try:
        with pytest.raises(DbreError):
            apply_pitr(repo, plan)
        assert app.execute("SELECT x FROM precious").fetchall() == [("do not lose me",)]
    finally:
        app.close()


# review finding 2 (fixed): the same for a snapshot restore (now a hard link, which fails if the name exists)
def test_restore_without_force_never_replaces_a_target_created_after_planning(
        replicated: tuple[Repository, Path], tmp_path: Path) -> None:
    repo, _ = replicated
    target = tmp_path / "app.db"
    plan = plan_restore(repo, "app", target)
    app = _live_wal_db(target)
    try:
        with pytest.raises(DbreError):
            apply_restore(repo, plan)
        assert app.execute("SELECT x FROM precious").fetchall() == [("do not lose me",)]
    finally:
        app.close()


# --------------------------------------------------------------------------- finding 3

_KILLED_PITR = r"""
import os, signal, sys
from datetime import datetime
import dbre.restore.pitr as pitr
from dbre.repository.repo import Repository
from tests.replication import restore_at

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

pitr._write_pages = die  # kill -9 while the segments are applied over the scratch copy
restore_at(Repository.open(sys.argv[1]), "app", datetime.fromisoformat(sys.argv[2]), sys.argv[3])
"""


# review finding 3 (fixed): the flocked PITR scratch copy is removed by the next restore once its writer died
def test_killed_pitr_scratch_file_is_removed_by_the_next_restore(replicated: tuple[Repository, Path],
                                                                  tmp_path: Path) -> None:
    repo, repo_dir = replicated
    target = tmp_path / "app.db"
    at = LATER().isoformat()
    proc = subprocess.run([sys.executable, "-c", _KILLED_PITR, str(repo_dir / "repo"), at, str(target)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.dbre-")]
    assert left, "the kill left a scratch file (precondition)"
    restore_at(repo, "app", LATER(), target)  # the operator retries: succeeds
    assert restored_seq(target)[1] == BASE_ROWS + 6
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.dbre-")]
    assert left == [], left


# --------------------------------------------------------------------------- finding 4


# review finding 4 (fixed): a transaction past SEGMENT_CAP is split into parts that restore applies whole
def test_a_transaction_larger_than_the_segment_cap_stays_restorable(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_mod, "SEGMENT_CAP", 256 * 1024)
    src = tmp_path / "src.db"
    make_source(src, 3000)  # ~1 MB: the big transaction is under VACUUM_SHARE of it
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        commit(conn, 3001, pad=400 * 1024)  # ~100 pages in one transaction: one 400 KiB segment
        time.sleep(0.5)
        commit(conn, 3002)
    conn.close()
    checked, problems = verify_segments(repo, "app")
    out = tmp_path / "after.db"
    restore_at(repo, "app", LATER(), out)
    assert restored_seq(out)[1] == 3002
    assert problems == [], problems
    parts = [k for k in repo.store.list("segments/app/") if k.rsplit(".", 1)[-1].isdigit()]
    assert parts, "the big transaction's segment was stored in parts"
    assert all(len((tmp_path / "repo" / k).read_bytes()) <= 256 * 1024 for k in repo.store.list("segments/app/"))
    (tmp_path / "repo" / parts[-1]).unlink()  # a lost part: refused with one line naming it
    with pytest.raises(DbreError, match=f"{parts[-1]}: part .* is missing"):
        restore_at(repo, "app", LATER(), tmp_path / "lost.db")


# --------------------------------------------------------------------------- finding 5


# review finding 5 (fixed): a snapshot newer than what the segments observed by T is restored instead
def test_restore_at_never_misses_commits_a_snapshot_saw_before_t(tmp_path: Path) -> None:
    from dbre.repository.backup import backup
    from dbre.sources.local import LocalFileSource

    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)  # kept open: the WAL continues between the runs
    with replicating(repo, src):
        commit(conn, BASE_ROWS + 1)
    for seq in range(BASE_ROWS + 2, BASE_ROWS + 5):  # replicate is down (a deploy, a crash)
        commit(conn, seq)
    backup(repo, LocalFileSource(src), "app")  # the nightly snapshot holds them
    time.sleep(0.3)
    at = datetime.now(UTC)
    time.sleep(0.3)
    with replicating(repo, src):  # replicate comes back and resumes the generation
        commit(conn, BASE_ROWS + 5)
    conn.close()
    assert len(list_generations(repo, "app")) == 1, "resumed, same generation"
    out = tmp_path / "at.db"
    restore_at(repo, "app", at, out)
    assert restored_seq(out)[2] == BASE_ROWS + 4


# --------------------------------------------------------------------------- finding 6

_DAEMON_READER = r"""
import hashlib, os, sys, threading, time
from dbre.sources.filemap import FileMap
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(os.urandom(1 << 20) * 32)
fd = os.open(path, os.O_RDONLY)
view = FileMap(fd, 32 << 20).view()

def hash_pages():  # as the replicator's daemon snapshot worker hashes mapped pages
    while True:
        hashlib.sha256(view).digest()

threading.Thread(target=hash_pages, daemon=True).start()
time.sleep(0.3)
sys.exit(3)  # the main thread fails (e.g. _poll raises while the snapshot worker runs)
"""


# review finding 6 (fixed): FileMap's finalizer no longer unmaps at interpreter exit under a live view
def test_filemap_is_not_unmapped_under_a_live_view_at_exit(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _DAEMON_READER, str(tmp_path / "big")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-500:])


# --------------------------------------------------------------------------- finding 7


# review finding 7 (fixed): a damaged newest generation makes replicate start a new one, with a warning
def test_replicate_starts_again_after_a_lost_segment(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src, interval=0.2):
        for seq in range(BASE_ROWS + 1, BASE_ROWS + 4):
            commit(conn, seq)
            time.sleep(0.6)  # one segment each
    (names,) = list_generations(repo, "app").values()
    assert len(names) >= 3
    (tmp_path / "repo" / names[1].key).unlink()  # a segment lost (an operator, a lifecycle rule, bit rot)
    errors: list[BaseException] = []
    stop = threading.Event()
    rep = Replicator(repo, src, "app", 0.2)

    def run() -> None:
        try:
            rep.run(stop)
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(1.5)
    commit(conn, BASE_ROWS + 4)
    time.sleep(1.0)
    stop.set()
    thread.join(60)
    conn.close()
    assert errors == [], errors
    out = tmp_path / "now.db"
    restore_at(repo, "app", LATER(), out)
    assert restored_seq(out)[2] == BASE_ROWS + 4


# --------------------------------------------------------------------------- finding 8


# review finding 8 (fixed): restore --at refuses a generation whose base is lost, naming it (as verify does)
def test_restore_at_refuses_when_the_newest_generation_base_is_lost(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        commit(conn, BASE_ROWS + 1)
    conn.close()  # the last connection: checkpoint and -wal deleted; the next run starts a generation
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        time.sleep(0.5)
        commit(conn, BASE_ROWS + 2)
        time.sleep(0.5)
        commit(conn, BASE_ROWS + 3)
    conn.close()
    gens = list(list_generations(repo, "app"))
    assert len(gens) == 2, gens
    (tmp_path / "repo" / f"segments/app/{gens[-1]}/base").unlink()
    _, problems = verify_segments(repo, "app")
    assert problems, "verify flags the generation"
    out = tmp_path / "later.db"
    with pytest.raises(DbreError, match=f"segments/app/{gens[-1]}/base is missing") as refused:
        restore_at(repo, "app", LATER(), out)  # refused: agrees with verify
    assert "restore --at a time before" in (refused.value.hint or "")
    restore_at(repo, "app", to_time(int(gens[-1][:16], 16) - 1), out)  # the way out it names
    assert restored_seq(out)[2] == BASE_ROWS + 1


def test_observation_times_going_back_across_segments_are_refused(replicated: tuple[Repository, Path],
                                                                  tmp_path: Path) -> None:
    """Finding 1's invariant: a generation whose segments' times go back (one stored by a resumed
    replicator whose clock was behind) is refused like a chain break, by restore and verify."""
    from dataclasses import replace

    from dbre.errors import IntegrityError
    from dbre.replicate.segment import check_contiguous

    repo, repo_dir = replicated
    (gen_id, names), = list_generations(repo, "app").items()
    gen = read_base(repo, "app", gen_id)
    assert len(names) >= 2
    assert check_contiguous("app", gen, names) == names
    back = [*names[:-1], replace(names[-1], first_us=names[-2].last_us - 1)]
    with pytest.raises(IntegrityError, match="observation times go back"):
        check_contiguous("app", gen, back)
    # stored: the last segment stamped before the first one's end; a restore at a time before it
    # (which would apply a prefix, then miss or misplace it) is refused from the names alone
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(repo_dir / "repo", copy)
    moved = replace(names[-1], first_us=names[0].first_us, last_us=names[0].first_us)
    (copy / names[-1].key).rename(copy / moved.key)
    with pytest.raises(IntegrityError, match="observation times go back"):
        plan_pitr(Repository.open(str(copy)), "app", tmp_path / "out.db", at=to_time(names[0].last_us))


# --------------------------------------------------------------------------- finding 9


# review finding 9 (fixed): segment read-ahead is bounded by bytes; the first segment is fetched alone
def test_planted_segments_do_not_multiply_restore_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    from dbre.errors import IntegrityError

    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src, interval=0.05):
        for seq in range(BASE_ROWS + 1, BASE_ROWS + 19):
            commit(conn, seq)
            time.sleep(0.15)
    conn.close()
    (names,) = list_generations(repo, "app").values()
    assert len(names) >= 17, len(names)
    cap = 1024 * 1024
    monkeypatch.setattr(segment_mod, "SEGMENT_CAP", cap)
    junk = os.urandom(cap)
    for name in names:  # an attacker with write access, no key
        (tmp_path / "repo" / name.key).write_bytes(junk)
    plan = plan_pitr(repo, "app", tmp_path / "out.db", at=LATER())
    assert plan is not None
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            apply_pitr(repo, plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap, f"{peak / cap:.1f} x SEGMENT_CAP held to refuse one planted segment"


# --------------------------------------------------------------------------- properties that hold


def test_restore_at_exact_per_transaction_and_txid(replicated: tuple[Repository, Path], tmp_path: Path) -> None:
    """Pinned: at every transaction's own stamp, and one µs before it, restore --at holds exactly the
    prefix; --txid N holds N transactions; the result comes from segments (a plan), not a snapshot."""
    repo, _ = replicated
    (gen_id,) = list_generations(repo, "app")
    txs = transactions(repo, gen_id)
    base_txid = read_base(repo, "app", gen_id).base_txid
    for i, (_, txid, obs) in enumerate(txs):
        if i + 1 < len(txs) and txs[i + 1][2] == obs:
            continue  # two commits read in one poll share a stamp
        seq = BASE_ROWS + txid - base_txid
        out = tmp_path / f"at-{txid}.db"
        plan = plan_pitr(repo, "app", out, at=to_time(obs))
        assert plan is not None
        apply_pitr(repo, plan)
        assert restored_seq(out) == (seq, seq, seq)
        out = tmp_path / f"txid-{txid}.db"
        apply_pitr(repo, plan_pitr(repo, "app", out, txid=txid))
        assert restored_seq(out) == (seq, seq, seq)
    leftovers = [p.name for p in tmp_path.iterdir() if ".dbre-" in p.name]
    assert leftovers == []


def test_filemap_view_outlives_map_and_session(tmp_path: Path) -> None:
    """Pinned: a view keeps its memory mapped after the FileMap and its descriptor are gone (no
    use-after-unmap), and the descriptor is not dup()ed (closing it keeps the map valid)."""
    import gc

    from dbre.sources.filemap import FileMap

    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192 + b"y" * 8192)
    fd = os.open(path, os.O_RDONLY)
    before = len(os.listdir("/proc/self/fd"))
    m = FileMap(fd, 16384)
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(fd)
    view = m.view()
    page = view[8192:12288]
    del m, view
    gc.collect()
    assert bytes(page[:4]) == b"yyyy"

