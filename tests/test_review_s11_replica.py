"""Review of 36755b5 (a sqld namespace backed up through an embedded replica at ``replica_url``).

The replica syncs from another hostname than the source: which server answers is up to DNS (a
wildcard record). When that name points at another sqld that has a namespace of the same name (a
staging server behind the same record, or a server of whoever controls DNS), the replica follows
that server's log. Each test runs the backup in a child process in a private mount namespace
(``unshare -rm``) whose /etc/hosts says where the namespace's hostname points (as in
tests/test_fleet_replica.py); the "other server" is a second real sqld reached at 127.0.0.2 on the
first one's port through a small TCP relay, so only the address differs, as a DNS record would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from tests.sqld import SqldServer, start_sqld, with_hostnames

DOMAIN = "dbre-review.test"
NS = "rv-shop"

CHILD = r'''
import json, sys
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.remote import RemoteLibsqlSource
from dbre.errors import SourceError
source, template, repo, cache, sync_timeout = sys.argv[1:6]
src = RemoteLibsqlSource(source, namespace="rv-shop", replica_url=template, cache_dir=cache,
                         sync_timeout=float(sync_timeout))
try:
    snap = backup(Repository.open_or_init(repo), src, "rv-shop").manifest
except SourceError as err:
    print(json.dumps({"error": err.message}), flush=True)
    sys.exit(0)
print(json.dumps({"id": snap.id, "method": snap.stats.get("source_method"),
                  "fallback": snap.stats.get("source_fallback")}), flush=True)
'''


class _Relay:
    """Accepts on (host, port) and pipes each connection to 127.0.0.1:target (stands in for a DNS
    record that points the hostname at another machine)."""

    def __init__(self, host: str, port: int, target: int) -> None:
        self.sock = socket.create_server((host, port))
        self.target = target
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()


def _fill(server: SqldServer, tag: str, rows: int) -> None:
    server.create_namespace(NS)
    server.pipeline([
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, who TEXT, note TEXT)",
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        f"INSERT INTO orders SELECT x, '{tag}', hex(randomblob(30)) FROM c",
    ], namespace=NS)


@pytest.fixture
def prod(tmp_path: Path) -> Iterator[SqldServer]:
    with start_sqld(tmp_path / "prod", namespaces=True, admin=True) as server:
        _fill(server, "prod", 300)
        yield server


@pytest.fixture
def prod_and_staging(prod: SqldServer, tmp_path: Path) -> Iterator[tuple[SqldServer, SqldServer]]:
    with start_sqld(tmp_path / "staging", namespaces=True, admin=True) as staging:
        _fill(staging, "staging", 200)
        yield prod, staging


def _backup(tmp_path: Path, prod: SqldServer, address: str, repo: str = "repo",
            via: tuple[str, int] | None = None, sync_timeout: float = 60.0) -> dict[str, object]:
    """One backup of the namespace in a child whose /etc/hosts points its hostname at ``address``
    (``via``: the source URL and port to use instead of the server's)."""
    url, port = via or (prod.url, prod.port)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    template = f"http://{{namespace}}.{DOMAIN}:{port}"
    out = subprocess.run(
        with_hostnames([sys.executable, script, url, template, tmp_path / repo, tmp_path / "cache", sync_timeout],
                       address, [f"{NS}.{DOMAIN}"], tmp_path / f"hosts-{address}"),
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _restored(tmp_path: Path, snap_id: str, repo: str = "repo") -> list[tuple[object, ...]]:
    r = Repository.open(str(tmp_path / repo))
    out = tmp_path / f"restored-{snap_id}.db"
    apply_restore(r, plan_restore(r, NS, str(out), snapshot=snap_id))
    conn = apsw.Connection(str(out))
    try:
        return [tuple(row) for row in conn.execute("SELECT id, who, note FROM orders ORDER BY id")]
    finally:
        conn.close()


def test_a_replica_hostname_pointing_at_another_sqld_is_not_backed_up_as_the_namespace(
        prod_and_staging: tuple[SqldServer, SqldServer], tmp_path: Path) -> None:
    """The wildcard record sends the namespace's hostname to another sqld (staging) that has a
    namespace of the same name: before the review the replica synced staging's log (first thing, or
    after a good round, wiping the prod replica as "foreign") and the backup held staging's rows as
    the namespace's, silently. Now the replica's database id must be the one the source itself
    (its URL, namespace by header) reports: else it is dropped and /dump reads the namespace, the
    reason recorded in stats.source_fallback."""
    prod, staging = prod_and_staging
    relay = _Relay("127.0.0.2", prod.port, staging.port)
    try:
        theirs = [tuple(r) for r in prod.execute("SELECT id, who, note FROM orders ORDER BY id", namespace=NS)]
        good = _backup(tmp_path, prod, "127.0.0.1")  # the record is right: the replica reads prod
        assert good["method"] == "replica" and not good["fallback"], good
        assert _restored(tmp_path, str(good["id"])) == theirs
        for _round in range(2):  # the record now points at staging: a synced replica, then none at all
            bad = _backup(tmp_path, prod, "127.0.0.2")
            assert _restored(tmp_path, str(bad["id"])) == theirs, "staging's rows backed up as the namespace's"
            assert bad["method"] == "dump", bad
            assert "serves another database" in str(bad["fallback"]), bad
        again = _backup(tmp_path, prod, "127.0.0.1")  # the record fixed: the replica is used again
        assert again["method"] == "replica" and _restored(tmp_path, str(again["id"])) == theirs
    finally:
        relay.stop()


def _rows(server: SqldServer) -> list[tuple[object, ...]]:
    return [tuple(r) for r in server.execute("SELECT id, who, note FROM orders ORDER BY id", namespace=NS)]


def test_a_replica_cache_others_can_write_is_not_backed_up(prod: SqldServer, tmp_path: Path) -> None:
    """The cached replica's pages become the snapshot: whoever can write there chooses what is backed
    up (a page changed in it stays until the server rewrites that page). dbre makes the directory
    0700; before the review a loosened one (a shared DBRE_CACHE_DIR, a chmod) was used as it was, so
    a row changed in the replica was backed up as the namespace's, silently. Now such a replica is
    dropped and /dump reads the namespace, saying why; once the directory is private again a fresh
    replica is synced (never the one others could change)."""
    good = _backup(tmp_path, prod, "127.0.0.1")
    assert good["method"] == "replica", good
    (rdir,) = (tmp_path / "cache" / "replicas").iterdir()
    rdir.chmod(0o777)  # e.g. a cache directory shared with another account
    conn = apsw.Connection(str(rdir / "replica.db"))  # what that account could do
    conn.execute("UPDATE orders SET who = 'forged' WHERE id = 7")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    theirs = _rows(prod)
    bad = _backup(tmp_path, prod, "127.0.0.1")
    assert _restored(tmp_path, str(bad["id"])) == theirs, "a row changed in the cache backed up as the namespace's"
    assert bad["method"] == "dump" and "can be changed by others" in str(bad["fallback"]), bad
    rdir.chmod(0o700)
    again = _backup(tmp_path, prod, "127.0.0.1")
    assert again["method"] == "replica" and _restored(tmp_path, str(again["id"])) == theirs, again


def test_a_replica_a_plain_sqlite_reader_opened_stays_in_use(prod: SqldServer, tmp_path: Path) -> None:
    """(A guard, no finding.) An operator looks into the cached replica with a plain SQLite connection
    (which checkpoints the WAL on close, unlike dbre's own reads): the next rounds still sync that
    replica and back up the namespace as it is."""
    assert _backup(tmp_path, prod, "127.0.0.1")["method"] == "replica"
    (rdir,) = (tmp_path / "cache" / "replicas").iterdir()
    conn = apsw.Connection(str(rdir / "replica.db"))  # `sqlite3 replica.db 'select count(*) from orders'`
    assert conn.execute("SELECT count(*) FROM orders").fetchall() == [(300,)]
    conn.close()
    for i in range(2):
        prod.pipeline([f"UPDATE orders SET who = 'prod{i}' WHERE id = {300 - i}"], namespace=NS)
        snap = _backup(tmp_path, prod, "127.0.0.1")
        assert _restored(tmp_path, str(snap["id"])) == _rows(prod)
    assert snap["method"] == "replica", snap


def test_a_sqld_restored_from_an_older_copy_is_not_mixed_into_the_replica(tmp_path: Path) -> None:
    """(A guard, no finding.) sqld's data directory is restored from an older copy (same database id,
    a shorter log) and written to again: the replica, synced past that point, does not apply the new
    log's frames over pages of the abandoned history (libsql starts it over: sqld's log changed)."""
    import shutil

    data = tmp_path / "prod"
    relay: _Relay | None = None
    server = start_sqld(data, namespaces=True, admin=True)
    try:
        _fill(server, "prod", 300)
        server.stop()
        shutil.copytree(data, tmp_path / "older")
        server = start_sqld(data, namespaces=True, admin=True)
        for i in range(20):
            server.pipeline([f"UPDATE orders SET who = 'lost{i}' WHERE id % 20 = {i}",
                             "INSERT INTO orders(who, note) VALUES ('lost', hex(randomblob(500)))"], namespace=NS)
        relay = _Relay("127.0.0.2", 0, server.port)  # one address and port for the source across restarts
        port = relay.sock.getsockname()[1]
        via = (f"http://127.0.0.2:{port}", port)
        first = _backup(tmp_path, server, "127.0.0.2", via=via)
        assert first["method"] == "replica" and _restored(tmp_path, str(first["id"])) == _rows(server)
        server.stop()
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "older", data)
        server = start_sqld(data, namespaces=True, admin=True)
        for i in range(40):
            server.pipeline([f"UPDATE orders SET who = 'kept{i}' WHERE id % 40 = {i}"], namespace=NS)
        relay.target = server.port
        snap = _backup(tmp_path, server, "127.0.0.2", via=via)
        assert len(list((tmp_path / "cache" / "replicas").iterdir())) == 1  # the same replica, kept
        assert _restored(tmp_path, str(snap["id"])) == _rows(server), "two histories mixed in the snapshot"
    finally:
        server.stop()
        if relay is not None:
            relay.stop()


def test_a_namespace_deleted_and_created_again_is_not_read_from_the_old_replica(prod: SqldServer,
                                                                                  tmp_path: Path) -> None:
    """(A guard, no finding.) The namespace is deleted and created again under the same name, and
    written to more than before: the cached replica, synced from the old namespace, is started over
    (sqld gives the new one another database id, which libsql compares), never mixed with it."""
    assert _backup(tmp_path, prod, "127.0.0.1")["method"] == "replica"
    prod.delete_namespace(NS)
    _fill(prod, "reborn", 600)
    snap = _backup(tmp_path, prod, "127.0.0.1")
    assert snap["method"] == "replica" and _restored(tmp_path, str(snap["id"])) == _rows(prod), snap


def test_a_first_sync_killed_midway_is_resumed_not_trusted(tmp_path: Path) -> None:
    """(A guard, no finding.) A namespace of many small transactions makes the first sync slow; the
    sync runs past its timeout and its process is killed (SIGKILL) midway. That round fails in one
    line (no fallback, nothing written); the next one syncs on from there and backs up the namespace
    as the server has it."""
    with start_sqld(tmp_path / "busy", namespaces=True, admin=True) as server:
        _fill(server, "busy", 10)
        for _batch in range(4):
            server.pipeline([f"INSERT INTO orders(who, note) VALUES ('tx', hex(randomblob({n})))"
                             for n in range(20, 520)], namespace=NS)
        cut = _backup(tmp_path, server, "127.0.0.1", sync_timeout=0.3)
        assert "did not finish within 0.3s" in str(cut.get("error")), cut
        (rdir,) = (tmp_path / "cache" / "replicas").iterdir()
        assert (rdir / "replica.db").exists()  # something was synced before the kill
        snap = _backup(tmp_path, server, "127.0.0.1")
        assert snap["method"] == "replica" and _restored(tmp_path, str(snap["id"])) == _rows(server), snap


def test_a_replica_path_that_always_falls_back_shows_in_the_backup_summary(prod: SqldServer,
                                                                          tmp_path: Path) -> None:
    """A replica URL that never answers (a DNS record missing for good) makes every round a full
    /dump: the namespace is backed up right, but the replica path is broken for good. Whoever reads
    a fleet run (its result rows, the Prefect summary built from backup summaries) should see how
    each database was read and why the replica was not used. Fixed: the backup summary carries
    ``source_method`` and ``source_fallback``; the fleet's table has a "read" column and its summary a
    "Read through /dump instead of the replica" section (tests/test_fleet_replica.py)."""
    from dbre.repository.backup import backup
    from dbre.sources.remote import RemoteLibsqlSource

    src = RemoteLibsqlSource(prod.url, namespace=NS, replica_url=f"http://{{namespace}}.{DOMAIN}:{prod.port}",
                             cache_dir=tmp_path / "cache")  # (this process has no record for that name)
    summary = backup(Repository.open_or_init(str(tmp_path / "repo")), src, NS).summary()
    assert summary["source_method"] == "dump"
    assert f"{NS}.{DOMAIN}" in summary["source_fallback"]
