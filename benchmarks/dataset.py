"""Benchmark databases: WAL-mode files of a target size with realistic content, cached on disk.

Four tables with indexes: customers (short text), orders (numbers, statuses, dates), events
(JSON-ish text payloads) and attachments (blobs: some random bytes like images, most
compressible documents, some larger than a page so they use overflow pages). The content is
generated from a fixed seed, so the same size always gives the same database.

``updated_copy`` makes the twin the incremental benchmark backs up second: the same database
after 1% of the rows of every table were updated at scattered places, in one transaction.
Both files are checkpointed (the -wal is empty), so comparing them page by page compares what
a backup reads.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import string
from dataclasses import dataclass
from pathlib import Path

VERSION = 1  # bump when the generated content changes: cached files are rebuilt
SEED = 20240601
UPDATE_FRACTION = 0.01

SCHEMA = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    city TEXT NOT NULL,
    address TEXT NOT NULL,
    created_at TEXT NOT NULL,
    notes TEXT
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE INDEX orders_status_created ON orders(status, created_at);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    entity_id INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX events_kind_ts ON events(kind, ts);
CREATE TABLE attachments (
    id INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders(id),
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX attachments_order ON attachments(order_id);
"""

TABLES = ("customers", "orders", "events", "attachments")
STATUSES = ("new", "paid", "packed", "shipped", "delivered", "returned", "cancelled")
KINDS = ("login", "view", "cart_add", "cart_remove", "checkout", "payment", "refund", "support")
MIMES = ("image/jpeg", "image/png", "application/pdf", "text/plain", "application/json")
CURRENCIES = ("EUR", "USD", "GBP", "SEK")


@dataclass
class BenchDatabase:
    size_mib: int
    base: Path  # the database as built
    updated: Path  # the same after 1% of rows were updated
    bytes: int
    page_size: int
    rows: dict[str, int]


class _Words:
    """A fixed vocabulary, so text compresses like text (zstd -1 gets about 2-3x on it)."""

    def __init__(self, rng: random.Random) -> None:
        letters = string.ascii_lowercase
        self.rng = rng
        self.vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
        self.cities = [w.capitalize() for w in self.vocab[:400]]

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choices(self.vocab, k=self.rng.randint(lo, hi)))


def _ts(rng: random.Random, year: int = 2024) -> str:
    return (f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")


def _blob(rng: random.Random, words: _Words, mime: str) -> bytes:
    if mime.startswith("image/"):
        # already-compressed media: random bytes, 1-12 KiB (many span overflow pages)
        return rng.randbytes(rng.randint(1024, 12 * 1024))
    # documents: text with some binary structure, 0.5-8 KiB
    body = words.text(60, 1000).encode()
    return b"%DOC\x00" + rng.randbytes(16) + body


def _customer(rng: random.Random, w: _Words, cid: int) -> tuple[object, ...]:
    first, last = rng.choice(w.vocab).capitalize(), rng.choice(w.vocab).capitalize()
    return (cid, f"{first} {last}", f"{first.lower()}.{last.lower()}.{cid}@example.com", rng.choice(w.cities),
            f"{rng.randint(1, 999)} {w.text(2, 4)} street, {rng.randint(10000, 99999)}", _ts(rng, 2022),
            w.text(5, 40) if rng.random() < 0.7 else None)


def _order(rng: random.Random, w: _Words, oid: int, customers: int) -> tuple[object, ...]:
    created = _ts(rng, 2024)
    return (oid, rng.randint(1, customers), rng.choice(STATUSES), rng.randint(100, 500_000), rng.choice(CURRENCIES),
            created, created, w.text(0, 12) or None)


def _event(rng: random.Random, w: _Words, eid: int, orders: int) -> tuple[object, ...]:
    kind = rng.choice(KINDS)
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    payload = {"session": rng.getrandbits(64), "ip": ip,
               "agent": w.text(3, 8), "path": "/" + "/".join(rng.choices(w.vocab, k=3)),
               "items": [rng.randint(1, 10_000) for _ in range(rng.randint(0, 8))], "comment": w.text(0, 50)}
    return (eid, _ts(rng, 2024), kind, rng.randint(1, max(1, orders)), json.dumps(payload))


def build(path: Path, size_mib: int, seed: int = SEED) -> dict[str, int]:
    """Fill a new WAL-mode database at ``path`` until it is about ``size_mib`` MiB."""
    rng = random.Random(seed)
    words = _Words(rng)
    target = size_mib * 1024 * 1024
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-65536")
    conn.executescript(SCHEMA)
    n = dict.fromkeys(TABLES, 0)
    # one chunk is about 1.6 MiB: customers ~10%, orders ~20%, events ~40%, attachments ~30%
    while True:
        conn.execute("BEGIN")
        cs = [_customer(rng, words, n["customers"] + i + 1) for i in range(500)]
        n["customers"] += len(cs)
        os_ = [_order(rng, words, n["orders"] + i + 1, n["customers"]) for i in range(2500)]
        n["orders"] += len(os_)
        es = [_event(rng, words, n["events"] + i + 1, n["orders"]) for i in range(1500)]
        n["events"] += len(es)
        at = []
        for i in range(80):
            mime = rng.choice(MIMES)
            at.append((n["attachments"] + i + 1, rng.randint(1, n["orders"]), f"{rng.choice(words.vocab)}.bin", mime,
                       _blob(rng, words, mime)))
        n["attachments"] += len(at)
        conn.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?,?)", cs)
        conn.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?,?,?)", os_)
        conn.executemany("INSERT INTO events VALUES (?,?,?,?,?)", es)
        conn.executemany("INSERT INTO attachments VALUES (?,?,?,?,?)", at)
        conn.execute("COMMIT")
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (ps,) = conn.execute("PRAGMA page_size").fetchone()
        if pages * ps >= target:
            break
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return n


