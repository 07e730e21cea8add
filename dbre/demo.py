"""`make demo`: the main job end to end on a sample shop database, as Prefect flow runs.

    python -m dbre.demo [--out DIR]      # DIR defaults to ./demo-output, emptied first (but DIR/prefect)
    python -m dbre.demo --cli            # the same through the `dbre` CLI only: quicker, no Prefect
    python -m dbre.demo --scale 0.1      # a smaller sample database (1 is about 48 MiB)

Builds a ~50 MB WAL-mode database (customers, products, orders, order_items, with foreign keys
and indexes), backs it up into a local-directory repository, changes rows, backs up again
(incrementally), lists the snapshots, verifies every byte, restores the newest snapshot and
compares it with the source (sqldiff when installed, else per-table row counts and content
checksums), then restores the first snapshot and shows it holds the rows of before the changes.

The backups, the verification and the restores are runs of the Prefect flows in flows/ (backup,
verify, restore), started from this process; after each the demo reads the run back through the
Prefect client and prints its name, state, duration and the artifacts it published. Where they
go: when PREFECT_API_URL is set (in the environment or the active Prefect profile), to that
server, and they show in its UI; otherwise to a temporary API server that Prefect starts for this
process (15-30 s here, so it starts in the background while the sample database is built), with
PREFECT_HOME in DIR/prefect: its database keeps the runs after the demo ends, and the next demo
keeps it too (the runs of every demo stay browsable, and the server starts sooner: no migrations).
Prefect's console logs are off (--prefect-logs shows them); the runs' logs go to the API anyway.

This is the one module of dbre that uses Prefect, and only inside its functions: `import dbre.demo`
and the --cli path never import it. Each step is one function taking the shared ``DemoContext``.
Exit status 0 when every step passed, 1 when one failed (the rest are skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

DB_NAME = "shop"
MARKER = ".dbre-demo"  # only a folder holding this is emptied at the start of a run
PREFECT_DIR = "prefect"  # PREFECT_HOME of the temporary API server, under --out
SEED = 7

SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA foreign_keys=ON;
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    city TEXT NOT NULL,
    address TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents > 0)
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    ship_to TEXT NOT NULL,
    note TEXT
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE INDEX orders_status ON orders(status, created_at);
CREATE TABLE order_items (
    order_id INTEGER NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    line INTEGER NOT NULL,
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    price_cents INTEGER NOT NULL,
    PRIMARY KEY (order_id, line)
);
CREATE INDEX order_items_product ON order_items(product_id);
"""
TABLES = ("customers", "products", "orders", "order_items")
STATUSES = ("new", "paid", "shipped", "delivered", "returned")


class DemoError(Exception):
    """A step failed; the message says which check and why."""


@dataclass
class PrefectSetup:
    """Where the flow runs go (the user's API, or a temporary server on PREFECT_HOME under --out) and how
    the start of that API went; ``start`` begins it in the background, ``wait`` joins it."""

    user_api: str | None = None  # the user's PREFECT_API_URL: the runs go there
    home: Path | None = None  # the PREFECT_HOME the demo set for a temporary server
    api_url: str = ""  # the API the client reached
    ready_after: float = 0.0  # seconds from ``start`` until the API answered
    error: BaseException | None = None
    thread: threading.Thread | None = None
    runs: list[tuple[str, str]] = field(default_factory=list)  # (flow run name, state name), in order

    def start(self) -> None:
        self.thread = threading.Thread(target=self._connect, name="prefect-start", daemon=True)
        self.thread.start()

    def _connect(self) -> None:
        started = time.perf_counter()
        try:
            from prefect import get_client

            for module in ("backup", "verify", "restore"):  # their imports overlap the build too
                flow_module(module)

            with get_client(sync_client=True) as client:  # without an API URL this starts the temporary server
                self.api_url = str(client.api_url).rstrip("/")
                problem = client.api_healthcheck()
            if problem is not None:
                raise problem
        except BaseException as err:  # noqa: BLE001 - reported by the step that waits for it
            self.error = err
        self.ready_after = time.perf_counter() - started

    def wait(self) -> None:
        if self.thread is None:
            self.start()
        assert self.thread is not None
        self.thread.join()


