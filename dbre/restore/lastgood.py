"""Find the last good point of a database: bisect its snapshots and transactions for the newest that passes its checks.

The candidate points are every snapshot (not safety ones) and, for a replicated database, every
transaction of its PITR window (a state exact to the txid), ordered by time: a snapshot's time, a
transaction's observation time (read from its segment's name: exact for the first and last of a
segment, interpolated between them for the others, which only matters for a snapshot taken while
that segment was being recorded). The search assumes the timeline is monotone (good, then bad
from some point on) and finds that boundary: the newest point probed good that comes just before
the oldest one probed bad. It probes the newest point first (good: done), then the lower bound
(the point at ``since``, else the oldest: bad means nothing good since then), then halves the gap,
so n points cost at most 2 + ceil(log2(n)) probes.

A probe runs in place through the read-only VFS of dbre/restore/query.py, cheapest first, stopping
at the first failure: the user's SQL checks (each one read-only statement whose first column of
the first row must be true), then ``PRAGMA integrity_check`` (``quick_check`` on states above
``QUICK_ABOVE``, or when asked: it skips the index-content cross-checks; each probe says which),
then, only if suites are given, the Great Expectations suites, which need a file: the point is
restored to a temporary file for them (removed after). Nothing is written to the repository but its
shared lock, held for the whole search.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apsw
import apsw.ext

from dbre.errors import RepositoryError, UsageError
from dbre.replicate.segment import list_generations, to_time
from dbre.repository.manifest import check_db_name, iso, micros
from dbre.repository.repo import Repository
from dbre.restore.connection import text_as_utf8
from dbre.restore.query import CountingStore, FetchStats, QueryState, choose_state, open_state

if TYPE_CHECKING:
    from dbre.validate.suites import Suite

QUICK_ABOVE = 1024**3  # states larger than this get quick_check (O(pages)), not integrity_check
INTEGRITY_ERRORS = 10  # the most problems integrity_check lists (the first one is shown)

# SQLite errors that only say a name is not in this state's schema: a check that uses a table the
# state lacks fails there; it is not bad input (a table dropped by mistake is what it should catch)
_UNRESOLVED = ("no such table", "no such column", "no such function", "no such collation", "no such module",
               "no such index", "no such view")
_CHECK_HINT = 'a --check is one read-only statement whose first column says pass, e.g. "SELECT count(*) > 0 FROM t"'


@dataclass(frozen=True)
class Point:
    """A state the search can probe: a snapshot, or a replicated transaction (the state up to it)."""

    time_us: int  # for ordering: exact for a snapshot; for a txid, from its segment's name (see module)
    snapshot: str | None = None
    txid: int | None = None

    def label(self) -> str:
        return f"snapshot {self.snapshot}" if self.snapshot else f"txid {self.txid}"

    def restore_args(self) -> list[str]:
        return ["--snapshot", str(self.snapshot)] if self.snapshot else ["--txid", str(self.txid)]

    def describe(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "txid": self.txid}


@dataclass
class Probe:
    """What probing one point found: good, or the first check that failed (and why)."""

    point: Point
    time: str  # when the state is from (the snapshot's time, the transaction's observation)
    good: bool
    failed: str | None = None  # which check failed: "check 2", "integrity_check", "expectations", "read"
    detail: str = ""  # what it found
    integrity: str | None = None  # integrity_check or quick_check (None: not reached)
    restored_for_expectations: bool = False
    bytes_read: int = 0
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {**self.point.describe(), "time": self.time, "result": "good" if self.good else "bad",
                "failed": self.failed, "detail": self.detail, "integrity": self.integrity,
                "restored_for_expectations": self.restored_for_expectations, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3)}


@dataclass
class LastGoodResult:
    """The search: every probe in order, and the newest good point before the oldest known bad one."""

    db: str
    points: int  # candidate points from the lower bound to the newest
    since: datetime | None
    lower: Point  # where the search started from below (the point at ``since``, else the oldest)
    probes: list[Probe] = field(default_factory=list)
    found: Probe | None = None
    first_bad: Probe | None = None  # the oldest point probed bad (None: the newest was good)
    seconds: float = 0.0

    def restore_command(self, repo_url: str, to: str, key_file: str | None = None) -> str | None:
        """The `dbre restore` command that restores the point found (None: nothing found)."""
        if self.found is None:
            return None
        args = ["dbre", "restore", "--repo", repo_url, "--db", self.db, *self.found.point.restore_args(), "--to", to]
        if key_file:
            args += ["--key-file", key_file]
        return shlex.join(args)

    def describe(self) -> dict[str, Any]:
        return {"db": self.db, "points": self.points, "since": iso(self.since) if self.since else None,
                "lower_bound": self.lower.describe(), "probes": [p.describe() for p in self.probes],
                "found": self.found.describe() if self.found else None,
                "first_bad": self.first_bad.describe() if self.first_bad else None,
                "assumes": "monotone: good up to a point, bad from the next on",
                "seconds": round(self.seconds, 3)}


# -- the points ----------------------------------------------------------------------------------


def list_points(repo: Repository, db: str) -> list[Point]:
    """Every snapshot of ``db`` but the safety ones, and every replicated transaction of its PITR window
    (a txid held by several generations: the newest's, as restore --txid takes it), oldest first."""
    points = [Point(micros(m.time), snapshot=m.id) for m in repo.require_db(db) if not m.is_safety]
    from dbre.replicate.window import read_pruned

    pruned = read_pruned(repo, db)
    cut = micros(pruned) if pruned is not None else None
    txids: dict[int, Point] = {}
    for names in list_generations(repo, db).values():  # oldest first: a newer generation's txid wins
        for n in names:
            span = n.last - n.first
            for i in range(span + 1):
                t = n.first_us + (n.last_us - n.first_us) * i // span if span else n.last_us
                if cut is None or t >= cut:
                    txids[n.first + i] = Point(t, txid=n.first + i)
    points += txids.values()
    # at the same time, the transaction comes first: a snapshot holds every commit observed before it
    points.sort(key=lambda p: (p.time_us, p.snapshot is not None, p.txid or 0))
    return points


# -- the checks ----------------------------------------------------------------------------------


def _prepare(conn: apsw.Connection, refused: list[str], n: int, sql: str) -> str | None:
    """None when ``sql`` is one read-only statement on this connection's schema; the SQLite message
    when it uses a name this schema lacks; UsageError when it is not SQL, not one statement, or writes."""
    refused.clear()
    try:
        info = apsw.ext.query_info(conn, sql)
    except apsw.AuthError:
        what = refused[0] if refused else "the statement"
        raise UsageError(f"--check {n}: refused: {what} writes or leaves the state: a check only reads",
                         _CHECK_HINT) from None
    except apsw.SQLError as err:
        text = str(err).removeprefix("SQLError: ")
        if any(u in text for u in _UNRESOLVED):
            return text
        raise UsageError(f"--check {n}: {text}", _CHECK_HINT) from None
    if (info.query_remaining or "").strip().strip(";").strip():
        raise UsageError(f"--check {n}: more than one statement", _CHECK_HINT)
    if info.has_vdbe and not info.is_readonly:
        raise UsageError(f"--check {n}: refused: {' '.join(sql.split()[:2])} writes: a check only reads", _CHECK_HINT)
    if not info.has_vdbe or not info.description:
        raise UsageError(f"--check {n}: {' '.join(sql.split()[:2]) or 'an empty statement'} returns no rows",
                         _CHECK_HINT)
    return None


def check_syntax(checks: list[str]) -> list[int]:
    """Refuse (UsageError) a check that does not parse, is not one statement or writes, on an empty
    schema; the indexes (from 0) of those that use names only a database's schema can resolve."""
    conn = apsw.Connection(":memory:")
    try:
        return [i for i, sql in enumerate(checks) if _prepare(conn, [], i + 1, sql) is not None]
    finally:
        conn.close()


def _truthy(conn: apsw.Connection, value: Any) -> bool:
    """As SQLite's WHERE reads a value: NULL is false, a number is true unless 0, text is its numeric prefix."""
    if value is None:
        return False
    if isinstance(value, int | float):
        return value != 0
    return bool(conn.execute("SELECT CAST(? AS NUMERIC) <> 0", (value,)).get)


def _run_checks(conn: apsw.Connection, refused: list[str], checks: list[str]) -> tuple[str, str] | None:
    """(which, detail) of the first check that is not true on this state; None when all are."""
    for n, sql in enumerate(checks, 1):
        missing = _prepare(conn, refused, n, sql)
        if missing is not None:
            return f"check {n}", missing
        try:
            with text_as_utf8(f"check {n}"):
                row = next(iter(conn.execute(sql)), None)
        except apsw.SQLError as err:
            return f"check {n}", str(err).removeprefix("SQLError: ")
        if row is None:
            return f"check {n}", "no rows"
        if not row or not _truthy(conn, row[0]):
            return f"check {n}", f"{sql.strip()} -> {row[0] if row else None!r}"
    return None


def _integrity(conn: apsw.Connection, quick: bool) -> tuple[str, str] | None:
    pragma = "quick_check" if quick else "integrity_check"
    rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}({INTEGRITY_ERRORS})")]
    if rows == ["ok"]:
        return None
    return pragma, f"{rows[0]}" + (f" (and {len(rows) - 1} more)" if len(rows) > 1 else "")


