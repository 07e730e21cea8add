"""A chain of snapshots with a lost or damaged pack, and `backup --full`, on a local disk and on S3.

The next backup after a pack is lost must not reuse the parent's records into it: those pages
are stored again, the new snapshot verifies and restores byte-identical to the source, and only
the old snapshots that needed the lost pack are named by `verify --read-data`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dbre.errors import RepositoryError
from dbre.repository.backup import BackupResult, backup, load_records
from dbre.repository.repo import Repository, pack_key
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage.base import PermanentError, Store
from tests.checksums import CountingHash
from tests.dbfactory import change_rows, cli, make_db

DB = "shop"


def _backup(repo: Repository, src: Path, **kw: bool) -> BackupResult:
    return backup(repo, LocalFileSource(src), DB, **kw)


def _name(result: BackupResult) -> str:
    return f"{DB}/{result.manifest.id}"


def _restores(repo: Repository, result: BackupResult, to: Path) -> bytes | None:
    """The restored file's bytes, or None when restore refuses the snapshot."""
    try:
        apply_restore(repo, plan_restore(repo, DB, to, snapshot=result.manifest.id))
    except RepositoryError:  # damaged (IntegrityError) or missing (NotFound)
        assert not to.exists()
        return None
    return to.read_bytes()


def _pages_in(repo: Repository, result: BackupResult, pack: str) -> int:
    return sum(1 for r in load_records(repo, result.manifest) if r[16:32].hex() == pack)


def _chain(repo: Repository, tmp_path: Path) -> tuple[Path, BackupResult, BackupResult]:
    """Two snapshots: a full one, then an incremental that reuses most of its pages."""
    src = make_db(tmp_path / "src.db", mb=1.0)
    first = _backup(repo, src)
    change_rows(src, 20)
    second = _backup(repo, src)
    assert second.manifest.parent == first.manifest.id
    return src, first, second


def _data_pack(first: BackupResult, second: BackupResult) -> str:
    """The first snapshot's pack, which the second needs for its unchanged pages (not for its runs)."""
    (pack,) = first.manifest.packs
    assert pack in second.manifest.packs and all(r.pack != pack for r in second.manifest.runs)
    return pack


def test_lost_pack_pages_are_stored_again(store: Store, tmp_path: Path) -> None:
    repo = Repository.open_or_init(store)
    src, first, second = _chain(repo, tmp_path)
    lost = _data_pack(first, second)
    needed = _pages_in(repo, second, lost)
    assert needed > 200
    store.delete(pack_key(lost))

    third = _backup(repo, src)

    st = third.manifest.stats
    assert st["missing_packs"] == [lost]
    assert st["repaired_pages"] == needed  # the source did not change since: exactly those pages
    assert third.pages_added == needed
    assert lost not in third.manifest.packs
    assert third.summary()["note"] == f"parent referenced 1 missing or damaged pack: {needed} pages stored again"
    report = verify(repo, read_data=True)
    assert report.damaged == {_name(first), _name(second)}  # the new snapshot is not named
    assert all(_name(third) not in p.snapshots for p in report.problems)
    assert _restores(repo, third, tmp_path / "third.db") == src.read_bytes()
    assert _restores(repo, second, tmp_path / "second.db") is None
    assert _restores(repo, first, tmp_path / "first.db") is None
    # the repaired chain goes on as usual: the next backup reuses the new records
    change_rows(src, 3, seed=7)
    fourth = _backup(repo, src)
    assert "missing_packs" not in fourth.manifest.stats and fourth.pages_added < 20
    assert _name(fourth) not in verify(repo, read_data=True).damaged
    assert _restores(repo, fourth, tmp_path / "fourth.db") == src.read_bytes()


def test_damaged_pack_index_is_treated_as_lost(store: Store, tmp_path: Path) -> None:
    """A small parent's packs have their indexes read: one whose index does not authenticate
    counts as lost (its blobs may be fine, but nothing then vouches for them)."""
    repo = Repository.open_or_init(store)
    src, first, second = _chain(repo, tmp_path)
    bad = _data_pack(first, second)
    data = bytearray(store.get(pack_key(bad)))
    data[-20] ^= 0x01  # inside the sealed index, before its length and magic
    store.put(pack_key(bad), bytes(data))

    third = _backup(repo, src)

    assert third.manifest.stats["missing_packs"] == [bad]
    assert bad not in third.manifest.packs
    report = verify(repo)  # the structure check alone finds a damaged index
    assert report.damaged == {_name(first), _name(second)}
    assert _restores(repo, third, tmp_path / "third.db") == src.read_bytes()