@dataclass
class DemoContext:
    """What the steps share: where things are, and what earlier steps found."""

    out: Path
    dbre: list[str]
    prefect: PrefectSetup | None = None  # None: the --cli path, no Prefect at all
    scale: float = 1.0  # of the sample database: 1 is about 48 MiB
    db_file: str = "shop.db"
    repo: str = "repo"
    counts_first: dict[str, int] = field(default_factory=dict)  # rows when the full backup ran
    counts_now: dict[str, int] = field(default_factory=dict)  # rows after the writes
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # backup --json outputs, in order

    @property
    def db_path(self) -> Path:
        return self.out / self.db_file


@dataclass
class StepReport:
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def prefect_command() -> str:
    """How to call the `prefect` script that belongs to this interpreter (a venv's when not activated)."""
    script = Path(sys.executable).parent / "prefect"
    if not script.exists() or shutil.which("prefect") == str(script):
        return "prefect"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def dbre_command() -> list[str]:
    """The installed `dbre` script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "dbre"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dbre.cli"]


def run_dbre(ctx: DemoContext, report: StepReport, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one `dbre` command in the demo folder, as a user would; DemoError on a non-zero exit."""
    report.add(f"[dim]$ dbre {shlex.join(args)}[/]")
    env = {**os.environ, "COLUMNS": "140"}  # room for the snapshots table when not on a terminal
    proc = subprocess.run([*ctx.dbre, *args], cwd=ctx.out, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DemoError(f"`dbre {args[0]}` exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# -- Prefect --------------------------------------------------------------------------------------


def flow_module(name: str) -> Any:
    """``flows.<name>``, imported when a step needs it: dbre never imports Prefect at module level (mypy,
    which checks dbre, sees an Any here rather than following into flows/ and tasks/)."""
    return importlib.import_module(f"flows.{name}")


def configured_api_url() -> str | None:
    """The PREFECT_API_URL the user set: in the environment, else in the active profile of their profiles file."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = str(profiles.get("profiles", {}).get(name, {}).get("PREFECT_API_URL") or "").strip()
    return value or None


def configure_prefect(out: Path, prefect_logs: bool = False) -> PrefectSetup:
    """Set Prefect's environment for this process; it must come before Prefect is first imported."""
    setup = PrefectSetup(user_api=configured_api_url())
    if setup.user_api is None:  # a temporary API server, its database in the demo folder
        setup.home = out / PREFECT_DIR
        setup.home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(setup.home)
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # else telemetry, and "database is locked"
        # the demo uses no blocks: registering every block type at start costs the server ~5 s of CPU
        os.environ.setdefault("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")  # 15-30 s here, 20 s default
    if not prefect_logs:  # the runs' logs still go to the API (the UI shows them); the console gets warnings
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.pop("DBRE_POLICY", None)  # the flows would take repositories and keys from a policy file
    return setup


def connect_prefect(ctx: DemoContext, report: StepReport) -> None:
    """Wait for the Prefect API the flow runs report to (started in the background at the beginning)."""
    setup = _prefect(ctx)
    setup.wait()
    where = f"your Prefect API at {setup.user_api} (PREFECT_API_URL)" if setup.user_api else \
        "Prefect's temporary API server"
    if setup.error is not None:
        raise DemoError(f"cannot reach {where}: {type(setup.error).__name__}: {setup.error}")
    if setup.user_api:
        report.add(f"{where} answers: the flow runs go there and show in its UI")
    else:
        report.add(f"{where} at {setup.api_url} answered {setup.ready_after:.1f} s after it was started "
                   "(in the background, during step 1)")
        report.add(f"PREFECT_HOME={setup.home}: its database keeps the flow runs and their artifacts")


def _prefect(ctx: DemoContext) -> PrefectSetup:
    if ctx.prefect is None:
        raise DemoError("this step runs a Prefect flow: run the demo without --cli")
    return ctx.prefect


def run_flow(ctx: DemoContext, report: StepReport, flow: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a flow here and now; report the run as the API has it (name, state, duration, artifacts).

    Returns the flow's result; DemoError when the run did not complete."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    setup = _prefect(ctx)
    state = flow(*args, return_state=True, **kwargs)
    run_id = state.state_details.flow_run_id
    if run_id is None:
        raise DemoError(f"flow {flow.name} did not start a run: {state.name}: {state.message}")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])),
            sort=ArtifactSort.KEY_ASC)
    artifacts = [a for a in artifacts if a.key]  # not the unnamed result records Prefect keeps of a failure
    state_name = str(run.state.name if run.state else state.name)
    setup.runs.append((run.name, state_name))
    report.add(f"flow run [bold]{escape(run.name)}[/] of {flow.name}: {state_name} in "
               f"{run.total_run_time.total_seconds():.2f} s, {len(artifacts)} artifacts")
    for a in artifacts:
        report.add(f"  artifact {a.key} ({a.type}): {escape(_preview(a.type, a.data))}")
    if setup.user_api:
        from prefect.utilities.urls import url_for

        link = url_for(run)
        if link:
            report.add(f"  [dim]{link}[/]")
    if not state.is_completed():
        raise DemoError(f"flow run {run.name!r} of {flow.name} ended {state_name}: {state.message}")
    return state.result()