def _state_time(state: QueryState) -> str:
    return state.last_committed if state.point is not None and state.last_committed else state.manifest.taken_at


# -- one probe -----------------------------------------------------------------------------------


def probe_point(repo: Repository, db: str, point: Point, checks: list[str], suites: list[Suite] | None = None, *,
                quick: bool | None = None) -> Probe:
    """Probe one point: the SQL checks and the integrity check in place, then (only with ``suites``, only
    if those passed) the GX suites on a temporary restored copy. A point whose pages cannot be read
    (a pack missing or damaged) is bad: it could not be restored either."""
    started = time.perf_counter()
    stats = FetchStats()
    counted = Repository(CountingStore(repo.store, stats), repo.config, repo.sealer, repo.raw_config)
    probe = Probe(point, to_time(point.time_us).isoformat(), good=False)
    try:
        try:
            state = choose_state(counted, db, snapshot=point.snapshot, txid=point.txid)
        except UsageError as err:  # (a listed txid restore --txid cannot reach: its generation's base is gone)
            raise RepositoryError(err.message, err.hint) from None
        try:
            probe.time = _state_time(state)
            with open_state(counted, state, stats) as (conn, refused):
                failure = _run_checks(conn, refused, checks)
                if failure is None:
                    use_quick = state.size > QUICK_ABOVE if quick is None else quick
                    probe.integrity = "quick_check" if use_quick else "integrity_check"
                    failure = _integrity(conn, use_quick)
        finally:
            state.overlay.close()
        if failure is None and suites:
            probe.restored_for_expectations = True
            failure = _expectations(counted, db, point, suites, state)
    except RepositoryError as err:  # (damage: a pack, segment or base missing or altered; not restorable either)
        failure = ("read", err.message)
    except (apsw.CorruptError, apsw.NotADBError) as err:  # (a page SQLite cannot parse: integrity_check's finding)
        failure = (probe.integrity or "integrity_check", f"database disk image is malformed ({err})")
    if failure is None:
        probe.good = True
    else:
        probe.failed, probe.detail = failure
    probe.bytes_read = stats.bytes
    probe.seconds = time.perf_counter() - started
    return probe


