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

With ``source`` provider, a whole database comes instead from the provider's own point-in-time
history (``dbre restore --provider``): a self-hosted sqld's bottomless backups (a namespace fork at
``at``) or Turso Cloud's (a new database seeded from ``at``), to the file at ``target`` or into a new
namespace or database left in place. The ``provider`` section's empty fields take the database's
``provider`` entry in the policy; its keys and tokens are references, like ``key``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.states import State
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from dbre.errors import DbreError, RepositoryError, UsageError
from dbre.policy import DatabasePolicy, Policy
from dbre.provider.command import PreparedRestore, ProviderOptions, ProviderSecrets, prepare_provider_restore
from dbre.repository.manifest import iso
from dbre.units import human_bytes as human
from flows.common import Repos, RunFailed, load, md_table, outcome, publish, refused, repos
from flows.references import KeyRef, as_reference, refuse_literal_secrets, store_references_only
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
from tasks.retry import HOUR, NO_RESULTS
from tasks.secrets import resolve_secret, resolve_token
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


def _references_not_null(schema: dict[str, Any]) -> None:
    """The key and token fields of a nested section drawn as the flow's own ``key`` is (serve.py's
    plain_optionals does it for a flow's parameters): a Secret block or a reference, not "X | None"."""
    for field in (schema.get("properties") or {}).values():
        if {"type": "null"} in field.get("anyOf", []):
            field["anyOf"] = [b for b in field["anyOf"] if b != {"type": "null"}]
            _no_null_default(field)


PROVIDER_SECRETS = ("admin_key", "token", "api_token")
_SQLD_FIELDS = ("admin_url", "namespace", "url", "into_namespace", "admin_key", "token")
_TURSO_FIELDS = ("org", "turso_database", "into", "api_token")
_FROM_POLICY = "; empty: the database's provider entry in the policy"


