"""A repository on a store: its config and key, snapshot manifests, pack reads, and locks.

Object layout (docs/FORMAT.md has the full description):
  config                    plain JSON: format version, repository id, encryption parameters
  packs/<id[:2]>/<id>       packs of sealed blobs: page batches and page-map runs
  snapshots/<db>/<id>       sealed manifest, written last with a conditional put
  locks/<id>                plain JSON lock records
  object-lock               sealed JSON: the S3 Object Lock setting, if any (dbre.repository.immutable)
  records/<kind>/<db>/<id>  sealed JSON records: drills, verification runs, audits
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import blake3
import xxhash

from dbre import __version__
from dbre.errors import IntegrityError, RepositoryError, UsageError
from dbre.repository.crypto import (
    CONFIG_MAC_INFO,
    PAGE_HASH_INFO,
    Sealer,
    WrongKeyError,
    config_mac,
    config_mac_ok,
    new_key_params,
    open_key,
    scrypt_params,
    scrypt_work,
    wrap_key,
)
from dbre.repository.lock import Lock, LockLostError, read_locks
from dbre.repository.lock import hold as hold_lock
from dbre.repository.manifest import (
    Manifest,
    check_db_name,
    inv_time,
    iso,
    micros,
    now_utc,
    parse_key_id,
    parse_time,
    snapshot_key_id,
)
from dbre.secrets import Secret, edge_spaces
from dbre.storage import AlreadyExists, NotFound, Store, open_store
from dbre.storage.base import (
    CONFIG_CAP,
    MANIFEST_CAP,
    RECORD_CAP,
    Conflict,
    StorageError,
    TransientError,
    WriteRefused,
    get_capped,
)

if TYPE_CHECKING:
    from dbre.repository.immutable import Extension, ObjectLock

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # new repositories; format 1 is still read (never written)
MANIFEST_READERS = 32  # manifests read at once when a history is listed (small GETs: latency-bound)


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def snapshot_key(db: str, snap_id: str) -> str:
    return f"snapshots/{db}/{snap_id}"


@dataclass
class SnapshotRef:
    """A snapshot's name: database, id, the key it is stored under, and (format 2) its time."""

    db: str
    id: str
    key: str
    time: datetime | None = None