def _preview(kind: str | None, data: Any) -> str:
    """One line saying what an artifact holds: a table's size, a markdown document's first line."""
    if kind == "table":
        rows = json.loads(data) if isinstance(data, str) else data
        if not isinstance(rows, list):
            return "a table"
        columns = ": " + ", ".join(rows[0]) if rows and isinstance(rows[0], dict) else ""
        return f"{len(rows)} row{'' if len(rows) == 1 else 's'}{columns}"
    first = next((line.strip() for line in str(data).splitlines() if line.strip()), "")
    return first if len(first) <= 100 else first[:99] + "…"


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def row_counts(path: Path) -> dict[str, int]:
    conn = _connect(path)
    try:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}
    finally:
        conn.close()


def table_digests(path: Path) -> dict[str, str]:
    """Per table: sha256 over every row, in primary-key order (a comparison that needs no sqldiff)."""
    conn = _connect(path)
    out = {}
    try:
        for t in TABLES:
            order = "order_id, line" if t == "order_items" else "id"
            h = hashlib.sha256()
            for row in conn.execute(f"SELECT * FROM {t} ORDER BY {order}"):
                h.update(repr(row).encode())
            out[t] = h.hexdigest()
    finally:
        conn.close()
    return out


# -- the steps -----------------------------------------------------------------------------------


