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
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Failed, State
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from dbre.errors import RepositoryError, UsageError
from dbre.policy import Policy
from dbre.units import human_bytes as human
from flows.common import Repos, RunFailed, load, md_table, outcome, publish, repos
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.restore import (
    check_restored_file,
    plan_pitr_restore,
    plan_rows,
    plan_tables,
    plan_whole_restore,
    repair_rows,
    restore_pitr,
    restore_tables,
    restore_whole,
)
from tasks.verify import check_restored

AT_HELP = ("Or: restore the database as it was at this time. ISO 8601 with its zone, e.g. 2026-12-01T02:14:00Z "
           "(UTC) or 2026-12-01T03:14:00+01:00; a time without a zone is read as UTC. whole: exactly the "
           "transactions replicated up to it when replication covers it, else the newest snapshot at or before "
           "it; table and rows: the newest snapshot at or before it")


def _utc(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def _no_null_default(schema: dict[str, Any]) -> None:
    if "default" in schema and schema["default"] is None:
        del schema["default"]


# The form draws a field whose schema is "anyOf [X, null]" as "X | None" with an empty "None" choice, so
# these optional fields are described as X alone; and without a default, for the form fills a field
# with its default, and the UI's own check (no null in an X) would then refuse an untouched field.
When = Annotated[datetime | None, AfterValidator(_utc), WithJsonSchema({"type": "string", "format": "date-time"})]
Txid = Annotated[int | None, Field(ge=1), WithJsonSchema({"type": "integer", "minimum": 1})]


class RestoreRequest(BaseModel):
    """What to restore, from when, and where to. A dry run shows the plan only: untick dry_run to restore."""

    model_config = ConfigDict(extra="forbid")

    database: str = Field(description="Database to restore: its name in the policy and the repository, e.g. orders",
                          min_length=1)
    snapshot: str = Field(default="", description="Snapshot id or a unique prefix; leave empty (and at and txid "
                                                  "empty) for the newest state: a replicated database's newest "
                                                  "replicated transaction, else the newest snapshot")
    at: When = Field(default=None, title="At (time, with zone)", description=AT_HELP,
                     json_schema_extra=_no_null_default)
    txid: Txid = Field(default=None, title="Txid (transaction)", json_schema_extra=_no_null_default, description=(
        "Or (whole only): restore exactly up to this replicated transaction id, from the newest generation that "
        "holds it (dbre restore --txid; see the txids of a database with dbre verify)"))
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
                                                            "and checksums against the snapshot's manifest "
                                                            "(a point-in-time restore: integrity and foreign keys)")

    @model_validator(mode="after")
    def _consistent(self) -> RestoreRequest:
        if sum(bool(x) for x in (self.snapshot, self.at, self.txid)) > 1:
            raise ValueError("give one of snapshot, at (a time) and txid, not both")
        if self.txid and self.scenario != "whole":
            raise ValueError("txid restores a whole database: use scenario whole (or a time, at)")
        if self.scenario in ("table", "rows") and not self.tables:
            raise ValueError(f"scenario {self.scenario} needs at least one table")
        if self.scenario == "rows" and (len(self.tables) != 1 or not self.where):
            raise ValueError("scenario rows needs exactly one table and a where clause")
        if self.scenario == "whole" and (self.tables or self.where):
            raise ValueError("scenario whole restores every table: leave tables and where empty")
        return self


def run_name(req: RestoreRequest) -> str:
    """What a run does: ``restore app @ 2026-12-01T02:14Z``, ``dry run: repair rows of app.orders @ newest``."""
    if req.at is not None:
        t = req.at.astimezone(UTC)
        when = t.strftime("%Y-%m-%dT%H:%M:%SZ" if t.second or t.microsecond else "%Y-%m-%dT%H:%MZ")
    else:
        when = f"txid {req.txid}" if req.txid else f"snapshot {req.snapshot}" if req.snapshot else "newest"
    what = {"whole": f"restore {req.database}", "table": f"restore tables {', '.join(req.tables)} of {req.database}",
            "rows": f"repair rows of {req.database}.{req.tables[0] if req.tables else '?'}"}[req.scenario]
    return ("dry run: " if req.dry_run else "") + f"{what} @ {when}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    request = flow_run.parameters.get("request")
    try:
        return run_name(request if isinstance(request, RestoreRequest) else RestoreRequest.model_validate(request))
    except ValueError:
        return "restore"


@store_references_only
@flow(name="dbre-restore", flow_run_name=_flow_run_name, persist_result=False)
def restore_flow(request: RestoreRequest, policy: str | None = None, repo: str | None = None,
                 key: KeyRef = None) -> dict[str, Any] | State[Any]:
    """Plan the restore a request describes and show it; unless a dry run, restore (and validate).

    Args:
        request: What to restore, from when, and where to
        policy: Policy file on the worker (default: $DBRE_POLICY); its repositories, key and database names
        repo: Repository URL or path, instead of the policy's primary (its offsite copies are still tried)
        key: Repository key, as a reference: secret:NAME (a Prefect Secret block), a Secret block, or env:NAME;
            never the key itself. Empty: the policy's, else $DBRE_ENCRYPTION_KEY
    """
    req = request
    try:  # refused before any work: one line and an artifact saying what to do, no traceback
        refuse_literal_secrets("restore", key=key)
        pol = load(policy)
        _check_database(pol, req.database)
        r = repos(pol, repo, None, key)
    except UsageError as err:
        get_run_logger().error("%s", err)
        return Failed(message=str(err))
    common = {"db": req.database, "snapshot": req.snapshot or None, "at": req.at, "key": r.key}
    if req.scenario == "whole":
        return _restore_whole(req, r, common)
    task: Any
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


