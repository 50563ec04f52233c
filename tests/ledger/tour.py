"""The ledger tour: one torpord driven through prefetch, eviction to each tier, resume from
each tier, snapshot GC under a running resume and a full store, with its books compared
during and after every step (books.py). The CPU test and the `gpu` test run the same tour.

Models: two small demos (alpha, beta, about 8 MiB of float32 weights each) and `big` (about
50 MiB), whose disk resume is long enough to run GC and DeleteSnapshot against. The store's
capacity is the weights of all three: every snapshot the core counts fits, but beta's,
written last on top of the others with their manifests and small files, cannot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call
from tests.ledger.books import Books, Probe, sampling
from torpor.errors import FailedPrecondition, ResourceExhausted, TorporError
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

SMALL = ("alpha", "beta")
BIG = "big"
PROMPT = [5, 4, 3, 2]
SETTLE_S = 0.3
"""How long the books are still read after a step's call returns: background work it
started (a host copy made after a load or a disk resume) shows up within it."""

S = common_pb2.RuntimeState
T = common_pb2.Tier


def make_models(root: Path) -> Path:
    for seed, name in enumerate(SMALL):
        make_demo(
            root / name, DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024, seed=seed)
        )
    make_demo(root / BIG, DemoSpec(layers=4, hidden=512, heads=8, kv_heads=4, vocab=4096, seed=9))
    return root


def weights(root: Path, name: str, cuda: bool) -> int:
    return estimate(root / name, "float32", 4, MAX_SEQ_LEN, cuda=cuda).weights


def resident(root: Path, name: str, cuda: bool) -> int:
    return estimate(root / name, "float32", 4, MAX_SEQ_LEN, cuda=cuda).resident


def store_capacity(root: Path, cuda: bool) -> int:
    """Room for the weights of every model: the core's count of three snapshots, not the
    bytes the store writes for them (manifests and small files too)."""
    return sum(weights(root, name, cuda) for name in (*SMALL, BIG))


def tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@dataclass
class Tour:
    daemon: Torpord
    probe: Probe
    settle_s: float = SETTLE_S
    reference: dict[str, list[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    # -- verbs -------------------------------------------------------------------------------

    def state(self, model: str) -> int:
        return self.daemon.runtime(model).state

    def prefetch(self, model: str, tier: common_pb2.Tier) -> None:
        call(
            self.daemon.scheduler.Prefetch,
            scheduler_pb2.PrefetchRequest(model=model, tier=tier, wait=True),
            timeout=120,
        )

    def evict(self, model: str, tier: common_pb2.Tier) -> None:
        call(self.daemon.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier), 120)

    def serve(self, model: str, restored_from: common_pb2.Tier | None = None) -> None:
        """Generate; the same greedy tokens every time, restored from where it was."""
        chunks = self.daemon.generate(model, PROMPT)
        got = tokens(chunks)
        assert got == self.reference.setdefault(model, got), (model, got)
        if restored_from is not None:
            assert chunks[-1].usage.restored_from == restored_from, chunks[-1].usage

    # -- the check ---------------------------------------------------------------------------

    def step(self, name: str, action: Callable[[], None]) -> None:
        """Run one step with the books read all along, then for `settle_s` after it; record,
        for each budget, the reading where reality exceeded the ledger most. The step's own
        error is raised after its books are recorded."""
        after: Books | None = None
        start = time.monotonic()
        with sampling(self.probe) as during:
            try:
                action()
            finally:
                deadline = time.monotonic() + self.settle_s
                while time.monotonic() < deadline or after is None:
                    after = self.probe.consistent() or after
                    if time.monotonic() > deadline + 30:
                        raise AssertionError(f"{name}: no consistent reading in 30 s")
                self.log.append(
                    f"{name}: {time.monotonic() - start:.2f} s, {during.samples} readings"
                )
                found = dict(during.worst)
                for budget in after.excess() if after is not None else {}:
                    found.setdefault(budget, after)
                for budget, books in found.items():
                    when = "during the step" if budget in during.worst else "after the step"
                    self.failures.append(books.report(name, when, budget))
        if during.error is not None:
            raise during.error

    def finish(self) -> None:
        assert not self.failures, "\n\n".join([*self.failures, "tour:", *self.log])


def gc_under_resume(tour: Tour) -> None:
    """Resume `big` from disk by a generate and, while it reads its chunks, ask for
    CollectGarbage and DeleteSnapshot of the very snapshot it reads: GC takes nothing it
    uses, the delete is refused, the resume serves the same tokens."""
    d = tour.daemon
    [snap] = [
        s
        for s in call(d.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest()).snapshots
        if s.model == BIG
    ]
    outcome: list[BaseException | None] = []

    def resume() -> None:
        try:
            tour.serve(BIG, T.TIER_DISK)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=resume, name="resume-big")
    worker.start()
    overlapped, refused, deleted = 0, 0, list[str]()
    while worker.is_alive():
        before = tour.state(BIG)
        call(d.admin.CollectGarbage, admin_pb2.CollectGarbageRequest())
        if not deleted and before == S.RUNTIME_STATE_RESUMING:
            request = admin_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
            try:
                call(d.admin.DeleteSnapshot, request)
                deleted.append(f"deleted: {S.Name(before)} before, {S.Name(tour.state(BIG))} after")
            except FailedPrecondition:  # SNAPSHOT_IN_USE: what it must say
                refused += 1
        if before == S.RUNTIME_STATE_RESUMING and tour.state(BIG) == S.RUNTIME_STATE_RESUMING:
            overlapped += 1
    worker.join()
    tour.log.append(
        f"gc under resume: {overlapped} GC rounds inside the resume, {refused} deletes"
        f" refused, {deleted or 'none deleted'}"
    )
    assert outcome == [None], f"the resume under GC failed: {outcome[0]!r} ({deleted})"
    assert not deleted or "RESUMING after" not in deleted[0], deleted[0]
    assert overlapped > 0, "the resume ended before any GC call ran inside it"


def full_store(tour: Tour, model: str) -> None:
    """Evict `model` to disk when its snapshot cannot fit the store: a clear
    RESOURCE_EXHAUSTED and it stays as it was, in the same worker, or, if it fits after
    all, SUSPENDED_DISK; either way no snapshot that the ledger counts is gone."""
    d = tour.daemon
    before = d.runtime(model)
    try:
        tour.evict(model, T.TIER_DISK)
    except ResourceExhausted:
        after = d.runtime(model)
        assert (after.state, after.worker_pid) == (before.state, before.worker_pid), after
    else:
        assert tour.state(model) == S.RUNTIME_STATE_SUSPENDED_DISK
    complete = {
        s.model
        for s in call(d.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest()).snapshots
        if s.state == admin_pb2.SNAPSHOT_STATE_COMPLETE
    }
    counted = {r.model for r in d.residency().runtimes if r.disk_bytes > 0}
    assert counted <= complete, f"snapshots the ledger counts were deleted: {counted - complete}"


def delete_snapshot(tour: Tour, model: str) -> None:
    """DeleteSnapshot of a RESIDENT runtime's snapshot: allowed, and its bytes leave the
    disk no later than the ledger stops counting them."""
    d = tour.daemon
    snaps = [
        s
        for s in call(d.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest()).snapshots
        if s.model == model
    ]
    for snap in snaps:  # none if the GC step's last delete came just after its resume
        request = admin_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
        call(d.admin.DeleteSnapshot, request)
    assert d.runtime(model).disk_bytes == 0


def steps(tour: Tour) -> list[tuple[str, Callable[[], None]]]:
    """The tour, in order; each step asserts its own outcome."""

    def evict(model: str, tier: common_pb2.Tier, state: int) -> Callable[[], None]:
        def run() -> None:
            tour.evict(model, tier)
            assert tour.state(model) == state, (model, S.Name(tour.state(model)))

        return run

    def prefetch(model: str, tier: common_pb2.Tier, state: int) -> Callable[[], None]:
        def run() -> None:
            tour.prefetch(model, tier)
            assert tour.state(model) == state, (model, S.Name(tour.state(model)))

        return run

    def serve(model: str, restored_from: common_pb2.Tier | None) -> Callable[[], None]:
        return lambda: tour.serve(model, restored_from)

    return [
        ("registered", lambda: None),
        ("prefetch alpha to GPU", prefetch("alpha", T.TIER_GPU, S.RUNTIME_STATE_RESIDENT)),
        ("serve alpha", serve("alpha", T.TIER_GPU)),
        (
            "prefetch beta to HOST from cold",
            prefetch("beta", T.TIER_HOST, S.RUNTIME_STATE_SUSPENDED_HOST),
        ),
        ("evict alpha to HOST", evict("alpha", T.TIER_HOST, S.RUNTIME_STATE_SUSPENDED_HOST)),
        ("resume alpha from HOST", serve("alpha", T.TIER_HOST)),
        ("evict alpha to DEEP", evict("alpha", T.TIER_DEEP, S.RUNTIME_STATE_SUSPENDED_DEEP)),
        ("resume alpha from DEEP", serve("alpha", T.TIER_DEEP)),
        ("evict alpha to DISK", evict("alpha", T.TIER_DISK, S.RUNTIME_STATE_SUSPENDED_DISK)),
        ("resume alpha from DISK", serve("alpha", T.TIER_DISK)),
        ("evict alpha to DROP", evict("alpha", T.TIER_DROP, S.RUNTIME_STATE_SNAPSHOT)),
        ("load alpha from its snapshot", serve("alpha", None)),
        ("load big", serve(BIG, T.TIER_SOURCE)),
        ("evict big to DISK", evict(BIG, T.TIER_DISK, S.RUNTIME_STATE_SUSPENDED_DISK)),
        ("full store: evict beta to DISK", lambda: full_store(tour, "beta")),
        (
            "prefetch big to HOST from DISK",
            prefetch(BIG, T.TIER_HOST, S.RUNTIME_STATE_SUSPENDED_HOST),
        ),
        ("evict big to DISK again", evict(BIG, T.TIER_DISK, S.RUNTIME_STATE_SUSPENDED_DISK)),
        ("GC and DeleteSnapshot under a resume of big from DISK", lambda: gc_under_resume(tour)),
        ("DeleteSnapshot of big, resident", lambda: delete_snapshot(tour, BIG)),
    ]


def run(tour: Tour) -> None:
    for name, action in steps(tour):
        try:
            tour.step(name, action)
        except AssertionError as exc:  # the step's own outcome; the books are checked too
            tour.failures.append(f"step {name!r}: {exc}")
        except TorporError as exc:
            tour.failures.append(f"step {name!r}: {type(exc).__name__} {exc.reason}: {exc}")
    tour.finish()


__all__ = ["BIG", "SMALL", "Tour", "make_models", "resident", "run", "store_capacity"]
