"""A repository on a store: its config and key, snapshot manifests, pack reads, and locks.

Object layout (docs/FORMAT.md has the full description):
  config                    plain JSON: format version, repository id, encryption parameters
  packs/<id[:2]>/<id>       packs of sealed blobs: page batches and page-map runs
  snapshots/<db>/<id>       sealed manifest, written last with a conditional put
  locks/<id>                plain JSON lock records
  records/<kind>/<db>/<id>  sealed JSON records: drills, verification runs, audits
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dbre import __version__
from dbre.errors import LockedError, RepositoryError, UsageError
from dbre.repository.crypto import Sealer, new_key_params, open_key
from dbre.repository.manifest import Manifest, check_db_name, iso, now_utc
from dbre.secrets import Secret
from dbre.storage import AlreadyExists, NotFound, Store, open_store

FORMAT_VERSION = 1
LOCK_STALE_SECONDS = 600
LOCK_REFRESH_SECONDS = 120


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def snapshot_key(db: str, snap_id: str) -> str:
    return f"snapshots/{db}/{snap_id}"


@dataclass
class SnapshotRef:
    db: str
    id: str


class Repository:
    """An opened repository. Create with ``Repository.open`` or ``Repository.open_or_init``."""

    def __init__(self, store: Store, config: dict[str, Any], sealer: Sealer) -> None:
        self.store = store
        self.config = config
        self.sealer = sealer
        self._manifests: dict[tuple[str, str], Manifest] = {}

    def __repr__(self) -> str:
        return f"Repository({self.store.url!r}, encrypted={self.sealer.encrypted})"

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def id(self) -> str:
        return str(self.config["id"])

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def read_config(store: Store) -> dict[str, Any] | None:
        try:
            raw = store.get("config")
        except NotFound:
            return None
        try:
            config = json.loads(raw)
            version = int(config["version"])
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(
                f"repository {store.url}: config is damaged", "restore it from the offsite copy"
            ) from None
        if version > FORMAT_VERSION:
            raise RepositoryError(
                f"repository {store.url}: format version {version} is newer than this dbre "
                f"supports ({FORMAT_VERSION})",
                "upgrade dbre",
            )
        return config

    @classmethod
    def open(cls, url: str | Store, key: Secret | None = None) -> Repository:
        store = open_store(url) if isinstance(url, str) else url
        config = cls.read_config(store)
        if config is None:
            raise RepositoryError(
                f"no repository at {store.url}", "check --repo; `dbre backup` creates one"
            )
        return cls(store, config, cls._sealer(config, key, store.url))

    @classmethod
    def open_or_init(cls, url: str | Store, key: Secret | None = None) -> Repository:
        store = open_store(url) if isinstance(url, str) else url
        config = cls.read_config(store)
        if config is None:
            config = {
                "format": "dbre-repository",
                "version": FORMAT_VERSION,
                "id": secrets.token_hex(16),
                "created": iso(now_utc()),
                "page_hash": "xxh3-128",
                "compression": "zstd",
                "encryption": new_key_params(key)[0] if key else None,
            }
            try:
                store.put("config", json.dumps(config, indent=1).encode(), if_absent=True)
            except AlreadyExists:
                pass  # another run created it first: use theirs
            config = cls.read_config(store)
            assert config is not None
        return cls(store, config, cls._sealer(config, key, store.url))

    @classmethod
    def init_copy_of(cls, source: Repository, url: str | Store, key: Secret | None) -> Repository:
        """Open ``url`` as an offsite copy of ``source``, creating it with the same config and key."""
        store = open_store(url) if isinstance(url, str) else url
        config = cls.read_config(store)
        if config is None:
            try:
                store.put("config", json.dumps(source.config, indent=1).encode(), if_absent=True)
            except AlreadyExists:
                pass
            config = cls.read_config(store)
            assert config is not None
        if config["id"] != source.id:
            raise UsageError(
                f"repository {store.url} is not a copy of {source.url} (different repository id)",
                "copy into an empty location or the copy made earlier",
            )
        return cls(store, config, source.sealer)

    @staticmethod
    def _sealer(config: dict[str, Any], key: Secret | None, url: str) -> Sealer:
        enc = config.get("encryption")
        if not enc:
            return Sealer(None)
        if key is None:
            raise RepositoryError(
                f"repository {url} is encrypted", "set DBRE_ENCRYPTION_KEY or pass --key-file"
            )
        return Sealer(open_key(enc, key))

    # -- snapshots -------------------------------------------------------------------------------

    def list_snapshot_refs(self, db: str | None = None) -> list[SnapshotRef]:
        prefix = f"snapshots/{db}/" if db else "snapshots/"
        refs = []
        for key in self.store.list(prefix):
            parts = key.split("/")
            if len(parts) == 3:
                refs.append(SnapshotRef(parts[1], parts[2]))
        return refs

    def load_manifest(self, db: str, snap_id: str) -> Manifest:
        cached = self._manifests.get((db, snap_id))
        if cached is not None:
            return cached
        key = snapshot_key(db, snap_id)
        raw = self.store.get(key)
        try:
            manifest = Manifest.from_json(self.sealer.unseal(raw, key))
        except (ValueError, TypeError, KeyError) as err:
            from dbre.errors import IntegrityError

            raise IntegrityError(f"{key}: manifest is damaged ({err.__class__.__name__})") from None
        self._manifests[(db, snap_id)] = manifest
        return manifest

    def snapshots(self, db: str | None = None, *, damaged: list[tuple[str, str]] | None = None) -> list[Manifest]:
        """Every snapshot (of ``db``), oldest first.

        A manifest that cannot be read raises, unless ``damaged`` is given: then it is skipped and
        (key, reason) appended there, so a listing can still show the healthy snapshots.
        """
        out = []
        for r in self.list_snapshot_refs(db):
            try:
                out.append(self.load_manifest(r.db, r.id))
            except RepositoryError as err:
                if damaged is None:
                    raise
                damaged.append((snapshot_key(r.db, r.id), err.message))
        out.sort(key=lambda m: (m.taken_at, m.id))
        return out

    def databases(self) -> list[str]:
        return sorted({r.db for r in self.list_snapshot_refs()})

    def require_db(self, db: str) -> list[Manifest]:
        check_db_name(db)
        snaps = self.snapshots(db)
        if not snaps:
            known = ", ".join(self.databases()) or "none"
            raise UsageError(f"no snapshots of database {db!r} in {self.url}", f"known databases: {known}")
        return snaps

    def find_snapshot(self, db: str, snap_id: str | None = None, at: datetime | None = None) -> Manifest:
        """The snapshot an ID prefix names, or the newest at or before ``at``, or the newest."""
        if snap_id and at:
            raise UsageError("--snapshot and --at were both given", "pass one of them")
        if snap_id:
            # read only the manifest asked for: a damaged sibling must not block this restore
            check_db_name(db)
            refs = self.list_snapshot_refs(db)
            if not refs:
                self.require_db(db)  # raises, naming the known databases
            hit_refs = [r for r in refs if r.id.startswith(snap_id)]
            if len(hit_refs) != 1:
                why = "no snapshot" if not hit_refs else f"{len(hit_refs)} snapshots"
                raise UsageError(
                    f"{why} of {db!r} with id {snap_id!r}", "list them with `dbre snapshots`"
                )
            return self.load_manifest(db, hit_refs[0].id)
        snaps = self.require_db(db)
        if at is not None:
            before = [m for m in snaps if m.time <= at]
            if not before:
                raise UsageError(
                    f"{iso(at)} is before the first snapshot of {db!r} ({snaps[0].taken_at})",
                    "pick a later time",
                )
            return before[-1]
        return snaps[-1]

    def write_manifest(self, manifest: Manifest) -> int:
        """Commit a snapshot: the conditional put of its manifest is the last write of a backup."""
        data = self.sealer.seal(manifest.to_json())
        key = snapshot_key(manifest.db, manifest.id)
        try:
            self.store.put(key, data, if_absent=True)
        except AlreadyExists:
            # a retried put may find its own first attempt; anything else is a real conflict
            if self.store.get(key) != data:
                raise

        self._manifests[(manifest.db, manifest.id)] = manifest
        return len(data)

    # -- records: drills, verification runs, audits ----------------------------------------------

    def put_record(self, kind: str, db: str, record: dict[str, Any]) -> str:
        """Store a small JSON record (e.g. kind "drills") so any machine can report on it.

        Records are sealed like manifests and named by time then a random suffix, so listing
        them gives time order. Returns the record id.
        """
        check_db_name(db)
        if not kind.isidentifier():
            raise UsageError(f"record kind {kind!r} is not allowed")
        rec_id = f"{now_utc().strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"
        data = self.sealer.seal(json.dumps(record, default=str).encode())
        self.store.put(f"records/{kind}/{db}/{rec_id}", data, if_absent=True)
        return rec_id

    def records(self, kind: str, db: str | None = None) -> list[dict[str, Any]]:
        """Every record of ``kind`` (for ``db``), oldest first; each gets its "record_id"."""
        prefix = f"records/{kind}/{db}/" if db else f"records/{kind}/"
        out = []
        for key in sorted(self.store.list(prefix), key=lambda k: k.rsplit("/", 1)[1]):
            rec = json.loads(self.sealer.unseal(self.store.get(key), key))
            rec["record_id"] = key.rsplit("/", 1)[1]
            out.append(rec)
        return out

    # -- packs -----------------------------------------------------------------------------------

    def read_blob(self, pack_id: str, offset: int, length: int) -> bytes:
        key = pack_key(pack_id)
        data = self.store.get_range(key, offset, length)
        if len(data) != length:
            from dbre.errors import IntegrityError

            raise IntegrityError(f"{key}: truncated (wanted {length} bytes at {offset})")
        return self.sealer.unseal(data, f"{key}@{offset}")

    def pack_ids(self) -> set[str]:
        return {k.rsplit("/", 1)[1] for k in self.store.list("packs/")}

    # -- locks -----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, op: str, *, exclusive: bool = False) -> Iterator[None]:
        """Hold a lock for ``op``. Backups and copies share; prune is exclusive.

        A lock is refreshed every few minutes and counts as stale after ten without refresh
        (a run killed with -9 leaves one behind; `dbre unlock` removes stale ones).
        """
        lock_id = secrets.token_hex(8)
        key = f"locks/{lock_id}"
        record = {
            "op": op,
            "exclusive": exclusive,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": iso(now_utc()),
            "time": time.time(),
        }
        self.store.put(key, json.dumps(record).encode())
        try:
            for other_key, other in self.read_locks():
                if other_key == key or _is_stale(other):
                    continue
                if exclusive or other.get("exclusive"):
                    raise LockedError(
                        f"repository is locked by {other.get('op')} on {other.get('host')} "
                        f"(pid {other.get('pid')}, since {other.get('created')})",
                        "wait for it to finish, or run `dbre unlock` if that run is dead",
                    )
        except BaseException:
            self.store.delete(key)
            raise
        stop = threading.Event()

        def refresh() -> None:
            while not stop.wait(LOCK_REFRESH_SECONDS):
                record["time"] = time.time()
                try:
                    self.store.put(key, json.dumps(record).encode())
                except Exception:  # noqa: BLE001 - a missed refresh only ages the lock
                    pass

        thread = threading.Thread(target=refresh, daemon=True, name="dbre-lock-refresh")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            self.store.delete(key)

    def read_locks(self) -> list[tuple[str, dict[str, Any]]]:
        return read_locks(self.store)


def read_locks(store: Store) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for k in store.list("locks/"):
        try:
            out.append((k, json.loads(store.get(k))))
        except NotFound:
            continue
        except ValueError:
            out.append((k, {"op": "?", "time": 0}))
    return out


def remove_locks(store: Store, *, all_locks: bool = False) -> int:
    """Remove stale locks (or every lock); returns how many were removed."""
    removed = 0
    for k, rec in read_locks(store):
        if all_locks or _is_stale(rec):
            store.delete(k)
            removed += 1
    return removed


def _is_stale(rec: dict[str, Any]) -> bool:
    if time.time() - float(rec.get("time", 0)) > LOCK_STALE_SECONDS:
        return True
    if rec.get("host") == socket.gethostname():
        pid = int(rec.get("pid", 0))
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True  # the run on this machine is dead: its lock is stale at once
            except PermissionError:
                return False
    return False


TOOL = f"dbre {__version__}"