class ProviderSource(BaseModel):
    """Where the provider keeps the database's history (source provider). Empty fields take the database's
    provider entry in the policy; fill in only what it lacks or what should differ."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, json_schema_extra=_references_not_null)

    kind: Literal["policy", "sqld", "turso"] = Field(
        default="policy", description="sqld: a self-hosted sqld with bottomless backups on S3 (a namespace fork at "
        "the time); turso: Turso Cloud (a new database created from the time); policy: the kind of the database's "
        "provider entry in the policy")
    admin_url: str = Field(default="", description="sqld: its admin API (--admin-listen-addr), e.g. "
                                                   "http://127.0.0.1:9090" + _FROM_POLICY)
    namespace: str = Field(default="", description="sqld: the namespace to restore" + _FROM_POLICY
                                                   + ", else the database's namespace")
    url: str = Field(default="", description="sqld: its HTTP API (--http-listen-addr), e.g. http://127.0.0.1:8080, "
                                             "to read the fork into the file at target" + _FROM_POLICY)
    into_namespace: str = Field(default="", description="sqld: fork into this new namespace and leave it there "
                                                        "(leave target empty); empty: restore to the file at target")
    admin_key: KeyRef = Field(default=None, description="sqld: its admin key (--admin-auth-key), as a reference: "
                              "secret:NAME or env:NAME, never the key itself" + _FROM_POLICY
                              + ", else $LIBSQL_ADMIN_AUTH_KEY on the worker")
    token: KeyRef = Field(default=None, description="sqld: the token of its HTTP API, as a reference (secret:NAME or "
                          "env:NAME); empty: the database's auth_token in the policy, else $LIBSQL_AUTH_TOKEN")
    org: str = Field(default="", description="turso: the organization, e.g. acme" + _FROM_POLICY)
    turso_database: str = Field(default="", description="turso: the database's name in Turso" + _FROM_POLICY)
    into: str = Field(default="", description="turso: create this new database and leave it there (leave target "
                                              "empty); empty: restore to the file at target")
    api_token: KeyRef = Field(default=None, description="turso: a Platform API token, as a reference (secret:NAME or "
                              "env:NAME), never the token itself" + _FROM_POLICY + ", else $TURSO_API_TOKEN")

    def given(self) -> list[str]:
        return [n for n in (*_SQLD_FIELDS, *_TURSO_FIELDS) if getattr(self, n)]

    @model_validator(mode="after")
    def _one_kind(self) -> ProviderSource:
        if self.kind != "policy":
            other = _TURSO_FIELDS if self.kind == "sqld" else _SQLD_FIELDS
            foreign = [f"provider.{n}" for n in other if getattr(self, n)]
            if foreign:
                raise ValueError(f"{', '.join(foreign)} cannot be used with provider kind {self.kind}: clear "
                                 f"{'it' if len(foreign) == 1 else 'them'}")
        if self.into and self.into_namespace:
            raise ValueError("give provider.into (turso) or provider.into_namespace (sqld), not both")
        return self


class RestoreRequest(BaseModel):
    """What to restore, from when, and where to. A dry run shows the plan only: untick dry_run to restore."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # (an error never repeats a typed token)

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
    target: str = Field(default="", description="Path of the restored database file (whole), or the live database "
                                                "(table: a file; rows: a file or a libsql:// URL); source provider: "
                                                "the file, or empty with provider.into or into_namespace")
    force: bool = Field(default=False, description="whole: replace an existing file at the target")
    replace_tables: bool = Field(default=False, description="table: replace the live tables (after a safety "
                                                            "snapshot) instead of creating TABLE_restored copies")
    delete_extra: bool = Field(default=False, description="rows: also delete selected live rows the snapshot lacks")
    source: Literal["repository", "provider"] = Field(
        default="repository", description="repository: dbre's own backups; provider: the provider's own "
        "point-in-time history of the whole database (sqld bottomless or Turso), at the time at, from the provider "
        "section below")
    provider: ProviderSource = Field(default_factory=ProviderSource, description=(
        "source provider: where the provider keeps the history; empty fields take the policy's"))
    dry_run: bool = Field(default=True, description="Show the plan only; untick to restore")
    validate_result: bool = Field(default=True, description="whole: after restoring, integrity_check and row counts "
                                                            "and checksums against the snapshot's manifest "
                                                            "(a point-in-time restore: integrity and foreign keys)")

    @model_validator(mode="after")
    def _consistent(self) -> RestoreRequest:
        if self.source == "provider":
            return self._provider_consistent()
        if self.provider.given() or self.provider.kind != "policy":
            raise ValueError("the provider section is filled in but source is repository: choose source provider, "
                             "or clear the provider section")
        if not self.target:
            raise ValueError("target is required: the file to restore to, or the live database")
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

    def _provider_consistent(self) -> RestoreRequest:
        if self.scenario != "whole" or self.tables or self.where:
            raise ValueError("source provider restores a whole database: use scenario whole, no tables or where")
        if self.snapshot or self.txid:
            raise ValueError("source provider restores the time at, not a snapshot or txid: clear them")
        if self.at is None:
            raise ValueError("source provider needs at: the time to restore, with its zone")
        into = self.provider.into or self.provider.into_namespace
        if bool(self.target) == bool(into):
            raise ValueError("source provider restores either to the file at target or into a new namespace or "
                             "database (provider.into_namespace, provider.into): give one of them")
        if into and self.force:
            raise ValueError("force with provider.into or into_namespace: a provider never restores over an existing "
                             "one; untick force")
        return self