class _PacksFail:
    """The real store, except that a whole listing of packs/ (no limit) is refused always and
    reading a pack's bytes is refused (a denied or broken request) once ``broken`` is set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.url = store.url
        self.broken = threading.Event()
        self.pack_listings = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def list(self, prefix: str = "", **kw: object) -> object:
        if prefix.startswith("packs") and kw.get("limit") is None:
            self.pack_listings += 1
            raise PermanentError(f"list {prefix}: access denied")
        return self._store.list(prefix, **kw)  # type: ignore[arg-type]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if self.broken.is_set() and key.startswith("packs/"):
            raise PermanentError(f"get {key}: access denied")
        return self._store.get_range(key, offset, length)


def test_parent_check_reads_the_parents_packs_not_a_listing(store: Store, tmp_path: Path) -> None:
    """The parent check costs what the parent needs, never a listing of every pack in the
    repository (flat in history): a store that refuses to list packs/ still backs up and finds
    the lost pack."""
    failing = _PacksFail(store)
    repo = Repository.open_or_init(failing)  # type: ignore[arg-type]
    src, first, second = _chain(repo, tmp_path)
    lost = _data_pack(first, second)
    store.delete(pack_key(lost))
    third = _backup(repo, src)
    assert failing.pack_listings == 0
    assert third.manifest.stats["missing_packs"] == [lost]
    assert _restores(repo, third, tmp_path / "third.db") == src.read_bytes()


def test_failed_read_fails_the_backup(store: Store, tmp_path: Path) -> None:
    """A pack read that fails (denied, not "not found") is never taken as "the pack is lost":
    the backup fails and nothing is written."""
    failing = _PacksFail(store)
    repo = Repository.open_or_init(failing)  # type: ignore[arg-type]
    src, first, second = _chain(repo, tmp_path)
    failing.broken.set()
    change_rows(src, 2, seed=3)
    with pytest.raises(RepositoryError, match="access denied"):
        _backup(repo, src)
    failing.broken.clear()
    assert len(repo.list_snapshot_refs(DB)) == 2


def test_parent_page_map_in_lost_pack_stores_every_page(store: Store, tmp_path: Path) -> None:
    """When the parent's page map itself is lost nothing of it can be reused: a full backup."""
    repo = Repository.open_or_init(store)
    src, first, second = _chain(repo, tmp_path)
    for pack in {r.pack for r in second.manifest.runs}:
        store.delete(pack_key(pack))
    third = _backup(repo, src)
    st = third.manifest.stats
    assert st["full"].startswith("its page map cannot be read")
    assert third.manifest.parent is None
    assert third.pages_added == len({r[:16] for r in load_records(repo, third.manifest)})
    assert not set(third.manifest.packs) & (set(first.manifest.packs) | set(second.manifest.packs))
    assert _name(third) not in verify(repo, read_data=True).damaged
    assert _restores(repo, third, tmp_path / "third.db") == src.read_bytes()


def test_full_backup_breaks_a_healthy_chain(store: Store, tmp_path: Path) -> None:
    repo = Repository.open_or_init(store)
    src, first, second = _chain(repo, tmp_path)
    old = set(first.manifest.packs) | set(second.manifest.packs)

    full = _backup(repo, src, full=True)

    m = full.manifest
    assert m.parent is None and m.stats["full"] == "asked"
    distinct = {r[:16] for r in load_records(repo, m)}
    assert full.pages_added == len(distinct)  # every page again; a page repeated in the file once
    assert not set(m.packs) & old  # no record or run points into an older pack
    assert full.summary()["note"] == "full backup (asked): every page stored again"
    assert verify(repo, read_data=True).ok
    assert _restores(repo, full, tmp_path / "full.db") == src.read_bytes()
    # and the chain goes on from it
    change_rows(src, 3, seed=5)
    nxt = _backup(repo, src)
    assert nxt.manifest.parent == m.id and nxt.pages_added < 20
    assert set(nxt.manifest.packs) & set(m.packs)


