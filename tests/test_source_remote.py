"""RemoteLibsqlSource against a real sqld: embedded replica, /dump, fallback, errors, secrets."""

from __future__ import annotations

import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.errors import SourceError
from dbre.secrets import Secret
from dbre.sources import open_source
from dbre.sources.remote import RemoteLibsqlSource, token_from_env
from tests.sqld import SqldServer, free_port, sqld, sqld_auth, sqld_namespaces, start_sqld  # noqa: F401

# --------------------------------------------------------------------------- helpers


def _fill(server: SqldServer, table: str, *, namespace: str | None = None) -> None:
    server.pipeline(
        [
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL, data BLOB)",
            f"CREATE INDEX {table}_name ON {table}(name)",
            f"CREATE VIEW {table}_v AS SELECT id, upper(name) AS n FROM {table}",
            (f"INSERT INTO {table} VALUES (?, ?, ?, ?)", [1, "it's \"quoted\"\nwith a newline; and -- dashes", 1.5,
                                                         b"\x00\x01\xff"]),
            (f"INSERT INTO {table} VALUES (?, ?, ?, ?)", [2, "ünïcødé ✓", None, None]),
            (f"INSERT INTO {table} VALUES (?, ?, ?, ?)", [3, "x" * 5000, -0.25, bytes(range(256)) * 20]),
        ],
        namespace=namespace,
    )


def _rows(conn: apsw.Connection, table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(f"SELECT id, name, score, data FROM {table} ORDER BY id")]


def _server_rows(server: SqldServer, table: str, namespace: str | None = None) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in server.execute(f"SELECT id, name, score, data FROM {table} ORDER BY id",
                                             namespace=namespace)]


def _schema(conn: apsw.Connection, table: str) -> set[tuple[str, str, str]]:
    return {
        (t, n, s)
        for t, n, s in conn.execute(
            "SELECT type, name, sql FROM sqlite_schema WHERE name LIKE ?", (f"{table}%",)
        )
    }


@pytest.fixture
def table(sqld: SqldServer) -> str:  # noqa: F811 - the fixture imported above
    name = "t_" + uuid.uuid4().hex[:10]
    _fill(sqld, name)
    return name


_PROXY = r"""
import socket, sys, threading
target = int(sys.argv[1])
down = 0
lock = threading.Lock()
srv = socket.create_server(("127.0.0.1", 0))
def pump(src, dst, count):
    global down
    try:
        while data := src.recv(65536):
            if count:
                with lock:
                    down += len(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
def accept():
    while True:
        client, _ = srv.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, True), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print(srv.getsockname()[1], flush=True)
for _line in sys.stdin:
    with lock:
        n, down = down, 0
    print(n, flush=True)
"""