def run_name(req: RestoreRequest, kind: str | None = None) -> str:
    """What a run does: ``restore app @ 2026-12-01T02:14Z``, ``dry run: repair rows of app.orders @ newest``,
    ``dry run: provider restore of app @ 2026-12-01T02:14Z (sqld)`` (``kind``: the policy's, for kind policy)."""
    if req.at is not None:
        t = req.at.astimezone(UTC)
        when = t.strftime("%Y-%m-%dT%H:%M:%SZ" if t.second or t.microsecond else "%Y-%m-%dT%H:%MZ")
    else:
        when = f"txid {req.txid}" if req.txid else f"snapshot {req.snapshot}" if req.snapshot else "newest"
    what = {"whole": f"restore {req.database}", "table": f"restore tables {', '.join(req.tables)} of {req.database}",
            "rows": f"repair rows of {req.database}.{req.tables[0] if req.tables else '?'}"}[req.scenario]
    if req.source == "provider":
        kind = req.provider.kind if req.provider.kind != "policy" else kind
        what = f"provider restore of {req.database}"
        return ("dry run: " if req.dry_run else "") + f"{what} @ {when}" + (f" ({kind})" if kind else "")
    return ("dry run: " if req.dry_run else "") + f"{what} @ {when}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    request = flow_run.parameters.get("request")
    try:
        req = request if isinstance(request, RestoreRequest) else RestoreRequest.model_validate(request)
    except ValueError:
        return "restore"
    kind = None
    if req.source == "provider" and req.provider.kind == "policy":
        try:
            pol = load(flow_run.parameters.get("policy"))
            entry = next((d for d in pol.databases if d.name == req.database), None) if pol else None
            kind = entry.provider.kind if entry and entry.provider else None
        except Exception:  # noqa: BLE001 - a name never fails a run (the run says what is wrong with the policy)
            kind = None
    return run_name(req, kind)


def _provider_references_only(fl: Any) -> Any:
    """Like ``store_references_only`` for the keys and tokens inside the request's provider section, when a run
    started from Python passes the request as a mapping (a RestoreRequest has replaced a literal already)."""
    serialize = fl.serialize_parameters

    def references_only(parameters: dict[str, Any]) -> dict[str, Any]:
        request = parameters.get("request")
        if isinstance(request, dict) and isinstance(request.get("provider"), dict):
            section = {k: as_reference(v) if k in PROVIDER_SECRETS else v for k, v in request["provider"].items()}
            parameters = {**parameters, "request": {**request, "provider": section}}
        return serialize(parameters)  # type: ignore[no-any-return]

    fl.serialize_parameters = references_only
    return fl


@_provider_references_only
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
        refuse_literal_secrets("restore", key=key,
                               **{f"provider.{n}": getattr(req.provider, n) for n in PROVIDER_SECRETS})
        pol = load(policy)
        _check_database(pol, req.database)
        if req.source == "provider":
            return _restore_from_provider(req, pol)
        r = repos(pol, repo, None, key)
    except UsageError as err:
        return refused(err)
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
        head = [f"# Restore of `{req.database}`" + (": validation FAILED" if problems else ""), "",
                f"Restored {what} in {result['seconds']:.2f} s."]
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
            if problems:
                head += ["", f"What to do: do not use `{req.target}`. Run the dbre-verify flow on "
                             f"`{plan['repository']}`, then restore an earlier snapshot (or from an offsite "
                             "copy) to a new file."]
    head += _tried(tried)
    md = "\n".join(head)  # the steps (plan, restore, validate) are the table artifact's rows
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
        head += ["", "Tables: " + ", ".join(f"`{t['table']}` → `{t['target']}` ({t['action']})" for t in rows)
                 + " (row counts in the table artifact)."]
    else:
        counts = done["counts"]
        rows = [{"table": req.tables[0], "where": req.where, **counts}]
        applied = "" if req.dry_run else (f" Inserted {done['inserted']}, updated {done['updated']}, "
                                          f"deleted {done['deleted']}.")
        head = [f"# {verb}row repair of `{req.database}`.`{req.tables[0]}`", "",
                ("Would repair " if req.dry_run else "Repaired ") + f"rows `WHERE {req.where}` from {source}: "
                + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()) + "." + applied]
        if done.get("preview"):  # the rows themselves, which the table artifact (the counts) does not hold
            head += ["", "Preview:", "", md_table(done["preview"], list(done["preview"][0]))]
    if not req.dry_run:
        head += ["", f"Audit record `{done['audit_record']}` is in the repository."]
    else:
        head += ["", "Start the run again with *dry_run* unticked to apply it (it is planned again then)."]
    head += _tried(tried)
    publish(f"restore-{req.database}-{req.scenario}", "\n".join(head), rows,
            [(done["live"], "live database")], description=f"{req.scenario} restore of {req.database}")


