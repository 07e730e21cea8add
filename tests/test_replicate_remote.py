"""`dbre replicate libsql://...` against a real sqld: an embedded replica synced every interval, shipped as
segments; restores at times hold exactly what the syncs had brought; errors are one line, no token shown."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dbre.repository.repo import Repository
from tests.replication import (
    PRECISION,
    Commit,
    check_chains,
    check_exact,
    dbre_cmd,
    observed_times,
    restore_at,
    restored_seq,
    utc,
    wait_for_generation,
)
from tests.sqld import SqldServer, free_port, start_sqld

INTERVAL = 0.5


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SqldServer]:
    """A sqld of this test's own that requires a JWT (``.token``), with the writer's tables."""
    with start_sqld(tmp_path / "sqld", jwt=True) as srv:
        srv.pipeline(["CREATE TABLE t(seq INTEGER PRIMARY KEY, pad BLOB)", "CREATE TABLE counter(n INTEGER)",
                      "INSERT INTO counter VALUES (0)"])
        yield srv


class Writer:
    """Commits numbered transactions through sqld's HTTP API (row seq, counter = seq), ``rate`` a second,
    logging when each began and when its COMMIT returned."""

    def __init__(self, srv: SqldServer, rate: float = 50.0) -> None:
        self.srv, self.rate = srv, rate
        self.commits: list[Commit] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                before = time.time()
                self.srv.pipeline(["BEGIN", ("INSERT INTO t VALUES (?, randomblob(?))", [seq, random.randint(50, 600)]),
                                   ("UPDATE counter SET n = ?", [seq]), "COMMIT"])
                self.commits.append(Commit(seq, before, time.time()))
                self.stop.wait(max(0.0, 1 / self.rate - (time.time() - before)))
        except BaseException as err:  # noqa: BLE001 - the test asserts none
            self.error = err

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def start(url: str, repo: Path, *extra: str, token: str | None = None, out: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LIBSQL_AUTH_TOKEN", "TURSO_AUTH_TOKEN")}
    if token is not None:
        environ["LIBSQL_AUTH_TOKEN"] = token
    sink = open(out, "ab") if out else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(dbre_cmd("replicate", *([url] if url else []), "--repo", str(repo), *extra),
                            stdout=sink, stderr=subprocess.PIPE, env={**environ, **(env or {})})


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every `dbre replicate` a test starts, stopped on every path."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            stop(p, signal.SIGKILL)


def longest_sync(stderr: str) -> float:
    m = re.search(r"syncs \(median [\d.]+ s, longest ([\d.]+) s\)", stderr)
    assert m, stderr
    return float(m.group(1))


def test_remote_source_replicates_to_the_commit(server: SqldServer, tmp_path: Path,
                                                procs: list[subprocess.Popen[bytes]]) -> None:
    """A writer commits on sqld at 50/s while `dbre replicate` of its URL runs: the newest state holds every
    commit that returned before SIGTERM (one last sync at stop); a restore at any time holds exactly the
    commits the replicator had read from the replica's syncs by then (a prefix), and every commit that
    returned more than interval + the longest sync + the observation precision (and a scheduling
    allowance) before it."""
    repo = tmp_path / "repo"
    assert server.token
    proc = start(server.url.replace("http://", "libsql://") + "?tls=0", repo, "--db", "app", "--interval", "500ms",
                 "--state-dir", str(tmp_path / "state"), "-q", token=server.token)
    procs.append(proc)
    wait_for_generation(str(repo), "app", proc=proc)
    with Writer(server) as writer:
        time.sleep(8)
        stop_at = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # commits on after the signal: they may or may not be shipped
    code, err = stop(proc, 0)  # (one signal: a second one means "stop now", exit 1, and a loaded machine sent it)
    assert writer.error is None
    assert code == 0, err
    assert server.token not in err
    commits = writer.commits
    assert len(commits) > 200
    slowest = longest_sync(err)

    r = Repository.open(str(repo))
    assert len(check_chains(r, "app")) == 1
    newest = tmp_path / "newest.db"
    restore_at(r, "app", utc(time.time()), newest)
    count, top, n = restored_seq(newest)
    assert count == top == n
    assert top >= max(c.seq for c in commits if c.after < stop_at), "the last sync at stop shipped all before it"

    # every transaction is one server commit, stamped when the replicator read it from the replica
    observed = observed_times(r, 0, "app")
    assert set(observed) == set(range(1, top + 1))
    by_seq = {c.seq: c for c in commits}
    # (a sync can bring a commit before its HTTP answer reaches the writer: the bound is when it began)
    assert all(observed[q] >= by_seq[q].before for q in observed), "seen before its commit began"
    # the sync after a commit starts within an interval and takes at most the slowest; then a poll reads
    # it (the replicator's PRECISION), plus as much again for scheduling on this loaded 2-core machine
    bound = INTERVAL + slowest + 2 * PRECISION
    first, last = min(observed.values()), max(observed.values())  # (before the first: no row, no max)
    for i, at in enumerate(sorted(random.uniform(first, last) for _ in range(5))):
        to = tmp_path / f"at{i}.db"
        restore_at(r, "app", utc(at), to)
        got = check_exact(to, commits, observed, at, 0)
        must = max([c.seq for c in commits if c.after <= at - bound], default=0)
        assert got >= must, f"at {at:.3f}: restored up to {got}, but {must} returned {bound:.2f} s before"


def test_wrong_token_is_one_line_and_exit_1(server: SqldServer, tmp_path: Path,
                                            procs: list[subprocess.Popen[bytes]]) -> None:
    secret = "not-the-token-" + "x" * 20
    for token, says in ((secret, "refused the token"), (None, "requires a token")):
        proc = start(server.url, tmp_path / "repo", "--db", "app", "--state-dir", str(tmp_path / "state"),
                     token=token)
        procs.append(proc)
        proc.wait(60)
        code, err = stop(proc, 0)
        lines = err.strip().splitlines()
        assert code == 1, err
        assert len(lines) == 1 and says in lines[0] and "LIBSQL_AUTH_TOKEN" in lines[0], err
        assert secret not in err
    assert not (tmp_path / "repo").exists(), "nothing created for a refused token"


def test_unreachable_server_is_a_clear_error(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    proc = start(f"http://127.0.0.1:{free_port()}", tmp_path / "repo", "--db", "app", "--state-dir",
                 str(tmp_path / "state"))
    procs.append(proc)
    proc.wait(60)
    code, err = stop(proc, 0)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0], err
    assert not (tmp_path / "repo").exists()


def test_server_gone_mid_run_stops_with_the_cause(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Syncs failing for DBRE_REPLICATE_SYNC_STALL seconds in a row stop the run: exit 1, the cause."""
    with start_sqld(tmp_path / "sqld") as srv:
        srv.execute("CREATE TABLE t(x)")
        proc = start(srv.url, tmp_path / "repo", "--db", "app", "--state-dir", str(tmp_path / "state"), "-q",
                     env={"DBRE_REPLICATE_SYNC_STALL": "2"})
        procs.append(proc)
        wait_for_generation(str(tmp_path / "repo"), "app", proc=proc)
        srv.execute("INSERT INTO t VALUES (1)")
        time.sleep(1.5)
    t0 = time.time()
    proc.wait(60)
    code, err = stop(proc, 0)
    assert code == 1, err
    assert "syncs failed for" in err and "cannot reach the server" in err, err
    assert time.time() - t0 < 30
    r = Repository.open(str(tmp_path / "repo"))
    to = tmp_path / "r.db"
    restore_at(r, "app", utc(time.time()), to)
    import sqlite3

    assert sqlite3.connect(to).execute("SELECT count(*) FROM t").fetchone() == (1,), "shipped before the stop"


