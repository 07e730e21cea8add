"""An unchanged sqld namespace is snapshotted without a /dump (issue 12: fleet rounds that cost what
changed), against a real sqld with namespaces and its admin API.

The marker is sqld's namespace instance id and replication index, asked before the read; equal
markers mean no write came in between, so the new snapshot holds the parent's pages. Each case
restores what the snapshot says and compares it with what the namespace holds.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import apsw
import pytest

import dbre.repository.unchanged as unchanged_mod
import dbre.sources.remote as remote_mod
from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.remote import RemoteLibsqlSource
from tests.sqld import SqldServer, sqld_namespaces  # noqa: F401 - the session fixture


def _source(server: SqldServer, ns: str, admin: bool = True) -> RemoteLibsqlSource:
    return RemoteLibsqlSource(server.url, namespace=ns, method="dump",
                              admin_url=server.admin_url if admin else None)


def _rows(path: Path) -> list[Any]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


def _restored(repo: Repository, m: Manifest, tmp: Path) -> list[Any]:
    target = tmp / f"restored-{m.id}.db"
    apply_restore(repo, plan_restore(repo, m.db, target, snapshot=m.id))
    return _rows(target)


@pytest.fixture()
def ns(sqld_namespaces: SqldServer) -> str:  # noqa: F811
    name = f"u{uuid.uuid4().hex[:10]}"
    sqld_namespaces.create_namespace(name)
    sqld_namespaces.pipeline(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
                              "INSERT INTO t(v) VALUES ('one'), ('two')"], namespace=name)
    return name


def _count_dumps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    dumps: list[str] = []
    real = remote_mod.RemoteLibsqlSource._open_dump

    def counted(self: RemoteLibsqlSource, stack: Any) -> Any:
        dumps.append(self.namespace or "")
        return real(self, stack)

    monkeypatch.setattr(remote_mod.RemoteLibsqlSource, "_open_dump", counted)
    return dumps


def test_an_unchanged_namespace_costs_no_dump(sqld_namespaces: SqldServer, ns: str, tmp_path: Path,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    dumps = _count_dumps(monkeypatch)
    first = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    assert dumps == [ns] and first.stats["change_marker"]["replication_index"] > 0
    sqld_namespaces.pipeline(["SELECT * FROM t"], namespace=ns)  # a read moves nothing
    second = backup(repo, _source(sqld_namespaces, ns), "app")
    assert dumps == [ns], "no /dump for an unchanged namespace"
    m = second.manifest
    assert m.stats["read"].startswith("unchanged") and m.stats["unchanged_run"] == 1
    assert m.stats["unchanged_since"] == first.id and m.parent == first.id
    assert second.bytes_added == 0 and [r.hash for r in m.runs] == [r.hash for r in first.runs]
    assert m.time > first.time and repo.newest_snapshot("app").id == m.id
    assert _restored(repo, m, tmp_path) == _restored(repo, first, tmp_path) == [(1, "one"), (2, "two")]
    # a write: the next backup reads the namespace, and holds the write
    sqld_namespaces.pipeline(["INSERT INTO t(v) VALUES ('three')"], namespace=ns)
    third = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    assert dumps == [ns, ns] and "unchanged_run" not in third.stats
    assert _restored(repo, third, tmp_path) == [(1, "one"), (2, "two"), (3, "three")]


def test_a_namespace_created_again_with_the_same_writes_is_read(sqld_namespaces: SqldServer, ns: str,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """Deleted and created again, the same statements reach the same replication index with other
    rows: the instance id tells them apart (the index alone would keep the old rows)."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    sqld_namespaces.delete_namespace(ns)
    sqld_namespaces.create_namespace(ns)
    sqld_namespaces.pipeline(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
                              "INSERT INTO t(v) VALUES ('uno'), ('dos')"], namespace=ns)
    again = _source(sqld_namespaces, ns).change_marker()
    assert again is not None and again["replication_index"] == first.stats["change_marker"]["replication_index"]
    second = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    assert "unchanged_run" not in second.stats
    assert _restored(repo, second, tmp_path) == [(1, "uno"), (2, "dos")]


def test_at_most_a_limit_of_unchanged_snapshots_in_a_row(sqld_namespaces: SqldServer, ns: str,  # noqa: F811
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unchanged_mod, "UNCHANGED_LIMIT", 2)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    dumps = _count_dumps(monkeypatch)
    runs = [backup(repo, _source(sqld_namespaces, ns), "app").manifest.stats.get("unchanged_run") for _ in range(5)]
    assert runs == [None, 1, 2, None, 1]
    assert len(dumps) == 2


def test_without_an_admin_url_or_with_full_the_namespace_is_read(sqld_namespaces: SqldServer, ns: str,  # noqa: F811
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    dumps = _count_dumps(monkeypatch)
    backup(repo, _source(sqld_namespaces, ns, admin=False), "app")
    backup(repo, _source(sqld_namespaces, ns, admin=False), "app")
    assert len(dumps) == 2
    backup(repo, _source(sqld_namespaces, ns), "app")  # records the marker
    assert backup(repo, _source(sqld_namespaces, ns), "app", full=True).manifest.stats.get("unchanged_run") is None
    assert len(dumps) == 4


def test_a_parent_with_a_lost_pack_is_not_cloned(sqld_namespaces: SqldServer, ns: str, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged namespace whose newest snapshot lost a pack is read again (which stores the lost
    pages again), not cloned into a second broken snapshot."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    data_packs = [p for p in first.packs if p not in {r.pack for r in first.runs}]
    for pack in data_packs or first.packs:
        repo.store.delete(pack_key(pack))
    dumps = _count_dumps(monkeypatch)
    second = backup(repo, _source(sqld_namespaces, ns), "app").manifest
    assert dumps == [ns] and "unchanged_run" not in second.stats
    assert _restored(repo, second, tmp_path) == [(1, "one"), (2, "two")]


def test_the_admin_key_never_shows(sqld_namespaces: SqldServer, ns: str) -> None:  # noqa: F811
    src = RemoteLibsqlSource(sqld_namespaces.url, namespace=ns, admin_url=sqld_namespaces.admin_url,
                             admin_key="s3cret-admin-key")  # type: ignore[arg-type]
    assert "s3cret" not in repr(src) and "s3cret" not in str(src.identity())