class Repository:
    """An opened repository. Create with ``Repository.open`` or ``Repository.open_or_init``."""

    def __init__(self, store: Store, config: dict[str, Any], sealer: Sealer, raw_config: bytes | None = None) -> None:
        self.store = store
        self.config = config
        self.sealer = sealer
        self.raw_config = raw_config  # `config` as stored: an offsite copy gets exactly these bytes
        self._hash_key: bytes | None = None
        self._plain_checked = False  # require_writable found no encrypted object in a plain repository
        self._manifests: dict[str, Manifest] = {}  # by key
        self.object_lock: ObjectLock | None = None  # read by attach_object_lock, before the first write
        self._lock_attached = False
        self.object_lock_version: str | None = None  # the version of `object-lock` followed, if not the current
        self.object_lock_replaced = False  # its current version differs: written back at the next ensure_locked
        self.lock_extensions: list[Extension] = []  # what each ensure_locked asked of the store
        self._read_unlocked = False  # read_lock warned that this repository refused its lock

    def __repr__(self) -> str:
        return f"Repository({self.store.url!r}, encrypted={self.sealer.encrypted})"

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def id(self) -> str:
        return str(self.config["id"])

    @property
    def version(self) -> int:
        """The repository's format: 1 (read only) or 2."""
        return int(self.config["version"])

    @property
    def hash_key(self) -> bytes | None:
        """The key of the v2 keyed page hash: HKDF(master, b"dbre v2 page hash") in an encrypted
        repository, the config's random "hash_key" in a plain one; None in format 1 (xxh3-128)."""
        if self.version < 2:
            return None
        if self._hash_key is None:
            derived = self.sealer.derive_key(PAGE_HASH_INFO)
            self._hash_key = derived if derived is not None else bytes.fromhex(str(self.config["hash_key"]))
        return self._hash_key

    def require_writable(self, op: str) -> None:
        """Refuse a write (backup, forget, prune, copy into, records) into a format-1 repository,
        or into a plain one that holds encrypted objects (its config was changed or damaged)."""
        if self.version < FORMAT_VERSION:
            raise RepositoryError(
                f"{op}: repository {self.url} uses format {self.version}",
                f"convert it with `dbre migrate --repo {self.url} --to NEW`",
            )
        self.attach_object_lock(op)
        if self.sealer.encrypted or self._plain_checked:
            return
        # one object of each kind is enough: a repository is encrypted throughout or not at all
        from dbre.repository.crypto import ENCRYPTED, ENCRYPTED_V1

        for prefix in ("snapshots/", "packs/", "records/"):
            for key in self.store.list(prefix, limit=1):
                try:
                    head = self.store.get_range(key, 0, 1)  # a pack starts with its first sealed blob
                except NotFound:
                    continue
                if head and head[0] in (ENCRYPTED, ENCRYPTED_V1):
                    raise RepositoryError(
                        f"{op}: repository {self.url} holds encrypted objects ({key}), but its config "
                        "says it is not encrypted",
                        "`config` was changed or damaged: restore it from the offsite copy",
                    )
        self._plain_checked = True

    def attach_object_lock(self, op: str) -> ObjectLock | None:
        """Read the repository's Object Lock setting once; with one, every later put but locks and
        leases is locked (dbre.repository.immutable). A bucket without Object Lock refuses."""
        if not self._lock_attached and self.version >= 2:
            from dbre.repository.immutable import attach

            self.object_lock = attach(self, op)
            self._lock_attached = True
        return self.object_lock

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def read_config(store: Store) -> dict[str, Any] | None:
        """The stored config (None if there is none); a damaged or newer one raises. Its MAC is
        checked when the repository is opened with its key (``open``)."""
        found = Repository._read_config(store)
        return None if found is None else found[0]

    @staticmethod
    def _read_config(store: Store) -> tuple[dict[str, Any], bytes] | None:
        try:
            raw = get_capped(store, "config", CONFIG_CAP, "config", "restore `config` from the offsite copy")
        except NotFound:
            return None
        except StorageError as err:  # unreachable, denied, not a folder: say which repository (its URL, no keys)
            raise type(err)(f"repository {store.url}: {err.message}", err.hint) from err
        return Repository._parse_config(raw, store.url), raw

    @staticmethod
    def _parse_config(raw: bytes, url: str) -> dict[str, Any]:
        """The config in ``raw``; a damaged or newer one raises (a plain one's MAC is checked here)."""
        store_url = url
        damaged = RepositoryError(
            f"repository {store_url}: config was changed or damaged", "restore `config` from the offsite copy"
        )
        try:
            config = json.loads(raw)
            version = int(config["version"])
        except (ValueError, KeyError, TypeError):
            raise damaged from None
        if version > FORMAT_VERSION:
            raise RepositoryError(
                f"repository {store_url}: format version {version} is newer than this dbre "
                f"supports ({FORMAT_VERSION})",
                "upgrade dbre",
            )
        if version < 1:
            raise damaged
        if version >= 2 and not config.get("encryption"):
            # plain: the MAC is keyed by the config's own hash_key, a checksum against accidents
            try:
                hash_key = bytes.fromhex(str(config["hash_key"]))
            except (KeyError, ValueError):
                raise damaged from None
            if len(hash_key) != 32 or not config_mac_ok(config, hash_key):
                raise damaged
        return config  # type: ignore[no-any-return]

    @staticmethod
    def new_config(key: Secret | None) -> tuple[dict[str, Any], Secret | None]:
        """A new format-2 config, with its MAC, and the new master key (None if plain)."""
        config: dict[str, Any] = {
            "format": "dbre-repository",
            "version": FORMAT_VERSION,
            "id": secrets.token_hex(16),
            "created": iso(now_utc()),
            "page_hash": "blake3-keyed-128",
            "compression": "zstd",
            "encryption": None,
        }
        master = None
        if key:
            if edge_spaces(key):  # (as `dbre key passwd` refuses it: nothing is created)
                raise UsageError("the passphrase of the new repository begins or ends with white space",
                                 "a --key-file is read without it, so it could never be given that way: "
                                 "remove the spaces from DBRE_ENCRYPTION_KEY; nothing was created")
            config["encryption"], master = new_key_params(key)
            mac_key = Sealer(master).derive_key(CONFIG_MAC_INFO)
            assert mac_key is not None
        else:
            mac_key = secrets.token_bytes(32)
            config["hash_key"] = mac_key.hex()
        config["mac"] = config_mac(config, mac_key)
        return config, master

    @classmethod
    def open(cls, url: str | Store, key: Secret | None = None) -> Repository:
        store = open_store(url) if isinstance(url, str) else url
        found = cls._read_config(store)
        if found is None:
            _refuse_init_over_data(store)  # (data without a config: say so, not "no repository")
            raise RepositoryError(
                f"no repository at {store.url}", "check --repo; `dbre backup` creates one"
            )
        config, raw = found
        try:
            sealer = cls._sealer(config, key, store.url)
        except WrongKeyError:
            # `verify/copy --immutable` read the oldest locked `config`: after `dbre key passwd` that one
            # still wraps the master key under the old passphrase, a newer locked version under the new
            newer = _newer_locked_config(store, key, config)
            if newer is None:
                raise
            config, raw, sealer = newer
        return cls(store, config, sealer, raw)

    @classmethod
    def open_or_init(cls, url: str | Store, key: Secret | None = None) -> Repository:
        store = open_store(url) if isinstance(url, str) else url
        found = cls._read_config(store)
        if found is None:
            _refuse_init_over_data(store)
            config, master = cls.new_config(key)
            raw = json.dumps(config, indent=1).encode()
            try:
                store.put("config", raw, if_absent=True)
                return cls(store, config, Sealer(master), raw)  # no second scrypt for our own key
            except AlreadyExists:
                found = cls._read_config(store)  # another run created it first: use theirs
                assert found is not None
        config, raw = found
        return cls(store, config, cls._sealer(config, key, store.url), raw)

    @classmethod
    def init_copy_of(cls, source: Repository, url: str | Store, key: Secret | None) -> Repository:
        """Open ``url`` as an offsite copy of ``source``, creating it with the same config and key."""
        store = open_store(url) if isinstance(url, str) else url
        found = cls._read_config(store)
        if found is None:
            _refuse_init_over_data(store)
            raw = source.raw_config or json.dumps(source.config, indent=1).encode()
            try:
                store.put("config", raw, if_absent=True)
            except AlreadyExists:
                pass
            found = cls._read_config(store)
            assert found is not None
        config, raw = found
        if config["id"] != source.id:
            raise UsageError(
                f"repository {store.url} is not a copy of {source.url} (different repository id)",
                "copy into an empty location or the copy made earlier",
            )
        # the copy's config must authenticate with the source's key: same master (or hash key)
        same = int(config["version"]) == source.version and bool(config.get("encryption")) == source.sealer.encrypted
        if same and source.version >= 2:
            mac_key = source.sealer.derive_key(CONFIG_MAC_INFO) or bytes.fromhex(str(source.config["hash_key"]))
            same = config_mac_ok(config, mac_key)
        if not same:
            raise RepositoryError(f"repository {store.url}: config was changed or damaged",
                                  f"restore `config` from {source.url}")
        return cls(store, config, source.sealer, raw)

    @staticmethod
    def _sealer(config: dict[str, Any], key: Secret | None, url: str) -> Sealer:
        version = int(config["version"])
        enc = config.get("encryption")
        if not enc:
            if key is not None and version >= 2:
                raise RepositoryError(
                    f"repository {url} is not encrypted, but a key was given",
                    "omit the key (DBRE_ENCRYPTION_KEY, --key-file) for this repository; if it was created "
                    "encrypted, its config was changed: restore `config` from the offsite copy",
                )
            return Sealer(None, version)
        if key is None:
            raise RepositoryError(
                f"repository {url} is encrypted", "set DBRE_ENCRYPTION_KEY or pass --key-file"
            )
        sealer = Sealer(open_key(enc, key), version)
        mac_key = sealer.derive_key(CONFIG_MAC_INFO)
        if version >= 2 and (mac_key is None or not config_mac_ok(config, mac_key)):
            raise RepositoryError(
                f"repository {url}: config was changed or damaged", "restore `config` from the offsite copy"
            )
        return sealer

    # -- the passphrase (`dbre key passwd`) -------------------------------------------------------

    def change_passphrase(self, old: Secret, new: Secret) -> bytes:
        """Wrap the same master key under ``new`` and replace `config` (no data is touched); returns
        the new config's bytes. docs/FORMAT.md, *Changing the passphrase*.

        Under the repository's exclusive lock: `config` is read again and must still be the bytes this
        repository was opened with; the new config (every field as before but ``encryption``, with a
        fresh salt, and ``mac``) must open with ``new`` and give the same master key; then
        ``ReplacingStore.replace`` swaps it in only if `config` is still unchanged (one rename or one
        PUT: a kill -9 leaves the old config or the new one, each valid), and it is read back."""
        op = "key passwd"
        if self.version < 2:
            raise UsageError(f"{op}: repository {self.url} uses format {self.version}, which is read only",
                             f"convert it with `dbre migrate --repo {self.url} --to NEW`, then change the passphrase")
        enc = self.config.get("encryption")
        if not enc or not self.sealer.encrypted:
            raise UsageError(f"{op}: repository {self.url} is not encrypted: it has no passphrase to change",
                             "nothing was changed")
        if not new.reveal():
            raise UsageError(f"{op}: the new passphrase is empty", "give a non-empty one; nothing was changed")
        if _same_secret(old, new):
            raise UsageError(f"{op}: the new passphrase is the old one", "give a different one; nothing was changed")
        replace = getattr(self.store, "replace", None)
        if replace is None:
            raise RepositoryError(f"{op}: the store of {self.url} cannot replace `config` only if unchanged",
                                  "nothing was changed")
        master = open_key(enc, old)  # (WrongKeyError: the old passphrase is wrong)
        mac_key = Sealer(master).derive_key(CONFIG_MAC_INFO)
        assert mac_key is not None
        if mac_key != self.sealer.derive_key(CONFIG_MAC_INFO):
            raise WrongKeyError(f"{op}: the old passphrase opens another master key than this repository's",
                                "nothing was changed")
        self.attach_object_lock(op)  # under Object Lock the new version of `config` is locked like the first
        with self.lock(op, exclusive=True) as lock:
            raw_old = get_capped(self.store, "config", CONFIG_CAP, "config", "restore `config` from the offsite copy")
            if raw_old != self.raw_config:
                raise RepositoryError(f"{op}: `config` of {self.url} changed since it was read (another run "
                                      "changed the passphrase?); nothing was changed",
                                      "run it again, with the passphrase now in force as the old one")
            config = {k: v for k, v in self.config.items() if k != "mac"}
            config["encryption"] = wrap_key(master, new, keep=scrypt_params(enc))
            config["mac"] = config_mac(config, mac_key)
            raw_new = json.dumps(config, indent=1).encode()
            # the new config must open with the new passphrase, to the same keys, before it replaces the old
            check = self._parse_config(raw_new, self.url)
            sealer = self._sealer(check, new, self.url)
            if (sealer.derive_key(CONFIG_MAC_INFO) != mac_key
                    or sealer.derive_key(PAGE_HASH_INFO) != self.sealer.derive_key(PAGE_HASH_INFO)):
                raise RepositoryError(f"{op}: the new config does not open to this repository's keys",
                                      "nothing was changed; report this as a bug")
            lock.check_alive(op, consequence="nothing was changed")
            try:
                replace("config", raw_new, expected=raw_old)
            except Conflict:
                raise RepositoryError(f"{op}: `config` of {self.url} changed since it was read, while this run "
                                      "replaced it (another run changed the passphrase?); nothing was changed",
                                      "run it again, with the passphrase now in force as the old one") from None
            except TransientError as err:  # (retries used up) an attempt may have reached the store, its answer lost
                raise RepositoryError(f"{op}: replacing `config` of {self.url} failed ({err.message}); it may have "
                                      "been replaced all the same",
                                      "try the NEW passphrase (`dbre snapshots`); if it is refused, the old one is "
                                      "still in force: run passwd again") from err
        try:
            there = get_capped(self.store, "config", CONFIG_CAP, "config", "restore `config` from the offsite copy")
        except StorageError as err:
            # the replace answered: the new config is in place. Say so, or the operator takes it for a failure
            # and keeps (or goes back to) the old passphrase, which no longer opens the repository
            raise RepositoryError(f"{op}: the passphrase of {self.url} was changed (`config` replaced), but reading "
                                  f"it back failed: {err.message}",
                                  "the NEW passphrase is in force: keep it; `dbre snapshots` with it confirms") from err
        if there != raw_new:
            raise RepositoryError(f"{op}: `config` of {self.url} was replaced by another run right after this one "
                                  "(the store does not honour If-Match?)",
                                  "open it with the passphrase that run set; this one is not in force")
        self.config, self.raw_config = check, raw_new
        return raw_new

    # -- snapshots -------------------------------------------------------------------------------

    @functools.cached_property
    def page_hash(self) -> Callable[[bytes | memoryview], bytes]:
        """The 16-byte content address of a page (and of a page-map run, and the manifest root).

        Format 2: keyed BLAKE3, so page identity cannot be forged by someone who controls page
        content; the key is HKDF(master, "dbre v2 page hash"), or the config's random hash_key in
        a plain repository. Format 1: xxh3-128, unkeyed. Called once per page: the key is bound once.
        """
        if self.version < 2:
            return xxhash.xxh3_128_digest
        key = self.hash_key
        if key is None or len(key) != 32:
            raise RepositoryError(f"repository {self.url}: no page hash key", "restore `config` from the offsite copy")

        def page_hash(data: bytes | memoryview, _new: Any = blake3.blake3, _key: bytes = key) -> bytes:
            return _new(data, key=_key).digest(16)  # type: ignore[no-any-return]

        return page_hash

    def manifest_key(self, manifest: Manifest) -> str:
        """The key a snapshot is stored under (format 2 names it by time, newest first)."""
        if self.version < 2:
            return snapshot_key(manifest.db, manifest.id)
        return snapshot_key(manifest.db, snapshot_key_id(manifest.time, manifest.id))

    def list_snapshot_refs(self, db: str | None = None) -> list[SnapshotRef]:
        """Every snapshot's name (of ``db``), in no particular order; no manifest is read."""
        prefix = f"snapshots/{db}/" if db else "snapshots/"
        return [r for r in map(self._ref, self.store.list(prefix)) if r is not None]

    def _ref(self, key: str) -> SnapshotRef | None:
        parts = key.split("/")
        if len(parts) != 3:
            return None
        parsed = parse_key_id(parts[2]) if self.version >= 2 else None
        if parsed is None:  # format 1: the name is the id (in format 2, load_ref refuses it)
            return SnapshotRef(parts[1], parts[2], key, None)
        return SnapshotRef(parts[1], parsed[0], key, parsed[1])

    def load_manifest(self, db: str, snap_id: str) -> Manifest:
        """The manifest of snapshot ``snap_id`` (the full id) of ``db``."""
        if self.version < 2:
            return self.load_ref(SnapshotRef(db, snap_id, snapshot_key(db, snap_id), None))
        for r in self.list_snapshot_refs(db):
            if r.id == snap_id:
                return self.load_ref(r)
        raise NotFound(f"snapshot {snap_id} of {db}: no such snapshot")

    def load_ref(self, ref: SnapshotRef) -> Manifest:
        """Read and check one manifest. Format 2: the body must be the one written under this
        name: db, id and taken_at as the key says, and the root over its runs."""
        key = ref.key
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        if self.version >= 2 and ref.time is None:
            raise IntegrityError(f"{key}: not a snapshot name of format 2", "remove it; it was not written by dbre")
        raw = get_capped(self.store, key, MANIFEST_CAP, "manifest")
        try:
            manifest = Manifest.from_json(self.sealer.unseal(raw, key))
        except (ValueError, TypeError, KeyError) as err:
            raise IntegrityError(f"{key}: manifest is damaged ({err.__class__.__name__})") from None
        if self.version >= 2:
            self._check_manifest(ref, manifest)
        self._manifests[key] = manifest
        return manifest

    def _check_manifest(self, ref: SnapshotRef, m: Manifest) -> None:
        key, hint = ref.key, "the manifest was moved or replaced: restore it from the offsite copy"
        if m.db != ref.db:
            raise IntegrityError(f"{key}: snapshot {m.id} belongs to {m.db}, not {ref.db}", hint)
        if m.id != ref.id:
            raise IntegrityError(f"{key}: holds snapshot {m.id}, not {ref.id}", hint)
        if m.format != 2:
            raise IntegrityError(f"{key}: manifest of format {m.format} in a format-2 repository", hint)
        try:
            taken = micros(parse_time(m.taken_at))
        except UsageError:
            taken = None
        assert ref.time is not None
        if taken != micros(ref.time):
            raise IntegrityError(f"{key}: snapshot taken at {m.taken_at}, its name says {iso(ref.time)}", hint)
        if m.root != m.run_root(self.page_hash):
            raise IntegrityError(f"{key}: page-map root does not match its runs (runs changed or reordered)", hint)

    def snapshots(self, db: str | None = None, *, damaged: list[tuple[str, str]] | None = None,
                  last: int | None = None) -> list[Manifest]:
        """Every snapshot (of ``db``), oldest first; with ``last``, only the newest ``last`` (format 2
        reads only their manifests: the names carry the time).

        A manifest that cannot be read raises, unless ``damaged`` is given: then it is skipped and
        (key, reason) appended there, so a listing can still show the healthy snapshots.
        """
        def load(r: SnapshotRef) -> Manifest | RepositoryError:
            try:
                return self.load_ref(r)
            except RepositoryError as err:
                return err

        refs = self.list_snapshot_refs(db)
        if last is not None and self.version >= 2:
            # format-2 names all carry their time: the newest ``last`` are known without a read
            timed = sorted((r for r in refs if r.time is not None), key=lambda r: (r.time, r.id))  # type: ignore[arg-type]
            # a name without a time is no snapshot: loaded below, it is refused and reported as damaged
            refs = (timed[-last:] if last > 0 else []) + [r for r in refs if r.time is None]
        # manifests are read MANIFEST_READERS at a time: a long history is many small GETs
        with ThreadPoolExecutor(MANIFEST_READERS, thread_name_prefix="dbre-manifests") as pool:
            loaded = list(pool.map(load, refs)) if len(refs) > 1 else [load(r) for r in refs]
        out = []
        for r, m in zip(refs, loaded, strict=True):
            if isinstance(m, RepositoryError):
                if damaged is None:
                    raise m
                damaged.append((r.key, m.message))
            else:
                out.append(m)
        out.sort(key=lambda m: (m.taken_at, m.id))
        return out

    def newest_snapshot(self, db: str, *, damaged: list[tuple[str, str]] | None = None) -> Manifest | None:
        """The newest snapshot of ``db`` (None if it has none), reading O(1) manifests in format 2.

        A manifest that cannot be read raises, unless ``damaged`` is given: then (key, reason) is
        appended there and the next older one is read, one at a time (the backup's parent)."""
        check_db_name(db)
        if self.version < 2:
            snaps = self.snapshots(db, damaged=damaged)
            return snaps[-1] if snaps else None
        prefix, after = f"snapshots/{db}/", None
        while True:
            ref = self._first_ref(prefix, after)
            if ref is None:
                return None
            try:
                return self.load_ref(ref)
            except RepositoryError as err:
                if damaged is None:
                    raise
                damaged.append((ref.key, err.message))
                after = ref.key

    def _first_ref(self, prefix: str, start_after: str | None) -> SnapshotRef | None:
        """The first snapshot name under ``prefix`` after ``start_after``: one listing request."""
        for key in self.store.list(prefix, start_after=start_after, limit=1):
            ref = self._ref(key)
            if ref is None:
                raise IntegrityError(f"{key}: not a snapshot name", "remove it; it was not written by dbre")
            return ref
        return None

    def databases(self) -> list[str]:
        return sorted({r.db for r in self.list_snapshot_refs()})

    def require_db(self, db: str) -> list[Manifest]:
        check_db_name(db)
        snaps = self.snapshots(db)
        if not snaps:
            self._no_snapshots(db)
        return snaps

    def _no_snapshots(self, db: str) -> None:
        known = ", ".join(self.databases()) or "none"
        raise UsageError(f"no snapshots of database {db!r} in {self.url}", f"known databases: {known}")

    def find_snapshot(self, db: str, snap_id: str | None = None, at: datetime | None = None,
                      skipped: list[Manifest] | None = None) -> Manifest:
        """The snapshot an ID prefix names, or the newest at or before ``at`` / the newest, either
        skipping safety snapshots (see ``Manifest.is_safety``) unless there is nothing else; those
        skipped (newer than the one chosen) are appended to ``skipped``, newest first.

        Format 2 reads exactly one manifest: the listing of names finds it (one request with
        ``at`` or for the newest; an id prefix lists the database's names)."""
        if snap_id and at:
            raise UsageError("--snapshot and --at were both given", "pass one of them")
        if snap_id:
            # read only the manifest asked for: a damaged sibling must not block this restore
            check_db_name(db)
            refs = self.list_snapshot_refs(db)
            if not refs:
                self._no_snapshots(db)  # raises, naming the known databases
            hit_refs = [r for r in refs if r.id.startswith(snap_id)]
            if len(hit_refs) != 1:
                why = "no snapshot" if not hit_refs else f"{len(hit_refs)} snapshots"
                raise UsageError(
                    f"{why} of {db!r} with id {snap_id!r}", "list them with `dbre snapshots`"
                )
            return self.load_ref(hit_refs[0])
        if self.version < 2:
            snaps = self.require_db(db)
            if at is not None:
                snaps = [m for m in snaps if m.time <= at]
                if not snaps:
                    raise UsageError(
                        f"{iso(at)} is before the first snapshot of {db!r} ({self.require_db(db)[0].taken_at})",
                        "pick a later time",
                    )
            regular = [m for m in snaps if not m.is_safety]  # (as in format 2, below)
            found = (regular or snaps)[-1]
            if skipped is not None:
                skipped.extend(m for m in reversed(snaps) if m.is_safety and m.time > found.time)
            return found
        check_db_name(db)
        prefix = f"snapshots/{db}/"
        # names at or before ``at`` sort at or after prefix + inv(at): the first of them is the one
        ref = self._first_ref(prefix, None if at is None else prefix + inv_time(at))
        if ref is None:
            refs = self.list_snapshot_refs(db)
            if not refs:
                self._no_snapshots(db)
            assert at is not None
            first = min(r.time for r in refs if r.time is not None)
            raise UsageError(f"{iso(at)} is before the first snapshot of {db!r} ({iso(first)})", "pick a later time")
        chosen = self.load_ref(ref)
        if chosen.is_safety:
            # the newest, and the newest at or before a time, skip safety snapshots: a repair's undo,
            # the state it replaced, not the backup history (after a recovery, `--at` a later time
            # must not bring back what was just repaired; --snapshot ID still names one); a database
            # with nothing else at that time restores the newest of them
            older = self._first_ref(prefix, ref.key)
            passed = [chosen]
            while older is not None:
                m = self.load_ref(older)
                if not m.is_safety:
                    if skipped is not None:
                        skipped.extend(passed)
                    return m
                passed.append(m)
                older = self._first_ref(prefix, older.key)
        return chosen

    def write_manifest(self, manifest: Manifest) -> int:
        """Commit a snapshot: the conditional put of its manifest is the last write of a backup."""
        key = self.manifest_key(manifest)
        if self.version >= 2:
            manifest.format = 2
            manifest.root = manifest.run_root(self.page_hash)
            if self.attach_object_lock(f"backup {manifest.db}") is not None:
                from dbre.repository.immutable import ensure_snapshot_locked

                # before the manifest: no snapshot is ever less protected than it says (FORMAT.md)
                ensure_snapshot_locked(self, manifest)
        data = self.sealer.seal(manifest.to_json(), key)
        try:
            self.store.put(key, data, if_absent=True)
        except AlreadyExists:
            # a retried put may find its own first attempt; anything else is a real conflict
            if self.store.get_range(key, 0, len(data) + 1) != data:  # never more than ours
                raise

        self._manifests[key] = manifest
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
        self.require_writable(f"record {kind}")
        rec_id = f"{now_utc().strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}"
        key = f"records/{kind}/{db}/{rec_id}"
        self.store.put(key, self.sealer.seal(json.dumps(record, default=str).encode(), key), if_absent=True)
        return rec_id

    def records(self, kind: str, db: str | None = None) -> list[dict[str, Any]]:
        """Every record of ``kind`` (for ``db``), oldest first; each gets its "record_id"."""
        prefix = f"records/{kind}/{db}/" if db else f"records/{kind}/"
        out = []
        for key in sorted(self.store.list(prefix), key=lambda k: k.rsplit("/", 1)[1]):
            try:
                rec = json.loads(self.sealer.unseal(get_capped(self.store, key, RECORD_CAP, "record"), key))
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except (IntegrityError, ValueError) as err:
                # one damaged (or planted) record must not hide the others: a drill's history, the backup
                # success rate and status go on from the rest, and say so
                log.warning("dbre: record %s could not be read (%s): skipped", key,
                            err.message if isinstance(err, IntegrityError) else err)
                continue
            rec["record_id"] = key.rsplit("/", 1)[1]
            out.append(rec)
        return out

    # -- packs -----------------------------------------------------------------------------------

    def read_blob(self, pack_id: str, offset: int, length: int, name: str) -> bytes:
        """The blob at ``offset`` in a pack, unsealed as ``name`` ("page-batch", "run <hash hex>")."""
        key = pack_key(pack_id)
        data = self.store.get_range(key, offset, length)
        if len(data) != length:
            from dbre.errors import IntegrityError

            raise IntegrityError(f"{key}: truncated (wanted {length} bytes at {offset})")
        return self.sealer.unseal(data, name, where=f"{key}@{offset}")

    def pack_ids(self) -> set[str]:
        return {k.rsplit("/", 1)[1] for k in self.store.list("packs/")}

    # -- locks -----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, op: str, *, exclusive: bool = False) -> Iterator[Lock]:
        """Hold a lock for ``op`` (dbre.repository.lock): backups, copies and restores share;
        forget and prune are exclusive. ``with repo.lock("backup app") as lock:`` and
        ``lock.check_alive(what)`` immediately before each commit. A repository that refuses the
        lock object (``WriteRefused``) refuses the run; read-only runs use ``read_lock``."""
        with ExitStack() as stack:
            try:
                held = stack.enter_context(hold_lock(self.store, op, exclusive=exclusive))
            except WriteRefused as err:
                if not exclusive:
                    raise
                fix = ("free space on the repository disk: a few KiB (outside the repository) is enough"
                       if err.cause == "disk full" else err.hint or "make the repository writable")
                raise WriteRefused(f"{op}: cannot write its exclusive lock ({err.message})",
                                   f"{op} writes a lock object of a few hundred bytes before it changes anything, "
                                   f"and never changes anything without it; {fix}, then run it again",
                                   cause=err.cause) from err
            yield held

    @contextmanager
    def read_lock(self, op: str) -> Iterator[Lock]:
        """A shared lock for ``op``, which only reads the repository (restore, sql, export, verify,
        copy's source): as ``lock``, except that a repository that refuses to store the lock object
        (``WriteRefused``: a read-only mount or credentials, a full disk) is read without a lock, with
        one warning (per repository object). A prune elsewhere could then make the run fail (an
        object gone), never read wrong bytes: every object read is checked. The ``UnlockedRead``
        yielded then refuses ``check_alive``: a run about to write elsewhere what it read would write
        into the repository too (an audit record, a safety snapshot), which refuses writes."""
        with ExitStack() as stack:
            try:
                held = stack.enter_context(self.lock(op))
            except WriteRefused as err:
                held = self.unlocked_read(op, err)
            yield held

    def unlocked_read(self, op: str, err: WriteRefused) -> UnlockedRead:
        """The ``UnlockedRead`` of ``read_lock`` when the store refused the lock object, said once."""
        if not self._read_unlocked:
            self._read_unlocked = True
            log.warning("dbre: warning: cannot lock %s (%s): %s reads it without a lock; a prune running "
                        "elsewhere now could make it fail (never read wrong bytes: every object is checked)",
                        self.url, err.cause, op.split(" ", 1)[0])
        return UnlockedRead(self.store, op, err)

    def read_locks(self) -> list[tuple[str, dict[str, Any]]]:
        return read_locks(self.store)


