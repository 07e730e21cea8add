"""The replication lease judged by the store's clock, never by this host's alone (the review of
prune beside a live replicator, finding 1): a lease found gone is never written again, a lease
whose object went unwritten past the limit by the store's clock is lost (and removed), and a
process stopped between two rounds of its polling loop renews the lease before the next segment.

A pause whose clocks the paused host did not see is stood in for by the lease object's modification
time moved back (the local store judges by mtime), which is what every other host sees after it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import dbre.replicate.lease as lease_mod
from dbre.replicate.lease import Lease, live_generation
from dbre.repository.lock import LockLostError
from dbre.repository.repo import Repository


def _age(repo_dir: Path, key: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(repo_dir / key, (t, t))


def test_a_lease_gone_is_never_written_again(tmp_path: Path) -> None:
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with repo.lock("replicate app") as lock:
        lease = Lease(repo.store, "app", lock)
        lease.acquire()
        lease.refresh()  # a good refresh
        repo.store.delete(lease.key())  # a takeover deleted it, then its replicator released its own
        with pytest.raises(LockLostError, match="is gone"):
            lease.refresh()
        assert not list(repo.store.list("leases/app/")), "the lease was written again"
        with pytest.raises(LockLostError):
            lease.verify("segment")


def test_a_lease_unwritten_too_long_by_the_stores_clock_is_lost_and_removed(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    repo = Repository.open_or_init(str(repo_dir))
    with repo.lock("replicate app") as lock:
        lease = Lease(repo.store, "app", lock)
        lease.acquire()
        lease.name("g1")
        # within the limit by the store's clock: renewed
        _age(repo_dir, lease.key(), lease_mod.STALE_SECONDS - lease_mod.SAFETY_SECONDS - 10)
        lease.refresh()
        lease.verify("segment")
        # paused 20 min by the store's clock, a few seconds by this host's: lost, never shipped on
        _age(repo_dir, lease.key(), 20 * 60.0)
        assert live_generation(repo.store, "app", lock.store_now() + 1) is None  # stale to other hosts
        with pytest.raises(LockLostError, match="store's clock"):
            lease.refresh()
        assert not list(repo.store.list("leases/app/")), "the stale lease was revived"
        with pytest.raises(LockLostError):
            lease.verify("segment")


def test_a_stopped_polling_loop_renews_the_lease_before_the_next_segment(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    monkeypatch.setattr(lease_mod, "SUSPECT_SECONDS", 0.2)
    with repo.lock("replicate app") as lock:
        lease = Lease(repo.store, "app", lock)
        lease.acquire()
        lease.tick()
        lease.tick()
        first = repo.store.get(lease.key())
        lease.verify("segment")  # loop running: no renewal (the object is as written)
        assert repo.store.get(lease.key()) == first
        time.sleep(0.3)  # the process stopped between two rounds; meanwhile the lease was taken
        repo.store.delete(lease.key())
        with pytest.raises(LockLostError, match="is gone"):
            lease.verify("segment")  # renewed before the segment: the loss is found here, not 20 s on
        assert not list(repo.store.list("leases/app/"))
