"""Backup one database: a snapshot (incremental against its newest one), then the offsite copies."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from dbre.errors import UsageError
from dbre.units import human_bytes as human
from flows.common import RunFailed, failures, load, outcome, publish, refused, repos
from flows.names import backup_name, from_parameters
from flows.references import KeyRef, TokenRef, refuse_literal_secrets, store_references_only
from tasks.backup import backup_database, copy_to_offsite


@store_references_only
@flow(name="dbre-backup", flow_run_name=from_parameters(backup_name, "backup"), persist_result=False)
def backup_flow(db: str, source: str | None = None, policy: str | None = None, repo: str | None = None,
                offsite: list[str] | None = None, copy_offsite: bool = True, key: KeyRef = None,
                token: TokenRef = None, checksums: bool | None = None, full: bool = False,
                accept_new_source: bool = False) -> dict[str, Any]:
    """Back up ``db`` (from ``source`` or the policy) into the primary repository, then copy it offsite.

    Every backup is incremental forever: only pages not already in the repository are stored, so
    a first backup is just a backup; ``full`` stores every page again in new packs, reusing nothing
    of the previous snapshot (breaks the chain); ``accept_new_source`` accepts that ``db`` now lives at
    another path or URL than its snapshots came from (else such a backup is refused, nothing
    written: a different database under the same name). Parameters override the policy; ``key`` and ``token`` are
    references (env:NAME or prefect-secret:BLOCK), never values."""
    refuse_literal_secrets("backup", key=key, token=token)
    log = get_run_logger()
    pol = load(policy)
    entry = None
    primary = repo or "R"
    try:  # a name or setting typed into the form: one line and the summary, no traceback, before any work
        r = repos(pol, repo, offsite, key)
        primary = r.primary
        if pol is not None:  # an explicit source may name a database the policy does not list
            entry = pol.database(db) if source is None else next((d for d in pol.databases if d.name == db), None)
        src = source or (entry.source if entry else None)
        if not src:
            raise UsageError(f"no source for database {db!r}", "pass source, or list the database in the policy")
    except UsageError as err:
        _publish_failure(db, primary, str(err))
        return refused(err)
    try:
        snap = backup_database(db, src, r.primary, r.key, token or (entry.auth_token if entry else None),
                               checksums if checksums is not None else (entry.checksums if entry else None),
                               entry.namespace if entry else None, full, accept_new_source,
                               entry.replica_url if entry else None)
    except Exception as err:  # the run still fails with this error; the summary says it and what to do first
        _publish_failure(db, r.primary, str(err) or type(err).__name__)
        raise
    if snap.get("note"):
        log.warning("%s: %s", db, snap["note"])
    log.info("snapshot %s of %s: %s, %s added", snap["id"], db, human(snap["size"]), human(snap["bytes_added"]))
    copies = []
    for target in r.offsite if copy_offsite else []:
        ok, res = outcome(copy_to_offsite(r.primary, target, r.key, db, return_state=True))
        copies.append(res if ok else {"offsite": target, "error": res})
    failed = [c for c in copies if "error" in c]
    kind = "incremental" if snap["parent"] else "first"
    rows = [{"step": "backup", "repository": r.primary, "snapshot": snap["id"],
             "kind": kind, "size": human(snap["size"]),
             "added": human(snap["bytes_added"]), "seconds": snap["seconds"], "result": "ok"}]
    rows += [{"step": "copy", "repository": c["offsite"], "snapshot": snap["id"],
              "added": human(c.get("bytes_copied")), "result": c.get("error", "ok")} for c in copies]
    md = [f"# Backup of `{db}`: " + (f"{len(failed)} of {len(copies)} offsite copies FAILED" if failed else "ok"), "",
          f"Snapshot **{snap['id']}** ({kind}) taken {snap['taken_at']}: {snap['pages']} pages, "
          f"{human(snap['size'])}; {snap['pages_added']} new pages ({human(snap['bytes_added'])} added) in "
          f"{snap['seconds']:.2f} s.", ""]
    if copies:
        md += [f"Offsite copies: {len(copies) - len(failed)} of {len(copies)} up to date.", ""]
    md += failures([(f"copy to {c['offsite']}", c["error"]) for c in failed], [
        "The snapshot is in the primary repository: only the offsite copy is behind.",
        "Fix what the error names (credentials, network, the bucket), then start this run again, or copy now: "
        f"`dbre copy --repo {r.primary} --to <offsite> --db {db}`."])
    publish(f"backup-{db}", "\n".join(md), rows, [(u, f"repository {u}") for u in [r.primary, *r.offsite]],
            description=f"backup of {db}")
    if failed:
        raise RunFailed(f"backup of {db} succeeded but {len(failed)} offsite copies failed: "
                        + "; ".join(f"{c['offsite']}: {c['error']}" for c in failed))
    return {"snapshot": snap, "copies": copies}


def _publish_failure(db: str, primary: str, error: str) -> None:
    """The summary of a backup that failed: the error and what to do (there is no table: no step finished)."""
    md = [f"# Backup of `{db}`: FAILED", "", *failures([(f"backup of {db}", error)], [
        "Fix what the error names (the source, its token, the repository), then start this run again.",
        f"Until then the newest restorable point is an earlier one: `dbre snapshots --repo {primary} --db {db}` "
        "lists them."])]
    publish(f"backup-{db}", "\n".join(md), links=[(primary, f"repository {primary}")], description=f"backup of {db}")
