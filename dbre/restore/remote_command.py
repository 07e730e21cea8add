"""`dbre restore --repo R --db NAME --into URL`: the options checked, the database restored to a
scratch file, the load planned and shown (--dry-run) or applied, the result printed. Called by
dbre/cli_restore.py; the token comes from the environment there."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from dbre.errors import DbreError, UsageError
from dbre.restore.remote import HranaTarget, LoadPlan, apply_load, plan_load, restore_scratch
from dbre.secrets import Secret
from dbre.units import human_bytes

REMOTE_SCHEMES = ("libsql://", "http://", "https://", "ws://", "wss://")


def is_remote_url(value: str | None) -> bool:
    return value is not None and value.strip().lower().startswith(REMOTE_SCHEMES)


def run_remote_restore(repository: Any, db: str, url: str, token: Secret | None, *, namespace: str | None,
                       snapshot: str | None, newest_snapshot: bool, at: datetime | None, force: bool,
                       dry_run: bool, json_out: bool, progress: Callable[[], Any],
                       admin_url: str | None = None) -> None:
    """Restore to a scratch file, then plan the load into ``url``; show it (dry run) or apply and verify.
    ``admin_url`` (sqld's admin API, key in LIBSQL_ADMIN_AUTH_KEY): create ``namespace`` first, and delete
    it again if the load fails."""
    import apsw

    admin = None
    if admin_url is not None:
        import os

        from dbre.provider.sqld import ADMIN_KEY_ENV, SqldAdmin, check_namespace

        if namespace is None:
            raise UsageError("--admin-url with --into URL creates a namespace: name it with --into-namespace",
                             "or drop --admin-url to load into an existing database")
        if force:
            raise UsageError("--force with --admin-url: the namespace is new, there is nothing to replace",
                             "drop --force")
        check_namespace(namespace, "--into-namespace")
        key = os.environ.get(ADMIN_KEY_ENV, "").strip()
        admin = SqldAdmin(admin_url, Secret(key) if key else None)
    target = HranaTarget(url, token, namespace=namespace)
    with tempfile.TemporaryDirectory(prefix="dbre-into-") as tmp:
        path = Path(tmp) / f"{db}.db"
        what = restore_scratch(repository, db, path, snapshot=snapshot, at=at, newest_snapshot=newest_snapshot)
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            plan = plan_load(conn, target, force=force, source=what, new=admin is not None)
            if dry_run:
                if admin is not None and not json_out:
                    print(f"would create namespace {namespace} through {admin.url}")
                _show_plan(plan, target, json_out)
                return
            if admin is not None:
                admin.create(namespace or "")
            try:
                with progress() as bar:
                    result = apply_load(conn, target, plan, bar)
            except BaseException:
                if admin is not None:  # (ours: created above) the target is as it was: not there
                    try:
                        admin.delete(namespace or "")
                    except DbreError:
                        pass
                raise
        finally:
            conn.close()
    s = result.summary()
    if json_out:
        from dbre.cli import _print_json  # (the CLI's one JSON interface: schema, vocabulary)

        _print_json({**s, "target": target.label})
    else:
        if result.dropped:
            print(f"dropped {result.dropped} user objects in {target.label} first (--force)")
        print(f"loaded {what} into {target.label}: {len(plan.tables)} tables, {plan.rows} rows, "
              f"{human_bytes(plan.bytes)} in {result.batches} batches, {s['indexes']} indexes, {s['views']} views, "
              f"{s['triggers']} triggers ({s['load_seconds']:.2f} s, {s['rows_per_second']} rows/s, "
              f"{s['mib_per_second']} MiB/s)")
    differ = [c for c in result.checks if not c.equal]
    if differ:
        from dbre.errors import RestoreError

        names = ", ".join(f"{c.name} ({c.remote_rows} rows, {c.rows} restored"
                          + (", contents differ" if c.rows == c.remote_rows else "") + ")" for c in differ)
        raise RestoreError(f"restore into {target.label}: the target differs from the restore: {names}",
                           "the load is left in place for inspection; rerun with --force to load it again")
    if not json_out:
        print(f"target equals snapshot: {len(result.checks)} tables, same row counts and row digests "
              f"({s['verify_seconds']:.2f} s)")


def _show_plan(plan: LoadPlan, target: HranaTarget, json_out: bool) -> None:
    d = plan.describe()
    if json_out:
        from dbre.cli import _print_json

        _print_json({"dry_run": True, "target": target.label, **d})
        return
    if plan.force and plan.existing:
        print(f"would drop {len(plan.existing)} user objects in {target.label} first (one transaction): "
              + ", ".join(f"{k} {n}" for k, n in plan.existing))
    print(f"would load {plan.source} into {target.label}: {len(plan.tables)} tables, {plan.rows} rows, "
          f"{human_bytes(plan.bytes)} in batches of {human_bytes(plan.batch_bytes)}, then {d['indexes']} indexes, "
          f"{d['views']} views, {d['triggers']} triggers"
          + (f", {len(plan.sequences)} AUTOINCREMENT counters" if plan.sequences else "")
          + (f", user_version {plan.user_version}" if plan.user_version else ""))
    for t in plan.tables:
        print(f"  {t.name}: {t.rows} rows, {human_bytes(t.bytes)}")
    print("dry run: nothing changed in the target")


def check_into_options(**given: object) -> None:
    """Options that mean nothing for a load into a remote database: refused in one line."""
    bad = [k for k, v in given.items() if v]
    if bad:
        raise UsageError(f"{', '.join(bad)} cannot be used with --into URL (a load into a remote database)",
                         "drop them")
