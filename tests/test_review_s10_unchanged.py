"""Review of unchanged snapshots (issue 12): a snapshot written from sqld's change marker, without
reading the namespace, must hold what the namespace held at its ``taken_at``. Against a real sqld
with namespaces and its admin API (its own server where a test restarts or kills it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.remote import RemoteLibsqlSource
from tests.sqld import SqldServer, free_port, sqld_binary


def _start(base: Path, port: int, admin_port: int) -> SqldServer:
    """sqld with namespaces and its admin API on these ports (a restart keeps the source's URL)."""
    base.mkdir(parents=True, exist_ok=True)
    log = open(base / "sqld.log", "ab")
    proc = subprocess.Popen([str(sqld_binary()), "--db-path", str(base / "data.sqld"), "--no-welcome",
                             "--http-listen-addr", f"127.0.0.1:{port}", "--enable-namespaces",
                             "--admin-listen-addr", f"127.0.0.1:{admin_port}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = SqldServer(proc=proc, url=f"http://127.0.0.1:{port}", db_path=base / "data.sqld",
                        log_path=base / "sqld.log", admin_url=f"http://127.0.0.1:{admin_port}",
                        namespaces=True, _log=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(server.admin_url + "/v1/diagnostics", timeout=1).close()
            urllib.request.urlopen(server.url + "/health", timeout=1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sqld did not start: {server.log_tail(1000)}")


def _source(server: SqldServer, ns: str) -> RemoteLibsqlSource:
    return RemoteLibsqlSource(server.url, namespace=ns, method="dump", admin_url=server.admin_url)


def _restored(repo: Repository, m: Manifest, tmp: Path) -> list[Any]:
    target = tmp / f"restored-{m.id}.db"
    apply_restore(repo, plan_restore(repo, m.db, target, snapshot=m.id))
    conn = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


def _crash(server: SqldServer, base: Path, ports: tuple[int, int], ns: str) -> SqldServer:
    """kill -9, start again on the same ports, and let the app touch the namespace first: sqld loads
    a namespace lazily, from its stats.json, and sets the live replication index a moment later (a
    stats request that loads it may see the persisted one: see the review report)."""
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server.stop()
    server = _start(base, *ports)
    server.execute("SELECT count(*) FROM t", namespace=ns)
    time.sleep(0.3)
    return server


def _index(server: SqldServer, ns: str) -> int:
    marker = _source(server, ns).change_marker()
    assert marker is not None
    return int(marker["replication_index"])


def test_an_index_that_starts_again_after_a_crash_is_not_taken_for_no_change(tmp_path: Path) -> None:
    """kill -9 of sqld (OOM, power loss): the namespace is recovered with its instance id kept and its
    replication index reset; the app's next writes bring the index back to the parent's. The next
    snapshot must hold every row the namespace holds, not the parent's rows. (Was a strict xfail:
    the marker held only the id and the index; its rows_written_count now differs.)"""
    ports = free_port(), free_port()
    base = tmp_path / "sqld"
    server = _start(base, *ports)
    try:
        ns = "crashy"
        server.create_namespace(ns)
        server.pipeline(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
                        + [f"INSERT INTO t(v) VALUES ('before-{i}')" for i in range(6)], namespace=ns)
        repo = Repository.open_or_init(str(tmp_path / "repo"))
        parent = backup(repo, _source(server, ns), "app").manifest
        k = parent.stats["change_marker"]["replication_index"]
        time.sleep(5.5)  # sqld persists its stats every 5 s: a crash minutes after the backup
        server.pipeline(["INSERT INTO t(v) VALUES ('after-the-backup')"], namespace=ns)
        server = _crash(server, base, ports, ns)
        assert _index(server, ns) < k, "sqld kept the replication index across the crash"
        n = 0
        while _index(server, ns) < k and n < 50:  # the app writes on (one frame per small insert)
            server.pipeline([f"INSERT INTO t(v) VALUES ('after-the-crash-{n}')"], namespace=ns)
            n += 1
        assert _index(server, ns) == k
        live = [tuple(r) for r in server.execute("SELECT id, v FROM t ORDER BY id", namespace=ns)]
        assert len(live) == 6 + 1 + n
        second = backup(repo, _source(server, ns), "app").manifest
        assert _restored(repo, second, tmp_path) == live
    finally:
        server.stop()


@pytest.mark.xfail(strict=True, reason=(
    "the hole rows_written_count leaves: rows written in the 5 s before a crash that sqld had not yet "
    "persisted in stats.json, with no write after it, give the parent's marker again when the "
    "recovered log has the parent's index (a parent read after an earlier crash: same page count). "
    "Fix: a marker from the replication log's id (sqld's replication Hello), or no unchanged "
    "snapshot while the index is at most the namespace's page count (a freshly recovered log)"))
def test_writes_lost_from_the_stats_in_a_crash_are_not_taken_for_no_change(tmp_path: Path) -> None:
    """Two crashes: the parent is read after the first (its index is the recovered log's), a write
    comes in just before the second, and nothing after it."""
    ports = free_port(), free_port()
    base = tmp_path / "sqld"
    server = _start(base, *ports)
    try:
        ns = "crashy"
        server.create_namespace(ns)
        server.pipeline(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
                        + [f"INSERT INTO t(v) VALUES ('before-{i}')" for i in range(6)], namespace=ns)
        server = _crash(server, base, ports, ns)
        repo = Repository.open_or_init(str(tmp_path / "repo"))
        parent = backup(repo, _source(server, ns), "app").manifest
        time.sleep(5.5)  # sqld persists its stats every 5 s
        server.pipeline(["INSERT INTO t(v) VALUES ('just-before-the-crash')"], namespace=ns)
        server = _crash(server, base, ports, ns)
        assert _source(server, ns).change_marker() is not None
        live = [tuple(r) for r in server.execute("SELECT id, v FROM t ORDER BY id", namespace=ns)]
        assert live[-1] == (7, "just-before-the-crash")
        second = backup(repo, _source(server, ns), "app").manifest
        assert second.parent == parent.id
        assert _restored(repo, second, tmp_path) == live
    finally:
        server.stop()
