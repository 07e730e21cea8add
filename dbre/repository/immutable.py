"""Object Lock: every immutable object of an S3 repository kept undeletable while a snapshot needs it.

The setting lives in the repository (the sealed object ``object-lock``), so every writer follows it:
the store writes each object but locks/ and leases/ with ``mode`` and retain-until now + period +
step; before a manifest is written, the objects it references that are locked for less than its
time + period are extended (``ensure_locked``). ``LockedView`` reads a bucket's locked versions
only: ``dbre verify --immutable`` and ``dbre copy --immutable`` (docs/FORMAT.md, *Object Lock*).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from dbre.errors import IntegrityError, RepositoryError, UsageError
from dbre.storage.base import (
    AlreadyExists,
    LockingStore,
    NotFound,
    ObjectVersion,
    PermanentError,
    Retention,
    StorageError,
    Store,
)

if TYPE_CHECKING:
    from dbre.repository.manifest import Manifest
    from dbre.repository.repo import Repository
    from dbre.secrets import Secret

log = logging.getLogger(__name__)

LOCK_KEY = "object-lock"
MUTABLE = ("locks/", "leases/")  # rewritten or deleted as dbre runs: never locked
MODES = ("governance", "compliance")
STEP_FRACTION = 0.1  # locks run period + period/10: a reused object is extended at most once per step
_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
_HINT_BUCKET = ("Object Lock is enabled when a bucket is created: make one with "
                "`aws s3api create-bucket --object-lock-enabled-for-bucket`, then `dbre copy` the repository there")


@dataclass(frozen=True)
class ObjectLock:
    """A repository's retention: ``mode`` governance or compliance, ``period`` in seconds."""

    mode: str
    period: float

    @property
    def step(self) -> float:
        return self.period * STEP_FRACTION

    @property
    def s3_mode(self) -> str:
        return self.mode.upper()

    def describe(self) -> str:
        days = self.period / 86400
        return f"{self.mode}, {days:g} days" if days >= 1 else f"{self.mode}, {self.period:g} s"

    @classmethod
    def parse(cls, text: str, option: str = "--object-lock") -> ObjectLock:
        """``governance:30d`` or ``compliance:1y`` (units s, min, h, d, y)."""
        mode, _, period = text.partition(":")
        return cls.of(mode, period, option)

    @classmethod
    def of(cls, mode: str, period: str | float, option: str = "object_lock") -> ObjectLock:
        mode = mode.strip().lower()
        if mode not in MODES:
            raise UsageError(f"{option}: mode {mode!r} is not governance or compliance",
                             "use e.g. governance:30d or compliance:1y")
        seconds = float(period) if isinstance(period, int | float) else _seconds(period)
        if seconds is None or seconds < 1:
            raise UsageError(f"{option}: period {period!r} is not a duration of at least 1 s",
                             "use e.g. governance:30d or compliance:1y")
        return cls(mode, seconds)

    def to_json(self) -> bytes:
        return json.dumps({"mode": self.mode, "period_seconds": self.period}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ObjectLock:
        body = json.loads(raw)
        return cls.of(str(body["mode"]), float(body["period_seconds"]))


def iso_utc(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(text: str) -> float | None:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d|y)\s*", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def locking_store(store: Store) -> LockingStore | None:
    """The S3 store under any wrappers (retry, test pass-throughs), if it can lock objects."""
    seen = 0
    current: Any = store
    while current is not None and seen < 8:
        if isinstance(current, LockingStore) and not isinstance(current, LockedView):
            return current
        current = getattr(current, "store", None) or getattr(current, "inner", None)
        seen += 1
    return None


def _locker(repo: Repository, op: str) -> LockingStore:
    locker = locking_store(repo.store)
    if locker is None:
        raise UsageError(f"{op}: repository {repo.url} is not on S3: Object Lock needs an S3 bucket",
                         "drop --object-lock, or use s3://bucket/prefix on a bucket with Object Lock enabled")
    return locker


def read_setting(repo: Repository) -> ObjectLock | None:
    """The current version of the repository's ``object-lock`` setting, None if it has none."""
    try:
        raw = repo.store.get_range(LOCK_KEY, 0, 64 * 1024)
    except NotFound:
        return None
    return _open_setting(repo, raw, LOCK_KEY)


def _open_setting(repo: Repository, raw: bytes, where: str) -> ObjectLock:
    try:
        return ObjectLock.from_json(repo.sealer.unseal(raw, LOCK_KEY, where=where))
    except (IntegrityError, ValueError, KeyError, TypeError, UsageError) as err:
        cause = err.message if isinstance(err, IntegrityError | UsageError) else type(err).__name__
        raise IntegrityError(
            f"{where}: the repository's Object Lock setting cannot be read ({cause}); no write was made",
            "it was damaged or replaced: check the bucket, then recover with `dbre copy --repo URL --to NEW "
            "--immutable` (it reads the locked versions)") from None


def _denied(err: StorageError) -> bool:
    return "access denied" in err.message


def attach(repo: Repository, op: str) -> ObjectLock | None:
    """Read the setting and make the store lock what it writes; a bucket without Object Lock refuses.

    The setting in force is the *oldest* authentic version of ``object-lock``: dbre writes it once
    (conditional put), and anyone with write access can put new versions on top (e.g. the offsite
    copy's, sealed with the same key) but never an older one. A current version that differs is
    logged, and written back before the next snapshot; that oldest version is kept locked by its id
    (both in ``ensure_locked``)."""
    current = read_setting(repo)
    locker = locking_store(repo.store)
    if current is None:
        if locker is None or not _may_lock(locker, op):
            return None
        if any(v.key == LOCK_KEY for v in locker.versions(LOCK_KEY)):
            # hidden by a delete marker: writing on, unlocked, would be the downgrade an attacker wants
            raise RepositoryError(
                f"{op}: repository {repo.url}: its Object Lock setting `object-lock` was deleted (a delete marker)",
                "someone with write access hid it: check the bucket, then recover with `dbre copy --immutable`")
        return None
    locker = _locker(repo, op)
    if not locker.lock_enabled():
        raise RepositoryError(
            f"{op}: repository {repo.url} asks for Object Lock ({current.describe()}), but its bucket does "
            "not have Object Lock enabled", _HINT_BUCKET)
    setting, repo.object_lock_version = _oldest_setting(repo, locker) or (current, None)
    locker.set_default_retention(setting.s3_mode, setting.period + setting.step, MUTABLE)
    if setting != current:
        log.warning("%s: repository %s: the current `object-lock` says %s, its first version %s: the first is "
                    "followed, and written back before the next snapshot (someone with write access replaced it)",
                    op, repo.url, current.describe(), setting.describe())
        repo.object_lock_replaced = True
    return setting


def _may_lock(locker: LockingStore, op: str) -> bool:
    """Whether the bucket may hold a hidden setting: it has Object Lock enabled. Credentials that may
    not read that (s3:GetBucketObjectLockConfiguration) never wrote a locked repository (its every
    writer reads it), so such a writer goes on as before, unlocked (FORMAT.md, *Permissions*)."""
    try:
        return locker.lock_enabled()
    except PermanentError as err:
        if not _denied(err):
            raise
        log.debug("%s: cannot read the bucket's Object Lock configuration (%s): no Object Lock", op, err.message)
        return False


def _oldest_setting(repo: Repository, locker: LockingStore) -> tuple[ObjectLock, str | None] | None:
    """The oldest version of ``object-lock`` that opens, and its version id when it is not the
    current one (one listing; one GET per older version tried). None if there is only the current."""
    versions = [v for v in locker.versions(LOCK_KEY) if v.key == LOCK_KEY and not v.delete_marker]
    for i, v in reversed(list(enumerate(versions))):  # newest first: the oldest is the last
        if i == 0:
            return None  # the current version, read already
        try:
            raw = locker.get_version(LOCK_KEY, v.version_id, 0, 64 * 1024)
            return ObjectLock.from_json(repo.sealer.unseal(raw, LOCK_KEY)), v.version_id
        except (NotFound, IntegrityError, ValueError, KeyError, TypeError, UsageError):
            continue  # an attacker's garbage, or gone meanwhile
    return None


def enable(repo: Repository, setting: ObjectLock) -> bool:
    """Give ``repo`` its Object Lock setting (once: it cannot be changed or removed); False if it
    already had this very setting. Objects written before are locked when a snapshot next uses them."""
    op = "object lock"
    locker = _locker(repo, op)
    if not locker.lock_enabled():
        raise UsageError(f"{op}: the bucket of {repo.url} does not have Object Lock enabled", _HINT_BUCKET)
    current = read_setting(repo)
    if current is not None:
        if current != setting:
            raise UsageError(f"{op}: repository {repo.url} already has Object Lock ({current.describe()})",
                             "a setting is itself locked and cannot be changed; drop --object-lock")
        return False
    repo.require_writable(op)
    locker.set_default_retention(setting.s3_mode, setting.period + setting.step, MUTABLE)
    try:
        repo.store.put(LOCK_KEY, repo.sealer.seal(setting.to_json(), LOCK_KEY), if_absent=True)
    except AlreadyExists:
        return enable(repo, setting)  # another run won: the same setting, or a refusal
    repo.object_lock = setting
    ensure_locked(repo, ["config", LOCK_KEY], time.time() + setting.period)  # (and the cache learns both)
    return True


# -- extension -------------------------------------------------------------------------------------


@dataclass
class Extension:
    """What one ``ensure_locked`` call asked of the store."""

    checked: int = 0  # HEAD requests: objects this host knew nothing about
    extended: int = 0  # PutObjectRetention requests
    cached: int = 0  # objects known (written or extended by this host) to be locked long enough
    weaker: list[str] = field(default_factory=list)  # locked governance in a compliance repository


class _VersionLocking(Protocol):
    """`S3Store.extend_retention` extends one version when given its id (the setting's first)."""

    def extend_retention(self, key: str, mode: str, until: float, version_id: str | None = None) -> None: ...


class RetentionCache:
    """retain-until per key, as this host last set or saw it: saves requests, never trusted for
    safety (`dbre verify --immutable` reads the truth). ``$DBRE_CACHE_DIR/object-lock/<hash>.json``, the
    hash of the repository id, URL and S3 endpoint."""

    def __init__(self, repo: Repository) -> None:
        from dbre.sources.remote import default_cache_root

        # the URL does not name the store: s3://bucket/prefix on another endpoint is another store
        endpoint = getattr(locking_store(repo.store), "endpoint", "")
        name = hashlib.sha256(f"{repo.id} {repo.url} {endpoint}".encode()).hexdigest()[:24]
        self.path = default_cache_root() / "object-lock" / f"{name}.json"
        self.until: dict[str, float] = {}
        try:
            loaded = json.loads(self.path.read_text())
            self.until = {str(k): float(v) for k, v in loaded.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # none yet, or damaged: ask the store

    def save(self) -> None:
        now = time.time()
        live = {k: v for k, v in self.until.items() if v > now}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs requests next time


def ensure_locked(repo: Repository, keys: Iterable[str], need: float) -> Extension:
    """Make every object of ``keys`` locked until at least ``need`` (seconds since the epoch) before
    the caller writes what references them; an object locked for less is extended to need + step.

    Known retain-untils (written by this store object, or cached by this host) save the requests;
    the rest cost a HEAD each, and an extension a PutObjectRetention. A missing object is left to
    verify (the manifest then names a missing object, as without Object Lock).
    """
    setting = repo.object_lock
    stats = Extension()
    if setting is None:
        return stats
    locker = _locker(repo, "object lock")
    cache = RetentionCache(repo)
    target = need + setting.step
    keys = list(dict.fromkeys(keys))
    if repo.object_lock_replaced and LOCK_KEY in keys:  # (a write: never in a dry run, which only attaches)
        repo.store.put(LOCK_KEY, repo.sealer.seal(setting.to_json(), LOCK_KEY))
        repo.object_lock_replaced = False
    todo: list[tuple[str, bool]] = []  # key, retention known to be below need
    learned = False
    for key in keys:
        known, written = cache.until.get(key), locker.written_until(key)
        if written is not None and (known is None or written > known):
            cache.until[key] = known = written  # written by this process: the next run knows it too
            learned = True
        if known is not None and known >= need:
            stats.cached += 1
        else:
            todo.append((key, known is not None))

    def weaker(current: Retention) -> bool:
        # a governance lock where the setting says compliance: S3 turns it into compliance only with
        # the bypass header, which dbre never sends (someone put the object back under governance)
        return current.mode.upper() != setting.s3_mode and setting.mode == "compliance"

    def one(item: tuple[str, bool]) -> tuple[str, float | None, bool, bool]:
        key, known_short = item
        checked = False
        current: Retention | None = None
        if not known_short:
            checked = True
            try:
                current = locker.retention(key)
            except NotFound:
                return key, None, checked, False
            if current is not None and weaker(current):
                stats.weaker.append(key)
                if current.until < need:  # at least as long, in the mode it has
                    locker.extend_retention(key, current.mode.upper(), target)
                return key, None, checked, current.until < need
            if current is not None and current.until >= need:
                return key, current.until, checked, False
        try:
            locker.extend_retention(key, setting.s3_mode, target)
        except PermanentError:
            if checked:
                raise
            # the cache was behind: another host may have locked it longer (S3 refuses to shorten)
            current = locker.retention(key)
            if current is not None and weaker(current):
                stats.weaker.append(key)
                return key, None, True, False
            if current is None or current.until < need:
                raise
            return key, current.until, True, False
        return key, target, checked, True

    if todo:
        with ThreadPoolExecutor(min(16, len(todo)), thread_name_prefix="dbre-lock") as pool:
            for key, until, checked, extended in pool.map(one, todo):
                stats.checked += checked
                stats.extended += extended
                if until is not None:
                    cache.until[key] = until
    vid = repo.object_lock_version
    if vid is not None and LOCK_KEY in keys and cache.until.get(f"{LOCK_KEY}@{vid}", 0.0) < need:
        # the setting's first version, which writers follow, kept locked too (a newer one is on top)
        current = locker.retention(LOCK_KEY, vid)
        until = current.until if current is not None else 0.0
        if until < need:
            cast(_VersionLocking, locker).extend_retention(LOCK_KEY, setting.s3_mode, target, version_id=vid)
            stats.extended += 1
            until = target
        cache.until[f"{LOCK_KEY}@{vid}"] = until
        learned = True
    if todo or learned:
        cache.save()
    if stats.weaker:
        log.warning("object lock: %d object(s) of %s are locked in governance mode, but the repository's setting "
                    "is compliance (e.g. %s): someone put them back under governance, and dbre cannot change the "
                    "mode (that needs the bypass it never sends); `dbre verify --immutable` names them, a `backup "
                    "--full` stores their pages again under compliance", len(stats.weaker), repo.url, stats.weaker[0])
    repo.lock_extensions.append(stats)
    return stats


def snapshot_keys(repo: Repository, manifest: Manifest) -> list[str]:
    """Every object a snapshot needs to be restored: config, the setting, its manifest, its packs."""
    from dbre.repository.repo import pack_key

    return ["config", LOCK_KEY, repo.manifest_key(manifest), *(pack_key(p) for p in sorted(manifest.packs))]


def ensure_snapshot_locked(repo: Repository, manifest: Manifest) -> Extension:
    """``ensure_locked`` for what ``manifest`` references (not the manifest itself: the caller writes
    it next, locked until now + period + step), until its time + period."""
    if repo.object_lock is None:
        return Extension()
    keys = [k for k in snapshot_keys(repo, manifest) if k != repo.manifest_key(manifest)]
    return ensure_locked(repo, keys, manifest.time.timestamp() + repo.object_lock.period)


def ensure_base_locked(repo: Repository, manifest: Manifest) -> Extension:
    """``ensure_locked`` for a replication base snapshot, before its generation starts: the states
    of a generation are up to a step younger than its base, so what the base needs (its manifest
    included) stays locked until its time + period + step."""
    if repo.object_lock is None:
        return Extension()
    lock = repo.object_lock
    return ensure_locked(repo, snapshot_keys(repo, manifest), manifest.time.timestamp() + lock.period + lock.step)


class _VersionDeleting(Protocol):
    """`S3Store.delete_version`: one version deleted for good."""

    def delete_version(self, key: str, version_id: str) -> None: ...


def delete_for_good(repo: Repository, key: str) -> bool:
    """Delete ``key`` (prune, forget: its current version is not locked). Under Object Lock the bucket
    is versioned, where a delete only adds a marker and frees nothing: each version is deleted by its
    id instead (a version still locked stays, and shows again as the current one: a later prune sees
    it). False when no version could be deleted (no s3:DeleteObjectVersion): then a delete marker."""
    locker = locking_store(repo.store) if repo.object_lock is not None else None
    if locker is None:
        repo.store.delete(key)
        return True
    deleted, refused = 0, 0
    for v in [v for v in locker.versions(key) if v.key == key]:
        try:
            cast(_VersionDeleting, locker).delete_version(key, v.version_id)
            deleted += 1
        except PermanentError:
            refused += 1
    if refused and not deleted:
        repo.store.delete(key)
        return False
    return True


def locked_until(repo: Repository, key: str, now: float) -> float | None:
    """The retain-until of ``key``'s current version if still in force (prune keeps it), else None."""
    if repo.object_lock is None:
        return None
    try:
        current = _locker(repo, "prune").retention(key)
    except NotFound:
        return None
    return current.until if current is not None and current.until > now else None


# -- the locked versions alone ----------------------------------------------------------------------


class LockedView:
    """A read-only Store of a bucket's locked versions: for each key, the oldest version whose lock
    is in force (dbre writes each immutable key once, so the oldest locked version is dbre's; an
    attacker's delete markers and newer versions are ignored). ``locks/`` goes to the bucket itself
    (a restore holds a lock). Built with one version listing and one HEAD per version tried."""

    def __init__(self, store: Store, locker: LockingStore, now: float | None = None) -> None:
        self.inner = store
        self.url = store.url
        self.now = time.time() if now is None else now
        by_key: dict[str, list[ObjectVersion]] = {}
        for v in locker.versions(""):
            if not v.key.startswith(MUTABLE):
                by_key.setdefault(v.key, []).append(v)
        self.chosen: dict[str, tuple[ObjectVersion, Retention]] = {}
        # keys whose current version is a delete marker: what `dbre restore` does not see
        self.hidden = {k for k, vs in by_key.items() if vs[0].delete_marker}
        self.unlocked: list[str] = []  # keys with versions, none of them locked now

        def pick(item: tuple[str, list[ObjectVersion]]) -> tuple[str, tuple[ObjectVersion, Retention] | None]:
            key, versions = item
            for v in reversed(versions):  # oldest first
                if v.delete_marker:
                    continue
                try:
                    r = locker.retention(key, v.version_id)
                except NotFound:
                    continue
                if r is not None and r.until > self.now:
                    return key, (v, r)
            return key, None

        with ThreadPoolExecutor(16, thread_name_prefix="dbre-versions") as pool:
            for key, found in pool.map(pick, by_key.items()):
                if found is None:
                    self.unlocked.append(key)
                else:
                    self.chosen[key] = found
        self.unlocked.sort()
        self._locker = locker
        self._keys = sorted(self.chosen)

    def __repr__(self) -> str:
        return f"LockedView({self.url!r})"

    def retention_of(self, key: str) -> Retention | None:
        found = self.chosen.get(key)
        return found[1] if found else None

    def _version(self, key: str) -> str:
        found = self.chosen.get(key)
        if found is None:
            raise NotFound(f"get {key}: no locked version")
        return found[0].version_id

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith("locks/"):
            return self.inner.put(key, data, if_absent=if_absent)
        raise PermanentError(f"put {key}: the locked versions are read only")

    def get(self, key: str) -> bytes:
        if key.startswith("locks/"):
            return self.inner.get(key)
        return self._locker.get_version(key, self._version(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key.startswith("locks/"):
            return self.inner.get_range(key, offset, length)
        return self._locker.get_version(key, self._version(key), offset, length)

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        if prefix.startswith("locks/"):
            yield from self.inner.list(prefix, start_after=start_after, limit=limit)
            return
        count = 0
        for key in self._keys:
            if key.startswith(prefix) and (start_after is None or key > start_after):
                if limit is not None and count >= limit:
                    return
                yield key
                count += 1

    def modified(self, key: str) -> float:
        if key.startswith("locks/"):
            return self.inner.modified(key)
        found = self.chosen.get(key)
        if found is None:
            raise NotFound(f"stat {key}: no locked version")
        return found[0].modified

    def delete(self, key: str) -> None:
        if key.startswith("locks/"):
            return self.inner.delete(key)
        raise PermanentError(f"delete {key}: the locked versions are read only")

    def exists(self, key: str) -> bool:
        if key.startswith("locks/"):
            return self.inner.exists(key)
        return key in self.chosen


def open_locked(url: str | Store, key: Secret | None = None, now: float | None = None) -> Repository:
    """The repository as its locked versions alone have it (read only): what survives an attacker
    with full credentials who deleted or overwrote everything deletable."""
    from dbre.repository.repo import Repository
    from dbre.storage import open_store

    store = open_store(url) if isinstance(url, str) else url
    locker = locking_store(store)
    if locker is None:
        raise UsageError(f"--immutable: repository {store.url} is not on S3", "locked versions exist only on S3")
    try:
        view = LockedView(store, locker, now)
    except StorageError as err:
        raise type(err)(f"--immutable: {err.message}", err.hint) from err
    if "config" not in view.chosen:
        raise RepositoryError(f"--immutable: repository {store.url} has no locked config",
                              "it was not created with Object Lock (`dbre init --object-lock`), or its locks ran out")
    repo = Repository.open(view, key)
    repo.object_lock = read_setting(repo)
    return repo


# -- verify --immutable ---------------------------------------------------------------------------


@dataclass
class ImmutableReport:
    """Which snapshots the locked versions alone protect."""

    setting: ObjectLock | None = None
    protected: list[str] = field(default_factory=list)  # "db/id": inside the window, restorable from locks
    outside: list[tuple[str, str]] = field(default_factory=list)  # ("db/id", why): outside the window
    problems: list[tuple[str, str]] = field(default_factory=list)  # (object, detail): inside, not protected
    unlocked: list[str] = field(default_factory=list)  # keys that have no locked version at all
    hidden: list[str] = field(default_factory=list)  # "db/id": protected, but hidden by a delete marker
    segments: int = 0  # replicated segments checked end to end on the locked versions

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "object_lock": self.setting.describe() if self.setting else None,
                "protected": self.protected, "outside_window": [{"snapshot": s, "why": w} for s, w in self.outside],
                "problems": [{"object": o, "detail": d} for o, d in self.problems],
                "unlocked_objects": len(self.unlocked), "hidden": self.hidden, "segments": self.segments}


def verify_immutable(url: str | Store, key: Secret | None = None, now: float | None = None,
                     read_data: bool = True) -> ImmutableReport:
    """Prove that every snapshot inside the lock window (taken less than a period ago) restores from
    locked versions alone: each object it needs has a locked version retained at least until the
    snapshot's time + period, and verify (reading every page with ``read_data``) passes on the
    locked versions. Snapshots outside the window, or whose manifest has no locked version, are named."""
    from dbre.repository.verify import verify

    now = time.time() if now is None else now
    repo = open_locked(url, key, now)
    view = repo.store
    assert isinstance(view, LockedView)
    report = ImmutableReport(repo.object_lock, unlocked=view.unlocked)
    setting = repo.object_lock
    if setting is None:
        report.problems.append((LOCK_KEY, "no locked Object Lock setting: the repository was not created with "
                                          "`dbre init --object-lock`"))
        return report
    for k in view.unlocked:
        if k.startswith("snapshots/"):
            report.outside.append((k, "its manifest has no locked version (written before Object Lock, or its "
                                      "lock ran out)"))
    damaged: list[tuple[str, str]] = []
    inside: dict[str, Manifest] = {}
    for m in repo.snapshots(damaged=damaged):
        name = f"{m.db}/{m.id}"
        need = m.time.timestamp() + setting.period
        if need <= now:
            report.outside.append((name, f"taken {m.taken_at}: its lock window ended {iso_utc(need)}"))
            continue
        inside[name] = m
        if repo.manifest_key(m) in view.hidden:
            # rolled back: restore takes an older snapshot while the bucket proves this one existed (still
            # protected: it restores from the locked versions, through `dbre copy --immutable`)
            report.hidden.append(name)
        for k in snapshot_keys(repo, m):
            r = view.retention_of(k)
            if r is None:
                report.problems.append((k, f"no locked version (needed by {name} until {iso_utc(need)})"))
            elif r.until < need:
                report.problems.append((k, f"locked until {iso_utc(r.until)}, but {name} needs it until "
                                           f"{iso_utc(need)}"))
            elif r.mode.upper() != setting.s3_mode and setting.mode == "compliance":
                report.problems.append((k, f"locked in {r.mode.lower()} mode, but the setting is compliance "
                                           f"(needed by {name}): credentials allowed to bypass governance can "
                                           "delete it"))
    for k, why in damaged:
        report.problems.append((k, f"locked manifest cannot be read: {why}"))
    checked = verify(repo, read_data=read_data)
    for p in checked.problems:
        hit = [s for s in p.snapshots if s in inside]
        if hit or not p.snapshots:
            report.problems.append((p.object, p.detail))
    report.protected = sorted(n for n in inside if n not in checked.damaged)
    _verify_segments(repo, setting, now, report)
    return report


def _verify_segments(repo: Repository, setting: ObjectLock, now: float, report: ImmutableReport) -> None:
    """Replicated chains on the locked versions: a generation whose newest state is inside the window
    must restore end to end (base object, base snapshot, every segment); older ones are named."""
    from dbre.replicate.check import verify_segments
    from dbre.replicate.segment import parse_key

    newest: dict[str, float] = {}
    for key in repo.store.list("segments/"):
        name = parse_key(key)
        if name is not None:
            where = f"segments/{name.db}/{name.generation}"
            newest[where] = max(newest.get(where, 0.0), name.last_us / 1e6)
    report.segments, problems = verify_segments(repo)
    for obj, detail in problems:
        last = newest.get(obj)
        if last is not None and last + setting.period > now:
            report.problems.append((obj, f"replicated states up to {iso_utc(last)} do not restore from locked "
                                         f"versions alone: {detail}"))
        else:
            report.outside.append((obj, f"replicated chain outside the lock window: {detail}"))
