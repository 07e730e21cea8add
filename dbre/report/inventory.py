"""What is in one database: tables, rows, bytes per table and index, foreign keys, personal data.

Two ways in: ``inspect_database`` reads a live connection (row counts, the ``dbstat`` virtual
table for bytes, a sample of values for personal-data sniffing); ``inventory_from_schema``
rebuilds the structure from a snapshot manifest's schema when no live source was given (then
only the manifest's row counts are known, not bytes or values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import apsw

from dbre.repository.tables import qident

SAMPLE_VALUES = 100  # text values sampled per column for personal-data sniffing
SNIFF_THRESHOLD = 0.6  # share of sampled values that must look like one kind


@dataclass
class PersonalColumn:
    """A column that looks like it holds personal data, and why we think so."""

    column: str
    kind: str
    evidence: str
    strong: bool = True


@dataclass
class TableInventory:
    name: str
    columns: list[str] = field(default_factory=list)
    rows: int | None = None
    table_bytes: int | None = None
    index_bytes: int | None = None
    indexes: dict[str, int] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)
    referenced_by: list[str] = field(default_factory=list)
    personal: list[PersonalColumn] = field(default_factory=list)

    @property
    def fk_in_degree(self) -> int:
        """How many other tables point at this one: a high count makes it a hub of the schema."""
        return len(self.referenced_by)

    @property
    def total_bytes(self) -> int | None:
        if self.table_bytes is None:
            return None
        return self.table_bytes + (self.index_bytes or 0)


@dataclass
class DatabaseInventory:
    live: bool
    page_size: int = 0
    page_count: int = 0
    freelist_pages: int = 0
    overhead_bytes: int = 0  # schema table and pages dbstat attributes to no table
    tables: dict[str, TableInventory] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.page_size * self.page_count


# -- personal data -------------------------------------------------------------------------------

# (kind, pattern on the lower-cased column name, strong?) — first match wins, so ip before address.
_NAME_PATTERNS: list[tuple[str, re.Pattern[str], bool]] = [
    ("email", re.compile(r"e[-_]?mail|^mail$|_mail$"), True),
    ("ip address", re.compile(r"^ip$|ip_?addr|_ip$|remote_?addr"), True),
    ("phone", re.compile(r"phone|mobile|^tel$|_tel$|telephone|^fax$|msisdn"), True),
    ("national id", re.compile(r"ssn|social_?security|national_?id|passport|tax_?id|^nin$|driver_?licen"), True),
    ("payment card", re.compile(r"card_?(number|num|no)$|^pan$|credit_?card|iban|account_?number"), True),
    ("birth date", re.compile(r"birth|^dob$|_dob$"), True),
    ("name", re.compile(r"(first|last|given|family|full|middle|sur|maiden|contact|customer|person)_?name"), True),
    ("name", re.compile(r"^name$|^username$|^user_name$"), False),
    ("address", re.compile(r"address|street|^addr|postcode|postal|zip_?code|^zip$"), True),
    ("address", re.compile(r"^city$|^town$"), False),
    ("geolocation", re.compile(r"^lat(itude)?$|^lng$|^lon(gitude)?$"), False),
]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
_SSN = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_IPV4 = re.compile(r"^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$")
_CARD = re.compile(r"^\d[\d -]{11,22}\d$")
_PHONE = re.compile(r"^\+?[\d\s().-]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def sniff_value(value: str) -> str | None:
    """The kind of personal data one text value looks like, or None."""
    v = value.strip()
    if not v or len(v) > 254:
        return None
    if _EMAIL.match(v):
        return "email"
    if _SSN.match(v):
        return "national id"
    if _IPV4.match(v):
        return "ip address"
    if _DATE.match(v):
        return None
    if _CARD.match(v):
        digits = re.sub(r"\D", "", v)
        if 13 <= len(digits) <= 19 and _luhn(digits):
            return "payment card"
    if _PHONE.match(v):
        digits = re.sub(r"\D", "", v)
        if 7 <= len(digits) <= 15 and (v.startswith("+") or re.search(r"[\s().-]", v)):
            return "phone"
    return None


def classify_column_name(column: str) -> tuple[str, bool] | None:
    """(kind, strong) when a column's name suggests personal data."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", column).lower()
    for kind, pattern, strong in _NAME_PATTERNS:
        if pattern.search(name):
            return kind, strong
    return None


