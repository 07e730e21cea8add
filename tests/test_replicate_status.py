"""`dbre replicate --policy` replicates every database the policy marks, one process; `dbre status`
(and its Prometheus text) reports each one's replication lag against the policy's RPO and alerts
when a source has committed and nothing shipped it for longer than the RPO."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from dbre.metrics import compute_status, prometheus_text
from dbre.policy import load_policy
from dbre.repository.repo import Repository
from tests.replication import check_chains, dbre_cmd, make_source, start_writer, stop_replicator, wait_for_generation

RPO = 3.0

POLICY = """
version: 1
repositories:
  primary: {repo}
databases:
  - name: alpha
    source: {a}
    rpo: 3s
    rto: 1h
    replicate: true
  - name: beta
    source: {b}
    rpo: 3s
    rto: 1h
    replicate: true
  - name: gamma
    source: {c}
    rpo: 1h
    rto: 1h
retention:
  keep_last: 10
"""


def _lags(policy_path: Path, repo_url: str) -> tuple[dict[str, float | None], list[str], str]:
    st = compute_status(Repository.open(repo_url), policy=load_policy(policy_path))
    lags = {d.db: d.replication_lag_seconds for d in st.databases}
    alerts = [f"{a.event} {a.db}" for a in st.all_alerts if a.db in ("alpha", "beta")]
    return lags, alerts, prometheus_text(st)


def _replicating(tmp_path: Path, rows: int) -> tuple[str, tuple[Path, Path, Path], Path, subprocess.Popen[bytes]]:
    """Three sources (alpha and beta replicated, gamma not), their policy, and `dbre replicate --policy`
    running over them: (repository URL, sources, policy, the replicator)."""
    repo_url = str(tmp_path / "repo")
    a, b, c = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    for p in (a, b, c):
        make_source(p, rows)
    policy = tmp_path / "dbre.yaml"
    policy.write_text(POLICY.format(repo=repo_url, a=a, b=b, c=c))
    rep = subprocess.Popen(dbre_cmd("replicate", "--policy", str(policy), "--interval", "200ms", "-q"),
                           stderr=subprocess.PIPE)
    return repo_url, (a, b, c), policy, rep


def test_replicate_policy_and_lag_in_status(tmp_path: Path) -> None:
    repo_url, (a, b, _), policy, rep = _replicating(tmp_path, 300)
    try:
        deadline = time.time() + 40
        while True:
            assert rep.poll() is None, rep.stderr.read().decode() if rep.stderr else ""
            assert time.time() < deadline, "no generations for both databases"
            try:
                keys = set(Repository.open(repo_url).store.list("segments/"))
            except Exception:  # noqa: BLE001 - the repository is not created yet
                keys = set()
            if {k.split("/")[1] for k in keys if k.endswith("/base")} == {"alpha", "beta"}:
                break
            time.sleep(0.2)
        writers = [start_writer(p, tmp_path / f"{p.stem}.log", 2.0, start_seq=300, ckpt_every=100) for p in (a, b)]
        assert all(w.wait(timeout=60) == 0 for w in writers)
        time.sleep(1.0)
        # both shipped and live: lag within the RPO, no alert
        lags, alerts, prom = _lags(policy, repo_url)
        assert lags["gamma"] is None  # not replicated: no lag reported
        assert lags["alpha"] is not None and lags["alpha"] < RPO and lags["beta"] is not None and lags["beta"] < RPO, \
            lags
        assert not alerts, alerts
        assert 'dbre_replication_lag_seconds{repository="' in prom and 'db="alpha"' in prom
        # idle sources, replicator alive: still no alert after the RPO has passed
        time.sleep(RPO + 1)
        lags, alerts, _ = _lags(policy, repo_url)
        assert not alerts and lags["alpha"] is not None and lags["alpha"] < RPO, (lags, alerts)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert err.count("stopped;") == 2, err  # one line per database
    chains = check_chains(Repository.open(repo_url), "alpha"), check_chains(Repository.open(repo_url), "beta")
    assert all(len(ch) == 1 for ch in chains), chains
    # the replicator is gone; alpha commits, beta does not
    con = sqlite3.connect(a, isolation_level=None)
    con.execute("INSERT INTO t(seq, pad) VALUES (100000, x'00')")
    con.close()
    time.sleep(RPO + 1)
    lags, alerts, prom = _lags(policy, repo_url)
    assert alerts == ["replication_lag alpha"], (alerts, lags)
    assert lags["alpha"] is not None and lags["alpha"] > RPO and lags["beta"] == 0, lags
    assert 'event="replication_lag"' in prom
    # the CLI exits 1 on the alert and names it
    r = subprocess.run(dbre_cmd("status", "--repo", repo_url, "--policy", str(policy)), capture_output=True,
                       timeout=120)
    assert r.returncode == 1 and b"ALERT replication_lag" in r.stderr and b"replication: alpha: lag" in r.stdout, r


def _truncated(path: Path, timeout: float = 30) -> None:
    """Checkpoint ``path`` with TRUNCATE until its WAL is empty (the replicator's reader may make
    the first tries busy)."""
    con = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        deadline = time.time() + timeout
        while con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
            assert time.time() < deadline, "the TRUNCATE checkpoint stayed busy"
            time.sleep(0.05)
    finally:
        con.close()
    assert (path.parent / (path.name + "-wal")).stat().st_size == 0


def _five_commits_shipped(src: Path) -> None:
    """Five commits into ``src``, then a second for the replicator (200 ms interval) to ship them."""
    con = sqlite3.connect(src, isolation_level=None)
    for i in range(5):
        con.execute("INSERT INTO t(seq, pad) VALUES (?, x'00')", (1000 + i,))
    con.close()
    time.sleep(1.0)


def _an_unshipped_commit_shows(src: Path, seq: int, policy: Path, repo_url: str) -> None:
    """A commit into ``src`` (alpha) that no replicator ships: past the RPO, its lag and alert show."""
    con = sqlite3.connect(src, isolation_level=None)
    con.execute("INSERT INTO t(seq, pad) VALUES (?, x'00')", (seq,))
    con.close()
    time.sleep(RPO + 1)
    lags, alerts, _ = _lags(policy, repo_url)
    assert "replication_lag alpha" in alerts and lags["alpha"] is not None and lags["alpha"] > RPO, (lags, alerts)


def test_an_idle_source_whose_wal_was_truncated_after_shipping_has_no_lag(tmp_path: Path) -> None:
    """An application that ends with ``wal_checkpoint(TRUNCATE)`` and then goes quiet restarts its WAL
    at new salts with no frame: the replicator follows and ships nothing (there is nothing), so the
    WAL no longer ends where the newest segment does. Status must still see that nothing is
    unshipped (it failed CI once: a false replication_lag alert 5 s into an idle period); and once a
    commit lands that no replicator ships, the lag shows again."""
    repo_url, (a, _, _), policy, rep = _replicating(tmp_path, 100)
    try:
        for db in ("alpha", "beta"):
            wait_for_generation(repo_url, db, timeout=40, proc=rep)
        _five_commits_shipped(a)
        _truncated(a)
        time.sleep(RPO + 1)
        lags, alerts, _ = _lags(policy, repo_url)
        assert not alerts and lags["alpha"] == 0, (lags, alerts)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    # the replicator is gone: a commit after the truncation is unshipped, and shows
    _an_unshipped_commit_shows(a, 5000, policy, repo_url)


def test_a_wal_truncated_just_before_a_clean_stop_leaves_no_lag(tmp_path: Path) -> None:
    """The same truncation, then the replicator stopped at once (a writer that ends with a TRUNCATE
    checkpoint, then a deploy): the lease that recorded the restarted WAL is released at the stop, so
    the stop itself records where it stood (``leases/<db>/stopped``). Status must still say nothing is
    unshipped: it failed CI once (beta, idle since the writer's last TRUNCATE, lag 9.4 s, a false
    replication_lag alert). A commit after the stop still shows."""
    repo_url, (a, _, _), policy, rep = _replicating(tmp_path, 100)
    try:
        wait_for_generation(repo_url, "alpha", timeout=40, proc=rep)
        _five_commits_shipped(a)
        _truncated(a)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    store = Repository.open(repo_url).store
    assert [k for k in store.list("leases/alpha/")] == ["leases/alpha/stopped"]  # the lease itself released
    time.sleep(RPO + 1)
    lags, alerts, _ = _lags(policy, repo_url)
    assert not alerts and lags["alpha"] == 0 and lags["beta"] == 0, (lags, alerts)
    _an_unshipped_commit_shows(a, 5000, policy, repo_url)


def test_a_file_copied_over_the_source_is_not_taken_for_the_one_followed(tmp_path: Path) -> None:
    """Status reads the source's WAL position to say nothing is unshipped; a file copied over the
    path (a restore from elsewhere, `cp` of an old copy) with its -wal and -shm shows the same
    position but is another file whose commits no replicator saw. The device and inode recorded in
    the newest segment (``file_id``) must be the file's: here they are not, and the lag counts from
    the heartbeat again (an alert once it passes the RPO), where it said 0 before."""
    repo_url, (a, _, _), policy, rep = _replicating(tmp_path, 100)
    try:
        wait_for_generation(repo_url, "alpha", timeout=40, proc=rep)
        _five_commits_shipped(a)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    lags, _, _ = _lags(policy, repo_url)
    assert lags["alpha"] == 0, lags  # the file followed, unchanged since: nothing unshipped
    for suffix in ("", "-wal", "-shm"):  # the same bytes under new inodes, renamed over the path
        copy = tmp_path / f"copy{suffix}"
        shutil.copyfile(f"{a}{suffix}", copy)
        os.replace(copy, f"{a}{suffix}")
    time.sleep(RPO + 1)
    lags, alerts, _ = _lags(policy, repo_url)
    assert "replication_lag alpha" in alerts and lags["alpha"] is not None and lags["alpha"] > RPO, (lags, alerts)
