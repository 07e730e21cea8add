"""Repository verification: every snapshot's manifest, page map and packs, optionally every byte."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbre.errors import RepositoryError
from dbre.repository.backup import load_records
from dbre.repository.manifest import RECORD, Manifest
from dbre.repository.pack import read_pack_index
from dbre.repository.repo import Repository, pack_key

Progress = Callable[[int, int], None]


@dataclass
class Problem:
    object: str
    detail: str


@dataclass
class VerifyReport:
    snapshots: int = 0
    packs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "packs_read": self.packs_read,
            "bytes_read": self.bytes_read,
            "problems": [{"object": p.object, "detail": p.detail} for p in self.problems],
        }


def verify(repo: Repository, db: str | None = None, *, read_data: bool = False,
           progress: Progress | None = None, packs_filter: Callable[[str], bool] | None = None) -> VerifyReport:
    """Check the snapshots (of ``db``); with ``read_data`` read and check every pack they use.

    ``packs_filter(pack_id)`` limits ``read_data`` to the packs it accepts (a rotating subset, see
    ``dbre.validate.subset``); manifests and page maps are always checked in full."""
    report = VerifyReport()
    present = repo.pack_ids()
    # blobs each pack must hold, as (offset, length) -> snapshots that need it
    needed: dict[str, set[tuple[int, int]]] = defaultdict(set)
    users: dict[str, set[str]] = defaultdict(set)
    refs = repo.list_snapshot_refs(db)
    for ref in refs:
        key = ref.key
        try:
            manifest = repo.load_ref(ref)
        except RepositoryError as err:
            report.problems.append(Problem(key, f"cannot read manifest: {err.message}"))
            continue
        report.snapshots += 1
        missing = [p for p in manifest.packs if p not in present]
        for p in missing:
            report.problems.append(Problem(pack_key(p), f"missing (needed by snapshot {ref.id} of {ref.db})"))
        for p in manifest.packs:
            users[p].add(f"{ref.db}/{ref.id}")
        if missing:
            continue
        try:
            records = load_records(repo, manifest)
        except RepositoryError as err:
            report.problems.append(Problem(key, f"cannot read page map: {err.message}"))
            continue
        _check_records(manifest, records, needed, report, key)
        for run in manifest.runs:
            needed[run.pack].add((run.offset, run.length))
    report.packs = len(users)
    if read_data:
        targets = sorted(p for p in users if p in present and (packs_filter is None or packs_filter(p)))
        for i, pack in enumerate(targets):
            _read_pack(repo, pack, needed.get(pack, set()), users[pack], report)
            if progress:
                progress(i + 1, len(targets))
    return report


def _check_records(manifest: Manifest, records: list[bytes], needed: dict[str, set[tuple[int, int]]],
                   report: VerifyReport, key: str) -> None:
    if len(records) != manifest.page_count:
        report.problems.append(Problem(key, f"page map has {len(records)} pages, manifest says {manifest.page_count}"))
    packs = set(manifest.packs)
    for rec in records:
        _, pack, off, length, _ = RECORD.unpack(rec)
        if length == 0:
            continue
        pid = pack.hex()
        if pid not in packs:
            report.problems.append(Problem(key, f"page map refers to pack {pid} the manifest does not list"))
            return
        needed[pid].add((off, length))


def _read_pack(repo: Repository, pack: str, needed: set[tuple[int, int]], users: set[str],
               report: VerifyReport) -> None:
    key = pack_key(pack)
    who = ", ".join(sorted(users)[:3]) + (" ..." if len(users) > 3 else "")
    try:
        data = repo.store.get(key)
    except RepositoryError as err:
        report.problems.append(Problem(key, f"cannot read: {err.message} (needed by {who})"))
        return
    report.packs_read += 1
    report.bytes_read += len(data)
    try:
        blobs = read_pack_index(data, repo.sealer, key)
    except RepositoryError as err:
        report.problems.append(Problem(key, f"{err.message} (needed by {who})"))
        return
    have = {(b.offset, b.length) for b in blobs}
    for off, length in sorted(needed - have):
        report.problems.append(Problem(key, f"no blob at offset {off} length {length} (needed by {who})"))
    for b in blobs:
        try:
            name = "page-batch" if b.kind == b"d" else f"run {b.hashes[0].hex() if b.hashes else ''}"
            raw = repo.sealer.unseal(data[b.offset : b.offset + b.length], name, where=f"{key}@{b.offset}")
        except RepositoryError as err:
            report.problems.append(Problem(key, f"{err.message} (needed by {who})"))
            continue
        page_hash = repo.page_hash
        if b.kind == b"d":
            ps = len(raw) // max(1, len(b.hashes))
            for slot, h in enumerate(b.hashes):
                if page_hash(raw[slot * ps : (slot + 1) * ps]) != h:
                    detail = f"page at offset {b.offset} slot {slot} does not match its hash"
                    report.problems.append(Problem(key, detail))
                    break
        elif b.kind == b"r" and b.hashes and page_hash(raw) != b.hashes[0]:
            report.problems.append(Problem(key, f"page-map run at offset {b.offset} does not match its hash"))
