"""The results table: one column per database size, medians first, then the ratios and targets."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mib(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _size_label(r: dict[str, Any]) -> str:
    return f"{r['size_mib'] / 1024:g} GiB" if r["size_mib"] >= 1024 else f"{r['size_mib']} MiB"


def _mark(check: dict[str, Any], fmt: str) -> str:
    value = format(check["value"], fmt)
    if float(value) == check["target"]:  # 0.351 must not read "0.35 FAIL" against <= 0.35
        value = format(check["value"], ".3f")
    return f"{value} [green]PASS[/]" if check["pass"] else f"{value} [bold red]FAIL[/]"


def table(doc: dict[str, Any]) -> Table:
    results = doc["results"]
    m = doc["machine"]
    t = Table(title=f"dbre benchmarks: medians of {doc['config']['runs']} runs after "
                    f"{doc['config']['warmup']} warm-up (time ratios: median of the per-run ratios)",
              title_justify="left",
              caption=f"{m['cpu']}, {m['cores']} cores, {m['memory']}, {m['filesystem']}; Python {m['python']}, "
                      f"sqlite3 CLI {m['sqlite3_cli']}, apsw SQLite {m['apsw_sqlite']}; load {m['loadavg_start']:.1f}",
              caption_justify="left")
    t.add_column("measure")
    for r in results:
        t.add_column(_size_label(r), justify="right")
    t.add_column("target", justify="right")

    def row(label: str, fn: Any, target: str = "", style: str | None = None) -> None:
        t.add_row(label, *[fn(r) for r in results], target, style=style)

    row("database (pages changed by the update)",
        lambda r: f"{_mib(r['db']['bytes'])}, {r['db']['pages']} p ({r['pages']['changed_pct']:.1f}%)")
    t.add_section()
    row("sqlite3 .backup", lambda r: f"{r['seconds']['sqlite_backup']:.2f} s")
    row("cp + fsync", lambda r: f"{r['seconds']['cp_fsync']:.2f} s")
    row("dbre full backup (checksums off)", lambda r: f"{r['seconds']['full_backup']:.2f} s")
    row("dbre full backup (checksums on)", lambda r: f"{r['seconds']['full_backup_checksums']:.2f} s")
    row("dbre incremental backup (1% rows updated)", lambda r: f"{r['seconds']['incremental_backup']:.2f} s")
    row("dbre restore of the incremental", lambda r: f"{r['seconds']['restore']:.2f} s")
    row("dbre full / incremental, default settings", lambda r: f"{r['seconds']['full_backup_defaults']:.2f} / "
        f"{r['seconds']['incremental_backup_defaults']:.2f} s")
    t.add_section()
    row("full backup: bytes added", lambda r: _mib(r["bytes"]["full_backup_added"]))
    row("changed pages x page size", lambda r: _mib(r["bytes"]["changed_page_bytes"]))
    row("  changed pages, zstd -1 (page-level minimum)", lambda r: _mib(r["bytes"]["changed_pages_zstd"]))
    row("  bytes that differ inside them", lambda r: _mib(r["bytes"]["differing_bytes"]))
    row("  what sub-page deltas would ship (XOR, zstd -1)", lambda r: _mib(r["bytes"]["subpage_delta_zstd"]))
    row("incremental: bytes added to the repository", lambda r: _mib(r["bytes"]["incremental_added"]))
    t.add_section()
    checks = [
        ("full_vs_sqlite_backup", "full / .backup", ".2f", "<= 1.5"),
        ("full_vs_sqlite_backup_defaults", "  the same, default settings", ".2f", "<= 1.5"),
        ("incremental_vs_full", "incremental time / full", ".2f", "<= 0.35"),
        ("incremental_vs_full_defaults", "  the same, default settings", ".2f", "<= 0.35"),
        ("incremental_bytes_vs_changed_pages", "bytes added / changed-page bytes", ".2f", "<= 0.6"),
        ("restore_vs_cp_fsync", "restore / (cp + fsync)", ".2f", "<= 2.5"),
        ("backup_rss_mb", "peak RSS of backup (MB)", ".0f", "<= 300"),
        ("restore_rss_mb", "peak RSS of restore (MB)", ".0f", "<= 300"),
    ]
    for key, label, fmt, target in checks:
        row(label, lambda r, k=key, f=fmt: _mark(r["checks"][k], f), target)
    t.add_section()
    row("whole commands, default settings (info): full / .backup",
        lambda r: f"{r['ratios'].get('full_vs_sqlite_backup_defaults_command', float('nan')):.2f}")
    row("  incremental / full",
        lambda r: f"{r['ratios'].get('incremental_vs_full_defaults_command', float('nan')):.2f}")
    row("  restore / (cp + fsync)",
        lambda r: f"{r['ratios'].get('restore_vs_cp_fsync_command', float('nan')):.2f}")
    row("full with checksums / .backup (info)", lambda r: f"{r['ratios']['full_checksums_vs_sqlite_backup']:.2f}")
    row("sub-page deltas / changed-page bytes (info)",
        lambda r: f"{r['ratios']['subpage_delta_vs_changed_pages']:.2f}")
    row("  their cost: the parent's changed pages read back",
        lambda r: f"{r['seconds'].get('parent_readback', float('nan')):.2f} s")
    row("  incremental + that read / full (info)",
        lambda r: f"{r['ratios'].get('incremental_with_readback_vs_full', float('nan')):.2f}")
    return t


def print_table(doc: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(table(doc))
