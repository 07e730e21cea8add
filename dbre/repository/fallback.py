"""Reading a repository with its offsite copies as fallbacks: an object a restore needs that is missing,
unreadable or damaged in the primary is read, under the same key, from the first copy that holds it intact.

`dbre copy` keeps everything a reader checks: the copy's `config` is the primary's bytes (same
repository id, master key or hash key, MAC), and packs, manifests, generation bases and segments go
over as stored, under the same keys. So an object taken from a copy is checked by the very code, with
the very keys and expected hashes, that checks the primary's: the manifest is unsealed under its key
with the primary's master key (or checksum key) and its root recomputed; a pack's index and pages
against the hashes the authenticated page map names; a segment against the hash chain. Someone who
can write the primary can make a restore read the copy, never accept something the primary's own
checks would refuse.

How: ``FallbackStore`` wraps the primary store. Listings of `snapshots/`, `segments/` and `packs/`
are the union of the primary's and the copies' (a manifest deleted from the primary is still found);
a key missing or unreadable (a store error after its retries) in the primary is read from a copy; a
key a restore found damaged is *routed* to the next copy. ``retrying`` runs a restore step again
after each damaged object, routed, until it succeeds or an object is damaged (or missing) everywhere.
After ``DISTRUST_AFTER`` objects found damaged in the primary (an attacker rarely rewrites one), every
object not read yet comes from the copies first and from the primary last, so a ransomed primary
costs a few attempts, not one per object. The restore's lock is held in every copy too (shared), so
a `forget --prune` on the offsite copy never deletes what the restore reads.
Writes (locks, records) and the listings of `locks/`, `leases/`, `records/` go to the primary alone;
a safety snapshot is taken with the primary repository itself (`primary_of`), so no snapshot in the
primary ever points at an object only the copy holds.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dbre.errors import IntegrityError, LockedError, RepositoryError, UsageError
from dbre.repository.crypto import CONFIG_MAC_INFO, config_mac_ok
from dbre.repository.lock import Lock
from dbre.repository.lock import hold as hold_lock
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from dbre.storage import NotFound, Store, open_store
from dbre.storage.base import PermanentError, StorageError, TransientError, WriteRefused

log = logging.getLogger(__name__)
T = TypeVar("T")

UNION_PREFIXES = ("snapshots/", "segments/", "packs/")  # what a restore looks up by listing
MAX_ROUTES = 1000  # damaged objects one restore takes from copies before it gives up (each costs a retry)
# After this many objects found damaged in the primary, the primary is taken for compromised (an attacker
# rarely rewrites one object): every object not read yet comes from the copies first, the primary last;
# a restore then costs a few attempts, not one per damaged object.
DISTRUST_AFTER = 2
_PRIMARY_LAST = -2  # a route: the key was read from the copies first and comes from the primary now

# an object key in an error message: the first one that names a stored object (not a generation)
_KEY = re.compile(r"(packs/(?:[0-9a-f]{2}/)?[0-9a-f]{32}|snapshots/[^\s:@(),;]+/[^\s:@(),;]+"
                  r"|segments/[^\s:@(),;/]+/[^\s:@(),;/]+/[^\s:@(),;]+)")


def damaged_key(err: Exception) -> str | None:
    """The key of the object an IntegrityError or NotFound names first (a pack as ``packs/ab/<id>``)."""
    text = getattr(err, "message", str(err))
    m = _KEY.search(text)
    if m is None:
        return None
    key = m.group(1).rstrip(".")
    if key.startswith("packs/") and key.count("/") == 1:
        pack = key[6:]
        key = f"packs/{pack[:2]}/{pack}"
    return key


def _why(err: Exception, key: str) -> str:
    """An error's message without the key it starts with: "checksum mismatch (...)", "missing"."""
    if isinstance(err, NotFound):
        return "missing"
    if isinstance(err, StorageError):
        return f"unreadable ({err.message})"
    text = getattr(err, "message", str(err))
    for prefix in (key, "packs/" + key.rsplit("/", 1)[-1]):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip("@0123456789").lstrip(": ")
            break
    return text or "damaged"


@dataclass
class Taken:
    """An object read from a copy: its key, the copy's URL, and why not from the repositories before it."""

    key: str
    source: str
    why: list[str] = field(default_factory=list)  # per repository before it: "missing", the check that failed

    @property
    def line(self) -> str:
        return f"{self.key}: {self.why[0] if self.why else 'damaged'} in the primary; taken from {self.source}"

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.source, "primary": self.why[0] if self.why else None}


