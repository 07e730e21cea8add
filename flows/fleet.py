"""Fleet backup: every database of the policy at once, under a concurrency limit; then copy and retention.

The hourly deployment runs the backups only; the nightly one also copies to the offsite
repositories and applies retention (forget, then prune) to every repository. Concurrency is
bounded twice: by the task runner (``max_concurrency`` backups in this run: threads, or Dask
workers) and by a Prefect global concurrency limit that every run on every machine shares. A
failed backup does not stop the others; the run fails at the end, naming each failure.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from dbre.errors import UsageError
from dbre.policy import Policy
from dbre.units import human_bytes as human
from flows.common import RunFailed, failures, load, md_table, outcome, publish, refused, repos
from flows.names import fleet_name, from_parameters
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.backup import backup_database_limited, copy_to_offsite
from tasks.retention import forget_snapshots, prune_repository

RUNNER_ENV = "DBRE_TASK_RUNNER"  # thread | dask: the default when the parameter is not given
DASK_ADDRESS_ENV = "DBRE_DASK_ADDRESS"  # a running Dask scheduler, e.g. tcp://dask:8786
DASK_PROCESSES_ENV = "DBRE_DASK_PROCESSES"  # 0: a local cluster of threads (starts in a second, shares the GIL)

RunnerKind = Literal["thread", "dask"]


def make_task_runner(kind: str, workers: int, dask_address: str | None = None) -> TaskRunner[Any]:
    """A thread pool of ``workers``, or a DaskTaskRunner (a running cluster, or a local one of ``workers``)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise UsageError(f"unknown task runner {kind!r}", "use thread or dask")
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    processes = os.environ.get(DASK_PROCESSES_ENV, "1") not in ("0", "false", "no")
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": processes,
                                          "dashboard_address": ":0"})


