"""Source identity (issue 15): a database name keeps one source. A different file that happens to
get the same default name is refused with nothing written; the same file, a restore over it, a
symlink to it, an old manifest without a recorded source and a libSQL URL with another token are
accepted; a moved file is accepted with --accept-new-source and its chain goes on."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dbre.repository.identity import location, same_lineage, same_source
from dbre.repository.repo import Repository
from tests.dbfactory import assert_one_line_error, change_rows, cli, make_db
from tests.sqld import SqldServer, sqld  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "repo") if request.param == "local" else request.getfixturevalue("s3_repo_url")


def listing(url: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every object of the repository, raw (hidden temp files included), with its size and version."""
    if not url.startswith("s3://"):
        root = Path(url)
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*") if p.is_file()}
    client = request.getfixturevalue("s3_client")
    bucket = urlsplit(url).netloc
    out: dict[str, Any] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["Size"], obj["ETag"])
    return out


def backup_json(*args: str | os.PathLike[str]) -> dict[str, Any]:
    r = cli("backup", *args, "--json")
    assert r.returncode == 0, r
    return dict(json.loads(r.stdout))


def other_database(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript("PRAGMA application_id=7; CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT);"
                       "INSERT INTO users(email) VALUES ('a@example.com');")
    conn.close()
    return path


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Path]:
    yield make_db(tmp_path / "app.db", mb=0.3)


def test_a_different_file_under_the_same_name_is_refused_and_nothing_written(
        app: Path, tmp_path: Path, repo_url: str, request: pytest.FixtureRequest) -> None:
    first = backup_json(app, "--repo", repo_url)
    other = other_database(tmp_path / "other" / "app.db")
    before = listing(repo_url, request)
    line = assert_one_line_error(cli("backup", other, "--repo", repo_url), 2,
                                 str(other), str(app), "another database", "--db NAME", "--accept-new-source")
    assert "users" in line and "items" in line  # what each holds
    assert listing(repo_url, request) == before  # no pack, no manifest, no lock left, no temp file
    # the name's newest snapshot is still app's; a plain restore brings app back
    snaps = json.loads(cli("snapshots", "--repo", repo_url, "--json").stdout)["snapshots"]
    assert [s["id"] for s in snaps] == [first["id"]]
    assert snaps[0]["source"]["path"] == str(app)
    # under a name of its own it is welcome
    assert backup_json(other, "--repo", repo_url, "--db", "users")["db"] == "users"


