"""Restore on demand: a form in the UI (``RestoreRequest``), a dry run by default, then the restore.

Scenarios (the seed's three):
- ``whole``: a snapshot (or the newest at a time) to a new file, checked against its manifest; a
  restore over an existing file needs ``force``.
- ``table``: chosen tables of a snapshot into the live database (``target``), as
  ``<table>_restored`` copies, or in place with ``replace_tables`` after a safety snapshot.
- ``rows``: the rows a WHERE selects in one table, diffed by key against the live database and put
  back as the snapshot had them (``delete_extra`` also removes selected rows the snapshot lacked).
A dry run shows the plan (the diff, for rows) and changes nothing; a run with dry_run off plans
again and applies in one transaction, with an audit record in the repository. The primary
repository is tried first, then each offsite copy, when the primary cannot be read.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import State
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dbre.errors import RepositoryError
from dbre.units import human_bytes as human
from flows.common import Repos, RunFailed, load, md_table, outcome, publish, repos
from tasks.restore import (
    plan_rows,
    plan_tables,
    plan_whole_restore,
    repair_rows,
    restore_tables,
    restore_whole,
)
from tasks.verify import check_restored


class RestoreRequest(BaseModel):
    """What to restore, from when, and where to. A dry run shows the plan only: untick dry_run to restore."""

    model_config = ConfigDict(extra="forbid")

    database: str = Field(description="Database name in the repository, e.g. orders", min_length=1)
    snapshot: str = Field(default="", description="Snapshot id or a unique prefix (empty: the newest)")
    at: datetime | None = Field(default=None, description="Or: restore the newest snapshot at or before this time")
    scenario: Literal["whole", "table", "rows"] = Field(
        default="whole", description="whole: the database to a new file; table: chosen tables; rows: rows by WHERE")
    tables: list[str] = Field(default_factory=list, description="Tables to restore (scenarios table and rows)")
    where: str = Field(default="", description="SQL WHERE selecting the rows to restore (scenario rows)")
    target: str = Field(description="Path of the restored database file (whole), or the live database (table: a "
                                    "file; rows: a file or a libsql:// URL)", min_length=1)
    force: bool = Field(default=False, description="whole: replace an existing file at the target")
    replace_tables: bool = Field(default=False, description="table: replace the live tables (after a safety "
                                                            "snapshot) instead of creating TABLE_restored copies")
    delete_extra: bool = Field(default=False, description="rows: also delete selected live rows the snapshot lacks")
    dry_run: bool = Field(default=True, description="Show the plan only; untick to restore")
    validate_result: bool = Field(default=True, description="whole: after restoring, integrity_check and row counts "
                                                            "and checksums against the snapshot's manifest")

    @model_validator(mode="after")
    def _consistent(self) -> RestoreRequest:
        if self.snapshot and self.at:
            raise ValueError("give a snapshot or a time (at), not both")
        if self.scenario in ("table", "rows") and not self.tables:
            raise ValueError(f"scenario {self.scenario} needs at least one table")
        if self.scenario == "rows" and (len(self.tables) != 1 or not self.where):
            raise ValueError("scenario rows needs exactly one table and a where clause")
        if self.scenario == "whole" and (self.tables or self.where):
            raise ValueError("scenario whole restores every table: leave tables and where empty")
        return self


@flow(name="dbre-restore", flow_run_name="restore {request.database} ({request.scenario})", persist_result=False)
def restore_flow(request: RestoreRequest, policy: str | None = None, repo: str | None = None,
                 key: str | None = None) -> dict[str, Any]:
    """Plan the restore a request describes and show it; unless a dry run, restore (and validate)."""
    pol = load(policy)
    r = repos(pol, repo, None, key)
    req = request
    common = {"db": req.database, "snapshot": req.snapshot or None, "at": req.at, "key": r.key}
    result: dict[str, Any] | None = None
    if req.scenario == "whole":
        args = {**common, "target": req.target, "force": req.force}
        plan, tried = _first_repository(r, lambda url: plan_whole_restore(url, return_state=True, **args))
        if not req.dry_run:  # the very snapshot the plan showed, from the repository that served it
            result = restore_whole(plan["repository"], **{**args, "snapshot": plan["snapshot"], "at": None})
        problems = _validate(req, plan, result, r)
        _publish_whole(req, plan, result, problems, tried)
        if problems:
            raise RunFailed(f"restored {req.database} to {req.target} but it fails validation: "
                            + "; ".join(problems[:5]))
        return {"dry_run": req.dry_run, "plan": plan, "result": result}
    if req.scenario == "table":
        args = {**common, "live": req.target, "tables": req.tables, "replace": req.replace_tables}
        task = plan_tables if req.dry_run else restore_tables
    else:
        entry = next((d for d in pol.databases if d.name == req.database), None) if pol else None
        args = {**common, "live": req.target, "table": req.tables[0], "where": req.where,
                "delete_extra": req.delete_extra, "token": entry.auth_token if entry else None}
        task = plan_rows if req.dry_run else repair_rows
    # applying plans again inside the task: what is applied is what the live database holds now
    done, tried = _first_repository(r, lambda url: task(url, return_state=True, **args))
    _publish_live(req, done, tried)
    return {"dry_run": req.dry_run, "plan" if req.dry_run else "result": done}


def _first_repository(r: Repos, call: Callable[[str], State[Any]]) -> tuple[dict[str, Any], list[str]]:
    """Run ``call`` against the primary, then each offsite copy, until one can serve it.

    Only a repository problem (missing, damaged, unreachable) moves on; a bad request (an unknown
    table, an existing target) would fail everywhere and is raised at once."""
    tried: list[str] = []
    for url in [r.primary, *r.offsite]:
        state = call(url)
        ok, res = outcome(state)
        if ok:
            return res, tried
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, RepositoryError):
            raise exc if isinstance(exc, Exception) else RunFailed(f"the restore failed: {res}")
        tried.append(f"{url}: {res}")
        get_run_logger().warning("cannot restore from %s (%s); trying the next repository", url, res)
    raise RunFailed("no repository could serve the restore: " + "; ".join(tried))


def _validate(req: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None, r: Repos) -> list[str]:
    if result is None or not req.validate_result:
        return []
    check = check_restored(plan["repository"], req.database, plan["snapshot"], req.target, r.key)
    return list(check["problems"])


def _publish_whole(req: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None, problems: list[str],
                   tried: list[str]) -> None:
    rows = [{"step": "plan", **{k: plan[k] for k in ("repository", "snapshot", "taken_at", "target", "size")},
             "result": "would replace the existing file" if plan["replaces_existing"] else "ok"}]
    what = (f"snapshot **{plan['snapshot']}** of `{plan['db']}` (taken {plan['taken_at']}, {human(plan['size'])}) "
            f"from `{plan['repository']}` to `{plan['target']}`")
    if result is None:
        head = [f"# Dry run: restore of `{req.database}`", "", f"Would restore {what}, reading "
                f"{human(plan['bytes_to_read'])} from {plan['packs']} packs"
                + (", **replacing the existing file**." if plan["replaces_existing"] else "."), "",
                "Start the run again with *dry_run* unticked to restore."]
    else:
        rows.append({"step": "restore", **{k: result[k] for k in ("repository", "snapshot", "taken_at", "target",
                                                                  "size")}, "seconds": result["seconds"],
                     "result": "ok"})
        head = [f"# Restore of `{req.database}`", "", f"Restored {what} in {result['seconds']:.2f} s."]
        if req.validate_result:
            rows.append({"step": "validate", "target": req.target,
                         "result": f"{len(problems)} problems" if problems else "ok"})
            passed = "integrity_check, foreign_key_check, schema, row counts and checksums match the manifest."
            head += ["", "Validation: " + ("**failed**" if problems else passed)]
            head += [f"- {p}" for p in problems]
    head += _tried(tried)
    md = "\n".join([*head, "", md_table(rows, ["step", "repository", "snapshot", "taken_at", "target", "size",
                                               "seconds", "result"])])
    links = [(plan["target"], "restored database")] if result is not None else []
    publish(f"restore-{req.database}", md, rows, links, description=f"restore of {req.database}")


def _publish_live(req: RestoreRequest, done: dict[str, Any], tried: list[str]) -> None:
    """Artifacts of a table restore or row repair: per-table actions, or the diff counts and a preview."""
    verb = "Dry run: " if req.dry_run else ""
    source = (f"snapshot **{done['snapshot']}** of `{req.database}` (taken {done['taken_at']}) from "
              f"`{done['repository']}` into `{done['live']}`")
    if req.scenario == "table":
        rows = [{k: t[k] for k in ("table", "target", "action", "snapshot_rows", "live_rows")} for t in done["tables"]]
        head = [f"# {verb}table restore into `{req.database}`", "",
                ("Would restore " if req.dry_run else "Restored ") + f"{len(rows)} tables of {source}"
                + (" after safety snapshot **" + str(done.get("safety_snapshot")) + "**" if done.get("safety_snapshot")
                   else "") + "."]
        table = md_table(rows, ["table", "target", "action", "snapshot_rows", "live_rows"])
    else:
        counts = done["counts"]
        rows = [{"table": req.tables[0], "where": req.where, **counts}]
        applied = "" if req.dry_run else (f" Inserted {done['inserted']}, updated {done['updated']}, "
                                          f"deleted {done['deleted']}.")
        head = [f"# {verb}row repair of `{req.database}`.`{req.tables[0]}`", "",
                ("Would repair " if req.dry_run else "Repaired ") + f"rows `WHERE {req.where}` from {source}: "
                + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()) + "." + applied]
        table = md_table(rows, ["table", "where", *counts])
        if done.get("preview"):
            head += ["", "Preview:", "", md_table(done["preview"], list(done["preview"][0]))]
    if not req.dry_run:
        head += ["", f"Audit record `{done['audit_record']}` is in the repository."]
    else:
        head += ["", "Start the run again with *dry_run* unticked to apply it (it is planned again then)."]
    head += _tried(tried)
    publish(f"restore-{req.database}-{req.scenario}", "\n".join([*head, "", table]), rows,
            [(done["live"], "live database")], description=f"{req.scenario} restore of {req.database}")


def _tried(tried: list[str]) -> list[str]:
    return ["", "Repositories that could not serve it:", *[f"- {t}" for t in tried]] if tried else []
