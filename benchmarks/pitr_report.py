"""The PITR benchmark's tables: Litestream and dbre side by side per target and rate, then the application's view."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

NA = "[dim]not available[/]"


def _num(v: Any, unit: str = "", fmt: str = ".2f") -> str:
    return "-" if v is None else f"{format(v, fmt)}{unit}"


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _rows(r: dict[str, Any] | None, reason: str | None) -> list[str]:
    """The column of one run, in the order of ``LABELS``."""
    if r is None:
        return [NA if reason else "-"] + [""] * (len(LABELS) - 1)
    if "error" in r:
        return [f"[red]failed: {r['error'][:60]}[/]"] + [""] * (len(LABELS) - 1)
    lag, at, newest, w = r["lag"], r["restores_at"], r["newest_restore"], r["writer"]
    shut = r.get("shutdown", {})
    return [
        _num(r["snapshot_seconds"], " s"),
        f"{w['commits']} ({w['rate_achieved']:g}/s)",
        _num(lag.get("median_s"), " s", ".3f"),
        _num(lag.get("p99_s"), " s", ".3f"),
        _num(lag.get("worst_s"), " s", ".3f"),
        f"{lag['commits_measured']} commits, {lag['pairs']} pairs",
        f"{at['exact']}/{at['count']}",
        f"{at['within_precision']}/{at['count']}",
        f"{_num(at['worst_missing_ms'], ' ms', '.0f')} / {at['after_time']}",
        _num(newest["seconds"], " s") + ("" if newest["holds_every_commit"] else " [red]incomplete[/]"),
        _mb(r["stored_bytes"]),
        str(r["objects"]),
        f"exit {shut.get('exit_code')}, {_num(shut.get('seconds'), ' s')}",
    ]


LABELS = [
    "initial snapshot (start -> restorable)",
    "commits written",
    "commit-to-durable lag: median",
    "  p99",
    "  worst",
    "  measured over",
    "restores at random T: exact to the commit (writer's log)",
    "  exact but for commits in the 100 ms before T",
    "  worst missing before T / restores with commits after T",
    "restore of the newest state",
    "stored bytes",
    "stored objects",
    "SIGTERM: exit, seconds to ship and stop",
]
RATIO_ROWS = {"initial snapshot (start -> restorable)": ("snapshot_ratio", ""),
              "restore of the newest state": ("newest_restore_ratio", "<= 0.5"),
              "stored bytes": ("stored_bytes_ratio", "<= 0.5"),
              "stored objects": ("objects_ratio", "<= 0.5")}
GOAL_ROWS = {"  p99": "dbre <= 1 s", "  exact but for commits in the 100 ms before T": "all"}


def comparison_table(doc: dict[str, Any], kind: str, rate: int) -> Table:
    runs = {r["tool"]: r for r in doc["runs"] if r["target"] == kind and r["rate"] == rate}
    comp = next((c for c in doc.get("comparison", []) if c["target"] == kind and c["rate"] == rate), None)
    s = doc["settings"]
    t = Table(title=f"PITR: {s['size_mib']} MiB database, {rate} commits/s for {s['seconds']:g} s, "
                    f"{'directory' if kind == 'file' else 'S3 (moto)'} replica, sync interval 1 s",
              title_justify="left")
    t.add_column("measure")
    columns = []
    for name in ("Litestream", "dbre"):
        info = doc["tools"].get(name, {"available": False, "reason": "not run"})
        t.add_column(name + (f" {info['version']}" if info.get("version") else ""), justify="right")
        columns.append(_rows(runs.get(name), info.get("reason")))
    t.add_column("dbre / Litestream", justify="right")
    t.add_column("goal", justify="right")
    for i, label in enumerate(LABELS):
        ratio = ""
        goal = GOAL_ROWS.get(label, "")
        if label in RATIO_ROWS:
            key, goal = RATIO_ROWS[label]
            if comp and comp.get("available"):
                value = comp["ratios"][key]
                ok = comp["checks"].get(key)
                ratio = _num(value, "", ".2f") + ("" if ok is None else " [green]PASS[/]" if ok else " [red]FAIL[/]")
        elif label in GOAL_ROWS and comp and comp.get("available"):
            ok = comp["checks"]["lag_p99_seconds" if label == "  p99" else "restores_exact"]
            ratio = "[green]PASS[/]" if ok else "[red]FAIL[/]"
        t.add_row(label, columns[0][i], columns[1][i], ratio, goal)
    return t


def application_table(doc: dict[str, Any]) -> Table:
    """The writer's own view: commit and RESTART checkpoint latency, WAL size, with and without each replicator."""
    t = Table(title="The application: RESTART checkpoint every "
                    f"{doc['settings']['checkpoint_every']:g} s (busy timeout 5 s), WAL sampled every 100 ms",
              title_justify="left")
    for col in ("replicator", "target", "rate", "commit max", "checkpoint median", "checkpoint max",
                "busy checkpoints", "WAL max", "WAL at end"):
        t.add_column(col, justify="left" if col in ("replicator", "target") else "right")
    rows = [(b["tool"], "-", b["rate"], b["writer"]) for b in doc["baseline"]]
    rows += [(r["tool"], r["target"], r["rate"], r["writer"]) for r in doc["runs"] if "writer" in r]
    for tool, kind, rate, w in sorted(rows, key=lambda x: (x[2], x[1], x[0])):
        t.add_row(tool, kind, f"{rate}/s", _num(w["commit_ms_max"], " ms", ".1f"),
                  _num(w["checkpoint_ms_median"], " ms", ".1f"), _num(w["checkpoint_ms_max"], " ms", ".1f"),
                  f"{w['checkpoints_busy']}/{w['checkpoints']}", _mb(w["wal_bytes_max"]), _mb(w["wal_bytes_end"]))
    return t


def print_tables(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for rate in doc["settings"]["rates"]:
        for kind in doc["settings"]["targets"]:
            console.print(comparison_table(doc, kind, rate))
    console.print(application_table(doc))