def test_cli_full_and_verify_output(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=0.5)
    repo = tmp_path / "repo"
    assert cli("backup", src, "--repo", repo, "--db", DB).returncode == 0
    res = cli("backup", src, "--repo", repo, "--db", DB, "--full")
    assert res.returncode == 0, res
    assert "(full)" in res.stdout and "note: full backup (asked): every page stored again" in res.stdout
    r = Repository.open(str(repo))
    newest = r.newest_snapshot(DB)
    assert newest is not None and newest.stats["full"] == "asked"
    for pack in Path(repo, "packs").glob("*/*"):
        if pack.name not in newest.packs:
            pack.unlink()
    res = cli("verify", "--repo", repo, "--read-data")
    assert res.returncode == 1, res
    assert "snapshots that cannot be restored" in res.stdout and newest.id not in res.stdout


def test_backup_task_and_flow_take_full(tmp_path: Path) -> None:
    """The Prefect task passes ``full`` through (tested with .fn, as the other task tests are)."""
    from tasks.backup import backup_database

    src = make_db(tmp_path / "src.db", mb=0.5)
    repo = str(tmp_path / "repo")
    first = backup_database.fn(DB, str(src), repo)
    again = backup_database.fn(DB, str(src), repo)
    full = backup_database.fn(DB, str(src), repo, full=True)
    assert first["note"] is None and again["parent"] == first["id"] and again["pages_added"] == 0
    assert full["parent"] is None and full["pages_added"] == first["pages_added"]
    assert full["note"] == "full backup (asked): every page stored again"


# -- the quick "unchanged" test: only changed pages pay for the keyed hash -------------------------