def build_sample_database(ctx: DemoContext, report: StepReport) -> None:
    """A shop: 40k customers, 3k products, 125k orders with about 310k order lines, WAL mode (times ``scale``)."""
    rng = random.Random(SEED)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(1500)]
    cities = [w.capitalize() for w in words[:200]]
    days = [f"2024-{m:02d}-{d:02d} {h:02d}:{mi:02d}" for m in range(1, 13) for d in range(1, 29)
            for h, mi in ((9, 5), (13, 40), (18, 15))]

    def text(k: int) -> str:
        return " ".join(rng.choices(words, k=k))

    # pools of names, streets and notes drawn once; rows pick from them by a fixed hash (fast)
    names = [f"{rng.choice(words).capitalize()} {rng.choice(words).capitalize()}" for _ in range(7919)]
    streets = [f"{rng.randint(1, 999)} {text(3)} street, {rng.choice(cities)}" for _ in range(7907)]
    notes = [text(5 + n % 20) for n in range(7901)]

    def pick(pool: list[str], i: int) -> str:
        return pool[(i * 2654435761) % len(pool)]

    n_customers, n_products, n_orders = (max(1, round(n * ctx.scale)) for n in (40_000, 3_000, 125_000))
    prices = [rng.randrange(199, 99_999) for _ in range(n_products)]
    conn = _connect(ctx.db_path)
    conn.executescript(SCHEMA)
    conn.execute("PRAGMA synchronous=OFF")  # a sample: nothing to lose if the machine dies mid-build
    conn.execute("PRAGMA cache_size=-131072")  # the whole build in memory until COMMIT: no spills
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?)", (
        (i, pick(names, i), f"customer{i}@example.com", cities[i % len(cities)], pick(streets, i),
         days[i * 31 % len(days)]) for i in range(1, n_customers + 1)))
    conn.executemany("INSERT INTO products VALUES (?,?,?,?,?)", (
        (i, f"SKU-{i:06d}", text(3).title(), text(150 + i % 100), prices[i - 1]) for i in range(1, n_products + 1)))
    conn.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?)", (
        (i, (i * 40503) % n_customers + 1, STATUSES[i * 7 % len(STATUSES)], days[i * 17 % len(days)],
         pick(streets, i * 3), pick(notes, i) if i % 5 < 3 else None)
        for i in range(1, n_orders + 1)))

    # one to four lines per order, products spread by a fixed hash: generated inside SQLite (fast)
    conn.execute(f"""
        INSERT INTO order_items (order_id, line, product_id, quantity, price_cents)
        SELECT o.id, l.n, p.id, l.n % 3 + 1, p.price_cents
        FROM orders AS o
        JOIN (SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) AS l ON l.n <= o.id % 4 + 1
        JOIN products AS p ON p.id = 1 + (o.id * 7919 + l.n * 104729) % {n_products}
        ORDER BY o.id, l.n""")
    conn.execute("COMMIT")
    conn.close()
    ctx.counts_first = row_counts(ctx.db_path)
    size = ctx.db_path.stat().st_size + _wal_size(ctx.db_path)
    report.add(f"{ctx.db_path.name}: {human(size)}, WAL mode; "
               + ", ".join(f"{t} {n:,}" for t, n in ctx.counts_first.items()))


def _wal_size(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def full_backup(ctx: DemoContext, report: StepReport) -> None:
    """The first backup of the database: a full snapshot into a new local repository."""
    _backup(ctx, report, "full")


def _backup(ctx: DemoContext, report: StepReport, kind: str) -> None:
    if ctx.prefect is None:
        proc = run_dbre(ctx, report, "backup", ctx.db_file, "--repo", ctx.repo, "--db", DB_NAME, "--json")
        s = json.loads(proc.stdout)  # docs/JSON.md's vocabulary (added_bytes)
    else:
        s = run_flow(ctx, report, flow_module("backup").backup_flow, DB_NAME, source=str(ctx.db_path),
                     repo=str(ctx.out / ctx.repo), copy_offsite=False)["snapshot"]
        s = {**s, "added_bytes": s["bytes_added"]}  # the flow returns the core's dict
    if (s["parent"] is None) != (kind == "full"):
        raise DemoError(f"expected a {kind} backup, got parent={s['parent']}")
    ctx.snapshots.append(s)
    report.add(f"snapshot {s['id']} ({kind}): {s['pages']:,} pages, {human(s['size'])}; added {s['pages_added']:,} "
               f"pages, {human(s['added_bytes'])} to the repository in {s['seconds']:.2f} s")


def write_changes(ctx: DemoContext, report: StepReport) -> None:
    """What a day of business does: status updates, a cancelled batch deleted, new customers and orders."""
    rng = random.Random(SEED + 1)
    conn = _connect(ctx.db_path)
    conn.execute("BEGIN")
    top = ctx.counts_first["orders"]
    updated = conn.executemany("UPDATE orders SET status='shipped' WHERE id=?",
                               [(i,) for i in rng.sample(range(1, top + 1), 400)]).rowcount
    gone = [(i,) for i in rng.sample(range(1, top + 1), 100)]
    deleted_items = conn.executemany("DELETE FROM order_items WHERE order_id=?", gone).rowcount
    deleted = conn.executemany("DELETE FROM orders WHERE id=?", gone).rowcount
    c0 = ctx.counts_first["customers"]
    conn.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?)", (
        (c0 + i, f"New Customer {i}", f"new{i}@example.com", "Springfield", f"{i} Evergreen Terrace",
         "2025-01-02 09:00") for i in range(1, 1001)))
    new_orders = [(top + i, c0 + rng.randint(1, 1000), "new", "2025-01-02 10:00", f"{i} Evergreen Terrace", None)
                  for i in range(1, 2001)]
    conn.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?)", new_orders)
    conn.executemany("INSERT INTO order_items VALUES (?,?,?,?,?)",
                     [(o[0], 1, rng.randint(1, ctx.counts_first["products"]), 1, 999) for o in new_orders])
    conn.execute("COMMIT")
    conn.close()
    ctx.counts_now = row_counts(ctx.db_path)
    report.add(f"updated the status of {updated:,} orders, deleted {deleted} orders ({deleted_items:,} order lines), "
               f"inserted 1,000 customers and 2,000 orders with their lines")
    report.add("rows now: " + ", ".join(f"{t} {n:,}" for t, n in ctx.counts_now.items()))