def update_rows(path: Path, fraction: float = UPDATE_FRACTION, seed: int = SEED + 1) -> dict[str, int]:
    """Update ``fraction`` of the rows of every table, at random (scattered) rowids, in one transaction."""
    rng = random.Random(seed)
    words = _Words(random.Random(seed))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    counts: dict[str, int] = {}
    conn.execute("BEGIN")
    for table in TABLES:
        (top,) = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()
        ids = sorted(rng.sample(range(1, top + 1), max(1, int(top * fraction))))
        counts[table] = len(ids)
        if table == "customers":
            conn.executemany("UPDATE customers SET city=?, notes=? WHERE id=?",
                             [(rng.choice(words.cities), words.text(5, 40), i) for i in ids])
        elif table == "orders":
            conn.executemany("UPDATE orders SET status=?, total_cents=?, updated_at=? WHERE id=?",
                             [(rng.choice(STATUSES), rng.randint(100, 500_000), _ts(rng, 2025), i) for i in ids])
        elif table == "events":
            conn.executemany("UPDATE events SET payload=json_set(payload, '$.comment', ?) WHERE id=?",
                             [(words.text(0, 50), i) for i in ids])
        else:
            conn.executemany("UPDATE attachments SET name=? WHERE id=?",
                             [(f"{rng.choice(words.vocab)}-v2.bin", i) for i in ids])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return counts


def _page_size(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(18)
    ps = int.from_bytes(head[16:18], "big")
    return 65536 if ps == 1 else ps


def ensure(data_dir: Path, size_mib: int, log: object = print) -> BenchDatabase:
    """The cached pair of databases for ``size_mib``, building them the first time."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{size_mib}mib-v{VERSION}"
    base, updated, meta_path = (data_dir / f"{stem}.db", data_dir / f"{stem}-updated.db",
                                data_dir / f"{stem}.json")
    meta: dict[str, object] | None = None
    if base.exists() and updated.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = None
    if meta is None or meta.get("bytes") != base.stat().st_size:
        for p in (base, updated, meta_path):
            for suffix in ("", "-wal", "-shm"):
                Path(str(p) + suffix).unlink(missing_ok=True)
        if callable(log):
            log(f"building the {size_mib} MiB benchmark database (cached in {data_dir}) ...")
        tmp = data_dir / f".{stem}.building.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        rows = build(tmp, size_mib)
        tmp.rename(base)
        shutil.copyfile(base, updated)
        updated_rows = update_rows(updated)
        meta = {"bytes": base.stat().st_size, "rows": rows, "updated_rows": updated_rows, "version": VERSION}
        meta_path.write_text(json.dumps(meta, indent=1))
    rows_meta = meta["rows"]
    assert isinstance(rows_meta, dict)
    return BenchDatabase(size_mib, base, updated, base.stat().st_size, _page_size(base),
                         {str(k): int(v) for k, v in rows_meta.items()})
