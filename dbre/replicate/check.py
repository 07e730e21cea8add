"""`dbre verify` for replicated segments: every generation's base and every chain, end to end."""

from __future__ import annotations

from dbre.errors import RepositoryError
from dbre.replicate.segment import check_contiguous, list_generations, open_segment, read_base
from dbre.repository.repo import Repository


def verify_segments(repo: Repository, db: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Check every generation (of ``db``): its base object and base snapshot, its segments without a
    gap or an overlap, each one unsealed and its hash chain recomputed over every page. Returns the
    number of segments checked and the problems as (object, detail); a generation is reported once,
    at its first problem."""
    from dbre.restore.pitr import base_snapshot

    dbs = [db] if db else sorted({k.split("/")[1] for k in repo.store.list("segments/") if k.count("/") == 3})
    checked, problems = 0, []
    for name in dbs:
        for gen_id, names in list_generations(repo, name).items():
            try:
                gen = read_base(repo, name, gen_id)
                base_snapshot(repo, gen)
                state = bytes.fromhex(gen.state)
                for seg in check_contiguous(name, gen, names):
                    state = open_segment(repo, seg, state).state_after
                    checked += 1
            except RepositoryError as err:
                problems.append((f"segments/{name}/{gen_id}", err.message))
    return checked, problems