def _tried(tried: list[str]) -> list[str]:
    return ["", "Repositories that could not serve it:", *[f"- {t}" for t in tried]] if tried else []


# -- source provider: the provider's own history -------------------------------------------------


@task(name="plan provider restore", task_run_name="plan provider restore of {options.provider}", timeout_seconds=60,
      **NO_RESULTS)
def plan_provider_restore(options: ProviderOptions) -> dict[str, Any]:
    """What a restore from the provider's history would do; asks the provider nothing."""
    return prepare_provider_restore(options, ProviderSecrets()).plan.describe()


@task(name="provider restore", task_run_name="restore from {options.provider}'s history", timeout_seconds=6 * HOUR,
      **NO_RESULTS)  # no retries: a fork or a create is not repeated blindly
def restore_provider(options: ProviderOptions, refs: dict[str, str | None]) -> dict[str, Any]:
    """Plan again and carry it out: a fork or a seeded create, then (to a file) the read and the delete."""
    prepared: PreparedRestore = prepare_provider_restore(options, _secrets(refs))
    prepared.plan_window = True  # (turso: the organization's plan is looked up, its window checked first)
    result = prepared.run()
    return {**result.summary(), "plan_note": result.plan_note}


def _secrets(refs: dict[str, str | None]) -> ProviderSecrets:
    """The references resolved (at the edge, in the task); unset ones fall back to the worker's environment."""
    env = ProviderSecrets.from_env()
    admin_key, api_token = refs.get("admin_key"), refs.get("api_token")
    return ProviderSecrets(admin_key=resolve_secret(admin_key) if admin_key else env.admin_key,
                           read_token=resolve_token(refs.get("token")),
                           api_token=resolve_secret(api_token) if api_token else env.api_token, api_url=env.api_url)


def _provider_options(req: RestoreRequest, db: DatabasePolicy | None) -> tuple[ProviderOptions, dict[str, str | None]]:
    """The form's provider section over the database's provider entry: the options `dbre restore --provider`
    would take, and the secret references. UsageError (one line, naming the field) when something is missing."""
    form, entry = req.provider, db.provider if db else None
    kind = form.kind if form.kind != "policy" else entry.kind if entry else None
    if kind is None:
        raise UsageError(f"restore: provider.kind is policy, but the policy has no provider entry for {req.database}",
                         "choose sqld or turso in the provider section, or add a provider entry to the database in "
                         "the policy")
    if entry is not None and entry.kind != kind:
        entry = None  # the policy's entry is of another kind: none of its settings apply
    other = _TURSO_FIELDS if kind == "sqld" else _SQLD_FIELDS
    foreign = [f"provider.{n}" for n in other if getattr(form, n)]
    if foreign:
        raise UsageError(f"restore: {', '.join(foreign)} cannot be used with provider kind {kind}", "clear them")
    target = Path(req.target) if req.target else None
    opts = ProviderOptions(kind, iso(req.at) if req.at else None, target, req.force, req.dry_run, False)
    if kind == "sqld":
        opts.admin_url = form.admin_url or (entry.admin_url if entry else None)
        opts.namespace = form.namespace or (entry.namespace if entry else None) or (db.namespace if db else None)
        opts.url = form.url or (entry.url if entry else None)
        opts.into_namespace = form.into_namespace or None
        needed = {"admin_url": opts.admin_url, "namespace": opts.namespace}
        if target is not None:
            needed["url"] = opts.url  # (sqld's HTTP API: the fork is read from it)
        refs = {"admin_key": form.admin_key or (entry.admin_key if entry else None),
                "token": form.token or (db.auth_token if db else None)}
    else:
        opts.org = form.org or (entry.org if entry else None)
        opts.database = form.turso_database or (entry.database if entry else None)
        opts.into = form.into or None
        needed = {"org": opts.org, "turso_database": opts.database}
        refs = {"api_token": form.api_token or (entry.api_token if entry else None)}
    missing = [f"provider.{k}" for k, v in needed.items() if not v]
    if missing:
        raise UsageError(f"restore: a {kind} provider restore needs {' and '.join(missing)}",
                         "fill it in the provider section, or in the database's provider entry in the policy")
    return opts, refs