def ensure_concurrency_limit(name: str, slots: int) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists; returns its size.

    An existing limit is never changed: operators size it (``prefect gcl update``) for the storage."""
    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            pass  # another run created it first
        return int(client.read_global_concurrency_limit_by_name(name).limit)


@flow(name="dbre-fleet-fan-out", flow_run_name="back up {count} databases", persist_result=False)
def back_up_all(jobs: list[dict[str, Any]], repo: str, key: str | None, limit: str | None,
                count: int, full: bool = False) -> list[dict[str, Any]]:
    """Submit one backup task per database and wait for all; a failure is a row, not an exception."""
    futures = [backup_database_limited.submit(j["db"], j["source"], repo, key, j["token"], j["checksums"],
                                              j["namespace"], limit, full, False, j.get("replica_url"))
               for j in jobs]
    rows = []
    for job, future in zip(jobs, futures, strict=True):
        future.wait()
        ok, res = outcome(future.state)
        rows.append({**res, "status": "ok"} if ok else {"db": job["db"], "status": "failed", "error": res})
    return rows


@store_references_only
@flow(name="dbre-fleet-backup", flow_run_name=from_parameters(fleet_name, "fleet"), persist_result=False)
def fleet_backup_flow(databases: list[str] | None = None, policy: str | None = None, repo: str | None = None,
                      offsite: list[str] | None = None, key: KeyRef = None, copy_offsite: bool = False,
                      retention: bool = False, max_concurrency: int | None = None,
                      task_runner: RunnerKind | None = None, concurrency_limit: str | None = None,
                      full: bool = False) -> dict[str, Any]:
    """Back up the policy's databases (or the named ones) concurrently; optionally copy offsite and
    apply retention. ``concurrency_limit`` "" turns the global limit off for this run; ``full``
    stores every page again (reusing nothing of the previous snapshots)."""
    refuse_literal_secrets("fleet", key=key)
    log = get_run_logger()
    pol = load(policy)
    if pol is None:
        raise UsageError("the fleet backup needs a policy", "pass the policy parameter or set DBRE_POLICY")
    started = time.perf_counter()
    try:  # a name typed into the form: one line and the summary, no traceback, before any work
        dbs = pol.select(databases)
        r = repos(pol, repo, offsite, key)
    except UsageError as err:
        publish("fleet", "\n".join(["# Fleet backup: refused, nothing was backed up", "", f"**{err}**", "",
                                     "Start the run again with *databases* naming databases of the policy "
                                     "(empty: all of them)."]), description="fleet backup refused")
        return refused(err)
    kind = task_runner or os.environ.get(RUNNER_ENV) or pol.fleet.task_runner
    workers = max_concurrency or pol.fleet.max_concurrency
    limit = pol.fleet.concurrency_limit if concurrency_limit is None else (concurrency_limit or None)
    if limit:
        slots = ensure_concurrency_limit(limit, pol.fleet.concurrency_limit_slots)
        log.info("global concurrency limit %r: %d slots", limit, slots)
    jobs = [{"db": d.name, "source": d.source, "token": d.auth_token, "checksums": d.checksums,
             "namespace": d.namespace, "replica_url": d.replica_url} for d in dbs]
    runner = make_task_runner(kind, workers, pol.fleet.dask_address or os.environ.get(DASK_ADDRESS_ENV))
    rows = back_up_all.with_options(task_runner=runner)(jobs, r.primary, r.key, limit, len(jobs), full)
    failed = [row for row in rows if row["status"] != "ok"]
    steps = _copy_and_retention(pol, r.primary, r.offsite if copy_offsite else [], r.key, [d.name for d in dbs],
                                retention, any(row["status"] == "ok" for row in rows))
    seconds = round(time.perf_counter() - started, 1)
    _publish(rows, steps, r.primary, r.offsite if copy_offsite else [], kind, workers, limit, seconds)
    step_failures = [s for s in steps if s["result"] != "ok"]
    if failed or step_failures:
        what = [f"{row['db']}: {row['error']}" for row in failed] + [f"{s['step']} {s['repository']}: {s['result']}"
                                                                      for s in step_failures]
        raise RunFailed(f"{len(failed)} of {len(rows)} backups failed" + (
            f" and {len(step_failures)} follow-up steps failed" if step_failures else "") + ": " + "; ".join(what))
    return {"backups": len(rows), "failed": 0, "seconds": seconds, "steps": steps}


def _copy_and_retention(pol: Policy, primary: str, offsite: list[str], key: str | None, dbs: list[str],
                        retention: bool, any_backup: bool) -> list[dict[str, Any]]:
    """The nightly follow-ups, each a row of the summary: copies, then forget and prune everywhere."""
    steps: list[dict[str, Any]] = []
    for target in offsite if any_backup else []:
        ok, res = outcome(copy_to_offsite(primary, target, key, return_state=True))
        steps.append({"step": "copy", "repository": target, "result": "ok" if ok else res,
                      "detail": f"{res['snapshots_copied']} snapshots, {human(res['bytes_copied'])}" if ok else ""})
    if not retention:
        return steps
    keep = pol.retention.keep_policy().__dict__
    for repo in [primary, *offsite]:
        ok, res = outcome(forget_snapshots(repo, keep, dbs, key=key, return_state=True))
        steps.append({"step": "forget", "repository": repo, "result": "ok" if ok else res,
                      "detail": f"forgot {res['forgotten']}, kept {res['kept']}" if ok else ""})
        if ok and pol.retention.prune:
            ok, res = outcome(prune_repository(repo, key=key, return_state=True))
            steps.append({"step": "prune", "repository": repo, "result": "ok" if ok else res,
                          "detail": f"deleted {res['delete_packs']} packs, kept {res['keep_packs']}" if ok else ""})
    return steps


def _publish(rows: list[dict[str, Any]], steps: list[dict[str, Any]], primary: str, offsite: list[str], kind: str,
             workers: int, limit: str | None, seconds: float) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    table = [{"db": r["db"], "status": r["status"], "snapshot": r.get("id"),
              "kind": ("incremental" if r.get("parent") else "first") if r["status"] == "ok" else None,
              "size": r.get("size"), "bytes_added": r.get("bytes_added"), "seconds": r.get("seconds"),
              "read": r.get("source_method"), "error": r.get("error")} for r in rows]
    fell_back = [r for r in ok if r.get("source_fallback")]
    failed = [r for r in rows if r["status"] != "ok"]
    failed_steps = [s for s in steps if s["result"] != "ok"]
    md = [f"# Fleet backup: {len(ok)} of {len(rows)} databases backed up, "
          f"{human(sum(r.get('bytes_added', 0) for r in ok))} added"
          + (f"; {len(failed_steps)} of {len(steps)} copy and retention steps FAILED" if failed_steps else ""), "",
          f"Repository `{primary}`; {kind} task runner, {workers} at once"
          + (f", global concurrency limit `{limit}`" if limit else "") + f"; {seconds} s in all. "
          "Each database's snapshot and figures are in the table artifact.", ""]
    todo = []
    if failed:
        todo.append("A failed backup does not stop the others: fix what its error names (the source, its token), "
                    "then run the fleet backup again, or back up that database alone with the dbre-backup flow.")
    if failed_steps:
        now = [f"`dbre copy --repo {primary} --to {s['repository']}`" for s in failed_steps if s["step"] == "copy"]
        now += ["the dbre-retention flow (the policy's retention)"] if any(s["step"] != "copy" for s in failed_steps) \
            else []
        todo.append("A failed copy, forget or prune is tried again by the next nightly run; to run it now, once what "
                    "its error names is fixed: " + ", ".join(now) + ".")
    md += failures([(f"backup of {r['db']}", r["error"]) for r in failed]
                   + [(f"{s['step']} {s['repository']}", s["result"]) for s in failed_steps], todo)
    if fell_back:  # backed up, but not as configured: the reason is in no table column
        md += ["## Read through /dump instead of the replica", ""] + [
            f"- {r['db']}: {r['source_fallback']}" for r in fell_back] + [
            "", "Backed up whole, and so every round until the replica works: check that the replica URL's "
            "hostname resolves to this sqld (its DNS record) and that the replica cache folder is this user's "
            "alone.", ""]
    if steps:  # the table artifact has the backups only: these rows are here alone
        md += ["## Offsite copy and retention", "", md_table(steps, ["step", "repository", "result", "detail"])]
    publish("fleet-backup", "\n".join(md), table, [(u, f"repository {u}") for u in [primary, *offsite]],
            description=f"fleet backup of {len(rows)} databases")
