"""What every torture test shares: the trial budget and seeds, the figures, a content digest of a
database, and the oracle that checks a repository after a kill (verify --read-data clean, every
snapshot it should hold restores to exactly the content recorded when it was taken)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer.main
import typer.testing

from dbre.errors import DbreError, RepositoryError
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from tests.dbfactory import CliResult, integrity
from tests.dbfactory import cli as _cli

# --------------------------------------------------------------------------- budget and seeds

# The CI part: kills per (command, backend). S3 trials cost 3-5x local ones (moto answers a listing
# in ~60 ms, and a run lists the locks, the snapshots, the packs), replicate ones ~2.5 s of writer each.
CI_TRIALS: dict[tuple[str, str], int] = {
    ("backup", "local"): 64, ("backup", "s3"): 6,
    ("copy", "local"): 32, ("copy", "s3"): 4,
    ("forget --prune", "local"): 32, ("forget --prune", "s3"): 3,
    ("restore", "local"): 44, ("restore", "s3"): 5,
    ("replicate", "local"): 7, ("replicate", "s3"): 3,
}
CI_TOTAL = sum(CI_TRIALS.values())
# DBRE_TORTURE_TRIALS=N scales every cell by N / CI_TOTAL (the long run: 2000)
TRIALS = int(os.environ.get("DBRE_TORTURE_TRIALS", CI_TOTAL))
SEED = int(os.environ.get("DBRE_TORTURE_SEED", "20261201"))


def trials(command: str, backend: str) -> int:
    """This cell's share of ``TRIALS`` (at least 2)."""
    return max(2, round(CI_TRIALS[(command, backend)] * TRIALS / CI_TOTAL))


def rng_for(command: str, backend: str) -> random.Random:
    """The cell's own seeded generator (a string seed is hashed with SHA-512: the same every run)."""
    return random.Random(f"{SEED}:{command}:{backend}")


@dataclass
class Trial:
    """One kill: what a failure message must say to reproduce it."""

    command: str
    backend: str
    index: int
    delay: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        return (f"[{self.command} on {self.backend}, trial {self.index}, kill after {self.delay:.3f} s{self.note}; "
                f"reproduce: DBRE_TORTURE_SEED={SEED} DBRE_TORTURE_TRIALS={TRIALS} "
                f"python -m pytest tests/torture -k '{self.command.split()[0]} and {self.backend}']")

    @contextmanager
    def checking(self) -> Iterator[None]:
        """Prefix any failed assertion with this trial (and its seed)."""
        try:
            yield
        except AssertionError as err:
            raise AssertionError(f"{self}: {err}") from err


# --------------------------------------------------------------------------- figures


@dataclass
class Cell:
    trials: int = 0
    kills: int = 0  # a SIGKILL cut the run (it had not finished)
    finished_first: int = 0  # the run ended before its kill time
    snapshots_restored: int = 0
    points_restored: int = 0  # replicate: point-in-time restores checked
    data_lost: int = 0
    next_run_max_s: float = 0.0  # the longest "next run" after a kill (a stale lock would show here)
    busy_base_exits: int = 0  # replicate: the known finding (test_replicate_busy_source.py) met here
    seconds: float = 0.0


@dataclass
class Tally:
    """Figures of the torture session, per command and backend, written to bench-output/torture.json."""

    cells: dict[str, Cell] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cell(self, command: str, backend: str) -> Cell:
        with self.lock:
            return self.cells.setdefault(f"{command} / {backend}", Cell())

    def as_json(self) -> dict[str, Any]:
        cells = {k: vars(v) for k, v in sorted(self.cells.items())}
        total = {k: sum(getattr(c, k) for c in self.cells.values())
                 for k in ("trials", "kills", "finished_first", "snapshots_restored", "points_restored", "data_lost")}
        return {"seed": SEED, "trials_asked": TRIALS, "total": total, "cells": cells}

    def lines(self) -> list[str]:
        out = [f"{'command / backend':<26} {'trials':>6} {'kills':>6} {'ended':>6} {'restores':>8} "
               f"{'points':>6} {'lost':>5} {'next run':>8} {'time':>7}"]
        for name, c in sorted(self.cells.items()):
            out.append(f"{name:<26} {c.trials:>6} {c.kills:>6} {c.finished_first:>6} {c.snapshots_restored:>8} "
                       f"{c.points_restored:>6} {c.data_lost:>5} {c.next_run_max_s:>7.2f}s {c.seconds:>6.1f}s")
        t = self.as_json()["total"]
        out.append(f"{'total':<26} {t['trials']:>6} {t['kills']:>6} {t['finished_first']:>6} "
                   f"{t['snapshots_restored']:>8} {t['points_restored']:>6} {t['data_lost']:>5}")
        return out


# --------------------------------------------------------------------------- the CLI in this process

_COMMAND: Any = None


def cli(*args: str | os.PathLike[str]) -> CliResult:
    """``tests.dbfactory.cli`` with dbre's click command built once: typer rebuilds it at every call
    (~0.1 s, as long as a small restore), and the oracle runs the CLI thousands of times."""
    global _COMMAND
    if _COMMAND is None:
        from dbre.cli import app

        _COMMAND = typer.main.get_command(app)
    built = typer.testing._get_command
    typer.testing._get_command = lambda app: _COMMAND  # type: ignore[assignment]
    try:
        return _cli(*args)
    finally:
        typer.testing._get_command = built


# --------------------------------------------------------------------------- content


def full_check(backend: str, i: int) -> bool:
    """Whether the check after kill ``i`` restores every snapshot again (else only the new ones; verify
    --read-data runs after every kill): after every second kill locally, every third on S3 (where a
    restore costs 4x), so each kill is followed by one before the repository is let go."""
    return i % (2 if backend == "local" else 3) == (1 if backend == "local" else 2)


