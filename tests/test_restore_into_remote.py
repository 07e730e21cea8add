"""`dbre restore --repo R --db NAME --into URL`: a restore loaded into a real sqld (its default
database, a namespace, a server that requires a JWT), checked row for row against the restored file;
a non-empty target refused without --force and replaced with it; a wrong token fails in one line."""

from __future__ import annotations

import json
import secrets
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from tests.dbfactory import assert_one_line_error, cli
from tests.sqld import SqldServer, sqld_namespaces, start_sqld  # noqa: F401 - the session fixture

SCHEMA = """
CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, data BLOB, price REAL, note TEXT);
CREATE TABLE tags(k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
CREATE TABLE plain(a, b);
CREATE TABLE log(item INTEGER, what TEXT);
CREATE INDEX items_name ON items(name);
CREATE VIEW priced AS SELECT id, name, price FROM items WHERE price IS NOT NULL;
CREATE TRIGGER items_log AFTER INSERT ON items BEGIN INSERT INTO log VALUES (new.id, 'insert'); END;
"""


def _make_source(path: Path, rows: int = 300) -> Path:
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    with conn:
        for i in range(1, rows + 1):
            conn.execute("INSERT INTO items(name, data, price, note) VALUES (?, ?, ?, ?)",
                         (f"item {i} — ünïcödé ✓ 漢字", secrets.token_bytes(i % 50) if i % 7 else None,
                          None if i % 5 == 0 else i * 1.25, None if i % 3 else "x" * (i % 40)))
        conn.execute("INSERT INTO tags VALUES ('b', 'β'), ('a', NULL), ('c', '')")
        conn.executemany("INSERT INTO plain(rowid, a, b) VALUES (?, ?, ?)",
                         [(10 + 3 * i, i, b"\x00\xff" * i) for i in range(50)])
        conn.execute("DELETE FROM items WHERE id > ?", (rows - 5,))  # sqlite_sequence stays above max(id)
    conn.execute("PRAGMA user_version=42")
    conn.close()
    return path


@pytest.fixture(scope="module")
def sqld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A plain sqld of this module's own: its default database is emptied by these tests (the session's
    is shared with other modules' tables)."""
    with start_sqld(tmp_path_factory.mktemp("sqld-into")) as server:
        yield server


@pytest.fixture(scope="module")
def sqld_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A sqld of this module's own that requires a JWT (``.token``)."""
    with start_sqld(tmp_path_factory.mktemp("sqld-into-auth"), jwt=True) as server:
        yield server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("into")
    src = _make_source(base / "app.db")
    repo = base / "repo"
    assert cli("init", "--repo", repo).returncode == 0
    r = cli("backup", src, "--repo", repo, "--db", "app")
    assert r.returncode == 0, r
    yield repo, src


def _remote_rows(server: SqldServer, sql: str, ns: str | None = None) -> list[list[object]]:
    return server.execute(sql, namespace=ns)


