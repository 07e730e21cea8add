"""Integrity validation (weekly): verify the repository, then restore each database's newest snapshot
to scratch and check it (integrity_check, foreign_key_check, row counts and checksums vs the manifest)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dbre.units import human_bytes as human
from dbre.validate.subset import subset_for_week
from flows.common import RunFailed, failures, load, outcome, publish, repos
from flows.names import from_parameters, verify_name
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.backup import list_snapshots
from tasks.verify import restore_check, verify_repository


@store_references_only
@flow(name="dbre-verify", flow_run_name=from_parameters(verify_name, "verify"), persist_result=False,
      task_runner=ThreadPoolTaskRunner(max_workers=2))
def verify_flow(databases: list[str] | None = None, policy: str | None = None, repo: str | None = None,
                key: KeyRef = None, read_data: bool = True, cycle_weeks: int = 4, restore: bool = True,
                scratch_dir: str | None = None) -> dict[str, Any]:
    """Check every snapshot and pack; with ``read_data`` read this week's share of the packs, so that every
    pack is read once in ``cycle_weeks`` weeks (1: all of them now); then prove the newest snapshot of each
    database (the named ones, else the policy's, else all in the repository) restores correctly."""
    refuse_literal_secrets("verify", key=key)
    pol = load(policy)
    r = repos(pol, repo, None, key)
    subset = subset_for_week(cycle_weeks) if read_data else None
    ok, report = outcome(verify_repository(r.primary, r.key, None, read_data, subset, return_state=True))
    if not ok:
        report = {"ok": False, "problems": [{"object": r.primary, "detail": report}], "snapshots": 0, "packs": 0}
    names = databases or ([d.name for d in pol.databases] if pol else None)
    if names is None:
        names = sorted({s["db"] for s in list_snapshots(r.primary, r.key)})
    scratch = scratch_dir or (pol.drills.scratch_dir if pol else None)
    checks: list[dict[str, Any]] = []
    if restore:
        futures = [restore_check.submit(r.primary, db, r.key, None, scratch) for db in names]
        for db, future in zip(names, futures, strict=True):
            future.wait()
            done, res = outcome(future.state)
            checks.append(res if done else {"db": db, "ok": False, "problems": [res]})
    _publish(r.primary, report, checks, read_data)
    bad = [c for c in checks if not c["ok"]]
    if not report["ok"] or bad:
        what = [f"{p['object']}: {p['detail']}" for p in report["problems"][:5]]
        what += [f"{c['db']}: {'; '.join(c['problems'][:3])}" for c in bad]
        raise RunFailed(f"verification failed ({len(report['problems'])} repository problems, {len(bad)} of "
                        f"{len(checks)} restore checks failed): " + "; ".join(what))
    return {"repository": report, "checks": checks}


def _publish(primary: str, report: dict[str, Any], checks: list[dict[str, Any]], read_data: bool) -> None:
    ok_checks = sum(1 for c in checks if c["ok"])
    bad = [c for c in checks if not c["ok"]]
    passed = report["ok"] and not bad
    md = [f"# Integrity validation of `{primary}`: " + ("ok" if passed else "FAILED"), "",
          f"- Repository: {'ok' if report['ok'] else '**damaged**'} ({report['snapshots']} snapshots, "
          f"{report['packs']} packs" + (f", read {report.get('packs_read', 0)} packs, "
                                         f"{human(report.get('bytes_read', 0))}" if read_data else "")
          + (f" of this week's subset {report['read_data_subset']}" if report.get("read_data_subset") else "") + ")",
          f"- Restore checks: {ok_checks} of {len(checks)} databases restored and passed"
          + (" (each with its figures in the table artifact)" if checks else ""), ""]
    todo = []
    if not report["ok"]:
        todo.append(f"Run `dbre verify --repo {primary}` for every damaged object; restore a snapshot that needs "
                    "one from an offsite copy (the dbre-restore flow tries the offsite repositories in turn).")
    if bad or not report["ok"]:
        todo.append("Take a new backup of each database named (the dbre-backup flow with *full* ticked stores every "
                    "page again in new packs), then run this validation again.")
    md += failures([(p["object"], p["detail"]) for p in report["problems"]]
                   + [(f"restore check of {c['db']}", "; ".join(c["problems"])) for c in bad], todo)
    table = [{"db": c["db"], "snapshot": c.get("snapshot"), "taken_at": c.get("taken_at"), "size": c.get("size"),
              "tables": c.get("tables"), "restore_seconds": c.get("restore_seconds"),
              "check_seconds": c.get("check_seconds"), "result": "ok" if c["ok"] else "; ".join(c["problems"])}
             for c in checks]
    publish("verify", "\n".join(md), table, [(primary, f"repository {primary}")], description="integrity validation")