def _expectations(repo: Repository, db: str, point: Point, suites: list[Suite], state: QueryState
                  ) -> tuple[str, str] | None:
    """Restore the point to a temporary file (GX reads a file, not the VFS), run the suites on it."""
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.restore.pitr import apply_pitr, plan_pitr
    from dbre.validate.suites import run_suites

    with tempfile.TemporaryDirectory(prefix=f"dbre-last-good-{db}-") as scratch:
        path = Path(scratch) / f"{db}.db"
        pitr = plan_pitr(repo, db, path, txid=point.txid) if point.txid is not None else None
        if pitr is not None:
            apply_pitr(repo, pitr)
        else:
            apply_restore(repo, plan_restore(repo, db, path, snapshot=point.snapshot))
        when = datetime.fromisoformat(_state_time(state).replace("Z", "+00:00"))
        run = run_suites(path, suites, snapshot_time=when)
    bad = [c for c in run.checks() if not c.passed]
    if not bad:
        return None
    return "expectations", bad[0].describe() + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")


# -- the search ----------------------------------------------------------------------------------


def find_last_good(repo: Repository, db: str, checks: list[str] | None = None, *, since: datetime | None = None,
                   suites: list[Suite] | None = None, quick: bool | None = None,
                   on_probe: Callable[[Probe], None] | None = None) -> LastGoodResult:
    """The newest good point of ``db`` before the oldest known bad one (see the module docstring), the
    search starting from the point at ``since`` (else the oldest). Checks are refused (UsageError) before
    any probe when they do not parse, are not one statement, or write; ``on_probe`` sees each probe as it
    ends. Holds the repository's shared lock throughout; writes nothing else."""
    checks = list(checks or [])
    check_db_name(db)
    check_syntax(checks)
    started = time.perf_counter()
    with repo.read_lock(f"last-good {db}"):
        points = list_points(repo, db)
        lo = 0
        if since is not None:
            limit = micros(since)
            lo = max((i for i, p in enumerate(points) if p.time_us <= limit), default=0)
        hi = len(points) - 1
        if checks:  # (with the state's authorizer: what an empty schema cannot tell, e.g. ATTACH)
            _resolve(repo, db, [points[hi], points[lo]], checks)
        result = LastGoodResult(db, hi - lo + 1, since, points[lo])

        def probe(i: int) -> Probe:
            p = probe_point(repo, db, points[i], checks, suites, quick=quick)
            result.probes.append(p)
            if on_probe is not None:
                on_probe(p)
            return p

        newest = probe(hi)
        if newest.good:
            result.found = newest
        else:
            result.first_bad = newest
            lower = probe(lo) if lo != hi else newest
            if lower.good:
                good, bad = lo, hi
                found = lower
                while bad - good > 1:  # good at ``good``, bad at ``bad``: halve the gap
                    mid = (good + bad) // 2
                    p = probe(mid)
                    if p.good:
                        good, found = mid, p
                    else:
                        bad, result.first_bad = mid, p
                result.found = found
            else:
                result.first_bad = lower
    result.seconds = time.perf_counter() - started
    return result


def _resolve(repo: Repository, db: str, points: list[Point], checks: list[str]) -> None:
    """Prepare the checks on the newest state, under its read-only authorizer, and those that name a table
    or column it lacks on the lower-bound state too (schema pages only, nothing run): one that writes is
    refused; one that names a table or column in neither is refused as a mistake (UsageError)."""
    unresolved = list(range(len(checks)))
    missing: dict[int, str] = {}
    for point in dict.fromkeys(points):
        state = choose_state(repo, db, snapshot=point.snapshot, txid=point.txid)
        try:
            with open_state(repo, state, FetchStats()) as (conn, refused):
                for i in unresolved:
                    why = _prepare(conn, refused, i + 1, checks[i])
                    if why is None:
                        missing.pop(i, None)
                    else:
                        missing[i] = why
        finally:
            state.overlay.close()
        unresolved = list(missing)
        if not unresolved:
            return
    i = unresolved[0]
    raise UsageError(f"--check {i + 1}: {missing[i]} in the newest state or the one the search starts from",
                     "check the names; `dbre sql ... \"SELECT name FROM sqlite_schema\"` lists the tables")