class UnlockedRead(Lock):
    """What ``Repository.read_lock`` yields when the repository refused the lock object: no object
    to refresh or release. ``check_alive`` refuses (nothing is committed without a lock)."""

    def __init__(self, store: Store, op: str, refused: WriteRefused) -> None:
        super().__init__(store, op)
        self.refused = refused

    def acquire(self) -> None:
        raise self.refused

    def store_now(self) -> float:
        """This host's clock: with no object written, the store's time cannot be learnt (what it
        judges, a dry run's grace period or a replicator's lease, is judged by this host's clock)."""
        return time.time()

    def refresh(self) -> None:
        pass

    def release(self) -> None:
        pass

    def check_alive(self, what: str, *, consequence: str = "nothing was committed",
                    hint: str = "run it again", refresh: bool = True) -> None:
        raise LockLostError(
            f"{what}: the repository refuses writes ({self.refused.message}), and this would write into it "
            f"(an audit record, a safety snapshot) — {consequence}",
            "make the repository writable (or `dbre copy` it to one and use that), or restore the whole "
            "database with `dbre restore --to` and take what you need from that file")


def _same_secret(a: Secret, b: Secret) -> bool:
    ra, rb = a.reveal(), b.reveal()
    return hmac.compare_digest(ra.encode() if isinstance(ra, str) else ra, rb.encode() if isinstance(rb, str) else rb)


