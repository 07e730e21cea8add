"""Review findings 5 and 7 of format v2: objects are never read past the size dbre could have
written (a planted huge lock, config, manifest, record or pack gives one clear line, not memory
exhaustion), and the temp file of a killed restore is removed by the next restore to that target
while a live restore's is left alone. Real parts: local directories and the moto S3 server, real
subprocesses under an address-space limit, real flock between processes.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dbre.repository.lock as lock_mod
import dbre.repository.pack as pack_mod
import dbre.repository.repo as repo_mod
import dbre.repository.verify as verify_mod
from dbre.errors import IntegrityError, LockedError
from dbre.repository.backup import backup
from dbre.repository.lock import Lock, remove_locks
from dbre.repository.pack import PackWriter, read_index_tail
from dbre.repository.repo import Repository, pack_key
from dbre.restore.full import _remove_leftovers
from dbre.sources.local import LocalFileSource
from dbre.storage import NotFound
from dbre.storage.base import Store, get_capped
from tests.dbfactory import assert_one_line_error, change_rows, cli, dbre_env, make_db, pack_files, snapshot_files
from tests.stores import PassThroughStore

ROOT = Path(__file__).resolve().parent.parent
AS_LIMIT = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))"  # 1.5 GiB


def _run_cli(args: list[str | Path], *, preamble: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dbre ARGS` as a real process; ``preamble`` runs first (resource limits, hooks)."""
    code = f"import sys\n{preamble}\nsys.argv = ['dbre'] + sys.argv[1:]\nfrom dbre.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dbre_env(), cwd=ROOT, timeout=timeout)


def _plant_sparse(path: Path, size: int = 4 << 30) -> None:
    """A 4 GiB object that costs nothing on disk (an attacker's upload, as far as a reader can tell)."""
    with open(path, "wb") as f:
        f.truncate(size)


class ReadLog(PassThroughStore):
    """A store that records every read: (method, key, bytes returned)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.reads: list[tuple[str, str, int]] = []

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self.reads.append(("get", key, len(data)))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(key, offset, length)
        self.reads.append(("get_range", key, len(data)))
        return data

    def read_of(self, key: str) -> int:
        return sum(n for _, k, n in self.reads if k == key)


# -- the helper, on every backend ------------------------------------------------------------------


def test_get_capped_reads_at_most_cap_plus_one_byte_on_every_store(store: Store) -> None:
    """Whole up to the cap, refused one byte past it (naming the key), NotFound when absent; never
    more than cap + 1 bytes fetched."""
    store.put("records/a", b"x" * 100)
    store.put("records/b", b"x" * 101)
    store.put("records/empty", b"")
    log = ReadLog(store)
    assert get_capped(log, "records/a", 100, "record") == b"x" * 100  # type: ignore[arg-type]
    assert get_capped(log, "records/empty", 100, "record") == b""  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=r"^records/b: object is larger than 100 B \(a record never is"):
        get_capped(log, "records/b", 100, "record")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        get_capped(log, "records/missing", 100, "record")  # type: ignore[arg-type]
    assert log.read_of("records/b") == 101
    assert all(method == "get_range" for method, _, _ in log.reads)


# -- planted objects: one clear line, under an address-space limit (local: sparse 4 GiB files) ------


def test_an_oversized_manifest_is_one_line_not_memory_exhaustion(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    [manifest] = snapshot_files(repo_dir)
    _plant_sparse(manifest)
    key = f"snapshots/app/{manifest.name}"
    r = _run_cli(["restore", "--repo", repo_dir, "--db", "app", "--to", tmp_path / "out.db"], preamble=AS_LIMIT)
    assert "MemoryError" not in r.stderr, r.stderr
    assert_one_line_error(r, 1, key, "larger than 64.0 MiB", "planted or damaged")  # type: ignore[arg-type]
    assert not (tmp_path / "out.db").exists()


def test_an_oversized_config_is_one_line_not_memory_exhaustion(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    _plant_sparse(repo_dir / "config")
    r = _run_cli(["snapshots", "--repo", repo_dir], preamble=AS_LIMIT)
    assert "MemoryError" not in r.stderr, r.stderr
    assert_one_line_error(r, 1, "config: object is larger than 64.0 KiB", "restore `config`")  # type: ignore[arg-type]


def test_oversized_manifest_and_record_on_every_store(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same refusal on S3 as on a local disk, with the caps made small so the planted objects
    stay cheap: the read stops at cap + 1 bytes, the error names the key."""
    monkeypatch.setattr(repo_mod, "MANIFEST_CAP", 64 * 1024)
    monkeypatch.setattr(repo_mod, "RECORD_CAP", 64 * 1024)
    db = make_db(tmp_path / "app.db", mb=0.2)
    made = backup(Repository.open_or_init(store), LocalFileSource(str(db)), "app").manifest
    log = ReadLog(store)
    repo = Repository.open(log)  # type: ignore[arg-type]
    repo.put_record("drills", "app", {"ok": True})
    [rec] = store.list("records/drills/app/")
    key = repo.manifest_key(made)
    for planted in (key, rec):
        store.put(planted, secrets.token_bytes(200 * 1024))
    log.reads.clear()
    with pytest.raises(IntegrityError, match=f"^{key}: object is larger than 64.0 KiB"):
        repo.find_snapshot("app")
    # a record that does not open is skipped with a warning naming it (one damaged record hides no other)
    with caplog.at_level(logging.WARNING):
        assert repo.records("drills", "app") == []
    assert any(rec in m and "object is larger than 64.0 KiB" in m for m in caplog.messages), caplog.messages
    assert log.read_of(key) == log.read_of(rec) == 64 * 1024 + 1


