"""`dbre copy --to` the repository being copied from is refused (issue 15): one line naming the cause, exit 2,
nothing written, however the same place is spelled (a trailing slash, a relative path, a symlinked folder, an S3
URL with a trailing slash). A different place, even a sibling prefix of the same bucket, is still copied to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.dbfactory import assert_one_line_error, cli, make_db


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns), to show that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def local_repo(tmp_path: Path) -> Path:
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo, "--db", "app").returncode == 0
    return repo


@pytest.mark.parametrize("spelling", ["same", "slash", "relative", "dotted", "symlink"])
def test_copy_to_the_same_local_repository_is_refused(local_repo: Path, tmp_path: Path, spelling: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        os.symlink(local_repo, tmp_path / "link")
    to = {"same": str(local_repo), "slash": f"{local_repo}/", "relative": "repo", "dotted": "./sub/../repo/",
          "symlink": str(tmp_path / "link")}[spelling]
    before = _tree(local_repo)
    result = cli("copy", "--repo", local_repo, "--to", to)
    assert_one_line_error(result, 2, "copy: --to is the repository being copied from", str(local_repo))
    assert _tree(local_repo) == before
    assert result.stdout == ""


def test_the_repository_given_through_a_symlink_is_refused_too(local_repo: Path, tmp_path: Path) -> None:
    """The other way round: --repo names the link, --to the real folder."""
    os.symlink(local_repo, tmp_path / "link")
    before = _tree(local_repo)
    result = cli("copy", "--repo", tmp_path / "link", "--to", local_repo)
    assert_one_line_error(result, 2, "--to is the repository being copied from")
    assert _tree(local_repo) == before


def test_copy_to_another_local_folder_still_works(local_repo: Path, tmp_path: Path) -> None:
    result = cli("copy", "--repo", local_repo, "--to", tmp_path / "offsite", "--json")
    assert result.returncode == 0, result
    assert (tmp_path / "offsite" / "config").is_file()
    assert any((tmp_path / "offsite" / "snapshots" / "app").iterdir())


def _objects(s3_client: Any, bucket: str) -> dict[str, str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_copy_to_the_same_s3_repository_is_refused(tmp_path: Path, s3_client: Any, s3_bucket: str) -> None:
    db = make_db(tmp_path / "app.db", mb=0.2)
    url = f"s3://{s3_bucket}/repo"
    assert cli("backup", db, "--repo", url, "--db", "app").returncode == 0
    before = _objects(s3_client, s3_bucket)
    assert "repo/config" in before
    for to in (url, f"{url}/", f"s3://{s3_bucket}//repo/"):
        result = cli("copy", "--repo", url, "--to", to)
        assert_one_line_error(result, 2, "--to is the repository being copied from", url)
    assert _objects(s3_client, s3_bucket) == before
    # another prefix of the same bucket is another repository: copied to
    result = cli("copy", "--repo", url, "--to", f"s3://{s3_bucket}/offsite")
    assert result.returncode == 0, result
    assert "offsite/config" in _objects(s3_client, s3_bucket)