def _local_rows(path: Path, sql: str) -> list[list[object]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [list(r) for r in conn.execute(sql)]
    finally:
        conn.close()


CHECKS = ["SELECT id, name, data, price, note FROM items ORDER BY id", "SELECT k, v FROM tags ORDER BY k",
          "SELECT rowid, a, b FROM plain ORDER BY rowid", "SELECT * FROM priced ORDER BY id",
          "SELECT name, seq FROM sqlite_sequence", "PRAGMA user_version",
          "SELECT type, name, tbl_name FROM sqlite_schema WHERE name NOT LIKE 'sqlite%' ORDER BY type, name",
          "SELECT count(*) FROM log"]


def _assert_same(server: SqldServer, src: Path, ns: str | None = None) -> None:
    for sql in CHECKS:
        assert _remote_rows(server, sql, ns) == _local_rows(src, sql), sql


def _wipe(server: SqldServer, ns: str | None = None) -> None:
    for kind, name in server.execute("SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite%' "
                                     "AND type IN ('table', 'view')", namespace=ns):
        server.execute(f'DROP {kind} IF EXISTS "{name}"', namespace=ns)


def test_into_default_database_then_refused_then_force(repo: tuple[Path, Path], sqld: SqldServer) -> None:
    repository, src = repo
    _wipe(sqld)
    dry = cli("restore", "--repo", repository, "--db", "app", "--into", sqld.url, "--dry-run")
    assert dry.returncode == 0, dry
    assert "would load snapshot" in dry.stdout and "items: 295 rows" in dry.stdout and "1 triggers" in dry.stdout
    assert sqld.execute("SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite%'") == [[0]]

    r = cli("restore", "--repo", repository, "--db", "app", "--into", sqld.url, "--json")
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    assert out["equal"] and out["rows"] == 295 + 3 + 50 + 300 and out["batches"] >= 1
    assert {c["table"] for c in out["checks"]} == {"items", "tags", "plain", "log"}
    _assert_same(sqld, src)
    # the trigger came after the data: it fired for no loaded row, and fires now
    sqld.execute("INSERT INTO items(name) VALUES ('new')")
    assert sqld.execute("SELECT max(id) FROM items") == [[301]]  # AUTOINCREMENT's counter came along
    assert sqld.execute("SELECT count(*) FROM log") == [[301]]

    refused = cli("restore", "--repo", repository, "--db", "app", "--into", sqld.url)
    assert_one_line_error(refused, 2, "not empty", "--force")
    assert sqld.execute("SELECT count(*) FROM items") == [[296]]  # nothing changed

    sqld.execute("CREATE TABLE stranger(x)")
    dry_force = cli("restore", "--repo", repository, "--db", "app", "--into", sqld.url, "--force", "--dry-run")
    assert "would drop" in dry_force.stdout and "table stranger" in dry_force.stdout, dry_force
    forced = cli("restore", "--repo", repository, "--db", "app", "--into", sqld.url, "--force")
    assert forced.returncode == 0, forced
    assert "target equals snapshot" in forced.stdout and "dropped" in forced.stdout
    _assert_same(sqld, src)
    assert sqld.execute("SELECT count(*) FROM sqlite_schema WHERE name='stranger'") == [[0]]
    _wipe(sqld)


def test_into_new_namespace(repo: tuple[Path, Path], sqld_namespaces: SqldServer) -> None:  # noqa: F811
    repository, src = repo
    ns = f"into-{secrets.token_hex(3)}"
    sqld_namespaces.create_namespace(ns)
    try:
        r = cli("restore", "--repo", repository, "--db", "app", "--into", sqld_namespaces.url,
                "--into-namespace", ns, "--json")
        assert r.returncode == 0, r
        assert json.loads(r.stdout)["equal"]
        _assert_same(sqld_namespaces, src, ns)
    finally:
        sqld_namespaces.delete_namespace(ns)


def test_many_batches_and_a_failed_load_leaves_the_target_empty(repo: tuple[Path, Path], sqld: SqldServer,
                                                                tmp_path: Path) -> None:
    """Tiny batches (many transactions); then a load that fails mid-way drops what it created."""
    from dbre.errors import RestoreError
    from dbre.repository.repo import Repository
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.restore.remote import HranaTarget, apply_load, plan_load

    repository, src = repo
    _wipe(sqld)
    scratch = tmp_path / "r.db"
    rp = Repository.open(str(repository))
    apply_restore(rp, plan_restore(rp, "app", scratch))
    conn = apsw.Connection(str(scratch))
    target = HranaTarget(sqld.url, None)
    plan = plan_load(conn, target, force=False, source="t", batch_bytes=2000)
    seen: list[int] = []
    result = apply_load(conn, target, plan, lambda done, total: seen.append(done))
    assert result.equal and result.batches > 5 and seen[-1] == plan.rows and seen == sorted(seen)
    _assert_same(sqld, src)

    # a row the target cannot take (a CHECK the source lacks) half-way through: everything dropped
    _wipe(sqld)
    plan = plan_load(conn, target, force=False, source="t", batch_bytes=2000)
    plain = next(t for t in plan.tables if t.name == "plain")
    plain.sql = plain.sql.replace("b)", "b CHECK (a < 10))")
    assert "CHECK" in plain.sql
    with pytest.raises(RestoreError, match="dropped: the target is empty"):
        apply_load(conn, target, plan)
    assert sqld.execute("SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite%'") == [[0]]
    conn.close()


def test_token_right_and_wrong(repo: tuple[Path, Path], sqld_auth: SqldServer) -> None:
    repository, src = repo
    assert sqld_auth.token
    wrong = "eyJ0eXAi.wrong-token-value.xyz"
    r = cli("restore", "--repo", repository, "--db", "app", "--into", sqld_auth.url,
            env={"LIBSQL_AUTH_TOKEN": wrong, "TURSO_AUTH_TOKEN": None})
    line = assert_one_line_error(r, 1, "token")
    assert wrong not in r.stderr + r.stdout and sqld_auth.token not in line
    none = cli("restore", "--repo", repository, "--db", "app", "--into", sqld_auth.url,
               env={"LIBSQL_AUTH_TOKEN": None, "TURSO_AUTH_TOKEN": None})
    assert_one_line_error(none, 1, "requires a token")
    _wipe(sqld_auth)
    ok = cli("restore", "--repo", repository, "--db", "app", "--into", sqld_auth.url,
             env={"LIBSQL_AUTH_TOKEN": None, "TURSO_AUTH_TOKEN": sqld_auth.token})
    assert ok.returncode == 0 and "target equals snapshot" in ok.stdout, ok
    assert sqld_auth.token not in ok.stdout + ok.stderr
    _assert_same(sqld_auth, src)
    _wipe(sqld_auth)


def test_bad_options_in_one_line(repo: tuple[Path, Path], tmp_path: Path) -> None:
    repository, _ = repo
    assert_one_line_error(cli("restore", "--repo", repository, "--db", "app", "--into", "http://127.0.0.1:1",
                              "--to", tmp_path / "x.db"), 2, "--to", "--into URL")
    assert_one_line_error(cli("restore", "--db", "app", "--into", "http://127.0.0.1:1"), 2, "--repo")
    assert_one_line_error(cli("restore", "--repo", repository, "--db", "app", "--into", "http://127.0.0.1:1"),
                          1, "cannot reach")


def test_into_a_namespace_it_creates_at_a_time(repo: tuple[Path, Path], sqld_namespaces: SqldServer,  # noqa: F811
                                               tmp_path: Path) -> None:
    """--admin-url creates the namespace (--dry-run does not); --at picks the snapshot; an existing
    namespace is refused by name and left alone."""
    from datetime import UTC, datetime

    repository, src = repo
    ns = f"made-{secrets.token_hex(3)}"
    assert sqld_namespaces.admin_url
    base = ["restore", "--repo", repository, "--db", "app", "--into", sqld_namespaces.url, "--into-namespace", ns,
            "--admin-url", sqld_namespaces.admin_url, "--at", datetime.now(UTC).isoformat()]
    dry = cli(*base, "--dry-run")
    assert dry.returncode == 0 and f"would create namespace {ns}" in dry.stdout, dry
    with pytest.raises(urllib.error.HTTPError):  # not created by the dry run
        sqld_namespaces.execute("SELECT 1", namespace=ns)
    try:
        r = cli(*base)
        assert r.returncode == 0 and "target equals snapshot" in r.stdout, r
        _assert_same(sqld_namespaces, src, ns)
        again = cli(*base)
        assert_one_line_error(again, 2, "already exists")
        _assert_same(sqld_namespaces, src, ns)
    finally:
        sqld_namespaces.delete_namespace(ns)


def test_big_blobs_page_under_the_response_limit(sqld: SqldServer, tmp_path: Path) -> None:
    """12 rows of 1 MiB blobs (more than sqld's 10 MB response limit in all): loaded a row a batch, read
    back in pages small enough, equal."""
    from dbre.restore.remote import HranaTarget, apply_load, plan_load

    _wipe(sqld)
    path = tmp_path / "blobs.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)")
    with conn:
        conn.executemany("INSERT INTO big(b) VALUES (?)", [(secrets.token_bytes(1 << 20),) for _ in range(12)])
    try:
        target = HranaTarget(sqld.url, None)
        result = apply_load(conn, target, plan_load(conn, target, force=False, source="blobs"))
        assert result.equal and result.batches >= 12 and result.checks[0].remote_rows == 12
    finally:
        conn.close()
        _wipe(sqld)