def test_an_oversized_lock_counts_as_shared_until_stale_then_unlock_removes_it(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted oversize lock object is treated like a damaged lock record, never read past the
    cap: shared runs go on, an exclusive one waits for it to go stale, and `dbre unlock` removes it
    then (no run fails forever)."""
    monkeypatch.setattr(lock_mod, "LOCK_CAP", 1024)
    Repository.open_or_init(store)
    planted = "locks/0123456789abcdef"
    store.put(planted, b"{" + b" " * 4096 + b"}")  # valid JSON, but past the cap: never parsed
    log = ReadLog(store)
    shared = Lock(log, "backup app")  # type: ignore[arg-type]
    shared.acquire()
    shared.release()
    with pytest.raises(LockedError, match=r"locked by \? on \?"):
        Lock(log, "forget", exclusive=True).acquire()  # type: ignore[arg-type]
    assert log.read_of(planted) == 2 * 1025
    assert remove_locks(store) == 0  # not stale yet
    monkeypatch.setattr(lock_mod, "STALE_SECONDS", 1.0)
    time.sleep(2.5)  # S3 LastModified has whole seconds
    assert remove_locks(store) == 1
    assert not store.exists(planted)
    exclusive = Lock(store, "forget", exclusive=True)
    exclusive.acquire()
    exclusive.release()


def test_the_cli_names_an_oversized_lock_and_goes_on(tmp_path: Path) -> None:
    """A planted 4 GiB lock object under a 1.5 GiB address-space limit: the backup succeeds and
    says which object it did not read."""
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    _plant_sparse(repo_dir / "locks" / "0123456789abcdef")
    change_rows(db, 3)
    r = _run_cli(["backup", db, "--repo", repo_dir, "--db", "app"], preamble=AS_LIMIT)
    assert r.returncode == 0, r.stderr
    assert "locks/0123456789abcdef: object is larger than 64.0 KiB" in r.stderr
    assert "MemoryError" not in r.stderr
    assert len(snapshot_files(repo_dir)) == 2


# -- packs: the index tail and verify --read-data ---------------------------------------------------


def test_an_oversized_pack_is_refused_before_it_is_read(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """read_index_tail on an object longer than MAX_PACK: one chunk and a one-byte probe, then a
    clear refusal; a trailer claiming an index past MAX_INDEX is refused before unsealing."""
    monkeypatch.setattr(pack_mod, "MAX_PACK", 3 << 20)
    repo = Repository.open_or_init(store)
    log = ReadLog(store)
    big = "ab" * 16
    store.put(pack_key(big), secrets.token_bytes(5 << 20))
    with pytest.raises(IntegrityError, match=r"object is larger than 3.0 MiB \(a pack never is"):
        read_index_tail(log, repo.sealer, big)  # type: ignore[arg-type]
    assert log.read_of(pack_key(big)) <= pack_mod.TAIL_READ + 1
    fake = "cd" * 16
    store.put(pack_key(fake), b"\0" * 100 + pack_mod._TAIL.pack(pack_mod.MAX_INDEX + 1, pack_mod.MAGIC))
    with pytest.raises(IntegrityError, match=r"index is larger than 8.0 MiB"):
        read_index_tail(store, repo.sealer, fake)


def test_index_tail_keeps_only_the_index_while_reading_a_whole_pack(store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a pack from offset 0 in many chunks keeps only the last MAX_INDEX bytes and still
    finds and authenticates the index."""
    monkeypatch.setattr(pack_mod, "TAIL_READ", 64 * 1024)
    monkeypatch.setattr(pack_mod, "MAX_INDEX", 64 * 1024)
    repo = Repository.open_or_init(store)
    writer = PackWriter(store, repo.sealer)
    wheres = [writer.add(b"d", secrets.token_bytes(100_000), [secrets.token_bytes(16)]) for _ in range(10)]
    [pack] = writer.finish()
    blobs = read_index_tail(store, repo.sealer, pack, 0)
    assert [(pack, b.offset, b.length) for b in blobs] == wheres
    assert read_index_tail(store, repo.sealer, pack, wheres[-1][1] + wheres[-1][2]) == blobs


def test_verify_read_data_reads_packs_by_ranges_and_still_finds_damage(
        store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--read-data never fetches a whole pack: ranges of at most READ_SPAN bytes (plus one blob);
    a flipped byte is still found and its snapshot named."""
    monkeypatch.setattr(verify_mod, "READ_SPAN", 256 * 1024)
    db = make_db(tmp_path / "app.db", mb=2)
    made = backup(Repository.open_or_init(store), LocalFileSource(str(db)), "app").manifest
    log = ReadLog(store)
    repo = Repository.open(log)  # type: ignore[arg-type]
    report = verify_mod.verify(repo, read_data=True)
    assert report.ok, report.problems
    pack_reads = [(m, n) for m, k, n in log.reads if k.startswith("packs/")]
    assert pack_reads and all(m == "get_range" for m, _ in pack_reads)  # never a whole-pack get
    blobs = [b for p in made.packs for b in read_index_tail(store, repo.sealer, p)]
    assert len(blobs) > 2
    assert max(n for _, n in pack_reads) <= max(256 * 1024, pack_mod.TAIL_READ, *(b.length for b in blobs))
    assert report.bytes_read == sum(b.length for b in blobs)
    # flip one byte in the first blob of a pack: --read-data finds it and names the snapshot
    raw = bytearray(store.get(pack_key(made.packs[0])))
    raw[1000] ^= 0xFF
    store.put(pack_key(made.packs[0]), bytes(raw))
    report = verify_mod.verify(Repository.open(store), read_data=True)
    assert f"app/{made.id}" in report.damaged


# -- restore temp files (finding 7) -----------------------------------------------------------------


def test_remove_leftovers_takes_only_dead_restores_temp_files(tmp_path: Path) -> None:
    """Beside the target: a killed restore's file goes; one held (flock) by another process, an
    empty one created a moment ago (its flock may be a moment away), and files of other targets or
    other names stay."""
    target = tmp_path / "app.db"
    prefix = ".app.db.dbre-restore-"
    dead, live, new, old = (tmp_path / f"{prefix}{n}" for n in ("0000dead", "0000beef", "00000001", "00000002"))
    others = [tmp_path / f"{prefix}notes.txt", tmp_path / ".other.db.dbre-restore-0000dead"]
    for p in (dead, live, *others):
        p.write_bytes(b"x" * 4096)
    for p in (new, old):
        p.write_bytes(b"")  # killed between its creation and its flock, or that flock is a moment away
    then = time.time() - 300
    os.utime(old, (then, then))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'rb')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n", str(live)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        removed = _remove_leftovers(target)
        assert {r.split(" ")[0] for r in removed} == {dead.name, old.name}
        assert sorted(tmp_path.iterdir()) == sorted([live, new, *others])
    finally:
        holder.kill()
        holder.wait()
    _remove_leftovers(target)  # its holder is dead now
    assert sorted(tmp_path.iterdir()) == sorted([new, *others])


def test_a_live_restores_temp_file_is_not_removed_by_a_second_restore(tmp_path: Path) -> None:
    """Restore A (a real process) is paused with its complete temp file, just before the rename;
    restore B to the same target runs meanwhile and succeeds; B left A's file. A then finds the
    target taken and refuses (without --force it never replaces a database: review of restore,
    finding 2), removing its temp file."""
    db = make_db(tmp_path / "app.db", mb=1)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    target_dir = tmp_path / "srv"
    target_dir.mkdir()
    target = target_dir / "app.db"
    ready, go = tmp_path / "ready", tmp_path / "go"
    hook = ("import os, time, pathlib, dbre.restore.full as F\n"
            "def pause(name):\n"
            "    if name != 'held':\n"
            "        return\n"
            f"    pathlib.Path({str(ready)!r}).touch()\n"
            f"    while not os.path.exists({str(go)!r}):\n"
            "        time.sleep(0.05)\n"
            "F._crash_point = pause")
    code = f"import sys\n{hook}\nsys.argv = ['dbre'] + sys.argv[1:]\nfrom dbre.cli import main\nmain()\n"
    a = subprocess.Popen([sys.executable, "-c", code, "restore", "--repo", str(repo_dir), "--db", "app",
                          "--to", str(target)], env=dbre_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.05)
        [a_tmp] = [p for p in target_dir.iterdir() if "dbre-restore" in p.name]
        assert a_tmp.stat().st_size > 0
        b = cli("restore", "--repo", repo_dir, "--db", "app", "--to", target)
        assert b.returncode == 0, b
        assert a_tmp.exists() and "removed" not in b.stderr
        go.touch()
        out, err = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 2 and "appeared while restoring" in err, err
    assert [p.name for p in target_dir.iterdir()] == ["app.db"]
    assert pack_files(repo_dir)


def test_a_planted_decompression_bomb_is_refused_before_it_opens(tmp_path: Path) -> None:
    """Plain repository: someone who can write the bucket can recompute the unkeyed checksum, so
    a small object whose zstd frame opens up to gigabytes must be refused from its frame header."""
    import xxhash
    import zstandard

    from dbre.errors import IntegrityError
    from dbre.repository.crypto import MAX_UNSEALED, Sealer

    sealer = Sealer(None, 2)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(MAX_UNSEALED + 1))
    assert len(bomb) < 1024 * 1024  # small on the wire
    name = "snapshots/app/x"
    blob = b"\x03" + bomb + xxhash.xxh3_128_digest(b"\x03" + name.encode() + b"\x00" + bomb)
    with pytest.raises(IntegrityError, match="would open up to"):
        sealer.unseal(blob, name)
    ok = sealer.seal(b"x" * 1000, name)
    assert sealer.unseal(ok, name) == b"x" * 1000
