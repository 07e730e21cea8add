"""Review of 086d387 (``leases/<db>/stopped``, the clean stop's WAL position read by `dbre status`).

Pins what was checked (the marker is no lease for any listing; a hostile or damaged marker only
costs the optimisation; a failed marker put changes neither the exit code nor the release) and
shows two findings:

- a WAL position of all zeros (a wal-index rebuilt over an empty WAL: what every source shows once
  all its connections closed, which checkpoints the commits into the file and deletes -wal and
  -shm, and one opened it again) matches every later state of the same file: a base and a clean
  stop's marker recorded there make status report lag 0 with commits unshipped;
- the marker's put comes before the lease's release and is bounded by no shutdown budget: a slow
  put pushes a clean stop past the CLI's hard stop (exit 1, lease left behind).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from dbre.metrics import _followed, replication_lag
from dbre.replicate.lease import _epochs, lease_keys, live_generation, live_leases, stopped_key
from dbre.replicate.segment import list_generations
from dbre.repository.repo import Repository
from dbre.storage.local import LocalStore
from tests.replication import make_source, replicating, stop_replicator, wait_for_generation
from tests.test_replicate_status import RPO, _lags, _replicating, _truncated

# -- 2. listings of leases/ ------------------------------------------------------------------------


def _store(tmp_path: Path) -> LocalStore:
    return Repository.open_or_init(str(tmp_path / "repo")).store  # type: ignore[return-value]


def test_the_marker_is_no_lease_for_any_listing(tmp_path: Path) -> None:
    """``stopped`` parses as no epoch: acquisition, live_leases, live_generation and status's
    heartbeat all pass over it, fresh as it is; only _followed reads it."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    store = repo.store
    store.put(stopped_key("app"), json.dumps({"generation": "g", "wal": {"salt": "00" * 8, "frame": 0}}).encode())
    assert _epochs(store, "app") == []
    now = time.time() + 1
    assert live_leases(store, "app", now) == [] and live_generation(store, "app", now) is None
    assert lease_keys(store, "app") == []
    store.put("leases/app/0000000000000003", b"{}")
    assert _epochs(store, "app") == [3] and lease_keys(store, "app") == ["leases/app/0000000000000003"]


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b"\xff\xfe", b"{\"generation\": \"g\", \"wal\": []}",
                                 b"{\"generation\": \"g\", \"wal\": {\"salt\": \"zz\"}}",
                                 b"{\"generation\": 1, \"wal\": {}}", b"x" * (2 << 20)])
def test_a_damaged_or_hostile_marker_records_nothing(tmp_path: Path, raw: bytes) -> None:
    store = _store(tmp_path)
    store.put(stopped_key("app"), raw)
    assert _followed(SimpleNamespace(store=store), "app", "g", []) == []  # type: ignore[arg-type]


# -- 3. a failed or slow put at the stop ---------------------------------------------------------


def test_a_failed_marker_put_keeps_the_release_and_the_clean_return(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full (or the store refusing) for the marker alone: run() still returns (no error), the
    lease is released, no marker is left."""
    src = tmp_path / "app.db"
    make_source(src, 50)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    put = LocalStore.put

    def failing(self: LocalStore, key: str, data: bytes, **kw: object) -> None:
        if key == stopped_key("app"):
            raise OSError(28, "No space left on device")
        put(self, key, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalStore, "put", failing)
    with replicating(repo, src):  # (raises what run() raised)
        con = sqlite3.connect(src, isolation_level=None)
        con.execute("INSERT INTO t(seq, pad) VALUES (1000, x'00')")
        con.close()
    assert list(repo.store.list("leases/app/")) == []


def test_a_slow_marker_put_turns_a_clean_stop_into_a_hard_exit(tmp_path: Path) -> None:
    """FINDING, fixed (the put is now waited for 2 s at most): the marker was put after the drain
    and before the release, with no bound of its own (RetryingStore allows 120 s): a put slower
    than what is left of the CLI's hard stop made a stop that shipped everything exit 1 ("without
    waiting for what was being shipped") and left the lease behind.
    Here the hard stop is 3 s and the marker's put takes 6 s."""
    src = tmp_path / "app.db"
    make_source(src, 50)
    repo_url = str(tmp_path / "repo")
    code = (
        "import time\n"
        "from dbre.storage import local\n"
        "orig = local.LocalStore.put\n"
        "def put(self, key, data, **kw):\n"
        "    if key.endswith('/stopped'):\n"
        "        time.sleep(6)\n"
        "    return orig(self, key, data, **kw)\n"
        "local.LocalStore.put = put\n"
        "from dbre.cli import main; main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, "replicate", str(src), "--repo", repo_url, "--db", "app",
                             "--interval", "200ms", "-q"], stderr=subprocess.PIPE,
                            env={**os.environ, "DBRE_REPLICATE_HARD_STOP": "3"})
    wait_for_generation(repo_url, "app", timeout=40, proc=proc)
    time.sleep(1.0)
    rc, err = stop_replicator(proc)
    leases = list(Repository.open(repo_url).store.list("leases/app/"))
    assert rc == 0 and leases in ([], [stopped_key("app")]), (rc, err, leases)


