"""The `dbre` command line: parses options, reads env and key files, prints tables or JSON.

This is an edge of the program: only here (and in flows/deployments) are the environment and
files of secrets read. Errors print one line on stderr, "dbre: <what failed>: <cause> (<hint>)",
and exit 1 (a check failed or an operation failed) or 2 (bad input); --debug shows a traceback.

This module holds the app, its options, the helpers the commands share and `main()`; the commands
are in dbre/cli_<group>.py (backup, restore, repo, drill, status, report, replicate).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from dbre import __version__
from dbre.errors import DbreError, UsageError
from dbre.secrets import Secret

app = typer.Typer(
    name="dbre",
    help="Backup and disaster recovery for libSQL, Turso and SQLite databases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

RepoOpt = Annotated[str, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix.")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Database name in the repository.")]
DbNameOpt = Annotated[str, typer.Option("--db", help="Database name in the repository.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option("--key-file", help="File holding the encryption passphrase (or set DBRE_ENCRYPTION_KEY)."),
]

T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        print(f"dbre {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """Backup and disaster recovery for libSQL, Turso and SQLite databases."""
    _state["debug"] = debug


# -- edges: secrets, output, progress ------------------------------------------------------------


def _key(key_file: Path | None) -> Secret | None:
    if key_file is not None:
        try:
            raw = key_file.read_text().strip()
        except OSError as err:
            raise UsageError(f"key file {key_file}: {err.strerror}", "check the --key-file path") from None
        if not raw:
            raise UsageError(f"key file {key_file} is empty", "put the passphrase in it")
        return Secret(raw)
    env = os.environ.get("DBRE_ENCRYPTION_KEY")
    if env is None and os.environ.get("DBRE_KEY_FILE"):
        return _key(Path(os.environ["DBRE_KEY_FILE"]))
    return Secret(env) if env else None


def _token() -> Secret | None:
    raw = os.environ.get("LIBSQL_AUTH_TOKEN") or os.environ.get("TURSO_AUTH_TOKEN")
    return Secret(raw) if raw else None


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except typer.Exit:
        raise
    except DbreError as err:
        if _state["debug"]:
            raise
        msg = err.message + (f" ({err.hint})" if err.hint else "")
        print(f"dbre: {msg}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("dbre: interrupted; the repository is unchanged by the unfinished step", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the one-line promise covers the unexpected too
        if _state["debug"]:
            raise
        print(f"dbre: unexpected error: {err.__class__.__name__}: {err} (run with --debug for details)",
              file=sys.stderr)
        raise typer.Exit(1) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextmanager
def _progress(label: str, enabled: bool, unit_bytes: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing with --json or without a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    counter = DownloadColumn() if unit_bytes else MofNCompleteColumn()
    with Progress("[bold]" + label, BarColumn(), counter, TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in {"pages", "size", "added", "seconds", "rows"} else "left",
                     no_wrap=True)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)  # piped or logged: never cut ids and names down to 80 columns
    console.print(t)


# -- options and parsers shared by the command modules ----------------------------------------------

PolicyOpt = Annotated[
    Path | None, typer.Option("--policy", help="Policy file: RPO/RTO targets, drills, alerts (or set DBRE_POLICY).")
]


def _policy(path: Path | None) -> Any:
    from dbre.policy import load_policy

    env = os.environ.get("DBRE_POLICY")
    chosen = path or (Path(env) if env else None)
    return load_policy(chosen) if chosen else None


_DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def _duration(text: str, option: str) -> float:
    """Seconds in "90s", "30min", "2h", "1d" or "0"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d)?\s*", text)
    if not match or (match.group(2) is None and float(match.group(1)) != 0):
        raise UsageError(f"{option} {text!r} is not a duration", "use e.g. 2h, 90min, 1d or 0")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def main() -> None:
    """Entry point of the `dbre` script: click's standalone mode gives usage errors exit 2."""
    app()


# -- commands: each module registers its own on `app` when imported, in the order `dbre --help` lists them --

if __name__ == "__main__":
    # `python -m dbre.cli` runs this file as a second module, __main__; the commands register on dbre.cli's app
    from dbre.cli import main as cli_main

    cli_main()
else:
    import dbre.cli_backup  # noqa: F401, I001 - backup, snapshots
    import dbre.cli_restore  # noqa: F401 - restore, restore-table, repair-rows
    import dbre.cli_repo  # noqa: F401 - verify, forget, copy, migrate, unlock
    import dbre.cli_drill  # noqa: F401 - drill, validate; the `expectations` group
    import dbre.cli_status  # noqa: F401 - status
    import dbre.cli_report  # noqa: F401 - the `report` group
    import dbre.cli_replicate  # noqa: F401 - replicate
    import dbre.cli_audit  # noqa: F401 - the `audit` group
