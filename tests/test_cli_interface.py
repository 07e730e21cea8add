"""The `dbre` interface as a new user meets it: git-style help, one-line usage errors, one exit-code table.

Every exit-code row of README's table is run here through the real CLI (`python -m dbre.cli` in a
subprocess) against real repositories; the help of every command is read as printed.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from dbre.cli import app
from dbre.repository.repo import Repository
from tests.dbfactory import CliResult, assert_one_line_error, cli, dbre_env, make_db, pack_files, run_dbre
from tests.test_cli import command_paths

WIDE = {"COLUMNS": "200"}  # rich wraps help at 80 columns off a terminal; 200 keeps each option on one line


@dataclass
class World:
    tmp: Path
    src: Path
    repo: Path
    damaged: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("interface")
    src = make_db(tmp / "shop.db", mb=0.3)
    repo = tmp / "repo"
    assert run_dbre("backup", src, "--repo", repo).returncode == 0
    damaged = tmp / "damaged"
    shutil.copytree(repo, damaged)
    pack_files(damaged)[0].unlink()
    (tmp / "existing.db").write_bytes(b"do not touch")
    return World(tmp, src, repo, damaged)


# --------------------------------------------------------------------------- exit codes: README's table

# (code, arguments, words of the one stderr line); {tmp} {src} {repo} {damaged} filled from the world
EXIT_CASES: list[tuple[str, int, list[str], list[str]]] = [
    ("ok", 0, ["snapshots", "--repo", "{repo}"], []),
    ("damage found", 1, ["verify", "--repo", "{damaged}"], ["DAMAGED packs/", "missing"]),  # a report, not one line
    ("missing source", 1, ["backup", "{tmp}/nosuch.db", "--repo", "{repo}"], ["nosuch.db", "no such file"]),
    ("no repository", 1, ["snapshots", "--repo", "{tmp}/nowhere"], ["no repository at {tmp}/nowhere", "--repo"]),
    ("a file as repository", 1, ["verify", "--repo", "{src}"], ["repository {src}", "not a repository: a file"]),
    ("a file in the repository's path", 1, ["backup", "{src}", "--repo", "{src}/repo"],
     ["repository {src}/repo", "not a repository: {src} is a file"]),
    ("locked", 1, ["forget", "--repo", "{repo}", "--keep-last", "1", "--prune"], ["locked", "dbre unlock"]),
    ("unknown option", 2, ["backup", "{src}", "--repo", "{repo}", "--bogus"],
     ["no such option: --bogus", "(see 'dbre backup --help')"]),
    ("missing option", 2, ["restore", "--repo", "{repo}", "--to", "{tmp}/out.db"],
     ["missing option '--db'", "dbre restore --help"]),
    ("option without its value", 2, ["--debug", "backup", "{src}", "--repo"],
     ["option '--repo' requires an argument", "(see 'dbre backup --help')"]),
    ("missing argument", 2, ["backup", "--repo", "{repo}"], ["missing argument 'SOURCE'"]),
    ("value given to a flag", 2, ["snapshots", "--repo", "{repo}", "--json", "true"],
     ["unexpected extra argument", "true"]),
    ("unknown command", 2, ["bakup"], ["no such command 'bakup'", "(see 'dbre --help')"]),
    ("unknown database", 2, ["restore", "--repo", "{repo}", "--db", "nosuch", "--to", "{tmp}/out.db"],
     ["nosuch", "known databases: shop"]),
    ("unparseable time", 2,
     ["restore", "--repo", "{repo}", "--db", "shop", "--to", "{tmp}/out.db", "--at", "yesterday"],
     ["cannot parse time"]),
    ("existing target", 2, ["restore", "--repo", "{repo}", "--db", "shop", "--to", "{tmp}/existing.db"],
     ["already exists", "--force"]),
    # an unset shell variable (`--at "$BEFORE"`) must not mean "the newest": found by a cold tester
    ("empty --at", 2, ["restore", "--repo", "{repo}", "--db", "shop", "--to", "{tmp}/out.db", "--at", ""],
     ["--at is empty", "unset shell variable"]),
    ("empty --snapshot=", 2, ["restore", "--repo", "{repo}", "--db", "shop", "--to", "{tmp}/out.db", "--snapshot="],
     ["--snapshot is empty"]),
    ("mistyped s3 URL", 2, ["backup", "{src}", "--repo", "s3:/bucket/prefix"],
     ["looks like a mistyped URL", "s3://bucket/prefix"]),
    ("blank --snapshot of sql", 2, ["sql", "--repo", "{repo}", "--db", "shop", "--snapshot", " ", "SELECT 1"],
     ["--snapshot is empty"]),
]


@pytest.mark.parametrize(("code", "args", "needles"), [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES])
def test_exit_code_table(world: World, code: int, args: list[str], needles: list[str]) -> None:
    fill = {"tmp": str(world.tmp), "src": str(world.src), "repo": str(world.repo), "damaged": str(world.damaged)}
    argv = [a.format(**fill) for a in args]
    if argv[0] == "forget":  # a live exclusive lock held by this test process, as a running prune holds it
        with Repository.open(str(world.repo)).lock("prune", exclusive=True):
            r = run_dbre(*argv)
    else:
        r = run_dbre(*argv)
    if code == 0:
        assert r.returncode == 0 and r.stderr == "", r
        return
    if argv[0] == "verify" and "DAMAGED packs/" in needles:  # one line per damaged object, each naming it
        assert r.returncode == 1 and r.stderr and "Traceback" not in r.stderr, r
        assert all(line.startswith("DAMAGED ") for line in r.stderr.splitlines()), r
        assert all(n in r.stderr for n in needles), r
        return
    line = assert_one_line_error(r, code, *(n.format(**fill) for n in needles))
    assert r.stdout == "", r  # an error prints nothing else: no usage block, no box
    assert not re.search(r"[╭│╰]", line), line


def test_exit_code_table_interrupted(world: World) -> None:
    """Row 130: Ctrl-C during a run (here a backup waiting on a server that never answers)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(60)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbre.cli", "backup", url, "--repo", str(world.tmp / "r130"), "--db", "remote"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dbre_env({"DBRE_CACHE_DIR": str(world.tmp / "cache")}),
        )
        try:
            conn, _ = server.accept()  # the backup is running: it has asked the server
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    r = CliResult(proc.returncode, out, err)
    assert_one_line_error(r, 130, "interrupted")