def incremental_backup(ctx: DemoContext, report: StepReport) -> None:
    """The second backup: only the pages that changed are stored."""
    _backup(ctx, report, "incremental")
    full, incr = ctx.snapshots[0], ctx.snapshots[-1]
    share = incr["added_bytes"] / max(1, full["added_bytes"])
    report.add(f"the incremental added {share:.0%} of what the full backup did")


def list_snapshots(ctx: DemoContext, report: StepReport) -> None:
    """`dbre snapshots`: the repository now holds both snapshots, the second with the first as parent."""
    proc = run_dbre(ctx, report, "snapshots", "--repo", ctx.repo, "--db", DB_NAME)
    report.lines.extend("  " + line for line in proc.stdout.rstrip().splitlines())
    listed = json.loads(run_dbre(ctx, report, "snapshots", "--repo", ctx.repo, "--db", DB_NAME,
                                 "--json").stdout)["snapshots"]
    report.lines.pop()  # the --json call is the demo's own check, not worth showing
    ids = [s["id"] for s in listed]
    if ids != [s["id"] for s in ctx.snapshots]:
        raise DemoError(f"snapshots lists {ids}, expected {[s['id'] for s in ctx.snapshots]}")


def verify_repository(ctx: DemoContext, report: StepReport) -> None:
    """Every manifest, page map and pack read back and checked (`dbre verify --read-data`); the flow
    also restores the newest snapshot to scratch and checks it against its manifest."""
    if ctx.prefect is None:
        proc = run_dbre(ctx, report, "verify", "--repo", ctx.repo, "--read-data")
        report.add(proc.stdout.strip())
        return
    res = run_flow(ctx, report, flow_module("verify").verify_flow, databases=[DB_NAME], repo=str(ctx.out / ctx.repo),
                   read_data=True, cycle_weeks=1, scratch_dir=str(ctx.out / "scratch"))
    r = res["repository"]
    report.add(f"{'ok' if r['ok'] else 'DAMAGED'}: {r['snapshots']} snapshots, {r['packs']} packs, "
               f"read {r.get('packs_read', 0)} packs ({human(r.get('bytes_read', 0))})")
    for c in res["checks"]:
        report.add(f"restore check of {c['db']}: snapshot {c['snapshot']} restored to scratch in "
                   f"{c['restore_seconds']:.2f} s, checked against its manifest in {c['check_seconds']:.2f} s: "
                   + ("ok" if c["ok"] else "; ".join(c["problems"])))


def restore_latest(ctx: DemoContext, report: StepReport) -> None:
    """Restore the newest snapshot to a new file."""
    _restore(ctx, report, "restored-latest.db")


def _restore(ctx: DemoContext, report: StepReport, target: str, snapshot: str | None = None) -> None:
    if ctx.prefect is None:
        args = ["restore", "--repo", ctx.repo, "--db", DB_NAME, "--to", target, "--json"]
        if snapshot:
            args[5:5] = ["--snapshot", snapshot]
        s = json.loads(run_dbre(ctx, report, *args).stdout)
    else:
        restore = flow_module("restore")
        request = restore.RestoreRequest(database=DB_NAME, snapshot=snapshot or "", target=str(ctx.out / target),
                                         dry_run=False, validate_result=True)
        s = run_flow(ctx, report, restore.restore_flow, request, repo=str(ctx.out / ctx.repo))["result"]
    report.add(f"snapshot {s['snapshot']} -> {target}: {human(s['size'])} in {s['seconds']:.2f} s"
               + ("; checked against its manifest (integrity, foreign keys, schema, row counts, checksums)"
                  if ctx.prefect else ""))


