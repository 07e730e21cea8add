"""Every command's --json against a real local repository: one schema key, one vocabulary, ISO times, absolute paths,
and failures as a JSON error document (docs/JSON.md)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from dbre.cli import SCHEMA, app
from tests.dbfactory import CliResult, cli

# Commands without --json, and why (docs/JSON.md says the same)
NO_JSON = {
    "replicate": "runs until stopped; its output is a log",
    "shell": "interactive",
    "sql": "--format json prints the query's rows (the user's columns), not a dbre document",
}
FORBIDDEN = {"snapshot_taken_at", "size_bytes", "passed", "last_drill_passed", "verify_passed"}
PATH_KEYS = {"path", "out", "files", "report", "report_markdown", "repository", "data_docs", "written"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def leaf_commands() -> list[tuple[str, Any]]:
    """Every command a user runs: the leaves, and a group that does something itself (`dbre audit` lists)."""
    out: list[tuple[str, Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        subs = getattr(command, "commands", None)
        if path and (not subs or any("--json" in getattr(p, "opts", []) for p in command.params)):
            out.append((" ".join(path), command))
        for name, sub in (subs or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A database with two snapshots, its starter suites and a live copy, under one folder (the cwd of each test)."""
    root = tmp_path_factory.mktemp("json")
    conn = sqlite3.connect(root / "app.db")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER)")
    conn.executemany("INSERT INTO items (name, qty) VALUES (?, ?)", [(f"n{i}", i) for i in range(200)])
    conn.commit()
    old = Path.cwd()
    os.chdir(root)
    try:
        assert cli("backup", "app.db", "--repo", "repo").returncode == 0
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id < 10")
        conn.commit()
        assert cli("backup", "app.db", "--repo", "repo").returncode == 0
        assert cli("expectations", "profile", "app.db", "--out", "exp/app").returncode == 0
    finally:
        os.chdir(old)
        conn.close()
    (root / "live.db").write_bytes((root / "app.db").read_bytes())
    (root / "out").mkdir()
    yield root


def run_json(world: Path, *args: str) -> tuple[CliResult, dict[str, Any]]:
    old = Path.cwd()
    os.chdir(world)  # relative paths on the command line: the JSON says them absolute
    try:
        result = cli(*args, "--json")
    finally:
        os.chdir(old)
    doc = json.loads(result.stdout)  # the whole of stdout is one document
    assert isinstance(doc, dict) and next(iter(doc)) == "schema" and doc["schema"] == SCHEMA, result
    return result, doc


