"""The `dbre` command line: parses options, reads env and key files, prints tables or JSON.

This is an edge of the program: only here (and in flows/deployments) are the environment and
files of secrets read. Errors print one line on stderr, "dbre: <what failed>: <cause> (<hint>)",
and exit 1 (a check failed or an operation failed) or 2 (bad input: README's exit-code table); usage
errors too; --debug shows a traceback.

This module holds the app, its options, the helpers the commands share and `main()`; the commands
are in dbre/cli_<group>.py (backup, restore, repo, drill, status, report, replicate, audit, inspect).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer._click.core import Context
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer._click.types import FloatParamType, IntParamType, StringParamType
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.models import TyperPath

from dbre import __version__
from dbre.errors import DbreError, UsageError
from dbre.secrets import Secret

# -- the interface: help as git and restic write it, usage errors in one line ------------------------


class _Argument(TyperArgument):
    """A positional argument in click's style: SOURCE (required) or [SOURCE] in the usage line, no type.

    typer writes `{SOURCE}` and `<str>`; every argument of every command gets this class (`_conventional`).
    """

    def make_metavar(self, ctx: Context, *, usage: bool = False) -> str:
        name = (self.metavar or (self.name or "").upper()) + ("..." if self.nargs != 1 else "")
        return name if self.required or not usage else f"[{name}]"


class _Untyped(StringParamType):
    """Text, as an argument's help shows its type: not at all (typer writes `<str>`)."""

    name = "text"

    def get_metavar(self, param: Any, ctx: Any = None) -> str:  # type: ignore[override]
        return ""


# What a value is, by the parameter's name, wherever it appears (restic: `--keep-last n`, git: `<path>`)
_METAVARS = {
    "at": "TIME", "snapshot": "ID", "where": "SQL", "to": "REPO", "live": "PATH", "sources": "SOURCE",
    "keep_last": "N", "keep_hourly": "N", "keep_daily": "N", "keep_weekly": "N", "keep_monthly": "N",
    "keep_yearly": "N", "keep_within": "DURATION", "keep_tz": "ZONE", "grace": "DURATION",
    "interval": "DURATION", "window": "DURATION", "quota": "SIZE", "read_data_subset": "N/M",
    "webhook": "URL", "namespace_admin": "URL", "namespace_url": "URL", "namespace": "NAME",
    "target": "TARGET",
}


def _metavar(param: TyperOption | TyperArgument) -> str:
    """The placeholder of a value whose definition names none: PATH, by name (--at TIME), N, or its name."""
    if isinstance(param.type, TyperPath):
        return "PATH"
    name = param.name or "value"
    if name in _METAVARS:
        return _METAVARS[name]
    if isinstance(param.type, (IntParamType, FloatParamType)):
        return "N"
    return name.upper()


def _conventional(command: Any) -> None:
    """Give every parameter below ``command`` a git-style placeholder, once, when the CLI is built.

    typer's help shows a type for every parameter, flags included (`--json <bool>`, `--table
    <list[str]>`), although a flag takes no value; here a flag shows none, an option an uppercase metavar
    (its own, else `_metavar`), an argument its name; a help paragraph is one line, wrapped by the console.
    """
    for param in command.params:
        if isinstance(param, TyperArgument):
            param.__class__ = _Argument
            if type(param.type) is StringParamType:  # (only text: an argument of another type keeps its conversion)
                param.type = _Untyped()
            name = param.name or "arg"
            param.metavar = param.metavar or _METAVARS.get(name, name.upper())
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""  # typer shows `metavar` instead of the type: nothing for a flag
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = _metavar(param)
    if command.help:  # rich keeps a docstring's line breaks: one paragraph reads as one line, wrapped at the console
        command.help = "\n\n".join(" ".join(p.split()) for p in command.help.split("\n\n"))
    help_option = command.get_help_option(Context(command))  # made once and cached by the command
    if help_option is not None:
        help_option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _conventional(sub)


_GROUP_VALUED = ("--retry-lock",)