def _newer_locked_config(store: Store, key: Secret | None, oldest: dict[str, Any]
                         ) -> tuple[dict[str, Any], bytes, Sealer] | None:
    """In the locked versions of a bucket (``LockedView``): the oldest locked version of `config` of the
    same repository that opens with ``key``, now the view's `config` (reads and retention), or None.

    After `dbre key passwd` the oldest locked `config` wraps the master key under the old passphrase
    until its lock runs out; a newer locked version opens with the new one. A version opens only if
    ``key`` unwraps a master key under which its MAC holds, so no one without the passphrase made it,
    and every object read through it must still open under that master key."""
    from dbre.repository import crypto
    from dbre.repository.immutable import LockedView, locking_store

    locker = locking_store(store.inner) if isinstance(store, LockedView) else None
    if key is None or locker is None or not isinstance(store, LockedView):
        return None
    chosen = store.chosen.get("config")
    # an attacker's locked versions could ask for scrypt at the 256 MiB cap and p=16 each: one derivation
    # per version costs at most what today's parameters or the oldest config's do, the most a passwd writes
    today = scrypt_work(crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P)
    before = scrypt_work(*(scrypt_params(oldest.get("encryption")) or (1, 1, 1)))
    limit = (max(today[0], before[0]), max(today[1], before[1]))  # (memory, time)
    versions = [v for v in locker.versions("config") if v.key == "config" and not v.delete_marker]
    for v in reversed(versions):  # oldest first
        if chosen is not None and v.version_id == chosen[0].version_id:
            continue
        try:
            retention = locker.retention("config", v.version_id)
            if retention is None or retention.until <= store.now:
                continue
            raw = locker.get_version("config", v.version_id, 0, CONFIG_CAP + 1)
            if len(raw) > CONFIG_CAP:
                continue
            config = Repository._parse_config(raw, store.url)
            if config.get("id") != oldest.get("id") or config.get("version") != oldest.get("version"):
                continue
            params = scrypt_params(config.get("encryption"))
            if params is None or any(a > b for a, b in zip(scrypt_work(*params), limit, strict=True)):
                continue  # not a passwd's: it wraps at today's parameters or the ones before, never dearer
            sealer = Repository._sealer(config, key, store.url)
        except (NotFound, RepositoryError):
            continue
        store.chosen["config"] = (v, retention)
        return config, raw, sealer
    return None


def _refuse_init_over_data(store: Store) -> None:
    """A store that holds packs, snapshots or records but no config is never initialised again
    (a new master key beside the old data would split the repository in two)."""
    for prefix in ("packs/", "snapshots/", "records/"):
        for _ in store.list(prefix, limit=1):
            raise RepositoryError(
                f"repository {store.url} holds data but no config",
                "restore `config` from the offsite copy or a backup of the repository",
            )


TOOL = f"dbre {__version__}"