def compare_with_source(ctx: DemoContext, report: StepReport) -> None:
    """The restored file must equal the source: sqldiff, or row counts and content digests."""
    restored = ctx.out / "restored-latest.db"
    conn = sqlite3.connect(restored)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        conn.close()
    if integrity != "ok" or fk:
        raise DemoError(f"restored file fails its checks: integrity_check={integrity!r}, "
                        f"{len(fk)} foreign-key violations")
    report.add("integrity_check ok, foreign_key_check ok")
    sqldiff = shutil.which("sqldiff")
    if sqldiff:
        report.add(f"[dim]$ sqldiff {ctx.db_file} {restored.name}[/]")
        proc = subprocess.run([sqldiff, ctx.db_file, restored.name], cwd=ctx.out, capture_output=True, text=True)
        if proc.returncode != 0 or proc.stdout.strip():
            lines = proc.stdout.strip().splitlines()
            raise DemoError(f"sqldiff found differences ({len(lines)} lines), e.g. {lines[:3]} {proc.stderr.strip()}")
        report.add("comparison passed: sqldiff finds no difference between the source and the restored file")
        return
    src, dst = table_digests(ctx.db_path), table_digests(restored)
    counts = row_counts(restored)
    if src != dst or counts != ctx.counts_now:
        bad = [t for t in TABLES if src[t] != dst[t]]
        raise DemoError(f"restored file differs from the source in {bad or 'row counts'}")
    report.add("comparison passed: every table has the same rows and content digest as the source "
               "(sqldiff not installed)")


def restore_first(ctx: DemoContext, report: StepReport) -> None:
    """Restore the first (full) snapshot: it holds the rows from before the changes."""
    _restore(ctx, report, "restored-first.db", ctx.snapshots[0]["id"])
    counts = row_counts(ctx.out / "restored-first.db")
    for t in TABLES:
        report.add(f"{t:12} first snapshot {counts[t]:>8,}   now {ctx.counts_now[t]:>8,}   "
                   f"({ctx.counts_now[t] - counts[t]:+,})")
    if counts != ctx.counts_first:
        raise DemoError(f"first snapshot has rows {counts}, expected {ctx.counts_first}")
    if counts == ctx.counts_now:
        raise DemoError("first snapshot has the same row counts as now: the writes are missing from the test")
    report.add("row counts match the database as it was at the first backup, as expected")


Step = Callable[[DemoContext, StepReport], None]

STEPS: list[tuple[str, Step]] = [
    ("build a sample database", build_sample_database),
    ("full backup", full_backup),
    ("write changes (update, delete, insert)", write_changes),
    ("incremental backup", incremental_backup),
    ("list snapshots", list_snapshots),
    ("verify every byte of the repository", verify_repository),
    ("restore the newest snapshot to a new file", restore_latest),
    ("compare the restored file with the source", compare_with_source),
    ("restore the first snapshot", restore_first),
]

FLOW_STEPS = {full_backup, incremental_backup, verify_repository, restore_latest, restore_first}


def steps(setup: PrefectSetup | None) -> list[tuple[str, Step]]:
    """The demo's steps: with Prefect, its API joins after the build and the flow steps say so."""
    if setup is None:
        return STEPS
    out: list[tuple[str, Step]] = []
    for title, step in STEPS:
        if step is build_sample_database:
            out.append((title if setup.user_api else f"{title} (Prefect's temporary API server starts meanwhile)",
                        step))
            out.append(("connect to the Prefect API", connect_prefect))
        else:
            out.append((f"{title} [dim](Prefect flow run)[/]" if step in FLOW_STEPS else title, step))
    return out


