"""The `dbre` command line as a user meets it: help for every command, a fast start, JSON output
shapes, default names, and no heavy imports (Prefect, GX, pandas, boto3) for a local backup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from dbre.cli import app
from tests.dbfactory import cli, dbre_env, make_db, run_dbre


def command_paths() -> list[list[str]]:
    """Every command of the CLI, as the words that invoke it (sub-commands of groups included)."""
    out: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            if path:
                out.append(path)
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append(path)

    walk(typer.main.get_command(app), [])
    return out


CORE_COMMANDS = {"backup", "snapshots", "restore", "verify", "forget", "copy", "unlock"}


def test_core_commands_exist() -> None:
    names = {p[0] for p in command_paths()}
    assert CORE_COMMANDS <= names, CORE_COMMANDS - names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path: list[str]) -> None:
    result = cli(*path, "--help")
    assert result.returncode == 0, result
    assert "Usage:" in result.stdout and "--help" in result.stdout
    # a one-line description of what the command does
    assert len(result.stdout.strip().splitlines()) > 3


def test_top_level_help_is_fast() -> None:
    """`dbre --help` costs under 1.5 s of CPU: nothing heavy is imported on the way (Prefect alone
    takes seconds). CPU time of the child, not wall time: on a busy machine (make test runs the
    suite on several workers) a start waits for a core, which is noise, not start-up cost."""
    cpu = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "dbre.cli", "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dbre_env())
        assert proc.stdout is not None
        with proc.stdout:
            out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, for its resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu.append(usage.ru_utime + usage.ru_stime)
        assert proc.returncode == 0, out
        for name in CORE_COMMANDS:
            assert name in out
    assert min(cpu) < 1.5, cpu


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("dbre ")


def test_usage_errors_exit_2() -> None:
    assert run_dbre("no-such-command").returncode == 2
    assert cli("restore", "--repo", "x").returncode == 2  # --db and --to are required
    assert cli("backup").returncode == 2


def test_backup_json(tmp_path: Path) -> None:
    src = make_db(tmp_path / "orders.sqlite3", mb=0.3)
    r = run_dbre("backup", src, "--repo", tmp_path / "repo", "--json")
    assert r.returncode == 0, r
    out = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert isinstance(out, dict)
    for key, kind in [("id", str), ("db", str), ("taken_at", str), ("pages", int), ("pages_added", int),
                      ("added_bytes", int), ("seconds", float)]:
        assert isinstance(out[key], kind), (key, out)
    assert out["db"] == "orders"  # the file's stem
    assert out["pages"] == out["pages_added"] > 0 and out["added_bytes"] > 0
    assert out["taken_at"].endswith("Z")
    assert r.stderr == ""  # no progress bar without a terminal

    plain = cli("backup", src, "--repo", tmp_path / "repo")
    assert plain.returncode == 0 and "incremental" in plain.stdout and "added 0 pages" in plain.stdout


def test_snapshots_json(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    a = make_db(tmp_path / "sales.db", mb=0.2)
    b = make_db(tmp_path / "my.data.db", mb=0.2)
    ids = [json.loads(cli("backup", p, "--repo", repo, "--json").stdout)["id"] for p in (a, b, a)]
    assert cli("backup", b, "--repo", repo, "--db", "renamed").returncode == 0
    r = run_dbre("snapshots", "--repo", repo, "--json")
    assert r.returncode == 0, r
    doc = json.loads(r.stdout)
    assert doc["schema"] == "dbre/1", doc
    snaps = doc["snapshots"]
    assert isinstance(snaps, list) and len(snaps) == 4
    for s in snaps:
        for key in ("id", "db", "taken_at", "pages", "added_bytes"):
            assert key in s, (key, s)
    assert [s["id"] for s in snaps[:3]] == ids  # oldest first
    assert [s["db"] for s in snaps] == ["sales", "my.data", "sales", "renamed"]
    assert [s["taken_at"] for s in snaps] == sorted(s["taken_at"] for s in snaps)
    only = json.loads(cli("snapshots", "--repo", repo, "--db", "sales", "--json").stdout)["snapshots"]
    assert [s["id"] for s in only] == [ids[0], ids[2]]
    # off a terminal the table is not cut to 80 columns: ids and names are whole
    table = run_dbre("snapshots", "--repo", repo)
    assert table.returncode == 0 and all(i in table.stdout for i in ids) and "my.data " in table.stdout, table


HEAVY = ("prefect", "great_expectations", "pandas", "boto3", "botocore")

# Runs CLI commands in one fresh interpreter and reports which heavy packages got imported.
_IMPORT_PROBE = """
import json, sys
from dbre.cli import app
codes = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, standalone_mode=True)
    except SystemExit as exc:
        codes.append(exc.code or 0)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_local_backup_imports_nothing_heavy(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=0.3)
    repo = tmp_path / "repo"
    commands = [
        ["backup", str(src), "--repo", str(repo)],
        ["backup", str(src), "--repo", str(repo), "--json"],
        ["snapshots", "--repo", str(repo)],
        ["verify", "--repo", str(repo), "--read-data"],
        ["restore", "--repo", str(repo), "--db", "src", "--to", str(tmp_path / "out.db")],
        ["copy", "--repo", str(repo), "--to", str(tmp_path / "offsite")],
        ["forget", "--repo", str(repo), "--keep-last", "1", "--prune"],
        ["unlock", "--repo", str(repo)],
    ]
    r = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, json.dumps(commands), json.dumps(HEAVY)],
                       capture_output=True, text=True, env=dbre_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * len(commands), r.stdout
    assert result["heavy"] == [], f"a local backup imported {result['heavy']}"