def sniff_column(values: list[str]) -> tuple[str, float] | None:
    """The kind most sampled values look like, with its share, if the share passes the threshold."""
    values = [v for v in values if v and v.strip()]
    if len(values) < 3:
        return None
    counts: dict[str, int] = {}
    for v in values:
        kind = sniff_value(v)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    kind, n = max(counts.items(), key=lambda kv: kv[1])
    share = n / len(values)
    return (kind, share) if share >= SNIFF_THRESHOLD else None


# -- inspection ----------------------------------------------------------------------------------


def _tables(conn: apsw.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM pragma_table_list WHERE schema='main' AND type IN ('table','shadow') "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def _structure(conn: apsw.Connection) -> dict[str, TableInventory]:
    """Tables, columns, foreign-key edges and name-based personal-data hints."""
    tables = {name: TableInventory(name) for name in _tables(conn)}
    for name, t in tables.items():
        t.columns = [str(r[1]) for r in conn.execute(f"PRAGMA table_info({qident(name)})")]
        parents = {str(r[0]) for r in conn.execute("SELECT \"table\" FROM pragma_foreign_key_list(?)", (name,))}
        t.references = sorted(parents)
        for col in t.columns:
            hit = classify_column_name(col)
            if hit:
                t.personal.append(PersonalColumn(col, hit[0], "column name", hit[1]))
    lowered = {n.lower(): n for n in tables}
    for name, t in tables.items():
        for parent in t.references:
            target = lowered.get(parent.lower())
            if target and target != name and name not in tables[target].referenced_by:
                tables[target].referenced_by.append(name)
    for t in tables.values():
        t.referenced_by.sort()
    return tables


def _sniff(conn: apsw.Connection, t: TableInventory, sample: int) -> None:
    """Look at a sample of text values; strengthen or add personal-data findings."""
    by_column = {p.column: p for p in t.personal}
    for col in t.columns:
        q = qident(col)
        values = [str(r[0]) for r in conn.execute(
            f"SELECT {q} FROM {qident(t.name)} WHERE typeof({q})='text' LIMIT ?", (sample,))]
        hit = sniff_column(values)
        if hit is None:
            continue
        kind, share = hit
        evidence = f"{share:.0%} of {len(values)} sampled values look like {kind}"
        found = by_column.get(col)
        if found is None:
            t.personal.append(PersonalColumn(col, kind, evidence, True))
        else:
            found.evidence += f"; {evidence}"
            if not found.strong:
                found.kind = kind  # the values say more than a vague name
            found.strong = True


def inspect_database(conn: apsw.Connection, *, sample: int = SAMPLE_VALUES) -> DatabaseInventory:
    """Inventory of a live database: structure, row counts, bytes from dbstat, sniffed values."""
    inv = DatabaseInventory(live=True)
    inv.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])  # type: ignore[index]
    inv.page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])  # type: ignore[index]
    inv.freelist_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])  # type: ignore[index]
    inv.tables = _structure(conn)
    owner = {str(r[0]): str(r[1]) for r in conn.execute("SELECT name, tbl_name FROM sqlite_schema")}
    for t in inv.tables.values():
        t.table_bytes, t.index_bytes = 0, 0
        (n,) = conn.execute(f"SELECT count(*) FROM {qident(t.name)}").fetchone()  # type: ignore[misc]
        t.rows = int(n)
        if sample:
            _sniff(conn, t, sample)
    # aggregate=TRUE: one row per table or index, without a row per page
    inv.overhead_bytes = inv.freelist_pages * inv.page_size
    for name, pgsize in conn.execute("SELECT name, pgsize FROM dbstat WHERE aggregate=TRUE"):
        size = int(pgsize or 0)
        if name in inv.tables:
            inv.tables[name].table_bytes = (inv.tables[name].table_bytes or 0) + size
            continue
        parent = owner.get(name)
        if parent in inv.tables and parent != name:
            t = inv.tables[parent]
            t.indexes[name] = size
            t.index_bytes = (t.index_bytes or 0) + size
        else:
            inv.overhead_bytes += size
    return inv


def inventory_from_schema(schema: list[dict[str, Any]]) -> DatabaseInventory:
    """Structure rebuilt from a manifest's schema in memory: tables, columns, foreign keys, name hints."""
    conn = apsw.Connection(":memory:")
    try:
        for entry in schema:
            sql, name = entry.get("sql"), str(entry.get("name", ""))
            if not sql or name.startswith("sqlite_") or entry.get("type") not in ("table", "index"):
                continue
            try:
                conn.execute(sql)
            except apsw.Error:
                continue  # a virtual table whose module this build lacks: structure unknown
        inv = DatabaseInventory(live=False)
        inv.tables = _structure(conn)
        return inv
    finally:
        conn.close()
