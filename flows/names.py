"""Flow run names that say what a run does: ``verify app``, ``drill app (random)``, ``fleet: 12 databases``,
``retention (dry run)``; the restore flow names its runs in flows/restore.py the same way.

Each ``*_name`` function takes the run's parameters (and reads the policy file they name, for the databases and
drill target a run would use); ``from_parameters`` makes one the ``flow_run_name`` of a flow. No name holds a
key, a token or a repository URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.common import load


def databases_text(names: list[str] | None) -> str:
    """``app``, ``app, shop``, ``12 databases``; ``all databases`` when no list is known."""
    if not names:
        return "all databases"
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} databases"


def _policy_databases(databases: list[str] | None, policy: str | None) -> list[str] | None:
    if databases:
        return list(databases)
    pol = load(policy)
    return [d.name for d in pol.databases] if pol else None


def _with(base: str, notes: list[str]) -> str:
    return base + (f" ({', '.join(notes)})" if notes else "")


def backup_name(db: str, full: bool = False, **_: Any) -> str:
    return _with(f"backup {db}", ["full"] if full else [])


def fleet_name(databases: list[str] | None = None, policy: str | None = None, copy_offsite: bool = False,
               retention: bool = False, full: bool = False, **_: Any) -> str:
    names = _policy_databases(databases, policy)
    then = [step for step, on in (("copy", copy_offsite), ("retention", retention)) if on]
    count = len(names or [])
    base = f"fleet: {count} database{'' if count == 1 else 's'}" + (f", then {' and '.join(then)}" if then else "")
    return _with(base, ["full"] if full else [])


def drill_name(databases: list[str] | None = None, policy: str | None = None, target: str | None = None,
               **_: Any) -> str:
    pol = load(policy)
    names = list(databases) if databases else ([d.name for d in pol.databases] if pol else None)
    return f"drill {databases_text(names)} ({target or (pol.drills.target if pol else 'newest')})"


def verify_name(databases: list[str] | None = None, policy: str | None = None, read_data: bool = True,
                restore: bool = True, **_: Any) -> str:
    notes = [note for note, on in (("no data read", not read_data), ("no restore check", not restore)) if on]
    return _with(f"verify {databases_text(_policy_databases(databases, policy))}", notes)


def snapshots_name(database: str | None = None, last: int = 20, **_: Any) -> str:
    return f"snapshots of {database or 'all databases'} (newest {last})"


def status_name(policy: str | None = None, notify: bool = True, **_: Any) -> str:
    return _with(f"status of {databases_text(_policy_databases(None, policy))}", [] if notify else ["no alerts"])


def retention_name(databases: list[str] | None = None, prune: bool = True, dry_run: bool = False,
                   **_: Any) -> str:
    notes = [note for note, on in (("dry run", dry_run), ("no prune", not prune)) if on]
    return _with("retention" + (f" of {databases_text(databases)}" if databases else ""), notes)


def requirements_name(out_dir: str | None = None, policy: str | None = None, **_: Any) -> str:
    where = out_dir or "the reports folder"
    return f"requirements report of {databases_text(_policy_databases(None, policy))} to {where}"


def from_parameters(name: Callable[..., str], fallback: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``name`` of the run's parameters, else ``fallback`` (an unreadable policy
    fails the run in its body, with its own message, not in its name)."""

    def run_name() -> str:
        from prefect.runtime import flow_run

        try:
            return name(**dict(flow_run.parameters))
        except Exception:  # noqa: BLE001 - a name never fails a run
            return fallback

    run_name.__name__ = f"{fallback.replace(' ', '_')}_run_name"
    return run_name
