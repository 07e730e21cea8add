"""`dbre forget --prune` says what it freed: the repository's bytes before and after (a local folder, and S3
through the store's `usage()` on the moto server), in its line and in --json; a dry run claims nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dbre.repository.repo import Repository
from dbre.storage.s3 import S3Store
from tests.dbfactory import cli, make_db


def _two_snapshots(src: Path, repo: str) -> None:
    """A snapshot adding ~2 MiB of random rows, then one after they were deleted and vacuumed away."""
    if not src.exists():
        make_db(src, mb=0.1)
        assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0  # the rows that stay: own packs
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 5000) "
                 "INSERT INTO items(name, n, payload) SELECT 'x' || i, i, randomblob(400) FROM s")
    conn.close()
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("DELETE FROM items WHERE name LIKE 'x%'")  # out of use once the first snapshot is forgotten
    conn.execute("VACUUM")
    conn.close()
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0


def _bytes(url: str) -> int:
    if url.startswith("s3://"):
        return S3Store.from_url(url).usage()
    return sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prune_says_what_it_freed(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repo = request.getfixturevalue("s3_repo_url") if where == "s3" else str(tmp_path / "repo")
    _two_snapshots(tmp_path / "app.db", repo)
    dry = cli("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry
    assert "freed_bytes" not in json.loads(dry.stdout)["prune"]  # a dry run deletes nothing, claims nothing
    before = _bytes(repo)
    r = cli("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0", "--json")
    assert r.returncode == 0, r
    p = json.loads(r.stdout)["prune"]
    after = _bytes(repo)
    assert p["delete_packs"] >= 1 and p["storage_bytes_before"] == before and p["storage_bytes_after"] == after
    assert p["freed_bytes"] == before - after > 0, p
    assert len(Repository.open(repo).snapshots("app")) == 1
    # the table form says it in one line
    _two_snapshots(tmp_path / "app.db", repo)
    text = cli("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0")
    assert text.returncode == 0, text
    assert any(line.startswith("prune: freed ") and "the repository went from" in line
               for line in text.stdout.splitlines()), text.stdout