def _usage_line(err: ClickUsageError, group: Any, args: Sequence[str]) -> str:
    """A click usage error as dbre's one line: "dbre: <what> (see 'dbre <command> --help')"."""
    what = err.format_message().strip().rstrip(".")
    what = what[:1].lower() + what[1:]
    path = err.ctx.command_path if err.ctx is not None else "dbre"
    # some errors (an option missing its value) carry the group's context: name the command the words reached
    words, command = ["dbre"], group
    skip = False
    for arg in args:
        if skip or (arg.startswith("-") and len(words) == 1):
            skip = arg in _GROUP_VALUED and not skip  # the value of --retry-lock is no command
            continue  # the group's own flags (--debug, --retry-lock D)
        command = getattr(command, "commands", {}).get(arg)
        if command is None:
            break
        words.append(arg)
    if len(words) > len(path.split()):
        path = " ".join(words)
    return f"dbre: {what} (see '{path} --help')"


# options whose empty value a shell gives for an unset variable (`--at "$BEFORE"`), and which would then mean
# their default ("the newest"): refused instead, before any command runs
_NOT_EMPTY = ("--snapshot", "--at", "--txid", "--since", "--target", "--repo", "-r", "--db", "--to", "--live",
              "--table", "--where", "--key-file", "--fallback", "--policy")


def _empty_option(args: list[str]) -> str | None:
    """The first of ``_NOT_EMPTY`` given an empty (or blank) value, as ``--at ''`` or ``--at=``."""
    for i, word in enumerate(args):
        if word == "--":
            return None
        name, eq, value = word.partition("=")
        if name not in _NOT_EMPTY:
            continue
        if eq and name.startswith("--") and not value.strip():
            return name
        if not eq and i + 1 < len(args) and not args[i + 1].strip():
            return name
    return None


# options naming a file to write, per command: a value ending in "/" that is no folder would otherwise become a
# file of the folder's name (a path type drops the slash)
_FILE_OPTIONS = {"restore": ("--to",), "export": ("--out",)}


def _folder_for_file(args: list[str]) -> tuple[str, str] | None:
    """(option, value) of the first ``_FILE_OPTIONS`` value that ends with "/" and is not a folder."""
    words = iter(args)
    command = None
    for word in words:
        if word == "--retry-lock":
            next(words, None)
        elif not word.startswith("-"):
            command = word
            break
    names = _FILE_OPTIONS.get(command or "", ())
    rest = list(words)
    for i, word in enumerate(rest):
        if word == "--":
            break
        name, eq, value = word.partition("=")
        if name in names:
            value = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            if value.endswith(("/", "/.", "/..")) and not os.path.isdir(value):
                return name, value
    return None


