"""The snapshots of a database, seen from the Prefect UI: what the on-call engineer looks at before filling
the restore form (an id to paste into *snapshot*, or a time for *at*), as `dbre snapshots` shows them."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dbre.errors import UsageError
from dbre.units import human_bytes
from flows.common import check_known, load, publish, refused, repos
from flows.names import from_parameters, snapshots_name
from flows.references import KeyRef, refuse_literal_secrets, store_references_only
from tasks.backup import list_snapshots


@store_references_only
@flow(name="dbre-snapshots", flow_run_name=from_parameters(snapshots_name, "snapshots"), persist_result=False)
def snapshots_flow(database: str | None = None, last: int = 20, policy: str | None = None, repo: str | None = None,
                   key: KeyRef = None) -> list[dict[str, Any]]:
    """List the newest snapshots of a database (or of every database), newest first, as a table artifact.

    Args:
        database: Database name (empty: every database in the repository)
        last: How many of the newest snapshots to show (per database)
        policy: Policy file on the worker (default: $DBRE_POLICY); its primary repository and key
        repo: Repository URL or path, instead of the policy's primary
        key: Repository key, as a reference: secret:NAME (a Prefect Secret block), a Secret block, or env:NAME
    """
    refuse_literal_secrets("snapshots", key=key)
    pol = load(policy)
    r = repos(pol, repo, None, key)
    if database:
        try:  # (a typo: one line naming the known databases, no traceback, the run Failed)
            check_known([database], pol, r.primary, r.key, "snapshots")
        except UsageError as err:
            return refused(err)
    every = list_snapshots(r.primary, r.key, database or None)
    names = sorted({s["db"] for s in every})
    shown: list[dict[str, Any]] = []
    md = [f"# Snapshots of {database or 'every database'}", ""]
    for name in names:
        mine = [s for s in every if s["db"] == name]
        newest = list(reversed(mine))[:max(1, last)]
        regular = [s for s in mine if "safety" not in (s.get("tags") or [])] or mine
        md.append(f"- **{name}**: {len(mine)} snapshots, oldest {mine[0]['taken_at']}, newest "
                  f"{regular[-1]['taken_at']} (`{regular[-1]['id']}`)")
        for s in newest:
            source = s.get("source") or {}
            shown.append({"db": name, "id": s["id"], "taken_at (UTC)": s["taken_at"], "size": human_bytes(s["size"]),
                          "added": human_bytes(s["bytes_added"]), "tags": ", ".join(s.get("tags") or []) or "-",
                          "source": source.get("path") or source.get("url") or "-"})
    if not names:
        md.append(f"No snapshots{f' of `{database}`' if database else ''} in `{r.primary}`.")
    md += ["", "Paste an id into the restore form's *snapshot*, or give a time in *at* (a replicated database "
           "restores any moment of its PITR window exactly: `dbre stats` shows the window)."
           + (" The table artifact lists them." if shown else "")]
    publish(f"snapshots-{database or 'all'}", "\n".join(md), shown,
            description=f"snapshots of {database or 'every database'} in {r.primary}")
    return shown
