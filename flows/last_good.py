"""Find the last good point from the UI (`dbre last-good`'s flow): bisect a database's timeline for the newest
state that passes integrity_check, the SQL checks and the Great Expectations suites, querying each probed state in
place; the probes and the point found are the run's artifacts, with the command that restores it. With
``restore_to`` and ``dry_run`` off, the point found is then restored there (a new file; an existing one only with
``force``), as the restore flow would."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from dbre.repository.manifest import check_db_name
from dbre.restore.lastgood import check_syntax
from flows.common import RunFailed, failures, load, publish, repos
from flows.names import from_parameters
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.restore import check_restored_file, find_last_good_point, restore_pitr, restore_whole


def last_good_name(db: str, restore_to: str | None = None, dry_run: bool = True, **_: Any) -> str:
    return f"last good point of {db}" + (" (then restore)" if restore_to and not dry_run else "")


@store_references_only
@flow(name="dbre-last-good", flow_run_name=from_parameters(last_good_name, "last good point"), persist_result=False)
def last_good_flow(db: str, checks: list[str] | None = None, since: datetime | None = None,
                   expectations: str | None = None, policy: str | None = None, repo: str | None = None,
                   key: KeyRef = None, restore_to: str | None = None, force: bool = False,
                   dry_run: bool = True) -> dict[str, Any]:
    """Find the newest good point of ``db`` (checks: read-only statements whose first column must be true, e.g.
    ``SELECT count(*) > 1000 FROM orders``; expectations: a folder of GX suites, ``<dir>/<db>/`` or ``<dir>``;
    since: search from that time, default the oldest point). It assumes the timeline is good up to some point and
    bad after: it finds that boundary in about log2(n) probes. Then, with ``restore_to`` and ``dry_run`` off,
    restores the point found to that path."""
    refuse_literal_secrets("last-good", key=key)
    check_db_name(db)
    checks = list(checks or [])
    check_syntax(checks)  # (a typo fails the run before any request)
    since = since if since is None or since.tzinfo else since.replace(tzinfo=UTC)
    pol = load(policy)
    r = repos(pol, repo, None, key)
    found = find_last_good_point(r.primary, db, checks, since, expectations, r.key)
    command = _command(r.primary, db, found, restore_to or f"{db}-last-good.db")
    restored = None
    if found["found"] is not None and restore_to and not dry_run:
        point = found["found"]
        if point["txid"] is not None:
            restored = restore_pitr(r.primary, db, restore_to, txid=point["txid"], force=force, key=r.key)
        else:
            restored = restore_whole(r.primary, db, restore_to, snapshot=point["snapshot"], force=force, key=r.key)
        check = check_restored_file(restore_to)
        restored = {**restored, "check": check}
        if not check["ok"]:
            _publish(db, found, command, restored)
            raise RunFailed(f"the point found restored to {restore_to} but fails its checks: "
                            + "; ".join(check["problems"][:3]))
    _publish(db, found, command, restored)
    if found["found"] is None:
        bad = found["first_bad"] or {}
        why = f"{bad.get('failed') or 'a check'}" + (f": {bad['detail']}" if bad.get("detail") else "")
        raise RunFailed(f"no good point of {db} since {found['since'] or 'the oldest point'}: the oldest probed "
                        f"fails {why}")
    get_run_logger().info("last good point of %s: %s; to restore it: %s", db, _label(found["found"]), command)
    return {**found, "restore_command": command, "restored": restored}


def _label(point: dict[str, Any]) -> str:
    return f"snapshot {point['snapshot']}" if point.get("snapshot") else f"txid {point['txid']}"


def _command(repo: str, db: str, found: dict[str, Any], to: str) -> str | None:
    import shlex

    args = found.get("restore_args")
    return shlex.join(["dbre", "restore", "--repo", repo, "--db", db, *args, "--to", to]) if args else None


def _publish(db: str, found: dict[str, Any], command: str | None, restored: dict[str, Any] | None) -> None:
    probes = [{"time": p["time"], "point": _label(p), "result": p["result"],
               "failed check": f"{p['failed']}: {p['detail']}" if p["failed"] else (p["integrity"] or ""),
               "read": p["bytes_read"], "seconds": p["seconds"]} for p in found["probes"]]
    point = found["found"]
    bad = found["first_bad"]
    why = (f"{bad['failed'] or 'a check'}" + (f": {bad['detail']}" if bad["detail"] else "")) if bad else ""
    when = {_label(p): p["time"] for p in found["probes"]}
    good = sum(1 for p in probes if p["result"] == "good")
    md = [f"# Last good point of `{db}`: " + (f"**{_label(point)}**" if point else "**none found**"), "",
          f"- Searched {found['points']} points ({'since ' + found['since'] if found['since'] else 'all of them'}) "
          f"in {len(probes)} probes ({good} good, {len(probes) - good} bad; each in the table artifact), "
          f"{found['seconds']} s; each state read in place, nothing restored to probe it"]
    if point:
        md.append(f"- Found: **{_label(point)}** ({when.get(_label(point))})")
    if point and bad:
        md.append(f"- The next point, {_label(bad)}, is bad: {why}")
    if command:
        md.append(f"- To restore it: `{command}`")
    if restored:
        md.append(f"- Restored to `{restored['target']}`: checks {'ok' if restored['check']['ok'] else 'FAILED'}")
    md += [f"- Assumes: {found['assumes']}", ""]
    failed, todo = [], []
    if point is None:
        failed.append((f"no good point since {found['since'] or 'the oldest point'}",
                       f"the oldest point probed, {_label(bad)}, fails {why}" if bad else "every probe failed"))
        todo += ["If the check is right, the damage is older than the search: start it again with an earlier "
                 "*since*, or restore from an offsite repository that keeps older snapshots.",
                 "If the check is wrong (it must be true on a good state), correct it and start again."]
    if restored and not restored["check"]["ok"]:
        failed.append((f"restored file {restored['target']}", "; ".join(restored["check"]["problems"][:3])))
        todo.append(f"Do not use `{restored['target']}`: the point passed its probe but the restored file fails its "
                    "checks; restore the same point again to a new file, or an earlier point.")
    md += failures(failed, todo)
    publish("last-good", "\n".join(md), probes, description=f"last good point of {db}")