class CountingProxy:
    """A TCP forwarder that counts the bytes the server sends: proof that a sync is incremental.

    It runs in its own process: libsql_experimental holds the GIL for the whole of ``sync()``,
    so a proxy thread in this process would deadlock with it.
    """

    def __init__(self, target_port: int) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", _PROXY, str(target_port)], text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        self.port = int(self._out.readline())

    def take(self) -> int:
        """Bytes sent by the server since the last call."""
        self._in.write("take\n")
        self._in.flush()
        return int(self._out.readline())

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A server of our own with ~4 MB in one table, so transfer sizes mean something."""
    with start_sqld(tmp_path_factory.mktemp("sqld-big")) as server:
        server.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, note TEXT)")
        for start in range(0, 1000, 250):  # 4 transactions: a first sync replays each commit
            inserts = [f"INSERT INTO big VALUES ({i}, randomblob(4000), 'row {i}')" for i in range(start, start + 250)]
            server.pipeline(["BEGIN", *inserts, "COMMIT"])
        yield server


# --------------------------------------------------------------------------- replica and dump


def test_replica_matches_server(sqld: SqldServer, table: str, tmp_path: Path) -> None:  # noqa: F811
    src = RemoteLibsqlSource(sqld.url, cache_dir=tmp_path, method="replica")
    with src.connect() as conn:
        assert _rows(conn, table) == _server_rows(sqld, table)
        assert {t for t, _, _ in _schema(conn, table)} == {"table", "index", "view"}
        assert conn.execute(f"SELECT count(*) FROM {table}_v").fetchall() == [(3,)]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert src.last_method == "replica"
    assert src.replica_path.is_relative_to(tmp_path) and src.replica_path.exists()


def test_dump_matches_server_and_replica(sqld: SqldServer, table: str, tmp_path: Path) -> None:  # noqa: F811
    dump_src = RemoteLibsqlSource(sqld.url, cache_dir=tmp_path, method="dump")
    with dump_src.connect() as conn:
        dumped_rows, dumped_schema = _rows(conn, table), _schema(conn, table)
        tmp_files = list((tmp_path / "tmp").rglob("*.db"))
        assert len(tmp_files) == 1  # the temporary copy exists while in use ...
    assert dump_src.last_method == "dump"
    assert not tmp_files[0].exists()  # ... and is gone afterwards
    assert not (tmp_path / "replicas").exists()  # the dump path never touches the replica cache
    with RemoteLibsqlSource(sqld.url, cache_dir=tmp_path, method="replica").connect() as conn:
        assert dumped_rows == _rows(conn, table) == _server_rows(sqld, table)
        assert dumped_schema == _schema(conn, table)


def test_replica_sync_is_incremental(big_server: SqldServer, tmp_path: Path) -> None:
    proxy = CountingProxy(big_server.port)
    try:
        src = RemoteLibsqlSource(f"http://127.0.0.1:{proxy.port}", cache_dir=tmp_path)
        with src.connect() as conn:
            assert conn.execute("SELECT count(*), sum(length(payload)) FROM big").fetchall() == [(1000, 4_000_000)]
        first_bytes, first_s = proxy.take(), src.last_seconds
        inode = src.replica_path.stat().st_ino
        assert src.last_method == "replica" and first_bytes > 4_000_000

        big_server.execute("UPDATE big SET note = 'changed' WHERE id = 500")
        with src.connect() as conn:
            assert conn.execute("SELECT note FROM big WHERE id = 500").fetchall() == [("changed",)]
            assert conn.execute("SELECT count(*) FROM big").fetchall() == [(1000,)]
        second_bytes, second_s = proxy.take(), src.last_seconds
        assert src.replica_path.stat().st_ino == inode  # the same file, synced in place

        with src.connect():
            pass
        idle_bytes = proxy.take()
        print(f"\nreplica sync: first {first_s:.3f}s {first_bytes} B; after 1 row changed "
              f"{second_s:.3f}s {second_bytes} B; unchanged {idle_bytes} B")
        assert second_bytes < first_bytes / 20, (first_bytes, second_bytes)
        assert idle_bytes < first_bytes / 20
    finally:
        proxy.close()


def test_dump_of_a_multi_megabyte_database(big_server: SqldServer, tmp_path: Path) -> None:
    expected = big_server.execute("SELECT count(*), sum(length(payload)), hex(max(payload)) FROM big")
    src = RemoteLibsqlSource(big_server.url, cache_dir=tmp_path, method="dump")
    started = time.monotonic()
    with src.connect() as conn:  # ~8 MB of SQL: loaded in several chunks
        got = conn.execute("SELECT count(*), sum(length(payload)), hex(max(payload)) FROM big").fetchall()
        assert [list(r) for r in got] == expected
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    print(f"\n/dump of ~4 MB table loaded in {time.monotonic() - started:.3f}s")


def test_auto_falls_back_to_dump_for_a_namespace(sqld_namespaces: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    ns = "ns" + uuid.uuid4().hex[:8]
    sqld_namespaces.create_namespace(ns)
    _fill(sqld_namespaces, "tn", namespace=ns)
    src = RemoteLibsqlSource(sqld_namespaces.url, cache_dir=tmp_path, namespace=ns)
    assert src.name == ns and src.identity()["namespace"] == ns
    with src.connect() as conn:
        assert _rows(conn, "tn") == _server_rows(sqld_namespaces, "tn", namespace=ns)
    assert src.last_method == "dump" and src.last_fallback_reason
    with pytest.raises(SourceError, match="embedded replica"):
        with RemoteLibsqlSource(sqld_namespaces.url, cache_dir=tmp_path, namespace=ns,
                                method="replica").connect():
            pass
    with pytest.raises(SourceError, match="404") as err:
        with RemoteLibsqlSource(sqld_namespaces.url, cache_dir=tmp_path, namespace="nosuchns").connect():
            pass
    assert "namespace" in err.value.hint


# --------------------------------------------------------------------------- errors and secrets


def test_sync_timeout(big_server: SqldServer, tmp_path: Path) -> None:
    src = RemoteLibsqlSource(big_server.url, cache_dir=tmp_path, method="replica", sync_timeout=0.05)
    with pytest.raises(SourceError, match="did not finish within 0.05s"):
        with src.connect():
            pass


@pytest.mark.parametrize("method", ["auto", "replica", "dump"])
def test_unreachable_server(method: str, tmp_path: Path) -> None:
    src = RemoteLibsqlSource(f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path, method=method)
    with pytest.raises(SourceError) as err:
        with src.connect():
            pass
    assert "cannot reach" in err.value.message
    assert err.value.hint == "check the URL and that the server is up"
    assert "\n" not in str(err.value)


def test_tls_against_plain_http_server_says_so(sqld: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    src = RemoteLibsqlSource(f"libsql://127.0.0.1:{sqld.port}", cache_dir=tmp_path)
    with pytest.raises(SourceError) as err:
        with src.connect():
            pass
    assert "tls=0" in err.value.hint
    with RemoteLibsqlSource(f"libsql://127.0.0.1:{sqld.port}?tls=0", cache_dir=tmp_path).connect() as conn:
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()


@pytest.mark.parametrize("method", ["auto", "dump"])
def test_bad_or_missing_token(sqld_auth: SqldServer, tmp_path: Path, method: str) -> None:  # noqa: F811
    bad = "bad-" + uuid.uuid4().hex
    for token in (Secret(bad), None):
        src = RemoteLibsqlSource(sqld_auth.url, token, cache_dir=tmp_path, method=method)
        with pytest.raises(SourceError) as err:
            with src.connect():
                pass
        e = err.value
        assert "LIBSQL_AUTH_TOKEN" in e.hint and "401" in e.message
        assert ("refused the token" if token else "none was given") in e.message
        text = str(e) + repr(e) + "".join(traceback.format_exception(e)) + repr(src)
        assert bad not in text and sqld_auth.token not in text
    assert sqld_auth.token
    good = RemoteLibsqlSource(sqld_auth.url, Secret(sqld_auth.token), cache_dir=tmp_path, method=method)
    with good.connect() as conn:
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    assert good.last_method == ("replica" if method == "auto" else "dump")


def test_secret_never_shown(sqld_auth: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    token = sqld_auth.token
    assert token
    src = RemoteLibsqlSource(sqld_auth.url, Secret(token), cache_dir=tmp_path)
    in_url = RemoteLibsqlSource(f"{sqld_auth.url}?authToken={token}", cache_dir=tmp_path, method="dump")
    with in_url.connect():  # the token in the URL is used ...
        pass
    for s in (src, in_url):  # ... and shown nowhere
        shown = repr(s) + str(s) + str(s.identity()) + s.name + str(vars(s))
        assert token not in shown
        assert s.identity() == {"kind": "libsql", "url": sqld_auth.url}
    assert "token=set" in repr(src)


# --------------------------------------------------------------------------- URLs, names, env


@pytest.mark.parametrize(
    ("url", "base", "name", "public"),
    [
        ("libsql://mydb-org.turso.io", "https://mydb-org.turso.io", "mydb-org.turso.io",
         "libsql://mydb-org.turso.io"),
        ("libsql://mydb-org.turso.io/?authToken=abc", "https://mydb-org.turso.io", "mydb-org.turso.io",
         "libsql://mydb-org.turso.io"),
        ("libsql://127.0.0.1:8080?tls=0", "http://127.0.0.1:8080", "127.0.0.1-8080",
         "libsql://127.0.0.1:8080?tls=0"),
        ("http://user:pw@127.0.0.1:8080", "http://127.0.0.1:8080", "127.0.0.1-8080", "http://127.0.0.1:8080"),
        ("wss://db.example.com", "https://db.example.com", "db.example.com", "wss://db.example.com"),
        ("ws://localhost:9000/", "http://localhost:9000", "localhost-9000", "ws://localhost:9000"),
        ("https://[::1]:8080", "https://[::1]:8080", "1-8080", "https://[::1]:8080"),
    ],
)
def test_url_mapping(url: str, base: str, name: str, public: str, tmp_path: Path) -> None:
    src = RemoteLibsqlSource(url, cache_dir=tmp_path)
    assert (src.base_url, src.name, src.identity()["url"]) == (base, name, public)
    assert "abc" not in repr(src) and "pw" not in repr(src)


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "c"))
    a = RemoteLibsqlSource("libsql://a.turso.io")
    assert a.replica_path == tmp_path / "c" / "replicas" / a.cache_key / "replica.db"
    assert len(a.cache_key) == 16
    assert RemoteLibsqlSource("https://a.turso.io").cache_key == a.cache_key  # same server, same replica
    assert RemoteLibsqlSource("libsql://b.turso.io").cache_key != a.cache_key
    with pytest.raises(SourceError):
        RemoteLibsqlSource("ftp://a.turso.io")
    with pytest.raises(SourceError):
        RemoteLibsqlSource("libsql://a.turso.io", method="magic")


def test_open_source_and_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_source("libsql://x.turso.io"), RemoteLibsqlSource)
    assert token_from_env({}) is None
    tok = token_from_env({"TURSO_AUTH_TOKEN": "t2"})
    assert tok is not None and tok.reveal() == "t2"
    tok = token_from_env({"LIBSQL_AUTH_TOKEN": "t1", "TURSO_AUTH_TOKEN": "t2"})
    assert tok is not None and tok.reveal() == "t1"
    monkeypatch.setenv("LIBSQL_AUTH_TOKEN", "t3")
    tok = token_from_env()
    assert tok is not None and tok.reveal() == "t3"


def test_refused_or_unreachable_source_creates_no_repository(sqld_auth: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    """`dbre backup URL --repo NEW` checks the server and the token before it creates NEW."""
    from tests.dbfactory import assert_one_line_error, cli

    bad = "bad-" + uuid.uuid4().hex
    fresh = tmp_path / "fresh-repo"
    env = {"DBRE_CACHE_DIR": str(tmp_path / "cache"), "LIBSQL_AUTH_TOKEN": bad, "TURSO_AUTH_TOKEN": None}
    r = cli("backup", sqld_auth.url, "--repo", fresh, env=env)
    assert_one_line_error(r, 1, "refused the token", "LIBSQL_AUTH_TOKEN")
    assert bad not in r.stderr + r.stdout
    assert not fresh.exists()
    r = cli("backup", f"http://127.0.0.1:{free_port()}", "--repo", fresh, env=env)
    assert_one_line_error(r, 1, "reach")
    assert not fresh.exists()
    # the check is no obstacle to a good token
    r = cli("backup", sqld_auth.url, "--repo", fresh, "--db", "ok", env={**env, "LIBSQL_AUTH_TOKEN": sqld_auth.token})
    assert r.returncode == 0, r
    assert fresh.exists()