def test_usage_errors_are_one_line_in_process_too() -> None:
    # typer's CliRunner (tests.dbfactory.cli) calls the same command object: the same line, the same code
    r = cli("backup", "--bogus")
    assert_one_line_error(r, 2, "no such option: --bogus", "dbre backup --help")


def test_debug_keeps_the_traceback(world: World) -> None:
    r = run_dbre("--debug", "snapshots", "--repo", world.tmp / "nowhere")
    assert r.returncode == 1, r
    assert "Traceback" in r.stderr and "RepositoryError: no repository at" in r.stderr, r


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_s3_repository_names_its_url(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_ACCESS_KEY_ID": "AKIAINTERFACETEST0001", "AWS_SECRET_ACCESS_KEY": "interface-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    src = make_db(tmp_path / "a.db", mb=0.1)
    for args in (["snapshots", "--repo", "s3://dbre-bucket/team/prod"],
                 ["backup", str(src), "--repo", "s3://dbre-bucket/team/prod"]):
        started = time.monotonic()
        r = run_dbre(*args, env=env, timeout=60)
        elapsed = time.monotonic() - started
        line = assert_one_line_error(r, 1, "repository s3://dbre-bucket/team/prod", "cannot reach", "AWS_ENDPOINT_URL")
        assert env["AWS_SECRET_ACCESS_KEY"] not in line and env["AWS_ACCESS_KEY_ID"] not in line, line
        assert elapsed < 30, elapsed  # bounded retries: a few seconds, not minutes


# --------------------------------------------------------------------------- help


TYPE_PLACEHOLDER = re.compile(r"<(str|bool|int|float|path|text|list\[[^\]]*\]|datetime)[^>]*>")


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "dbre")
def test_help_has_no_type_placeholders(path: list[str]) -> None:
    r = cli(*path, "--help", env=WIDE)
    assert r.returncode == 0, r
    assert not TYPE_PLACEHOLDER.search(r.stdout), r.stdout
    usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
    assert usage.split("Usage:")[1].split()[0] == "dbre", usage
    arguments = usage.split("[OPTIONS]")[-1]  # SOURCE, [SOURCE]..., COMMAND [ARGS]...: named, uppercase
    assert "{" not in usage and arguments == arguments.upper(), usage


def parameters() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    def walk(cmd: Any, name: str) -> None:
        out.extend((name, p) for p in cmd.params)
        for sub, c in getattr(cmd, "commands", {}).items():
            walk(c, f"{name} {sub}")

    walk(typer.main.get_command(app), "dbre")
    return out


def test_every_parameter_has_a_git_style_metavar() -> None:
    seen = 0
    for where, p in parameters():
        if getattr(p, "is_flag", False):
            assert p.metavar == "", (where, p.opts)  # a flag takes no value
        else:
            assert re.fullmatch(r"[A-Z][A-Z_/]*", p.metavar or ""), (where, p.opts, p.metavar)
            seen += 1
    assert seen > 50


def test_a_help_paragraph_wraps_at_the_console_not_at_the_docstring() -> None:
    """A docstring's line breaks are not the console's: `dbre --help` at 80 columns shows restore's summary
    as one wrapped paragraph ("... (else its newest snapshot), a snapshot (--snapshot), ..."), not a line
    cut after "a"."""
    commands: list[Any] = []

    def walk(cmd: Any) -> None:
        commands.append(cmd)
        for c in getattr(cmd, "commands", {}).values():
            walk(c)

    walk(typer.main.get_command(app))
    broken = [c.name for c in commands for para in (c.help or "").split("\n\n") if "\n" in para.strip()]
    assert not broken, broken
    r = cli("--help", env={"COLUMNS": "80"})
    text = " ".join(line.strip("│ ") for line in r.stdout.splitlines())
    assert "(else its newest snapshot), a snapshot (--snapshot)" in " ".join(text.split()), r.stdout


