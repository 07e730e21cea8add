"""Page-level comparison of two database files, independent of dbre.

``compare`` reads both files page by page and reports the pages that differ (by xxh3 hash),
their bytes, what shipping them would cost at page granularity (zstd level 1 over 1 MiB
batches, as a pack would hold them), and what sub-page deltas would ship: per changed page,
the XOR against the previous version of that page (zero wherever nothing changed), zstd
compressed in the same batches. Pages past the end of the old file count as new pages, and
their delta is the page itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard

BATCH = 1024 * 1024


@dataclass
class PageDiff:
    page_size: int
    pages_before: int
    pages_after: int
    changed_pages: int
    changed_page_bytes: int  # changed pages x page size: what page granularity must cover
    differing_bytes: int  # bytes that differ inside those pages (new pages count whole)
    changed_pages_zstd_bytes: int  # the page-level minimum, compressed (zstd -1 over 1 MiB batches)
    subpage_delta_zstd_bytes: int  # XOR deltas of the changed pages, compressed the same way
    subpage_delta_zstd_per_page_bytes: int  # the same, each page's delta compressed on its own

    @property
    def changed_pct(self) -> float:
        return 100.0 * self.changed_pages / max(1, self.pages_after)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed_pct": round(self.changed_pct, 2)}


class _Batcher:
    """Compresses a stream of pieces in batches of about BATCH bytes and sums the output size."""

    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(level=1)
        self.buf = bytearray()
        self.total = 0

    def add(self, piece: bytes) -> None:
        self.buf += piece
        if len(self.buf) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.total += len(self.cctx.compress(bytes(self.buf)))
            self.buf = bytearray()


def compare(before: Path, after: Path, page_size: int) -> PageDiff:
    one = zstandard.ZstdCompressor(level=1)
    pages_batch, delta_batch = _Batcher(), _Batcher()
    changed = differing = per_page = 0
    n_before = before.stat().st_size // page_size
    n_after = after.stat().st_size // page_size
    chunk = page_size * 1024
    with open(before, "rb") as fb, open(after, "rb") as fa:
        while True:
            a = fa.read(chunk)
            if not a:
                break
            b = fb.read(chunk)
            for off in range(0, len(a), page_size):
                new = a[off : off + page_size]
                old = b[off : off + page_size]
                if len(old) == len(new) and xxhash.xxh3_64_digest(old) == xxhash.xxh3_64_digest(new):
                    continue
                changed += 1
                pages_batch.add(new)
                if len(old) == len(new):
                    x = np.frombuffer(old, np.uint8) ^ np.frombuffer(new, np.uint8)
                    differing += int(np.count_nonzero(x))
                    delta = x.tobytes()
                else:
                    differing += len(new)
                    delta = new
                delta_batch.add(delta)
                per_page += len(one.compress(delta))
    pages_batch.flush()
    delta_batch.flush()
    return PageDiff(page_size, n_before, n_after, changed, changed * page_size, differing, pages_batch.total,
                    delta_batch.total, per_page)
