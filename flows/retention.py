"""Retention on demand: forget snapshots the keep-policy does not keep, then prune, in every repository.

The nightly fleet backup does the same after its copies; this flow is for a one-off run (or a
dry run to see what a new policy would remove)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dbre.errors import UsageError
from dbre.repository.retention import KeepPolicy
from flows.common import RunFailed, check_known, failures, load, outcome, publish, refused, repos
from flows.names import from_parameters, retention_name
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.retention import forget_snapshots, prune_repository


@store_references_only
@flow(name="dbre-retention", flow_run_name=from_parameters(retention_name, "retention"), persist_result=False)
def retention_flow(databases: list[str] | None = None, policy: str | None = None, repo: str | None = None,
                   offsite: list[str] | None = None, key: KeyRef = None, keep_last: int | None = None,
                   keep_hourly: int | None = None, keep_daily: int | None = None, keep_weekly: int | None = None,
                   keep_monthly: int | None = None, keep_yearly: int | None = None, keep_within: str | None = None,
                   prune: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Apply retention to the primary and every offsite repository; keep_* parameters replace the policy's
    rules (counts: -1 is unlimited; keep_within: restic's 7d, 1y6m), in the policy's retention time zone."""
    refuse_literal_secrets("retention", key=key)
    pol = load(policy)
    r = repos(pol, repo, offsite, key)
    given = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily, "weekly": keep_weekly,
             "monthly": keep_monthly, "yearly": keep_yearly}
    if any(v is not None for v in given.values()) or keep_within:
        keep = KeepPolicy(**{k: v or 0 for k, v in given.items()}, within=keep_within,
                          timezone=pol.retention.timezone if pol else None)
    elif pol is not None:
        keep = pol.retention.keep_policy()
    else:
        raise UsageError("no retention rule given", "pass keep_* parameters or a policy with a retention section")
    keep.check()
    if databases:
        try:  # (a typo: one line naming the known databases, no traceback, the run Failed, nothing pruned)
            check_known(list(databases), pol, r.primary, r.key, "retention")
        except UsageError as err:
            return refused(err)
    names = databases or ([d.name for d in pol.databases] if pol else None)
    steps: list[dict[str, Any]] = []
    for target in [r.primary, *r.offsite]:
        ok, res = outcome(forget_snapshots(target, vars(keep), names, dry_run, r.key, return_state=True))
        steps.append({"step": "forget", "repository": target, "result": "ok" if ok else res,
                      "forgotten": res["forgotten"] if ok else None, "kept": res["kept"] if ok else None})
        if ok and prune:
            ok, res = outcome(prune_repository(target, dry_run, r.key, return_state=True))
            steps.append({"step": "prune", "repository": target, "result": "ok" if ok else res,
                          "packs_deleted": res["delete_packs"] if ok else None,
                          "packs_kept": res["keep_packs"] if ok else None})
    rules = ", ".join(f"keep {k} {v}" for k, v in vars(keep).items() if v)
    failed = [s for s in steps if s["result"] != "ok"]
    repos_failed = len({s["repository"] for s in failed})
    would = "would be " if dry_run else ""
    md = [f"# Retention{' (dry run)' if dry_run else ''}: {1 + len(r.offsite) - repos_failed} of "
          f"{1 + len(r.offsite)} repositories done" + (f", {repos_failed} FAILED" if repos_failed else ""), "",
          f"{sum(s.get('forgotten') or 0 for s in steps)} snapshots {would}forgotten, "
          f"{sum(s.get('kept') or 0 for s in steps)} kept"
          + (f"; {sum(s.get('packs_deleted') or 0 for s in steps)} packs {would}deleted" if prune else "")
          + " (per repository in the table artifact).", "", f"Rules: {rules}.", ""]
    md += failures([(f"{s['step']} {s['repository']}", s["result"]) for s in failed], [
        "Fix what the error names (a lock held by another run, credentials, network), then start this run again "
        "(the nightly fleet backup applies retention too)."])
    publish("retention", "\n".join(md), steps, [(u, f"repository {u}") for u in [r.primary, *r.offsite]],
            description="retention")
    if failed:
        raise RunFailed("retention failed: " + "; ".join(f"{s['step']} {s['repository']}: {s['result']}"
                                                          for s in failed))
    return {"dry_run": dry_run, "steps": steps}