def option_line(help_text: str, option: str) -> str:
    named = re.compile(rf"(?<![\w-]){re.escape(option)}(?![\w-])")
    lines = [line for line in help_text.splitlines() if line.startswith("│") and named.search(line)]  # panel rows
    assert lines, (option, help_text)
    return lines[0]


def test_help_reads_like_git(world: World) -> None:
    backup = run_dbre("backup", "--help", env=WIDE)
    assert backup.returncode == 0, backup
    assert "Usage: dbre backup [OPTIONS] SOURCE" in backup.stdout, backup.stdout
    assert re.search(r"--repo\s+-r\s+REPO\s", option_line(backup.stdout, "--repo")), backup.stdout
    assert re.search(r"--db\s+DB\s", option_line(backup.stdout, "--db"))
    assert re.search(r"--key-file\s+PATH\s", option_line(backup.stdout, "--key-file"))
    assert re.search(r"--json\s+Print JSON", option_line(backup.stdout, "--json")), backup.stdout
    assert re.search(r"--checksums\s+--no-checksums\s+Record", option_line(backup.stdout, "--checksums"))

    table = run_dbre("restore-table", "--help", env=WIDE)
    assert re.search(r"--table\s+TABLE\s", option_line(table.stdout, "--table")), table.stdout
    assert re.search(r"--at\s+TIME\s", option_line(table.stdout, "--at"))
    assert re.search(r"--replace\s+Drop", option_line(table.stdout, "--replace"))
    rows = run_dbre("repair-rows", "--help", env=WIDE)
    assert re.search(r"--where\s+SQL\s", option_line(rows.stdout, "--where")), rows.stdout
    forget = run_dbre("forget", "--help", env=WIDE)
    assert re.search(r"--keep-last\s+N\s", option_line(forget.stdout, "--keep-last")), forget.stdout
    top = run_dbre("--help", env=WIDE)
    assert "Usage: dbre [OPTIONS] COMMAND [ARGS]..." in top.stdout, top.stdout
    assert re.search(r"--debug\s+Show tracebacks", option_line(top.stdout, "--debug")), top.stdout


def test_result_of_the_flag_json_is_json(world: World) -> None:
    # the flag as the help shows it, without a value, does what it says
    r = run_dbre("snapshots", "--repo", world.repo, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["snapshots"], r



# -- one command built per run ------------------------------------------------------------------------


def test_a_run_builds_only_the_command_it_names() -> None:
    """`main` builds typer's parameters for the named command (or group) alone: every top-level name
    narrows to exactly itself, past the group's own options; no name, or an unknown one, keeps all."""
    from dbre.cli import _first_word, _narrowed

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"backup", "restore", "key", "report"} <= set(names)
    for name in names:
        built = typer.main.get_command(_narrowed(name))
        assert sorted(built.commands) == [name], name  # type: ignore[attr-defined]
    assert _first_word(["--retry-lock", "5m", "--debug", "key", "passwd"]) == "key"
    assert _first_word(["--retry-lock=5m", "snapshots"]) == "snapshots"
    assert _first_word(["--version"]) is None
    assert _narrowed(None) is app and _narrowed("bakup") is app


def test_help_and_suggestions_are_those_of_the_whole_cli(tmp_path: Path) -> None:
    """Narrowing changes nothing a user sees: a misspelt command is still suggested, a group's help and a
    command's help behind the group's options print as before."""
    r = run_dbre("bakup", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean 'backup'?" in r.stderr
    r = run_dbre("--retry-lock", "5m", "snapshots", "--help", cwd=tmp_path, env=WIDE)
    assert r.returncode == 0 and "Usage: dbre snapshots" in r.stdout
    r = run_dbre("key", "--help", cwd=tmp_path, env=WIDE)
    assert r.returncode == 0 and "passwd" in r.stdout
    r = run_dbre("--help", cwd=tmp_path, env=WIDE)
    assert r.returncode == 0 and all(f" {n} " in r.stdout for n in ("backup", "restore", "drill", "status"))


def test_debug_keeps_the_exit_code_and_the_json_document(world: World) -> None:
    """--debug adds the traceback; the exit code, the one line and the --json error document stay (before, a
    usage refusal exited 1 under --debug, and --json printed nothing)."""
    r = run_dbre("--debug", "restore", "--repo", world.repo, "--db", "no-such-db", "--to", world.tmp / "x.db",
                 "--json")
    assert r.returncode == 2, r
    assert "Traceback" in r.stderr and "dbre: no snapshots of database 'no-such-db'" in r.stderr, r
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["error"]["exit_code"] == 2, doc