class FallbackStore:
    """A read view of ``primary`` in which the keys a restore could not use come from ``copies``
    (each an offsite copy of the same repository, in order). See the module docstring."""

    def __init__(self, primary: Store, copies: list[Store]) -> None:
        self.url = primary.url
        self.primary = primary
        self.copies = copies
        self._route: dict[str, int] = {}  # key -> index of the copy it is read from
        self._why: dict[str, list[str]] = {}  # key -> why each repository before that copy was not used
        self._read: set[str] = set()  # routed keys actually read from their copy
        self._reroutes = 0
        self._damaged_in_primary = 0
        self._primary_skipped: set[str] = set()  # keys read from the copies first (the primary distrusted)
        self._mutex = threading.Lock()

    @property
    def distrusted(self) -> bool:
        """The primary was found damaged often enough (DISTRUST_AFTER) to be read last from now on."""
        return self._damaged_in_primary >= DISTRUST_AFTER

    def __repr__(self) -> str:
        return f"FallbackStore({self.url!r}, copies={[c.url for c in self.copies]!r})"

    @property
    def taken(self) -> list[Taken]:
        """Every object read from a copy, in key order."""
        with self._mutex:
            return [Taken(k, self.copies[self._route[k]].url, list(self._why.get(k, [])))
                    for k in sorted(self._read) if self._route.get(k, -1) >= 0]

    def reroute(self, key: str, err: Exception) -> bool:
        """Read ``key`` from the next copy from now on, ``err`` saying why not from where it came from;
        False when no copy is left (the caller then gives up)."""
        with self._mutex:
            at = self._route.get(key, -1)
            self._why.setdefault(key, []).append(_why(err, key))
            if at == -1:
                self._damaged_in_primary += 1
            if self._reroutes >= MAX_ROUTES:
                return False
            if at + 1 >= len(self.copies) or at == _PRIMARY_LAST:
                if key in self._primary_skipped and at != _PRIMARY_LAST:  # damaged in every copy: the primary's
                    self._reroutes += 1
                    self._route[key] = _PRIMARY_LAST
                    self._read.discard(key)
                    return True
                return False
            self._reroutes += 1
            self._route[key] = at + 1
            self._read.discard(key)
            return True

    def source_of(self, key: str) -> str:
        """The URL of the repository ``key`` is read from now."""
        with self._mutex:
            at = self._route.get(key, -1)
        return self.primary.url if at < 0 else self.copies[at].url

    def everywhere(self, key: str) -> str:
        """One line: why ``key`` could be used from none of the repositories."""
        with self._mutex:
            return self._everywhere(key)

    def _everywhere(self, key: str) -> str:
        urls = [self.primary.url] + [c.url for c in self.copies]
        why = self._why.get(key, [])
        if key in self._primary_skipped and len(why) > len(urls):  # (read from the primary last, too)
            why = [f"{why[0]}, then {why[-1]}", *why[1:-1]]
        return f"{key}: " + "; ".join(f"{w} in {u}" for w, u in zip(why, urls, strict=False))

    # -- reads -----------------------------------------------------------------------------------

    def _read_with(self, key: str, read: Callable[[Store], T]) -> T:
        if key.startswith(("locks/", "leases/", "records/", ".tmp/")):
            return read(self.primary)
        with self._mutex:
            at = self._route.get(key, -1)
            if at == -1 and self.copies and self.distrusted and key.startswith(UNION_PREFIXES):
                at = self._route[key] = 0
                self._primary_skipped.add(key)
                self._why.setdefault(key, []).append(
                    f"not read ({self._damaged_in_primary} objects were damaged there)")
        if at == _PRIMARY_LAST:
            return read(self.primary)
        if at < 0:
            try:
                return read(self.primary)
            except (NotFound, PermanentError, TransientError) as err:  # missing, or unreadable (after retries)
                if not self.copies:
                    raise
                with self._mutex:
                    if key not in self._route:
                        self._route[key] = 0
                        self._why.setdefault(key, []).append(_why(err, key))
                    at = self._route[key]
        while True:
            try:
                data = read(self.copies[at])
            except NotFound as err:
                with self._mutex:
                    why = self._why.setdefault(key, [])
                    if len(why) < at + 2:
                        why.append(_why(err, key))
                    if at + 1 >= len(self.copies):
                        if key in self._primary_skipped:  # in no copy: the primary's, as a last resort
                            self._route[key] = _PRIMARY_LAST
                            return read(self.primary)
                        raise IntegrityError(self._everywhere(key),
                                             "nothing was restored; restore another snapshot or time") from None
                    at = self._route[key] = at + 1
                continue
            with self._mutex:
                self._read.add(key)
            return data

    def get(self, key: str) -> bytes:
        return self._read_with(key, lambda s: s.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._read_with(key, lambda s: s.get_range(key, offset, length))

    def modified(self, key: str) -> float:
        return self._read_with(key, lambda s: s.modified(key))

    def exists(self, key: str) -> bool:
        if self.primary.exists(key):
            return True
        return not key.startswith(("locks/", "leases/", "records/")) and any(c.exists(key) for c in self.copies)

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        if not prefix.startswith(UNION_PREFIXES) or not self.copies:
            return self.primary.list(prefix, start_after=start_after, limit=limit)
        keys = set(self.primary.list(prefix, start_after=start_after, limit=limit))
        for c in self.copies:
            keys.update(c.list(prefix, start_after=start_after, limit=limit))
        ordered = sorted(keys)
        return iter(ordered[:limit] if limit is not None else ordered)

    # -- writes: the primary's (locks, records); a restore writes nothing else ---------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.primary.put(key, data, if_absent=if_absent)

    def delete(self, key: str) -> None:
        self.primary.delete(key)


class FallbackRepository(Repository):
    """The primary repository read through a ``FallbackStore``; ``primary`` is the repository itself
    (for writes that must reference the primary's objects only: safety snapshots)."""

    store: FallbackStore

    def __init__(self, primary: Repository, store: FallbackStore) -> None:
        super().__init__(store, primary.config, primary.sealer, primary.raw_config)
        self.primary = primary
        self.config_from: str | None = None  # the copy whose config was used (the primary's was unusable)

    @property
    def taken(self) -> list[Taken]:
        return self.store.taken

    @contextmanager
    def lock(self, op: str, *, exclusive: bool = False) -> Iterator[Lock]:  # type: ignore[override]
        """The primary's lock, and a shared lock in every copy read from: a `forget --prune` on the offsite
        copy then waits for (or refuses beside) this restore instead of deleting what it reads. A copy that
        refuses the lock (read-only credentials) is read without one, with a warning."""
        with ExitStack() as stack:
            held = stack.enter_context(hold_lock(self.store.primary, op, exclusive=exclusive))
            self._lock_copies(stack, op)
            yield held

    @contextmanager
    def read_lock(self, op: str) -> Iterator[Lock]:
        """As ``lock``, for a run that only reads: a primary that refuses the lock object (read-only) is
        read without one, after a warning, and every copy read from still gets its shared lock (a prune
        on the offsite copy is kept off, or refuses this run, as with a writable primary)."""
        with ExitStack() as stack:
            try:
                held = stack.enter_context(hold_lock(self.store.primary, op))
            except WriteRefused as err:
                held = self.unlocked_read(op, err)
            self._lock_copies(stack, op)
            yield held

    def _lock_copies(self, stack: ExitStack, op: str) -> None:
        """A shared lock in every copy (held by ``stack``); a copy's live conflicting lock refuses."""
        for copy in self.store.copies:
            try:
                stack.enter_context(hold_lock(copy, f"{op} (fallback of {self.store.primary.url})"))
            except LockedError:
                raise
            except StorageError as err:
                log.warning("fallback %s: no lock taken there (%s); a prune there during this restore could "
                            "remove what it reads", copy.url, err.message)

    def fallback_lines(self) -> list[str]:
        """One line per object taken from a copy (the config first, when it was)."""
        lines = [f"config: unusable in the primary; taken from {self.config_from}"] if self.config_from else []
        return lines + [t.line for t in self.taken]

    def describe_fallback(self) -> dict[str, Any]:
        return {"repositories": [c.url for c in self.store.copies], "config_from": self.config_from,
                "objects": len(self.taken), "taken": [t.describe() for t in self.taken]}


def primary_of(repo: Repository) -> Repository:
    """The repository to write into: the primary itself when ``repo`` reads through copies."""
    return repo.primary if isinstance(repo, FallbackRepository) else repo


def retrying(repo: Repository, attempt: Callable[[], T]) -> T:
    """``attempt()``; when ``repo`` reads through copies and it fails on a damaged or missing object,
    that object is read from the next copy and ``attempt`` runs again (every object checked again as
    strictly: nothing of a failed attempt is kept but the manifests that passed their checks). An
    object unusable everywhere raises one IntegrityError naming it and every repository."""
    if not isinstance(repo, FallbackRepository):
        return attempt()
    store = repo.store
    while True:
        try:
            return attempt()
        except (IntegrityError, NotFound) as err:
            key = damaged_key(err)
            if key is None:
                raise
            if not store.reroute(key, err):
                raise IntegrityError(store.everywhere(key),
                                     "nothing was restored; restore another snapshot or time, and "
                                     "`dbre verify --read-data` both repositories") from err
            log.info("%s: %s; reading it from %s", key, _why(err, key), store.source_of(key))


# -- opening -------------------------------------------------------------------------------------


def _check_copy(primary: Repository, store: Store) -> None:
    """Raise UsageError unless ``store`` holds an offsite copy of ``primary`` (its config: same id,
    authenticated by the primary's key)."""
    try:
        config = Repository.read_config(store)
    except RepositoryError as err:
        if isinstance(err, StorageError) and not isinstance(err, NotFound):
            raise
        raise UsageError(f"fallback {store.url}: {err.message}", "give an offsite copy made by `dbre copy`") from None
    if config is None:
        raise UsageError(f"fallback {store.url}: no repository there", "give an offsite copy made by `dbre copy`")
    same = config.get("id") == primary.id and int(config.get("version", 0)) == primary.version
    if same and primary.version >= 2:
        mac_key = primary.sealer.derive_key(CONFIG_MAC_INFO) or bytes.fromhex(str(primary.config["hash_key"]))
        same = config_mac_ok(config, mac_key)
    elif same:
        same = config == primary.config
    if not same:
        raise UsageError(f"fallback {store.url} is not an offsite copy of {primary.url} (another repository id or key)",
                         "give the repository `dbre copy --to` wrote")


def open_with_fallbacks(url: str, key: Secret | None, fallbacks: list[str]) -> Repository:
    """The repository at ``url``, reading through ``fallbacks`` (offsite copies) when any are given.

    Each copy's config must be the primary's (`_check_copy`; bad input otherwise, nothing read). A copy
    that cannot be reached is left out with a warning (a restore from a healthy primary goes on). When
    the primary's own config is missing or unusable (damaged, or its key does not open it), a copy's
    config, opened with ``key``, is used and the restore says so."""
    if not fallbacks:
        return Repository.open(url, key)
    stores = [open_store(f) for f in dict.fromkeys(fallbacks)]
    primary_store = open_store(url)
    if any(s.url == primary_store.url for s in stores):
        raise UsageError(f"--fallback {primary_store.url} is the primary repository", "give its offsite copy")
    config_from = None
    try:
        primary = Repository.open(primary_store, key)
    except RepositoryError as err:
        if isinstance(err, StorageError) and not isinstance(err, NotFound):
            raise  # unreachable, denied: not damage
        holds = any(next(iter(primary_store.list(p, limit=1)), None) is not None for p in ("snapshots/", "packs/"))
        if not holds and not primary_store.exists("config"):
            raise  # no repository there at all (a wrong --repo): not one to repair from a copy
        primary, config_from = _config_from_copy(primary_store, key, stores, err)
    copies = []
    for s in stores:
        try:
            _check_copy(primary, s)
        except StorageError as err:
            log.warning("fallback %s not used: %s", s.url, err.message)
            continue
        copies.append(s)
    repo = FallbackRepository(primary, FallbackStore(primary_store, copies))
    repo.config_from = config_from
    return repo


def _config_from_copy(primary_store: Store, key: Secret | None, stores: list[Store],
                      err: RepositoryError) -> tuple[Repository, str]:
    """The primary opened with the first copy's config that opens with ``key``; raises ``err`` if none does."""
    for s in stores:
        try:
            copy = Repository.open(s, key)
        except RepositoryError:
            continue
        return Repository(primary_store, copy.config, copy.sealer, copy.raw_config), s.url
    raise err