# -- 1. positions that match states they do not describe ----------------------------------------


def test_an_all_zero_position_hides_commits_checkpointed_on_close(tmp_path: Path) -> None:
    """FINDING, fixed (pre-existing in the base comparison; the marker records the same position and
    carries it past the stop): a replicator started on a source whose connections had all closed
    reads the wal-index rebuilt over an empty WAL, salt 0, frame 0, checksum 0. It stops with
    nothing committed: the generation has no segment, the base and the marker say (0, 0, 0). Then
    the application commits and closes (the commits go into the file; -wal and -shm are deleted),
    and opens the database again: the new wal-index says (0, 0, 0) again, whatever the file holds.
    Status must report the lag; it reports 0."""
    repo_url, (a, _, _), policy, rep = _replicating(tmp_path, 100)
    try:
        for db in ("alpha", "beta"):
            wait_for_generation(repo_url, db, timeout=40, proc=rep)
        time.sleep(0.5)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    repo = Repository.open(repo_url)
    assert not repo.store.exists(stopped_key("alpha"))  # (fixed: no record at salts of zeros)
    (gen_id, names), = list_generations(repo, "alpha").items()
    assert names == []  # no segment: nothing was committed while it ran
    con = sqlite3.connect(a, isolation_level=None)  # the application: 50 commits, then it closes
    for i in range(50):
        con.execute("INSERT INTO t(seq, pad) VALUES (?, x'00')", (5000 + i,))
    con.close()
    assert not os.path.exists(f"{a}-wal")  # checkpointed into the file on close
    app = sqlite3.connect(a, isolation_level=None)  # ... and opened again, idle
    try:
        assert app.execute("SELECT count(*) FROM t WHERE seq >= 5000").fetchone()[0] == 50
        time.sleep(RPO + 1)
        lags, alerts, _ = _lags(policy, repo_url)
        lag = replication_lag(repo, "alpha", datetime.now(UTC), str(a))
        assert lag is not None and lag.seconds > RPO, lag
        assert "replication_lag alpha" in alerts, (lags, alerts)
    finally:
        app.close()


def test_a_wal_restarted_after_the_stop_is_not_the_marker(tmp_path: Path) -> None:
    """Pins the stale-marker case that works: the marker records a WAL emptied by TRUNCATE; after
    the stop the application, its connection held open (so -wal and -shm stay), commits and truncates
    again: new salts, and status reports the lag."""
    repo_url, (a, _, _), policy, rep = _replicating(tmp_path, 100)
    app = None
    try:
        wait_for_generation(repo_url, "alpha", timeout=40, proc=rep)
        app = sqlite3.connect(a, isolation_level=None)
        for i in range(5):
            app.execute("INSERT INTO t(seq, pad) VALUES (?, x'00')", (1000 + i,))
        time.sleep(1.0)
        _truncated(a)
        time.sleep(0.5)
    finally:
        code, err = stop_replicator(rep)
    try:
        assert code == 0, err
        marker = json.loads(Repository.open(repo_url).store.get(stopped_key("alpha")))
        assert marker["wal"]["frame"] == 0 and marker["wal"]["salt"] != "00" * 8, marker
        assert app is not None
        app.execute("INSERT INTO t(seq, pad) VALUES (7000, x'00')")
        assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        time.sleep(RPO + 1)
        lags, alerts, _ = _lags(policy, repo_url)
        assert "replication_lag alpha" in alerts and lags["alpha"] is not None and lags["alpha"] > RPO, \
            (lags, alerts)
    finally:
        if app is not None:
            app.close()


def test_a_holder_whose_lease_was_found_lost_records_no_stop(tmp_path: Path) -> None:
    """FINDING 3, fixed: a replicator paused until another took its lease over, then stopped with
    nothing pending, writes no record over the newer replicator's (a false alert at worst, but the
    record is not its to write)."""
    from dbre.replicate.lease import Lease

    store = _store(tmp_path)
    lease = Lease(store, "app", None)  # type: ignore[arg-type]  # (the lock only judges other leases' age)
    lease._lost = True
    lease.stopped("g", {"salt": "11" * 8, "frame": 3, "cksum": "22" * 8}, within=1.0)
    assert not store.exists(stopped_key("app"))
    lease._lost = False
    lease.stopped("g", {"salt": "11" * 8, "frame": 3, "cksum": "22" * 8}, within=5.0)
    assert json.loads(store.get(stopped_key("app")))["generation"] == "g"