def _page_count(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as c:
        return int(c.execute("PRAGMA page_count").fetchone()[0])


def test_incremental_keyed_hash_only_for_changed_pages(store: Store, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An incremental hashes every page with xxh3 and only the pages that changed with the keyed
    hash; the snapshot still restores byte-identical and verifies clean (fast runs included).
    (Table checksums off: with them every page gets the keyed hash, see the next test.)"""
    repo = Repository.open_or_init(store)
    src = make_db(tmp_path / "src.db", mb=2)
    first = _backup(repo, src, checksums=False)
    assert first.manifest.fast_runs, "format 2 snapshots carry their xxh3 runs"
    change_rows(src, 3, seed=11)
    counter = CountingHash(repo)
    monkeypatch.setattr(Repository, "page_hash", property(lambda self: counter))
    second = _backup(repo, src, checksums=False)
    monkeypatch.undo()
    pages = _page_count(src)
    changed = sum(1 for a, b in zip(load_records(repo, first.manifest), load_records(repo, second.manifest),
                                    strict=False) if a[:16] != b[:16])
    assert 0 < changed < pages // 4
    # keyed calls: the changed pages, plus runs and fast runs (a few), never every page
    assert counter.calls < changed + pages // 8, (counter.calls, changed, pages)
    assert _restores(repo, second, tmp_path / "out.db") == src.read_bytes()
    assert verify(repo, read_data=True).ok


def test_with_carried_table_checksums_every_page_is_keyed_once(store: Store, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With table checksums that keep the partial sums of unchanged leaves (the default up to
    256 MiB), the sink gives every page the keyed hash and tells unchanged pages by it; the table
    checksums then hash no page again (before: the sink hashed the changed pages, and the checksums
    each kept leaf and overflow page a second time, at ~3x the cost per page)."""
    repo = Repository.open_or_init(store)
    src = make_db(tmp_path / "src.db", mb=2)
    _backup(repo, src)
    change_rows(src, 3, seed=11)
    counter = CountingHash(repo)
    monkeypatch.setattr(Repository, "page_hash", property(lambda self: counter))
    second = _backup(repo, src)
    monkeypatch.undo()
    pages = _page_count(src)
    leaves = second.manifest.stats["checksum_leaves"]
    assert 0 < leaves["read"] < leaves["of"] // 2, leaves  # (most leaves kept their partial sums)
    assert pages <= counter.calls < pages + pages // 8, (counter.calls, pages)  # (plus runs, a few)
    assert _restores(repo, second, tmp_path / "out.db") == src.read_bytes()
    assert verify(repo, read_data=True).ok


def test_damaged_fast_runs_only_cost_time(store: Store, tmp_path: Path) -> None:
    """The xxh3 runs are a hint: when the parent's cannot be read (here the pack holding them is
    lost; the pages are elsewhere), every page gets the keyed hash and the snapshot is right."""
    repo = Repository.open_or_init(store)
    src = make_db(tmp_path / "src.db", mb=1)
    first = _backup(repo, src)
    change_rows(src, 3, seed=12)
    second = _backup(repo, src)
    fast_packs = {r.pack for r in second.manifest.fast_runs}
    needed = {r[16:32].hex() for r in load_records(repo, second.manifest)} | {r.pack for r in second.manifest.runs}
    assert fast_packs, "format 2 snapshots carry their xxh3 runs"
    # damage the fast runs' blobs only: rewrite each such pack with the fast-run blob bytes flipped
    for run in second.manifest.fast_runs:
        key = pack_key(run.pack)
        data = bytearray(store.get(key))
        data[run.offset + run.length // 2] ^= 0xFF
        store.put(key, bytes(data))
    change_rows(src, 3, seed=13)
    third = _backup(repo, src)
    assert _restores(repo, third, tmp_path / "out.db") == src.read_bytes()
    assert third.manifest.parent == second.manifest.id
    if not fast_packs & needed:  # (when they share a pack with pages, verify rightly names that pack)
        assert verify(repo).ok
    assert first.manifest.fast_runs


def test_restore_checks_pages_against_the_fast_runs_when_there_are_some(tmp_path: Path) -> None:
    """A format-2 snapshot is restored checking each page against its xxh3 from the snapshot's
    (authenticated) fast runs; a format-1 snapshot, which has none, against its page hash. A page
    changed inside a re-sealed batch is refused either way (tests/test_verify_agreement.py)."""
    import shutil

    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = make_db(tmp_path / "src.db", mb=0.5)
    _backup(repo, src)
    plan = plan_restore(repo, DB, tmp_path / "ok.db")
    assert plan.quick_check
    apply_restore(repo, plan)
    assert (tmp_path / "ok.db").read_bytes() == src.read_bytes()
    v1 = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "data" / "v1" / "plain", v1)
    old = Repository.open(str(v1))
    plan = plan_restore(old, "app", tmp_path / "v1.db")
    assert not plan.quick_check
    apply_restore(old, plan)
    assert (tmp_path / "v1.db").read_bytes() == (Path(__file__).parent / "data" / "v1" / "app-final.db").read_bytes()


def test_restore_falls_back_to_the_keyed_hash_when_a_fast_hash_is_missing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored page without its xxh3 in the fast runs (all zeros: never set) must not fail the
    restore: the whole restore checks keyed hashes instead."""
    import dbre.restore.full as full

    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = make_db(tmp_path / "src.db", mb=0.5)
    _backup(repo, src)
    real = full.load_fast_hashes

    def with_a_hole(repo: Repository, manifest: object) -> list[bytes] | None:
        fast = real(repo, manifest)  # type: ignore[arg-type]
        assert fast is not None
        fast[1] = bytes(16)
        return fast

    monkeypatch.setattr(full, "load_fast_hashes", with_a_hole)
    plan = plan_restore(repo, DB, tmp_path / "out.db")
    assert not plan.quick_check
    apply_restore(repo, plan)
    assert (tmp_path / "out.db").read_bytes() == src.read_bytes()


def test_fast_runs_are_never_reused_from_a_lost_or_repacked_pack(tmp_path: Path) -> None:
    """Review of fast runs, finding 1: a parent's fast run whose pack is lost (its index damaged)
    or being repacked is written again, so the new snapshot never lists that pack."""
    from dbre.repository import backup as engine
    from dbre.repository.pack import PackWriter
    from dbre.repository.sink import PageSink

    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = make_db(tmp_path / "src.db", mb=0.5)
    first = _backup(repo, src).manifest
    fast = engine.load_fast_hashes(repo, first)
    assert fast is not None and len(fast)
    their_pack = first.fast_runs[0].pack
    writer = PackWriter(repo.store, repo.sealer)
    records = engine.load_records(repo, first)

    def fast_runs(avoid: set[str]) -> list:
        sink = PageSink(repo, writer, records, first.page_size, first.page_count, None, fast,
                        parent_runs=first.runs, parent_fast_runs=first.fast_runs, avoid_fast=avoid)
        with open(src, "rb") as f:
            for i in range(first.page_count):
                sink.add(i, f.read(first.page_size))
        return sink.finish()[1]

    reused = fast_runs(set())
    assert [r.pack for r in reused] == [r.pack for r in first.fast_runs]  # same bytes: reused as they are
    avoided = fast_runs({their_pack})
    writer.finish()
    assert their_pack not in {r.pack for r in avoided}
    assert [r.hash for r in avoided] == [r.hash for r in first.fast_runs]
