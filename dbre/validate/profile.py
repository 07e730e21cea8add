"""Starter Great Expectations suites written from a live database's schema and data.

Per table, from the schema: primary keys unique and not null, UNIQUE indexes unique, NOT NULL
columns not null, foreign keys resolvable (an ``unexpected_rows_expectation`` whose SQL finds
orphans), the column set. From the data, one aggregate query per column: a row-count band
around today's count, not-null for nullable columns that hold no NULL (marked "observed"),
value sets for low-cardinality columns, ranges for numeric columns, and freshness for
timestamp-like columns (the newest value no older than a window before the snapshot time, via
the ``snapshot_minus_<N>d`` suite parameter, see ``dbre.validate.suites``; a column whose newest
value is already months old is not being written to, and gets none: ``meta.dbre.no_freshness``). Every generated
expectation carries ``meta.dbre.basis`` ("declared" or "observed") so a person can see which to
loosen. The suites are plain GX 1.x JSON; nothing here imports GX.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apsw

from dbre import __version__
from dbre.repository.tables import qident
from dbre.validate.suites import suite_file_name

LOW_CARDINALITY = 12  # at most this many distinct values (and each seen 3+ times on average) -> a value set
ROW_BAND = (0.9, 2.0)  # row-count band: 90% to 200% of today's count
STALE_DAYS = 90  # a timestamp column whose newest value is older than this gets no freshness expectation
_TIMESTAMP_NAME = re.compile(r"(_at|_on|_time|_ts|_date|^date|^time|timestamp|updated|created)$", re.I)
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_SKIP_TABLES = re.compile(r"^(sqlite_|_litestream_|libsql_)")


def _exp(kind: str, kwargs: dict[str, Any], basis: str, description: str, **meta: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "description": description,
            "meta": {"dbre": {"basis": basis, **meta}}}


def _columns(conn: apsw.Connection, table: str) -> list[dict[str, Any]]:
    return [{"name": r[1], "type": (r[2] or "").upper(), "notnull": bool(r[3]), "pk": int(r[5]), "hidden": int(r[6])}
            for r in conn.execute(f"PRAGMA table_xinfo({qident(table)})") if int(r[6]) == 0]


def _unique_indexes(conn: apsw.Connection, table: str) -> list[list[str]]:
    out = []
    for _seq, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({qident(table)})"):
        if not unique or partial or origin == "pk":
            continue
        cols = [r[2] for r in conn.execute(f"PRAGMA index_info({qident(name)})")]
        if cols and all(c is not None for c in cols):  # expression indexes have no column name
            out.append(cols)
    return out


def _foreign_keys(conn: apsw.Connection, table: str) -> list[dict[str, Any]]:
    fks: dict[int, dict[str, Any]] = {}
    for fid, _seq, parent, frm, to, *_ in conn.execute(f"PRAGMA foreign_key_list({qident(table)})"):
        fk = fks.setdefault(fid, {"parent": parent, "from": [], "to": []})
        fk["from"].append(frm)
        fk["to"].append(to)
    for fk in fks.values():
        if any(t is None for t in fk["to"]):  # REFERENCES parent with no column list: the parent's key
            pk = sorted((r[5], r[1]) for r in conn.execute(f"PRAGMA table_info({qident(fk['parent'])})") if r[5])
            fk["to"] = [name for _, name in pk] or ["rowid"]
    return list(fks.values())


def _fk_query(fk: dict[str, Any]) -> str:
    frm = [qident(c) for c in fk["from"]]
    to = [qident(c) for c in fk["to"]]
    not_null = " AND ".join(f"{c} IS NOT NULL" for c in frm)
    parent = qident(fk["parent"])
    if len(frm) == 1:
        return (f"SELECT * FROM {{batch}} WHERE {not_null} AND {frm[0]} NOT IN "
                f"(SELECT {to[0]} FROM {parent} WHERE {to[0]} IS NOT NULL)")
    return (f"SELECT * FROM {{batch}} WHERE {not_null} AND ({', '.join(frm)}) NOT IN "
            f"(SELECT {', '.join(to)} FROM {parent})")


def _column_profile(conn: apsw.Connection, table: str, col: str) -> dict[str, Any]:
    c = qident(col)
    row = conn.execute(
        f"SELECT count(*) - count({c}), count(DISTINCT {c}), min({c}), max({c}), "
        f"sum(typeof({c}) = 'integer'), sum(typeof({c}) = 'real'), sum(typeof({c}) = 'text'), count({c}) "
        f"FROM {qident(table)}"
    ).fetchone()
    assert row is not None
    nulls, distinct, lo, hi, ints, reals, texts, nonnull = row
    return {"nulls": int(nulls or 0), "distinct": int(distinct or 0), "min": lo, "max": hi,
            "ints": int(ints or 0), "reals": int(reals or 0), "texts": int(texts or 0), "nonnull": int(nonnull or 0)}


def _epoch_unit(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if 1e9 <= value < 1e10:
            return "_epoch"
        if 1e12 <= value < 1e13:
            return "_epoch_ms"
    return None


def _age_days(value: Any, epoch: str | None, now: datetime) -> float | None:
    try:
        if epoch == "_epoch":
            t = datetime.fromtimestamp(float(value), UTC)
        elif epoch == "_epoch_ms":
            t = datetime.fromtimestamp(float(value) / 1000, UTC)
        else:
            t = datetime.fromisoformat(str(value)[:19].replace(" ", "T")).replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return max(0.0, (now - t).total_seconds() / 86400)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    span = (hi - lo) or abs(hi) or 1.0
    new_lo = lo - 0.1 * span
    if lo >= 0:
        new_lo = max(0.0, new_lo)
    new_hi = hi + 0.1 * span

    def tidy(v: float) -> float | int:
        return int(math.floor(v)) if v == int(v) or abs(v) >= 100 else round(v, 4)

    return tidy(new_lo), (int(math.ceil(new_hi)) if abs(new_hi) >= 100 or new_hi == int(new_hi) else round(new_hi, 4))


def profile_table(conn: apsw.Connection, db: str, table: str, *, now: datetime | None = None) -> dict[str, Any]:
    """A starter suite for one table, as GX 1.x suite JSON."""
    now = now or datetime.now(UTC)
    cols = _columns(conn, table)
    row = conn.execute(f"SELECT count(*) FROM {qident(table)}").fetchone()
    rows = int(row[0]) if row else 0
    exps: list[dict[str, Any]] = []
    lo, hi = math.floor(rows * ROW_BAND[0]), math.ceil(rows * ROW_BAND[1]) + 10
    exps.append(_exp("expect_table_row_count_to_be_between", {"min_value": lo, "max_value": hi}, "observed",
                     f"{table} holds between {lo} and {hi} rows ({rows} when profiled)"))
    exps.append(_exp("expect_table_columns_to_match_set",
                     {"column_set": [c["name"] for c in cols], "exact_match": True}, "declared",
                     f"{table} has exactly its declared columns"))
    pk = [c["name"] for c in sorted((c for c in cols if c["pk"]), key=lambda c: c["pk"])]
    keyed: set[str] = set()
    not_null: dict[str, str] = {}
    if len(pk) == 1:
        exps.append(_exp("expect_column_values_to_be_unique", {"column": pk[0]}, "declared",
                         f"{table}.{pk[0]} is unique (primary key)", check="primary_key"))
        keyed.add(pk[0])
    elif pk:
        exps.append(_exp("expect_compound_columns_to_be_unique", {"column_list": pk}, "declared",
                         f"({', '.join(pk)}) is unique in {table} (primary key)", check="primary_key"))
    for c in pk:
        not_null[c] = "declared"
    for cols_u in _unique_indexes(conn, table):
        if cols_u == pk:
            continue
        if len(cols_u) == 1:
            exps.append(_exp("expect_column_values_to_be_unique", {"column": cols_u[0]}, "declared",
                             f"{table}.{cols_u[0]} is unique (UNIQUE index)", check="unique"))
            keyed.add(cols_u[0])
        else:
            exps.append(_exp("expect_compound_columns_to_be_unique", {"column_list": cols_u}, "declared",
                             f"({', '.join(cols_u)}) is unique in {table} (UNIQUE index)", check="unique"))
    fks = _foreign_keys(conn, table)
    fk_cols = {c for fk in fks for c in fk["from"]}
    for fk in fks:
        ref = f"{fk['parent']}({', '.join(fk['to'])})"
        col = ", ".join(fk["from"])
        exps.append(_exp("unexpected_rows_expectation", {"unexpected_rows_query": _fk_query(fk)}, "declared",
                         f"every {table}.{col} refers to a row of {ref}", check="foreign_key", column=col,
                         references=ref))
    fresh: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for c in cols:
        name = c["name"]
        if c["notnull"]:
            not_null.setdefault(name, "declared")
        if rows == 0:
            continue
        p = _column_profile(conn, table, name)
        if p["nulls"] == 0 and name not in not_null:
            not_null[name] = "observed"
        if name in keyed or name in fk_cols or name in pk or p["nonnull"] == 0:
            continue
        is_time = bool(_TIMESTAMP_NAME.search(name)) or any(t in c["type"] for t in ("DATE", "TIME"))
        epoch = _epoch_unit(p["max"])
        if is_time and (epoch or (isinstance(p["max"], str) and _ISO_DATE.match(p["max"]))):
            age = _age_days(p["max"], epoch, now)
            if age is not None and age > STALE_DAYS:
                stale.append({"column": name, "newest": p["max"], "age_days": round(age)})
                continue
            if age is not None:
                days = max(2, math.ceil(age * 2))
                param = f"snapshot_minus_{days}d{epoch or ''}"
                fresh.append(_exp("expect_column_max_to_be_between",
                                  {"column": name, "min_value": {"$PARAMETER": param}}, "observed",
                                  f"the newest {table}.{name} is at most {days} days older than the snapshot",
                                  check="freshness", max_age_days=days, relative_to="snapshot time"))
                continue
        numeric = p["ints"] + p["reals"] == p["nonnull"]
        if p["distinct"] <= LOW_CARDINALITY and p["nonnull"] >= 3 * p["distinct"] and p["reals"] == 0:
            values = [r[0] for r in conn.execute(
                f"SELECT DISTINCT {qident(name)} FROM {qident(table)} WHERE {qident(name)} IS NOT NULL "
                f"ORDER BY 1")]
            if all(isinstance(v, str | int) for v in values):
                exps.append(_exp("expect_column_values_to_be_in_set", {"column": name, "value_set": values},
                                 "observed", f"{table}.{name} is one of {len(values)} known values",
                                 check="value_set"))
                continue
        if numeric and p["min"] is not None:
            lo_v, hi_v = _widen(float(p["min"]), float(p["max"]))
            exps.append(_exp("expect_column_values_to_be_between",
                             {"column": name, "min_value": lo_v, "max_value": hi_v}, "observed",
                             f"{table}.{name} lies in [{lo_v}, {hi_v}] (observed {p['min']} to {p['max']})",
                             check="range"))
    for name, basis in not_null.items():
        exps.append(_exp("expect_column_values_to_not_be_null", {"column": name}, basis,
                         f"{table}.{name} is never NULL" + (" (no NULL seen when profiled)" if basis == "observed"
                                                            else ""), check="not_null"))
    exps.extend(fresh)
    return {
        "name": f"{db}.{table}",
        "expectations": exps,
        "meta": {"dbre": {"db": db, "table": table, "rows_when_profiled": rows,
                          "profiled_at": now.isoformat(timespec="seconds"),
                          "generated_by": f"dbre {__version__} expectations profile",
                          "notes": "A starter suite: edit freely. Expectations with basis 'observed' describe the "
                                   "data on the day it was profiled; loosen or remove those that are not rules.",
                          **({"no_freshness": stale} if stale else {})}},
    }


def profile_database(conn: apsw.Connection, db: str, *, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Starter suites for every ordinary table of the database: {table: suite JSON}."""
    from dbre.repository.tables import user_tables

    out = {}
    for t in user_tables(conn):
        if t["type"] != "table" or _SKIP_TABLES.match(t["name"]):
            continue
        out[t["name"]] = profile_table(conn, db, t["name"], now=now)
    return out


def write_suites(suites: dict[str, dict[str, Any]], out_dir: str | os.PathLike[str], *,
                 overwrite: bool = False) -> list[Path]:
    """Write one ``<table>.json`` per suite; an existing file is kept unless ``overwrite``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table, suite in sorted(suites.items()):
        path = out / suite_file_name(table)
        if path.exists() and not overwrite:
            continue
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(suite, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written