class _Group(TyperGroup):
    """The `dbre` command: builds the conventional help of every command and prints errors in one line."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _conventional(self)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        """Run a command. A usage error prints one line and exits 2 (click's code), not typer's rich box."""
        empty = _empty_option(list(sys.argv[1:] if args is None else args))
        if empty is not None:
            if not standalone_mode:
                raise ClickUsageError(f"{empty} is empty")
            print(f"dbre: {empty} is empty (an unset shell variable?): give it a value (an empty one is refused, "
                  "never read as the default)", file=sys.stderr)
            sys.exit(2)
        folder = _folder_for_file(list(sys.argv[1:] if args is None else args))
        if folder is not None:
            name, value = folder
            if not standalone_mode:
                raise ClickUsageError(f"{name} {value} names a folder")
            bare = value.rstrip("/.") or value
            if os.path.exists(bare) and not os.path.isdir(bare):
                print(f"dbre: {name} {value} names a folder, but {bare} is a file: give {name} {bare} to name "
                      "that file", file=sys.stderr)
            else:
                print(f"dbre: {name} {value} names a folder, which does not exist: give a file path, e.g. "
                      f"{name} {value.rstrip('.').rstrip('/')}/restored.db (create the folder first)", file=sys.stderr)
            sys.exit(2)
        try:
            result = super().main(args, prog_name or "dbre", complete_var, standalone_mode=False,
                                  windows_expand_args=windows_expand_args, **extra)
        except NoArgsIsHelpError as err:  # plain `dbre`: the help (rich has printed it already), exit 2 as click
            if not standalone_mode:
                raise
            if err.format_message().strip():
                err.show()
            sys.exit(err.exit_code)
        except ClickUsageError as err:
            if not standalone_mode:
                raise
            print(_one_line(_usage_line(err, self, sys.argv[1:] if args is None else args)), file=sys.stderr)
            sys.exit(2)
        except ClickException as err:
            if not standalone_mode:
                raise
            print(_one_line(f"dbre: {err.format_message()}"), file=sys.stderr)
            sys.exit(err.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            print("dbre: aborted", file=sys.stderr)
            sys.exit(1)
        if not standalone_mode:
            return result
        # standalone_mode=False returns the code of a typer.Exit; a command's own return value means success
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="dbre",
    cls=_Group,
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    retry_lock: Annotated[str | None, typer.Option(
        "--retry-lock", envvar="DBRE_RETRY_LOCK", metavar="DURATION",
        help="While another run holds a conflicting repository lock (prune, forget), try again for this "
             "long (e.g. 5m) instead of failing at once.")] = None,
) -> None:
    """Backup and disaster recovery for libSQL, Turso and SQLite databases."""
    _state["debug"] = debug
    from dbre.repository.lock import set_retry

    set_retry(0)  # every invocation sets it (an in-process caller runs several)
    if retry_lock is not None and retry_lock.strip() not in ("0", "0s"):
        from dbre.policy import parse_duration  # here: pydantic is slow to import

        try:
            set_retry(parse_duration(retry_lock))
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="'--retry-lock'") from None


# -- edges: secrets, output, progress ------------------------------------------------------------


def _key(key_file: Path | None) -> Secret | None:
    if key_file is not None:
        try:
            raw = key_file.read_text().strip()
        except OSError as err:
            raise UsageError(f"key file {key_file}: {err.strerror}", "check the --key-file path") from None
        except UnicodeDecodeError:  # (its message would quote a byte of the passphrase)
            raise UsageError(f"key file {key_file} is not UTF-8 text",
                             "write the passphrase as text in it") from None
        if not raw:
            raise UsageError(f"key file {key_file} is empty", "put the passphrase in it")
        return Secret(raw)
    env = os.environ.get("DBRE_ENCRYPTION_KEY")
    if env is None and os.environ.get("DBRE_KEY_FILE"):
        return _key(Path(os.environ["DBRE_KEY_FILE"]))
    if env is not None and not env.strip():
        # (a secret that failed to load: an empty key must not create or open a plain repository)
        raise UsageError("DBRE_ENCRYPTION_KEY is set but empty",
                         "set it to the passphrase, or unset it for a repository without encryption")
    return Secret(env) if env else None


def _token() -> Secret | None:
    raw = os.environ.get("LIBSQL_AUTH_TOKEN") or os.environ.get("TURSO_AUTH_TOKEN")
    return Secret(raw) if raw else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def _one_line(text: str) -> str:
    """An error line as one line: a control character a name or value brought in (a newline, a CR, a NUL) is
    shown escaped, as Python writes it (`\\n`), so the message stays one line and says what was given."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _run(fn: Callable[[], T]) -> T:
    """Run a command's body: a DbreError (or the unexpected) prints one line on stderr and exits with its code;
    under --json the same error is also printed on stdout as a JSON error document (docs/JSON.md)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except DbreError as err:
        if _state["debug"]:  # the traceback too, then the same line, JSON document and exit code as without
            traceback.print_exc(file=sys.stderr)
        from dbre.storage.base import NotFound  # (loaded already whenever one was raised)

        if not err.hint and isinstance(err, NotFound):
            err.hint = ("the repository lacks an object this needs: `dbre verify` names every missing one; use "
                        "another snapshot (`dbre snapshots`) or the offsite copy (`--fallback URL`)")
        msg = err.message + (f" ({err.hint})" if err.hint else "")
        print(_one_line(f"dbre: {msg}"), file=sys.stderr)
        _json_error(err.message, err.hint, err.exit_code)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("dbre: interrupted; the repository is unchanged by the unfinished step", file=sys.stderr)
        _json_error("interrupted; the repository is unchanged by the unfinished step", None, 130)
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the one-line promise covers the unexpected too
        if _state["debug"]:
            traceback.print_exc(file=sys.stderr)
        print(_one_line(f"dbre: unexpected error: {err.__class__.__name__}: {err} (run with --debug for details)"),
              file=sys.stderr)
        _json_error(f"unexpected error: {err.__class__.__name__}: {err}", "run with --debug for details", 1)
        raise typer.Exit(1) from None


# -- JSON output: one schema version, one vocabulary (docs/JSON.md) ------------------------------------

SCHEMA = "dbre/1"

# The core's dicts keep their own keys (drill records are stored as they are; flows and tasks read them); the
# CLI's JSON says one thing one way, so the few keys that differ are renamed here, at the one exit.
_VOCABULARY = {
    "passed": "ok", "last_drill_passed": "last_drill_ok", "verify_passed": "verify_ok",
    "snapshot_taken_at": "taken_at", "size_bytes": "size",
    "bytes_added": "added_bytes", "bytes_read": "read_bytes", "bytes_to_read": "to_read_bytes",
    "bytes_written": "written_bytes", "bytes_to_replay": "to_replay_bytes", "bytes_copied": "copied_bytes",
}
# Values keyed by the user's names (columns, rows, GX kwargs): never renamed.
_USER_KEYED = frozenset({"columns", "rows", "row", "before", "after", "values", "key", "keys", "parameters",
                         "kwargs", "fallbacks", "counts", "targets"})
# Keys whose value is a local path (or a list of them): written absolute and normalised; URLs are left as they are.
_PATH_KEYS = frozenset({"path", "live", "out", "files", "written", "report", "report_markdown", "repository",
                        "data_docs", "report_dir"})


def _path(value: Any) -> Any:
    if isinstance(value, Path) or (isinstance(value, str) and value and "://" not in value
                                   and not value.startswith(("libsql:", "file:", ":memory:"))):
        return os.path.normpath(os.path.abspath(os.path.expanduser(str(value))))
    return value


def _vocabulary(obj: Any, *, paths: bool = False) -> Any:
    """``obj`` in docs/JSON.md's vocabulary: renamed keys, times as ISO-8601 UTC with Z, local paths absolute."""
    from datetime import UTC, datetime

    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = _VOCABULARY.get(k, k) if isinstance(k, str) else k
            if key in _USER_KEYED:
                out[key] = v
            else:
                out[key] = _vocabulary(v, paths=key in _PATH_KEYS)
        return out
    if isinstance(obj, list | tuple):
        return [_vocabulary(v, paths=paths) for v in obj]
    if isinstance(obj, datetime):
        moment = obj if obj.tzinfo else obj.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(obj, Path) or paths:
        return _path(obj) if isinstance(obj, Path | str) else obj
    return obj


def _document(obj: Any, key: str | None = None) -> dict[str, Any]:
    """The JSON document a command prints: an object whose first key is "schema"; a list goes under ``key``."""
    body = {key or "items": obj} if isinstance(obj, list) else dict(obj)
    body.pop("schema", None)
    return {"schema": SCHEMA, **_vocabulary(body)}


def _print_json(obj: Any, key: str | None = None) -> None:
    """Print ``obj`` as a JSON document (``_document``): a list needs ``key``, the name of what it lists."""
    print(json.dumps(_document(obj, key), indent=2, default=str))


def _wants_json() -> bool:
    """Whether the running command was asked for JSON (--json, or `sql --format json`)."""
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return ctx is not None and (ctx.params.get("json_out") is True or ctx.params.get("fmt") == "json")


def _json_error(message: str, hint: str | None, exit_code: int) -> None:
    """Under --json, the failure as a document on stdout too: {"schema", "ok": false, "error": {...}}."""
    if _wants_json():
        print(json.dumps({"schema": SCHEMA, "ok": False,
                          "error": {"message": message, "hint": hint, "exit_code": exit_code}}, indent=2))


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


def _table(title: str, columns: list[str], rows: list[list[Any]], *, whole: Collection[str] = (),
           priority: Sequence[str] = ()) -> None:
    """Print rows as a table that fits the console: COLUMNS when set, the terminal's width, 1000 when piped.

    ``whole`` columns (ids, names and paths users paste, times) are never cut or wrapped. The others wrap; when the
    table still does not fit, columns are hidden from the least important up (``priority`` lists the columns from
    most to least important; columns it does not name come last, in table order) and a note says so.
    """
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(width=1000)  # piped or logged: never cut ids and names down to 80 columns
    cells = [[c, *(str(r[i]) for r in rows)] for i, c in enumerate(columns)]
    natural = [max(cell_len(line) for s in col for line in s.splitlines() or [""]) for col in cells]
    floor = [n if c in whole else max(min(n, 6), *(cell_len(w) for s in col for w in s.split() or [""]))
             for c, n, col in zip(columns, natural, cells, strict=True)]
    rank = {c: i for i, c in enumerate(list(priority) + [c for c in columns if c not in priority])}
    shown = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c not in whole), key=lambda i: rank[columns[i]])

    def room() -> int:  # the width left for text: each column has 1 space either side and a border
        return console.width - 3 * len(shown) - 1

    while droppable and sum(floor[i] for i in shown) > room():
        shown.remove(droppable.pop())
    widths = {i: floor[i] for i in shown}
    spare = room() - sum(widths.values())
    while spare > 0:  # widen the wrapped columns, the most cut first, up to what they need
        i = max(shown, key=lambda j: natural[j] - widths[j])
        if natural[i] <= widths[i]:
            break
        widths[i] += 1
        spare -= 1
    t = Table()
    for i in shown:
        c = columns[i]
        t.add_column(c, justify="right" if c in {"pages", "size", "added", "seconds", "rows"} else "left",
                     no_wrap=c in whole, overflow="fold", width=widths[i])
    for r in rows:
        t.add_row(*[str(r[i]) for i in shown])
    console.print(title, style="table.title", markup=False, highlight=False)  # wraps at the console, not the table
    console.print(t)
    if hidden := len(columns) - len(shown):
        console.print(f"({hidden} column{'s' if hidden > 1 else ''} hidden: use --json or a wider terminal)")


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


