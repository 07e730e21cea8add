"""Test helpers that build SQLite databases, run the `dbre` CLI and compare databases.

Databases are built with Python's own sqlite3 module (a different SQLite build from the apsw
one dbre reads with), and compared with the independent `sqldiff` tool.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SQLDIFF = shutil.which("sqldiff")

# --------------------------------------------------------------------------- building databases


def make_db(
    path: str | os.PathLike[str],
    *,
    mb: float = 1.0,
    journal: str = "wal",
    page_size: int = 4096,
    auto_vacuum: str | None = None,
    encoding: str | None = None,
    row_bytes: int = 400,
    seed: int = 0,
) -> Path:
    """A database of about ``mb`` MiB: table ``items(id, name, n, payload)`` of random rows.

    ``journal`` is "wal" or "delete"; ``auto_vacuum`` "full", "incremental" or None;
    ``encoding`` e.g. "UTF-16le". The payload is random (incompressible) bytes, so a backup's
    size tracks the data. The file is left checkpointed and closed.
    """
    path = Path(path)
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={int(page_size)}")
        if auto_vacuum:
            conn.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
        if encoding:
            conn.execute(f"PRAGMA encoding='{encoding}'")
        conn.execute(f"PRAGMA journal_mode={journal}")
        conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER, payload BLOB)")
        conn.execute("CREATE INDEX items_name ON items(name)")
        rows = max(1, int(mb * 1024 * 1024) // (row_bytes + 40))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO items(name, n, payload) VALUES (?, ?, ?)",
            ((f"item-{i:08d}-{rng.random():.6f}", rng.randrange(1 << 40), rng.randbytes(row_bytes))
             for i in range(rows)),
        )
        conn.execute("COMMIT")
        if journal == "wal":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path


def change_rows(path: str | os.PathLike[str], count: int = 5, *, seed: int = 1) -> None:
    """Update ``count`` random rows of ``items`` (a small change: a few pages)."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (top,) = conn.execute("SELECT max(id) FROM items").fetchone()
        conn.execute("BEGIN")
        for _ in range(count):
            conn.execute("UPDATE items SET n = n + 1, name = name || 'x' WHERE id = ?", (rng.randrange(1, top + 1),))
        conn.execute("COMMIT")
    finally:
        conn.close()


def execute_script(path: str | os.PathLike[str], sql: str, *, setup: Sequence[str] = ()) -> Path:
    """Create (or extend) a database by running ``setup`` pragmas one by one, then a script."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for stmt in setup:
            conn.execute(stmt)
        conn.executescript(sql)
    finally:
        conn.close()
    return Path(path)


# --------------------------------------------------------------------------- reading databases


def pragma(path: str | os.PathLike[str], name: str) -> Any:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(f"PRAGMA {name}").fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def integrity(path: str | os.PathLike[str]) -> str:
    """``PRAGMA integrity_check`` joined into one string ("ok" when healthy)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def query(path: str | os.PathLike[str], sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def sqldiff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> str:
    """The output of ``sqldiff a b`` (empty when the two hold the same content).

    Without the sqldiff tool (Debian: sqlite3-tools), every table's rows are compared instead.
    """
    if SQLDIFF is None:
        return _row_diff(a, b)
    proc = subprocess.run([SQLDIFF, str(a), str(b)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"sqldiff failed: {proc.stderr}"
    return proc.stdout


def _row_diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> str:
    tables = "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name"
    names_a, names_b = query(a, tables), query(b, tables)
    if names_a != names_b:
        return f"tables differ: {names_a} != {names_b}\n"
    out = []
    for (name,) in names_a:
        sql = f'SELECT * FROM "{name}" ORDER BY 1'
        if query(a, sql) != query(b, sql):
            out.append(f"rows of {name} differ\n")
    return "".join(out)


_HEADER_PRAGMAS = ("page_size", "encoding", "auto_vacuum", "user_version", "application_id")


def assert_same_db(source: str | os.PathLike[str], restored: str | os.PathLike[str]) -> None:
    """The restored file is healthy and equals the source: content, schema and header fields."""
    assert Path(restored).exists(), f"{restored} was not written"
    assert integrity(restored) == "ok"
    diff = sqldiff(source, restored)
    assert diff == "", f"sqldiff reports differences:\n{diff[:2000]}"
    for name in _HEADER_PRAGMAS:
        assert pragma(restored, name) == pragma(source, name), f"PRAGMA {name} differs"
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name"
    assert query(restored, schema) == query(source, schema)


# --------------------------------------------------------------------------- running the CLI


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"CliResult(rc={self.returncode}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"


def dbre_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment for a `dbre` subprocess: ours, without any encryption key, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("DBRE_ENCRYPTION_KEY", "DBRE_KEY_FILE")}
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_dbre(
    *args: str | os.PathLike[str],
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike[str] | None = None,
) -> CliResult:
    """Run ``python -m dbre.cli ARGS`` in a subprocess: real exit codes and real stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "dbre.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=dbre_env(env), cwd=cwd,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def cli(*args: str | os.PathLike[str], env: Mapping[str, str | None] | None = None) -> CliResult:
    """Run the CLI in this process (fast; for tests of behaviour rather than of the process)."""
    from typer.testing import CliRunner

    from dbre.cli import app

    base: dict[str, str | None] = {"DBRE_ENCRYPTION_KEY": None, "DBRE_KEY_FILE": None}
    result = CliRunner().invoke(app, [str(a) for a in args], env={**base, **(env or {})}, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: CliResult, code: int, *needles: str) -> str:
    """The run failed with ``code`` and printed exactly one "dbre: ..." line, no traceback."""
    assert result.returncode == code, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result
    line = lines[0]
    assert line.startswith("dbre: "), result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------- files


def tree_hashes(*roots: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file under each root (or of the root itself if it is a file)."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            out[str(root)] = "(absent)"
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def pack_files(repo: str | os.PathLike[str]) -> list[Path]:
    return sorted(Path(repo, "packs").glob("*/*"))


def snapshot_files(repo: str | os.PathLike[str]) -> list[Path]:
    return sorted(Path(repo, "snapshots").glob("*/*"))


def copy_db(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """A consistent copy of ``src`` at ``dst`` through SQLite's backup API (a reference to compare with)."""
    a = sqlite3.connect(src)
    b = sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()
    return Path(dst)


def backed_up_db(tmp: Path, name: str = "app", mb: float = 0.3) -> tuple[Path, Path]:
    """A database ``tmp/NAME.db`` (``make_db``) backed up as NAME into ``tmp/repo``: (source, repository)."""
    src = make_db(tmp / f"{name}.db", mb=mb)
    repo = tmp / "repo"
    assert cli("backup", src, "--repo", repo, "--db", name).returncode == 0
    return src, repo


def two_databases_repo(tmp: Path) -> tuple[Path, Path, Path]:
    """A repository ``tmp/repo`` with database ``app`` (two snapshots) and ``b`` (one): (repo, app, b)."""
    repo, app, b = tmp / "repo", tmp / "app.db", tmp / "b.db"
    make_db(app, mb=0.2)
    make_db(b, mb=0.2, seed=1)
    for src in (app, b):
        assert cli("backup", src, "--repo", repo).returncode == 0
    change_rows(app)
    assert cli("backup", app, "--repo", repo).returncode == 0
    return repo, app, b


def sql_file(path: Path, *statements: str) -> Path:
    """Run ``statements`` on the SQLite file at ``path`` (created if missing) in one transaction, and close it."""
    conn = sqlite3.connect(path)
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()
    return path