def test_policy_replicates_a_remote_database_and_resumes(server: SqldServer, tmp_path: Path,
                                                          procs: list[subprocess.Popen[bytes]]) -> None:
    """A policy database whose source is remote and marked `replicate: true` is replicated (its token from
    auth_token: env:VAR); a second run, after a kill -9, continues the same generation (the replica kept
    in the cache); a namespace is refused (exit 2)."""
    repo = tmp_path / "repo"
    pol = tmp_path / "dbre.yaml"
    pol.write_text(yaml.safe_dump({
        "repositories": {"primary": str(repo)},
        "databases": [{"name": "remote", "source": server.url, "auth_token": "env:APP_TOKEN", "rpo": "5s",
                       "rto": "15m", "replicate": True}],
        "retention": {"keep_last": 5},
    }))
    env = {"APP_TOKEN": server.token or "", "DBRE_CACHE_DIR": str(tmp_path / "cache")}
    total = 0
    for _run in range(2):
        proc = start("", repo, "--policy", str(pol), "-q", env=env)
        procs.append(proc)
        wait_for_generation(str(repo), "remote", proc=proc)
        before = len(list(Repository.open(str(repo)).store.list("segments/remote/")))
        server.pipeline([("INSERT INTO t VALUES (?, x'00')", [10_000 + total + i]) for i in range(5)])
        total += 5
        deadline = time.time() + 30  # (the second run: until it ships them, so it runs)
        while len(list(Repository.open(str(repo)).store.list("segments/remote/"))) < before + 1:
            assert time.time() < deadline and proc.poll() is None, stop(proc)
            time.sleep(0.1)
        # the first run killed: the sync child never closes its connection (which would checkpoint the
        # replica's WAL away and cost the next run a new generation)
        code, err = stop(proc, signal.SIGKILL if _run == 0 else signal.SIGTERM)
        assert code == (-signal.SIGKILL if _run == 0 else 0), err
        assert any((tmp_path / "cache" / "replicate").glob("*/replica.db"))
    r = Repository.open(str(repo))
    assert len(check_chains(r, "remote")) == 1, "the second run continued the generation"
    to = tmp_path / "r.db"
    restore_at(r, "remote", utc(time.time()), to)
    import sqlite3

    assert sqlite3.connect(to).execute("SELECT count(*) FROM t WHERE seq >= 10000").fetchone() == (10,)

    doc = yaml.safe_load(pol.read_text())
    doc["databases"][0]["namespace"] = "tenant1"
    pol.write_text(yaml.safe_dump(doc))
    proc = start("", repo, "--policy", str(pol), env=env)
    procs.append(proc)
    proc.wait(60)
    code, err = stop(proc, 0)
    assert code == 2 and "namespace" in err, err