def test_a_missing_file_under_the_name_says_it_is_missing(app: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    backup_json(app, "--repo", repo)
    assert_one_line_error(cli("backup", tmp_path / "gone" / "app.db", "--repo", repo), 1, "no such file")
    from dbre.errors import SourceError
    from dbre.repository.backup import backup
    from dbre.sources.local import LocalFileSource

    with pytest.raises(SourceError, match="no such file"):  # the API too (the Prefect task calls it)
        backup(Repository.open(str(repo)), LocalFileSource(tmp_path / "gone.db"), "app")


def test_the_same_file_daily_a_symlink_and_a_restore_over_it_are_the_same_source(
        app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    a = backup_json(app, "--repo", repo)
    change_rows(app, 20)
    monkeypatch.chdir(app.parent)  # a relative path names the same file
    b = backup_json("app.db", "--repo", repo)
    assert b["parent"] == a["id"]
    link = tmp_path / "current.db"
    link.symlink_to(app)
    c = backup_json(link, "--repo", repo, "--db", "app")
    assert c["parent"] == b["id"]
    # a restored database put back at the source's path (new inode) is the same source
    r = cli("restore", "--repo", repo, "--db", "app", "--snapshot", a["id"], "--to", app, "--force")
    assert r.returncode == 0, r
    safety = r.stdout.split("safety snapshot ")[1].split()[0]  # (the database it replaced: the newest now)
    d = backup_json(app, "--repo", repo)
    assert d["parent"] == safety and d["parent"] != c["id"]


def test_a_moved_file_is_refused_then_accepted_with_the_option_and_the_chain_goes_on(
        app: Path, tmp_path: Path, repo_url: str, request: pytest.FixtureRequest) -> None:
    first = backup_json(app, "--repo", repo_url)
    moved = tmp_path / "new-disk" / "app.db"
    moved.parent.mkdir()
    shutil.move(app, moved)
    before = listing(repo_url, request)
    assert_one_line_error(cli("backup", moved, "--repo", repo_url), 2, str(moved), str(app), "same tables",
                          "--accept-new-source")
    assert listing(repo_url, request) == before
    second = backup_json(moved, "--repo", repo_url, "--accept-new-source")
    assert second["parent"] == first["id"] and second["pages_added"] == 0  # the chain goes on: dedup
    repo = Repository.open(repo_url)
    m = repo.find_snapshot("app", second["id"])
    assert m.source["path"] == str(moved)
    assert m.stats["new_source"] == {"from": {"kind": "file", "path": str(app), "application_id": 0},
                                     "snapshot": first["id"]}
    # from now on the new place is the source: no option needed, and the old place is refused
    change_rows(moved, 5)
    assert backup_json(moved, "--repo", repo_url)["parent"] == second["id"]
    make_db(app, mb=0.1, seed=3)  # a new file at the old place
    assert_one_line_error(cli("backup", app, "--repo", repo_url), 2, str(app), str(moved))


def test_an_old_manifest_without_a_source_is_accepted_and_the_source_recorded(app: Path, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    first = backup_json(app, "--repo", repo_dir)
    repo = Repository.open(str(repo_dir))
    m = repo.find_snapshot("app", first["id"])
    key = repo.manifest_key(m)
    m.source = {}  # as a manifest written before sources were recorded (or by another tool)
    repo.store.delete(key)
    repo.write_manifest(m)
    assert Repository.open(str(repo_dir)).find_snapshot("app", first["id"]).source == {}
    other = other_database(tmp_path / "elsewhere" / "app.db")
    second = backup_json(other, "--repo", repo_dir)  # nothing to compare with: accepted
    assert second["parent"] == first["id"]
    rec = Repository.open(str(repo_dir)).find_snapshot("app", second["id"]).source
    assert rec == {"kind": "file", "path": str(other), "application_id": 7}
    assert_one_line_error(cli("backup", app, "--repo", repo_dir), 2, str(app), str(other))  # recorded now


def test_libsql_url_with_another_token_or_scheme_is_the_same_source(sqld: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    """A real sqld: the token rotates (in the URL, then in the env), the scheme changes
    (http:// -> libsql://?tls=0): one source, one chain, no token recorded."""
    repo = tmp_path / "repo"
    table = "identity_" + os.urandom(4).hex()
    r = cli("backup", f"{sqld.url}?authToken=first-token-aaaa", "--repo", repo, "--db", "remote", "--json")
    assert r.returncode == 0, r
    prev = json.loads(r.stdout)["id"]
    port = urlsplit(sqld.url).port
    env = {"LIBSQL_AUTH_TOKEN": "second-token-bbbb"}
    for url in (f"{sqld.url}/", f"libsql://127.0.0.1:{port}?tls=0"):
        sqld.execute(f"CREATE TABLE IF NOT EXISTS {table}(x)")
        sqld.execute(f"INSERT INTO {table} VALUES (1)")
        r = cli("backup", url, "--repo", repo, "--db", "remote", "--json", env=env)
        assert r.returncode == 0, r
        snap = json.loads(r.stdout)
        assert snap["parent"] == prev  # chained on the previous snapshot
        prev = snap["id"]
    snaps = json.loads(cli("snapshots", "--repo", repo, "--db", "remote", "--json").stdout)["snapshots"]
    assert len(snaps) == 3 and all(s["parent"] for s in snaps[1:])
    assert {s["source"]["kind"] for s in snaps} == {"libsql"}
    text = json.dumps(snaps) + "".join(p.read_text(errors="replace") for p in repo.rglob("*") if p.is_file())
    assert "first-token" not in text and "second-token" not in text
    # a file under that name is another source
    assert_one_line_error(cli("backup", make_db(tmp_path / "remote.db", mb=0.05), "--repo", repo, "--db", "remote"),
                          2, "remote.db", f"127.0.0.1:{port}")


@pytest.mark.parametrize(("a", "b", "same"), [
    ("libsql://db-org.turso.io", "https://db-org.turso.io/", True),
    ("libsql://db-org.turso.io?authToken=SECRET1", "wss://DB-org.turso.io:443?authToken=SECRET2", True),
    ("libsql://db-org.turso.io?jwt=SECRET1", "libsql://db-org.turso.io", True),
    ("http://127.0.0.1:8080", "libsql://127.0.0.1:8080?tls=0", True),
    ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/", True),
    ("libsql://db-org.turso.io", "libsql://other-org.turso.io", False),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8081", False),
    ("libsql://127.0.0.1?tls=0", "https://127.0.0.1", False),  # port 80 vs 443
])
def test_url_normalisation(a: str, b: str, same: bool) -> None:
    ia, ib = {"kind": "libsql", "url": a}, {"kind": "libsql", "url": b}
    assert same_source(ia, ib) is same and same_source(ib, ia) is same
    assert "SECRET" not in repr(location(ia)) + repr(location(ib))


def test_namespace_and_kind_are_part_of_the_identity() -> None:
    url = "http://127.0.0.1:8080"
    assert not same_source({"kind": "libsql", "url": url, "namespace": "a"},
                           {"kind": "libsql", "url": url, "namespace": "b"})
    assert not same_source({"kind": "libsql", "url": url}, {"kind": "file", "path": "/x/app.db"})
    assert same_source({"kind": "file", "path": "/x/../x/app.db"}, {"kind": "file", "path": "/x/app.db"})
    for old in ({}, None, {"kind": "file"}, {"kind": "file", "path": ""}, {"purpose": "x"}):
        assert same_source(old, {"kind": "file", "path": "/x/app.db"})  # nothing recorded: accepted


def test_lineage_words_the_refusal_only() -> None:
    assert same_lineage(0, ["items", "users"], 0, ["items", "users", "new"])
    assert not same_lineage(1, ["items"], 2, ["items"])  # another application
    assert same_lineage(None, ["items"], 5, ["items"])  # an old manifest without application_id
    assert not same_lineage(0, ["items"], 0, ["users"])
    assert same_lineage(0, [], 0, [])
