"""The `dbre replicate` command: continuous WAL shipping of one database, in the foreground.

Registered on the main app by dbre/cli.py. SIGINT and SIGTERM ship what is committed and exit 0;
any failure prints one line and exits non-zero (1; 2 for bad input).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import KeyFileOpt, PolicyOpt, _key, _policy, _run, app
from dbre.errors import UsageError
from dbre.secrets import Secret

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
    source: Annotated[Path | None, typer.Argument(help="The SQLite/libSQL database file (WAL mode) to replicate "
                                                  "(none with --policy).")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix "
                                             "(default with --policy: its primary).")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Database name in the repository.")] = None,
    interval: Annotated[str, typer.Option("--interval", help="Ship committed transactions this often.")] = "500ms",
    key_file: KeyFileOpt = None,
    policy: PolicyOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final line.")] = False,
) -> None:
    """Ship every committed transaction continuously (segments), for `restore --at` to the commit.
    With --policy: every database marked `replicate: true`, one thread each, in one process."""

    def go() -> None:
        from dbre.replicate.shipper import Replicator
        from dbre.repository.manifest import check_db_name
        from dbre.repository.repo import Repository
        from dbre.sources.local import LocalFileSource

        pol = _policy(policy)
        seconds = parse_interval(interval)
        if pol is not None and source is None:
            if db is not None:
                raise UsageError("--db with --policy", "the policy names the databases (`replicate: true`)")
            chosen = [(Path(d.source), d.name) for d in pol.databases if d.replicate]
            if not chosen:
                raise UsageError("the policy marks no database `replicate: true`", "add it to a database entry")
            remote = [name for path, name in chosen if "://" in str(path)]
            if remote:
                raise UsageError(f"replicate: {', '.join(remote)}: only local files can be replicated",
                                 "a remote libSQL source is backed up on its schedule")
        elif source is not None and db is not None:
            chosen = [(source, check_db_name(db))]
        else:
            raise UsageError("replicate needs SOURCE and --db, or --policy", "e.g. dbre replicate app.db --db app")
        url = repo or (pol.repositories.primary if pol else None)
        if not url:
            raise UsageError("no repository given", "pass --repo, or a --policy naming the primary repository")
        key = _key(key_file)
        if key is None and pol is not None and (ref := pol.repositories.encryption_key or "").startswith("env:"):
            key = Secret(os.environ[ref[4:]]) if os.environ.get(ref[4:]) else None
        for path, _name in chosen:
            LocalFileSource(path).check()  # before a repository is created for nothing
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        repository = Repository.open_or_init(url, key)

        def shipped(key: str) -> None:
            if not quiet:
                print(f"shipped {key}", flush=True)

        results: dict[str, Any] = {}

        def one(path: Path, name: str) -> None:
            try:
                results[name] = Replicator(repository, path, name, seconds).run(stop, shipped)
            except BaseException as err:  # noqa: BLE001 - reported below; the others stop too
                results[name] = err
                stop.set()

        if len(chosen) == 1:
            one(*chosen[0])
        else:
            threads = [threading.Thread(target=one, args=c, name=f"dbre-replicate-{c[1]}") for c in chosen]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):  # the main thread stays free for the signals
                for t in threads:
                    t.join(0.2)
        failed = None
        for _path, name in chosen:
            stats = results.get(name)
            if isinstance(stats, BaseException):
                failed = failed or stats
                continue
            if stats is None:
                continue
            print(f"replicate {name}: stopped; {stats.transactions} transactions in {stats.segments} segments "
                  f"({stats.bytes} bytes), generations {', '.join(stats.generations) or 'none'}; "
                  f"write lock held at most {stats.max_swap_ms:.1f} ms, {stats.yields} checkpoints yielded to, "
                  f"longest gap between two polls {stats.max_poll_gap_ms:.0f} ms",
                  file=sys.stderr, flush=True)
        if failed is not None:
            raise failed

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
    follower = Follower(Repository.open(repo, key), db, target, seconds, force=force)
    stats = follower.run(stop)
    print(f"follow {db}: stopped at txid {stats.last_txid}; {stats.transactions} transactions from "
          f"{stats.segments} segments applied in place, {stats.restores} restores "
          f"(generations {', '.join(stats.generations)}), {stats.polls} polls", file=sys.stderr, flush=True)