def content_digest(path: str | os.PathLike[str], *, copy: bool = False) -> str:
    """sha256 of what a database holds as SQLite reads it (its -wal included): the schema, then every
    table's rows in rowid order. Two files with this digest equal hold the same content.

    ``copy``: read a copy of the file and its -wal (a file a kill left in WAL mode without its -shm
    cannot be opened read-only, and opening it read-write would change it)."""
    if copy:
        with tempfile.TemporaryDirectory() as scratch:
            dst = Path(scratch) / "copy.db"
            shutil.copyfile(path, dst)
            if Path(f"{path}-wal").exists():
                shutil.copyfile(f"{path}-wal", f"{dst}-wal")
            assert integrity(dst) == "ok", f"{path} is damaged"
            return content_digest(dst)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name").fetchall()
        h.update(repr(schema).encode())
        for _type, name, _tbl, sql in schema:
            if _type != "table" or name.startswith("sqlite_"):
                continue
            order = "" if "WITHOUT ROWID" in (sql or "").upper() else " ORDER BY rowid"
            # pickled (C speed) rather than repr'd per row: ~10x faster on rows of blobs
            h.update(pickle.dumps(conn.execute(f'SELECT * FROM "{name}"{order}').fetchall(), protocol=5))
        return h.hexdigest()
    finally:
        conn.close()


def restore_digest(repo: Repository, db: str, snap_id: str, target: Path, known: dict[str, str] | None = None) -> str:
    """Restore one snapshot to ``target`` (in this process, through the API the CLI calls, on an open
    repository: the config is not read and checked again for each) and return its content digest.

    ``known`` maps the sha256 of restored files to their content digest: a restore byte-equal to an
    earlier one (restores of one snapshot are) is not read through SQLite again.
    """
    remove_db(target)
    try:
        apply_restore(repo, plan_restore(repo, db, target, snapshot=snap_id))
    except DbreError as err:
        raise AssertionError(f"snapshot {snap_id} does not restore: {err}") from err
    try:
        raw = hashlib.sha256(target.read_bytes()).hexdigest()
        if known is not None and raw in known:
            return known[raw]
        assert integrity(target) == "ok", f"snapshot {snap_id} restores damaged"
        digest = content_digest(target)
        if known is not None:
            known[raw] = digest
        return digest
    finally:
        remove_db(target)


def remove_db(path: Path) -> None:
    """Remove a database file and whatever SQLite keeps beside it."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def list_snapshots(url: str, *, db: str | None = None) -> list[dict[str, Any]]:
    r = cli("snapshots", "--repo", url, "--json", *(["--db", db] if db else []))
    assert r.returncode == 0, r
    snaps: list[dict[str, Any]] = json.loads(r.stdout)["snapshots"]
    return snaps


def verify_clean(url: str) -> dict[str, Any]:
    """`dbre verify --read-data` passes on ``url``; its JSON report."""
    r = cli("verify", "--repo", url, "--read-data", "--json")
    report: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    assert r.returncode == 0 and report.get("ok"), f"verify --read-data of {url} is not clean: {r}"
    return report


class Oracle:
    """The content each snapshot of a repository must restore to, recorded when it was taken.

    ``expect(id, digest)`` records one; ``check()`` runs verify --read-data and restores every recorded
    snapshot still expected there (``gone`` ones were forgotten on purpose), comparing digests.
    """

    def __init__(self, url: str, workdir: Path, cell: Cell) -> None:
        self.url = url
        self.target = workdir / "oracle-restore.db"
        self.cell = cell
        self.digests: dict[str, str] = {}
        self.gone: set[str] = set()
        self.restored: set[str] = set()
        self.repo: Repository | None = None
        self.known: dict[str, str] = {}  # sha256 of a restored file -> its content digest

    def expect(self, snap_id: str, digest: str) -> None:
        assert self.digests.setdefault(snap_id, digest) == digest, f"snapshot {snap_id} recorded twice, unequal"

    def open(self) -> Repository | None:
        """The repository, once it has its config (a run killed before writing it leaves none)."""
        if self.repo is None:
            try:
                self.repo = Repository.open(self.url)
            except RepositoryError as err:
                if not str(err).startswith("no repository at"):
                    raise
        return self.repo

    def exists(self) -> bool:
        return self.open() is not None

    def listed(self) -> dict[str, str]:
        """Snapshot id -> database name, of every snapshot listed now (none before the config exists)."""
        repo = self.open()
        return {m.id: m.db for m in repo.snapshots()} if repo is not None else {}

    def ids(self) -> set[str]:
        return set(self.listed())

    def check(self, *, only_new: bool = False) -> set[str]:
        """Verify, then restore every expected snapshot (``only_new``: those not restored yet); the ids
        listed now."""
        verify_clean(self.url)
        listed = self.listed()
        missing = sorted(set(self.digests) - self.gone - set(listed))
        if missing:
            self.cell.data_lost += len(missing)
        assert not missing, f"snapshots lost: {missing}"
        for snap_id, digest in sorted(self.digests.items()):
            if snap_id in self.gone or (only_new and snap_id in self.restored):
                continue
            assert self.repo is not None
            got = restore_digest(self.repo, listed[snap_id], snap_id, self.target, self.known)
            if got != digest:
                self.cell.data_lost += 1
            assert got == digest, f"snapshot {snap_id} restores to other content than it was taken with"
            self.cell.snapshots_restored += 1
            self.restored.add(snap_id)
        return set(listed)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - t