def _restore_from_provider(req: RestoreRequest, pol: Policy | None) -> dict[str, Any] | State[Any]:
    """Plan (the dry run), then restore from the provider's history; a failure publishes what to do."""
    db = next((d for d in pol.databases if d.name == req.database), None) if pol else None
    plan: dict[str, Any] | None = None
    try:
        options, refs = _provider_options(req, db)
        plan = plan_provider_restore(options)
        if req.dry_run:
            _publish_provider(req, plan, None, [])
            return {"dry_run": True, "plan": plan}
        if options.provider == "turso" and not refs["api_token"] and not ProviderSecrets.from_env().api_token:
            raise UsageError("restore: a turso provider restore needs a Platform API token",
                             "set provider.api_token to secret:NAME or env:NAME (or api_token in the database's "
                             "provider entry, or TURSO_API_TOKEN on the worker)")
        result = restore_provider(options, refs)
    except DbreError as raised:
        err = type(raised)(_form_words(raised.message), _form_words(raised.hint))
        _publish_provider_failure(req, plan, err)
        return refused(err)
    problems: list[str] = []
    if result["to"] and req.validate_result:
        problems = list(check_restored_file(result["to"])["problems"])
    _publish_provider(req, plan, result, problems)
    if problems:
        raise RunFailed(f"restored {req.database} from {plan['provider']}'s history to {result['to']} but it fails "
                        "validation: " + "; ".join(problems[:5]))
    return {"dry_run": False, "plan": plan, "result": result}


_CLI_OPTION = re.compile(r"--(into-namespace|into|namespace|org|database|admin-url|url|at|to|force)\b")
_FORM_FIELD = {"into-namespace": "provider.into_namespace", "into": "provider.into", "namespace": "provider.namespace",
               "org": "provider.org", "database": "provider.turso_database", "admin-url": "provider.admin_url",
               "url": "provider.url", "at": "at", "to": "target", "force": "force"}


def _form_words(text: str) -> str:
    """A message of the shared provider code in the form's words: ``--into`` is ``provider.into`` here."""
    return _CLI_OPTION.sub(lambda m: _FORM_FIELD[m.group(1)], text)


def _provider_rows(plan: dict[str, Any], result: dict[str, Any] | None, problems: list[str],
                   validated: bool) -> list[dict[str, Any]]:
    rows = [{"step": "plan", **{k: plan[k] for k in ("provider", "source", "at", "to", "into", "scratch")},
             "result": "would replace the existing file" if plan["replaces_existing"] else "ok"}]
    if result is not None:
        rows.append({"step": "restore", **{k: result[k] for k in ("provider", "source", "at", "to", "into", "scratch")},
                     "size": result["size"], "seconds": result["seconds"],
                     "result": "ok" if not result["cleanup_error"] else f"{result['scratch']} not deleted"})
        if validated:
            rows.append({"step": "validate", "to": result["to"],
                         "result": f"{len(problems)} problems" if problems else "ok"})
    return rows