def _check_database(pol: Policy | None, name: str) -> None:
    """A database the policy does not list: one line and an artifact naming those it does, before any work."""
    if pol is None or any(d.name == name for d in pol.databases):
        return
    names = sorted(d.name for d in pol.databases)
    publish("restore-refused", "\n".join([
        f"# Restore refused: no database `{name}` in the policy", "",
        "Nothing was read or written. Start the run again with *database* set to one of:", "",
        *[f"- `{n}`" for n in names]]), description=f"restore refused: unknown database {name}")
    raise UsageError(f"restore: no database {name!r} in the policy",
                     "choose one of " + ", ".join(names) if names else "the policy lists no databases")


def _restore_whole(req: RestoreRequest, r: Repos, common: dict[str, Any]) -> dict[str, Any]:
    """A whole database: from segments when they cover what is asked (``at``, ``txid``, or with neither
    and no snapshot the newest replicated state, as `dbre restore` does), else a snapshot."""
    args = {**common, "target": req.target, "force": req.force}
    plan: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    tried: list[str] = []
    pitr = not req.snapshot
    if pitr:
        pargs = {k: v for k, v in args.items() if k != "snapshot"} | {"txid": req.txid}
        plan, tried = _first_repository(r, lambda url: plan_pitr_restore(url, return_state=True, **pargs))
        if plan is not None:
            result = None if req.dry_run else restore_pitr(plan["repository"], **pargs)
        pitr = plan is not None
    if plan is None:
        plan, tried = _first_repository(r, lambda url: plan_whole_restore(url, return_state=True, **args))
        # the very snapshot the plan showed, from the repository that served it
        result = None if req.dry_run else restore_whole(plan["repository"], **{**args, "snapshot": plan["snapshot"],
                                                                                 "at": None})
    problems = _validate(req, plan, result, r, pitr)
    _publish_whole(req, plan, result, problems, tried, pitr)
    if problems:
        raise RunFailed(f"restored {req.database} to {req.target} but it fails validation: " + "; ".join(problems[:5]))
    return {"dry_run": req.dry_run, "plan": plan, "result": result}


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


def _validate(req: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None, r: Repos,
              pitr: bool) -> list[str]:
    if result is None or not req.validate_result:
        return []
    if pitr:  # the file holds transactions after its base snapshot: no manifest describes it
        return list(check_restored_file(req.target)["problems"])
    check = check_restored(plan["repository"], req.database, plan["snapshot"], req.target, r.key)
    return list(check["problems"])


def _publish_whole(req: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None, problems: list[str],
                   tried: list[str], pitr: bool) -> None:
    rows = [{"step": "plan", **{k: plan[k] for k in ("repository", "snapshot", "taken_at", "target")},
             "size": plan.get("size"), "result": "would replace the existing file" if plan["replaces_existing"]
             else "ok"}]
    if pitr:
        upto = f"at {plan['at']}" if plan["at"] else f"up to txid {plan['txid']}" if plan["txid"] is not None \
            else "as of its newest replicated transaction"
        what = (f"`{plan['db']}` {upto}: snapshot **{plan['snapshot']}** (taken {plan['taken_at']}) and "
                f"{plan['segments']} segments of generation {plan['generation']} from `{plan['repository']}` "
                f"to `{plan['target']}`")
        reading = f"reading {plan['objects']} objects"
    else:
        what = (f"snapshot **{plan['snapshot']}** of `{plan['db']}` (taken {plan['taken_at']}, "
                f"{human(plan['size'])}) from `{plan['repository']}` to `{plan['target']}`")
        reading = f"reading {human(plan['bytes_to_read'])} from {plan['packs']} packs"
    if result is None:
        head = [f"# Dry run: restore of `{req.database}`", "", f"Would restore {what}, {reading}"
                + (", **replacing the existing file**." if plan["replaces_existing"] else "."), "",
                "Start the run again with *dry_run* unticked to restore."]
    else:
        rows.append({"step": "restore", **{k: result[k] for k in ("repository", "snapshot", "taken_at", "target")},
                     "size": result.get("size"), "seconds": result["seconds"], "result": "ok"})
        head = [f"# Restore of `{req.database}`", "", f"Restored {what} in {result['seconds']:.2f} s."]
        if pitr:
            head += ["", f"Applied {result['transactions']} transactions, the last txid {result['last_txid']} "
                         f"(committed {result['last_committed']})."]
        if result.get("safety_snapshot"):
            head += ["", f"The database it replaced is safety snapshot **{result['safety_snapshot']}** (tagged "
                         "safety, kept 7 days): restore it by that id to bring it back."]
        if req.validate_result:
            rows.append({"step": "validate", "target": req.target,
                         "result": f"{len(problems)} problems" if problems else "ok"})
            passed = ("integrity_check and foreign_key_check pass." if pitr else
                      "integrity_check, foreign_key_check, schema, row counts and checksums match the manifest.")
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