def _first_word(args: Sequence[str]) -> str | None:
    """The command the words name, past the group's own options (`dbre --debug backup ...` names backup)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _GROUP_VALUED  # `--retry-lock 5m`: the next word is its value
        else:
            return arg
    return None


def _narrowed(word: str | None) -> typer.Typer:
    """`app` with only the command (or group) `word` names, or the whole `app` when it names none.

    typer builds every command's parameters from its signature (type hints, pydantic adapters) before it
    runs one: ~0.2 s of each command's start for 30 commands. A run names one; `dbre --help`, a misspelt
    command and `--version` get the whole app, so their help and suggestions are unchanged."""
    if word is None:
        return app
    commands = [c for c in app.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__ if c.callback else "")) == word]
    groups = [g for g in app.registered_groups
              if (g.name or (g.typer_instance.info.name if g.typer_instance else None)) == word]
    if not commands and not groups:
        return app
    narrow = copy.copy(app)
    narrow.registered_commands, narrow.registered_groups = commands, groups
    return narrow


def main() -> None:
    """Entry point of the `dbre` script; `_Group.main` turns usage errors into one line and exit 2."""
    _narrowed(_first_word(sys.argv[1:]))()


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
    import dbre.cli_inspect  # noqa: F401 - diff, stats
    import dbre.cli_sql  # noqa: F401 - sql
    import dbre.cli_export  # noqa: F401 - export
    import dbre.cli_key  # noqa: F401 - the `key` group: key passwd