def test_replicate_under_the_name_its_backups_use(server: SqldServer, tmp_path: Path,
                                                  procs: list[subprocess.Popen[bytes]]) -> None:
    """`dbre backup URL --db app` on a schedule and `dbre replicate URL --db app` share one name, as a policy
    database marked `replicate: true` does: the replicator's bases record the remote URL as their source
    (not the local replica file), so the chain is one."""
    repo = tmp_path / "repo"
    env = {"LIBSQL_AUTH_TOKEN": server.token or "", "DBRE_CACHE_DIR": str(tmp_path / "cache")}
    backup = subprocess.run(dbre_cmd("backup", server.url, "--repo", str(repo), "--db", "app"), capture_output=True,
                            env={**os.environ, **env}, timeout=120, check=False)
    assert backup.returncode == 0, backup.stderr
    proc = start(server.url, repo, "--db", "app", "-q", env=env)
    procs.append(proc)
    wait_for_generation(str(repo), "app", proc=proc)
    code, err = stop(proc)
    assert code == 0, err


def test_a_sync_that_meets_the_write_lock_is_retried(server: SqldServer, tmp_path: Path) -> None:
    """Another connection holding the replica's write lock (as the replicator's swap does, here for 300 ms
    at a time) makes syncs fail with "database is locked" before they apply anything; they are retried
    and every commit still arrives, each one transaction (in process: the counts are read directly).
    (The injector waits ~100 ms for the lock: held 150 ms of every 200, a sync met it in only a quarter
    of the cases, and once none of 16 did.)"""
    import apsw

    from dbre.replicate.remote import RemoteReplicator
    from dbre.secrets import Secret
    from dbre.sources.local import keep_wal
    from dbre.sources.pins import Pin

    repo = Repository.open_or_init(str(tmp_path / "repo"), None)
    rr = RemoteReplicator(repo, server.url, Secret(server.token or ""), "app", INTERVAL, tmp_path / "state")
    halt = threading.Event()
    done: dict[str, object] = {}

    def run() -> None:
        try:
            done["stats"] = rr.run(halt)
        except BaseException as err:  # noqa: BLE001 - asserted below
            done["error"] = err

    runner = threading.Thread(target=run)
    runner.start()
    try:
        wait_for_generation(str(tmp_path / "repo"), "app")
        path = rr.source.replica_path
        with Pin(path):  # (our descriptors never drop the replicator's POSIX locks: dbre.sources.pins)
            conn = keep_wal(apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE))
            conn.set_busy_timeout(2000)
            try:
                with Writer(server, rate=40) as writer:
                    deadline = time.time() + 6
                    while time.time() < deadline:
                        conn.execute("BEGIN IMMEDIATE")
                        time.sleep(0.3)
                        conn.execute("ROLLBACK")
                        time.sleep(0.05)
            finally:
                conn.close()
        time.sleep(2 * INTERVAL)
    finally:
        halt.set()
        runner.join(60)
    assert "error" not in done, done
    assert rr.sync_stats.locked > 0, rr.sync_stats
    to = tmp_path / "r.db"
    restore_at(repo, "app", utc(time.time()), to)
    count, top, n = restored_seq(to)
    assert count == top == n == len(writer.commits) > 100
    assert writer.error is None
    assert set(observed_times(repo, 0, "app")) == set(range(1, top + 1)), "one transaction per server commit"