def check_vocabulary(value: Any, where: str = "") -> None:
    """Walk a document: no key of the old vocabulary, times ISO-8601 UTC with Z, local paths absolute."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_vocabulary(v, f"{where}[{i}]")
        return
    if not isinstance(value, dict):
        return
    for key, v in value.items():
        at = f"{where}.{key}"
        if key in ("columns", "fallbacks", "targets", "parameters", "kwargs", "rows", "counts"):
            continue  # keyed by the user's names
        assert key not in FORBIDDEN and not key.startswith("bytes_"), at
        if key == "ok" or key.endswith("_ok"):
            assert v is None or isinstance(v, bool), at
        if (key.endswith("_at") or key in ("taken_at", "time")) and isinstance(v, str):
            assert ISO_Z.match(v), (at, v)
        if key in PATH_KEYS:
            for p in v if isinstance(v, list) else [v]:
                if isinstance(p, str) and "://" not in p:
                    assert os.path.isabs(p) and os.path.normpath(p) == p, (at, p)
        check_vocabulary(v, at)


def snapshot_ids(world: Path) -> list[str]:
    _, doc = run_json(world, "snapshots", "--repo", "repo")
    return [s["id"] for s in doc["snapshots"]]


COMMANDS: list[tuple[str, list[str]]] = [
    ("snapshots", ["snapshots", "--repo", "repo"]),
    ("restore --dry-run", ["restore", "--repo", "repo", "--db", "app", "--to", "out/r0.db", "--dry-run"]),
    ("restore", ["restore", "--repo", "repo", "--db", "app", "--to", "out/./r1.db"]),
    ("last-good", ["last-good", "--repo", "repo", "--db", "app"]),
    ("restore-table", ["restore-table", "--repo", "repo", "--db", "app", "--live", "live.db", "--table", "items"]),
    ("repair-rows", ["repair-rows", "--repo", "repo", "--db", "app", "--live", "live.db", "--table", "items",
                     "--where", "id < 5"]),
    ("init", ["init", "--repo", "other"]),
    ("verify", ["verify", "--repo", "repo"]),
    ("forget", ["forget", "--repo", "repo", "--keep-last", "5", "--dry-run"]),
    ("copy", ["copy", "--repo", "repo", "--to", "offsite"]),
    ("unlock", ["unlock", "--repo", "repo"]),
    ("drill", ["drill", "--repo", "repo", "--db", "app", "--report-dir", "reports"]),
    ("validate", ["validate", "--repo", "repo"]),
    ("status", ["status", "--repo", "repo"]),
    ("diff", ["diff", "{first}", "{last}", "--repo", "repo", "--db", "app"]),
    ("stats", ["stats", "--repo", "repo"]),
    ("export", ["export", "--repo", "repo", "--db", "app", "--table", "items", "--format", "csv", "--out",
                "out/items.csv", "--force"]),
    ("expectations profile", ["expectations", "profile", "app.db", "--out", "exp2/app"]),
    ("audit", ["audit", "--repo", "repo"]),
    ("backup", ["backup", "app.db", "--repo", "repo"]),
]


@pytest.mark.parametrize(("name", "args"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_prints_one_document_in_one_vocabulary(world: Path, name: str, args: list[str]) -> None:
    ids = snapshot_ids(world)
    args = [a.format(first=ids[0], last=ids[-1]) for a in args]
    result, doc = run_json(world, *args)
    assert result.returncode == 0, result
    check_vocabulary(doc)
    if name == "snapshots":
        snap = doc["snapshots"][0]
        assert {"id", "db", "taken_at", "size", "added_bytes"} <= set(snap), snap
    if name.startswith("restore") and name != "restore-table":
        assert doc["snapshot"] == ids[-1] and ISO_Z.match(doc["taken_at"]), doc
        assert doc["target"] == str(world / "out" / ("r0.db" if "dry" in name else "r1.db")), doc
    if name in ("drill", "validate"):
        rec = doc if name == "drill" else doc["databases"][0]
        assert rec["ok"] is True and rec["snapshot"] == ids[-1] and rec["taken_at"], rec
    if name == "status":
        assert doc["databases"][0]["size"] > 0 and "last_drill_ok" in doc["databases"][0], doc
    if name == "verify":
        assert doc["ok"] is True and doc["repository"] == str(world / "repo"), doc


def test_every_command_has_json_or_a_reason(world: Path) -> None:
    """A new command decides: --json, or a line in NO_JSON (and docs/JSON.md)."""
    names = {name for name, _ in leaf_commands()}
    for name, command in leaf_commands():
        has = any("--json" in getattr(p, "opts", []) for p in command.params)
        assert has != (name in NO_JSON), name
    assert set(NO_JSON) <= names
    # run with --json by their own tests: migrate (a format-1 repository), report requirements (slow), audit show,
    # key passwd (an encrypted repository): docs/JSON.md shows each
    documented = {c[0].split(" --")[0] for c in COMMANDS} | {"migrate", "report requirements", "audit show",
                                                               "key passwd"}
    assert {n for n in names if n not in NO_JSON} <= documented, names - documented
    doc = (Path(__file__).parent.parent / "docs" / "JSON.md").read_text()
    for name in names:
        assert f"dbre {name}" in doc, name


ERRORS = [
    (["restore", "--repo", "repo", "--db", "app", "--to", "app.db"], 2, "already exists"),
    (["snapshots", "--repo", "no-such-repo"], 1, "no-such-repo"),
    (["diff", "0123456789abcdef", "latest", "--repo", "repo", "--db", "app"], 2, "0123456789abcdef"),
]


@pytest.mark.parametrize(("args", "code", "needle"), ERRORS, ids=["exists", "no repository", "no snapshot"])
def test_a_failure_under_json_is_a_json_error_document(world: Path, args: list[str], code: int, needle: str) -> None:
    before = sorted(p.name for p in world.iterdir())
    result, doc = run_json(world, *args)
    assert result.returncode == code, result
    assert doc["ok"] is False and set(doc["error"]) == {"message", "hint", "exit_code"}, doc
    assert doc["error"]["exit_code"] == code and needle in doc["error"]["message"], doc
    line = result.stderr.strip()  # and the one line on stderr, as without --json
    assert line.startswith("dbre: ") and "\n" not in line and doc["error"]["message"] in line, result
    assert sorted(p.name for p in world.iterdir()) == before  # nothing changed


def test_a_usage_error_stays_one_plain_line(world: Path) -> None:
    """click's usage errors happen before a command runs: one line on stderr, exit 2, nothing on stdout."""
    result = cli("snapshots", "--repo", str(world / "repo"), "--json", "--no-such-option")
    assert result.returncode == 2 and result.stdout == "" and "no such option" in result.stderr, result


def test_sql_rows_stay_a_list_and_its_failure_is_the_error_document(world: Path) -> None:
    """`sql --format json` prints the query's rows (no schema key: the keys are the user's columns); a failure
    under it is the same error document as under --json."""
    rows = cli("sql", "--repo", str(world / "repo"), "--db", "app", "--format", "json",
               "SELECT id FROM items WHERE id < 3 ORDER BY id")
    assert rows.returncode == 0 and json.loads(rows.stdout) == [{"id": 1}, {"id": 2}], rows
    bad = cli("sql", "--repo", str(world / "nowhere"), "--db", "app", "--format", "json", "SELECT 1")
    doc = json.loads(bad.stdout)
    assert bad.returncode == 1 and doc["schema"] == SCHEMA and doc["ok"] is False, bad
    assert doc["error"]["exit_code"] == 1 and "no repository" in doc["error"]["message"], doc