def _publish_provider(req: RestoreRequest, plan: dict[str, Any], result: dict[str, Any] | None,
                      problems: list[str]) -> None:
    kind = "namespace" if plan["provider"] == "sqld" else "database"
    where = (f"to `{plan['to']}` through a temporary {kind} `{plan['scratch']}` (deleted after the read)"
             + (", **replacing the existing file**" if plan["replaces_existing"] else "")
             if plan["to"] else f"into the new {kind} `{plan['into']}` (left in place)")
    what = (f"{kind} `{plan['source']}` as it was at {plan['at']} from {plan['provider']}'s own history "
            f"(`{plan['endpoint']}`) {where}")
    validated = bool(result and result["to"] and req.validate_result)
    if result is None:
        head = [f"# Dry run: provider restore of `{req.database}` ({plan['provider']})", "", f"Would restore {what}.",
                "", "Start the run again with *dry_run* unticked to restore (it is planned again then)."]
    else:
        timing = (f"{'fork' if plan['provider'] == 'sqld' else 'create'} {result['create_seconds']:.2f} s"
                  + (f", read {result['read_seconds']:.2f} s" if result["read_seconds"] is not None else ""))
        head = [f"# Provider restore of `{req.database}` ({plan['provider']})"
                + (": validation FAILED" if validated and problems else ""), "",
                f"Restored {what} in {result['seconds']:.2f} s ({timing})."]
        if result["url"]:
            head += ["", f"The new {kind} answers at `{result['url']}`."]
        if result.get("plan_note"):
            head += ["", f"Turso {result['plan_note']}."]
        if result["tables"] is not None:
            head += ["", f"It holds {result['tables']} schema objects"
                     + (f", {human(result['size'])}." if result["size"] else ".")]
        if result["to"] and plan["replaces_existing"]:
            head += ["", "The file it replaced is gone: a provider restore takes no safety snapshot."]
        if result["cleanup_error"]:
            head += ["", f"**The temporary {kind} `{result['scratch']}` was not deleted**: {result['cleanup_error']}. "
                         "Delete it by hand."]
        if plan["provider"] == "sqld":
            from dbre.provider.sqld import FORK_WARNING

            head += ["", "Warning: " + FORK_WARNING.format(ns=plan["source"]) + "."]
        if validated:
            head += ["", "Validation: " + ("**failed**" if problems else "integrity_check and foreign_key_check pass.")]
            head += [f"- {p}" for p in problems]
            if problems:
                head += ["", f"What to do: do not use `{result['to']}`; restore an earlier time, or from dbre's own "
                             "backups (set *source* to repository), to a new file."]
    head += ["", f"Granularity: {plan['granularity']}.", f"Retention: {plan['retention']}."]
    rows = _provider_rows(plan, result, problems, validated)
    links = [(result["to"], "restored database")] if result is not None and result["to"] else []
    publish(f"restore-{req.database}-provider", "\n".join(head), rows,
            links, description=f"provider restore of {req.database}")


def _publish_provider_failure(req: RestoreRequest, plan: dict[str, Any] | None, err: DbreError) -> None:
    """What failed and what to do, for the person who started the run."""
    usage = isinstance(err, UsageError)
    kind = req.provider.kind if req.provider.kind != "policy" else plan["provider"] if plan else "provider"
    steps = ([f"1. {err.hint[0].upper() + err.hint[1:]}." if err.hint else "1. Correct the request.",
              "2. Start the run again (dry_run first: it asks the provider nothing)."] if usage else [
        f"1. {err.hint[0].upper() + err.hint[1:]}." if err.hint else "1. See the worker's log.",
        "2. dbre deletes the temporary namespace or database it created when a restore fails; if the provider "
        "lists one named `dbre-restore-...` (sqld) or `dbre-pitr-...` (turso), delete it by hand.",
        "3. Start the run again; or restore from dbre's own backups: set *source* to repository."])
    publish(f"restore-{req.database}-provider-failed", "\n".join([
        f"# Provider restore of `{req.database}` failed ({kind})", "",
        f"**{err.message}**", "",
        "Nothing was changed at the target." if usage or plan is None else
        "The target file is written only after a complete read: it was not changed.", "",
        "What to do:", *steps]), description=f"provider restore of {req.database} failed")
