"""The `dbre replicate` command: continuous WAL shipping of one database, in the foreground.

Registered on the main app by dbre/cli.py. SIGINT and SIGTERM ship what is committed and exit 0;
any failure prints one line and exits non-zero (1; 2 for bad input).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import DbNameOpt, KeyFileOpt, RepoOpt, _key, _run, app
from dbre.errors import UsageError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_interval(text: str) -> float:
    """``1s``, ``500ms``, ``2m`` or a number of seconds, between 0.05 s and 1 h."""
    m = _DURATION.match(text)
    if m is None:
        raise UsageError(f"--interval {text!r} is not a duration", "e.g. 1s, 500ms, 2m")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    if not 0.05 <= value <= 3600:
        raise UsageError(f"--interval {text!r} is out of range", "use 50ms to 1h")
    return value


@app.command()
def replicate(
    source: Annotated[Path, typer.Argument(help="The SQLite/libSQL database file (WAL mode) to replicate.")],
    repo: RepoOpt,
    db: DbNameOpt,
    interval: Annotated[str, typer.Option("--interval", help="Ship committed transactions this often.")] = "1s",
    key_file: KeyFileOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final line.")] = False,
) -> None:
    """Ship every committed transaction continuously (segments), for `restore --at` to the commit."""

    def go() -> None:
        from dbre.replicate.shipper import Replicator
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.sources.local import LocalFileSource

        check_db_name(db)
        seconds = parse_interval(interval)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        LocalFileSource(source).check()  # before a repository is created for nothing
        repository = Repository.open_or_init(repo, _key(key_file))
        replicator = Replicator(repository, source, db, seconds)

        def shipped(key: str) -> None:
            if not quiet:
                print(f"shipped {key}", flush=True)

        stats = replicator.run(stop, shipped)
        print(f"replicate {db}: stopped; {stats.transactions} transactions in {stats.segments} segments "
              f"({stats.bytes} bytes), generations {', '.join(stats.generations) or 'none'}; "
              f"write lock held at most {stats.max_swap_ms:.1f} ms, {stats.yields} checkpoints yielded to, "
              f"longest gap between two polls {stats.max_poll_gap_ms:.0f} ms",
              file=sys.stderr, flush=True)

    _run(go)


def follow_standby(repo: str, db: str, to: Path, interval: str, force: bool, key: Any,
                   conflicts: list[str]) -> None:
    """`dbre restore --follow`: restore the newest replicated state to ``to``, then keep it current
    until SIGINT/SIGTERM (exit 0)."""
    from dbre.repository.manifest import check_db_name
    from dbre.repository.repo import Repository
    from dbre.restore.follow import Follower

    if conflicts:
        raise UsageError(f"--follow cannot be combined with {', '.join(conflicts)}",
                         "--follow always keeps the newest state")
    check_db_name(db)
    seconds = parse_interval(interval)
    target = to.expanduser().absolute()
    if target.exists() and not force:
        raise UsageError(f"restore target {target} already exists", "choose a new path or pass --force")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    follower = Follower(Repository.open(repo, key), db, target, seconds)
    stats = follower.run(stop)
    print(f"follow {db}: stopped at txid {stats.last_txid}; {stats.transactions} transactions from "
          f"{stats.segments} segments applied in place, {stats.restores} restores "
          f"(generations {', '.join(stats.generations)}), {stats.polls} polls", file=sys.stderr, flush=True)
