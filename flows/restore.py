"""Restore on demand: a form in the UI (``RestoreRequest``), a dry run by default, then the restore.

Scenarios: ``whole`` restores a snapshot (or the newest at a time) to a new file; a restore over
an existing file needs ``force``. ``table`` and ``rows`` are validated here and run once dbre's
table- and row-level restore exist (``dbre.restore.table`` / ``dbre.restore.rows``); until then
the run stops at once with a clear message. The primary repository is tried first, then each
offsite copy, when the primary cannot be read.
"""

from __future__ import annotations

import importlib.util
from datetime import datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dbre.errors import RepositoryError, UsageError
from flows.common import RunFailed, human, load, md_table, outcome, publish, repos
from tasks.restore import plan_whole_restore, restore_whole
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
    target: str = Field(description="Path of the restored database file (whole), or the live database (table, rows)",
                        min_length=1)
    force: bool = Field(default=False, description="Replace an existing file at the target (whole)")
    dry_run: bool = Field(default=True, description="Show the plan only; untick to restore")
    validate_result: bool = Field(default=True, description="After restoring: integrity_check and row counts and "
                                                            "checksums against the snapshot's manifest")

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


def check_supported(scenario: str) -> None:
    """UsageError unless dbre can run this restore scenario."""
    module = {"table": "dbre.restore.table", "rows": "dbre.restore.rows"}.get(scenario)
    if module and importlib.util.find_spec(module) is None:
        raise UsageError(f"restore scenario {scenario!r} is not supported yet",
                         "restore the whole database to a new file (scenario whole) and copy what you need from it")


@flow(name="dbre-restore", flow_run_name="restore {request.database} ({request.scenario})", persist_result=False)
def restore_flow(request: RestoreRequest, policy: str | None = None, repo: str | None = None,
                 key: str | None = None) -> dict[str, Any]:
    """Plan the restore a request describes, show it, and (unless a dry run) restore and validate."""
    log = get_run_logger()
    check_supported(request.scenario)
    pol = load(policy)
    r = repos(pol, repo, None, key)
    args = {"db": request.database, "target": request.target, "snapshot": request.snapshot or None, "at": request.at,
            "force": request.force, "key": r.key}
    plan, tried = None, []
    for candidate in [r.primary, *r.offsite]:
        state = plan_whole_restore(candidate, return_state=True, **args)
        ok, res = outcome(state)
        if ok:
            plan = res
            break
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, RepositoryError):  # a bad request: another repository would refuse it too
            raise exc if isinstance(exc, Exception) else RunFailed(f"plan of the restore failed: {res}")
        tried.append(f"{candidate}: {res}")
        log.warning("cannot restore from %s (%s); trying the next repository", candidate, res)
    if plan is None:
        raise RunFailed("no repository could serve the restore: " + "; ".join(tried))
    rows = [{"step": "plan", **{k: plan[k] for k in ("repository", "snapshot", "taken_at", "target", "size")},
             "result": "would replace the existing file" if plan["replaces_existing"] else "ok"}]
    result = None
    problems: list[str] = []
    if not request.dry_run:
        result = restore_whole(plan["repository"], **{**args, "snapshot": plan["snapshot"], "at": None})
        rows.append({"step": "restore", **{k: result[k] for k in ("repository", "snapshot", "taken_at", "target",
                                                                  "size")}, "seconds": result["seconds"],
                     "result": "ok"})
        if request.validate_result:
            check = check_restored(plan["repository"], request.database, plan["snapshot"], request.target, r.key)
            problems = check["problems"]
            rows.append({"step": "validate", "target": request.target,
                         "result": "ok" if check["ok"] else f"{len(problems)} problems"})
    _publish(request, plan, result, problems, rows, tried)
    if problems:
        raise RunFailed(f"restored {request.database} to {request.target} but it fails validation: "
                        + "; ".join(problems[:5]))
    return {"dry_run": request.dry_run, "plan": plan, "result": result}


def _publish(request: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None, problems: list[str],
             rows: list[dict[str, Any]], tried: list[str]) -> None:
    what = (f"snapshot **{plan['snapshot']}** of `{plan['db']}` (taken {plan['taken_at']}, {human(plan['size'])}) "
            f"from `{plan['repository']}` to `{plan['target']}`")
    if result is None:
        head = [f"# Dry run: restore of `{request.database}`", "", f"Would restore {what}, reading "
                f"{human(plan['bytes_to_read'])} from {plan['packs']} packs"
                + (", **replacing the existing file**." if plan["replaces_existing"] else "."), "",
                "Start the run again with *dry_run* unticked to restore."]
    else:
        head = [f"# Restore of `{request.database}`", "", f"Restored {what} in {result['seconds']:.2f} s."]
        if request.validate_result:
            passed = "integrity_check, foreign_key_check, schema, row counts and checksums match the manifest."
            head += ["", "Validation: " + (passed if not problems else "**failed**")]
            head += [f"- {p}" for p in problems]
    if tried:
        head += ["", "Repositories that could not serve it:"] + [f"- {t}" for t in tried]
    md = "\n".join([*head, "", md_table(rows, ["step", "repository", "snapshot", "taken_at", "target", "size",
                                               "seconds", "result"])])
    links = [(plan["target"], "restored database")] if result is not None else []
    publish(f"restore-{request.database}", md, rows, links, description=f"restore of {request.database}")