def run(out: Path, console: Console, flows: bool = True, prefect_logs: bool = False, scale: float = 1.0) -> bool:
    """Run every step in order; False (and the rest skipped) as soon as one fails. ``flows=False``: CLI only."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            console.print(f"[bold red]{out} exists and is not a demo folder[/] (no {MARKER} in it): "
                          "pass --out with a new or empty folder")
            return False
        # all but Prefect's database: the runs of earlier demos stay browsable, and the temporary
        # server starts ~10 s sooner when its database needs no migrations
        for item in out.iterdir():
            if item.name == PREFECT_DIR:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m dbre.demo; emptied on every run\n")
    ctx = DemoContext(out=out.absolute(), dbre=dbre_command(), scale=scale)
    how = "through the dbre CLI"
    if flows:
        ctx.prefect = configure_prefect(ctx.out, prefect_logs)
        ctx.prefect.start()  # the API server takes 15-30 s to start: let it, while the database is built
        how = (f"as Prefect flow runs on your Prefect API {ctx.prefect.user_api}" if ctx.prefect.user_api
               else f"as Prefect flow runs (temporary API server, PREFECT_HOME={out / PREFECT_DIR})")
    console.print(f"[bold]dbre demo[/] in {out}/ (database {ctx.db_file}, repository {ctx.repo}/), {how}")
    plan = steps(ctx.prefect)
    started = time.perf_counter()
    for number, (title, step) in enumerate(plan, 1):
        report = StepReport()
        t0 = time.perf_counter()
        try:
            step(ctx, report)
        except Exception as err:  # noqa: BLE001 - any failure ends the demo with one clear line
            console.print(f"[bold red]{number}. {title}: FAILED[/] ({time.perf_counter() - t0:.2f} s)")
            for line in report.lines:
                console.print(f"     {line}", highlight=False)
            console.print(f"     [red]{type(err).__name__}: {err}[/]", highlight=False)
            return False
        console.print(f"[bold green]{number}. {title}[/] ({time.perf_counter() - t0:.2f} s)")
        for line in report.lines:
            console.print(f"     {line}", highlight=False, soft_wrap=True)
    repo_bytes = sum(f.stat().st_size for f in (ctx.out / ctx.repo).rglob("*") if f.is_file())
    console.print(f"[bold green]demo passed[/]: all {len(plan)} steps in {time.perf_counter() - started:.1f} s; "
                  f"repository {human(repo_bytes)} for 2 snapshots of a {human(ctx.db_path.stat().st_size)} database")
    if ctx.prefect is not None:
        runs = ctx.prefect.runs
        states = sorted({state for _, state in runs})
        console.print(f"{len(runs)} flow runs, {'all ' if len(states) == 1 else ''}{', '.join(states)}: "
                      + ", ".join(name for name, _ in runs), highlight=False)
        if ctx.prefect.user_api:
            console.print(f"see them, their logs and artifacts in your Prefect UI (API {ctx.prefect.user_api})",
                          highlight=False)
        else:
            console.print("the temporary API server stops with the demo; to browse these runs and their artifacts "
                          f"in the Prefect UI: PREFECT_HOME={out / PREFECT_DIR} {prefect_command()} server start",
                          highlight=False, soft_wrap=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbre.demo", description="Run dbre's main job end to end.")
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="working folder, emptied first (default ./demo-output)")
    parser.add_argument("--cli", action="store_true",
                        help="run backup, verify and restore through the dbre CLI instead of Prefect flows "
                             "(no Prefect: quicker)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="size of the sample database relative to the default ~48 MiB (0.05 to 20)")
    parser.add_argument("--prefect-logs", action="store_true",
                        help="show the flow runs' logs on the console (they always go to the Prefect API)")
    args = parser.parse_args(argv)
    if not 0.05 <= args.scale <= 20:
        parser.error("--scale must be between 0.05 and 20")
    console = Console() if sys.stdout.isatty() else Console(width=140)
    ok = run(args.out, console, flows=not args.cli, prefect_logs=args.prefect_logs, scale=args.scale)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
