"""Operator evictions and drains, pins, and prefetches."""

from __future__ import annotations

import pytest

from torpor.errors import Code, FailedPrecondition
from torpor.scheduler.core import (
    AbortRequests,
    ClientGone,
    DrainRequested,
    DrainStarted,
    Drop,
    EndLease,
    EvictFinished,
    EvictMode,
    EvictRequested,
    LeaseEnd,
    Load,
    PinChanged,
    PrefetchDone,
    PrefetchRequested,
    Reason,
    RequestStarted,
    Resume,
    RuntimeState,
    SnapshotDeleted,
    Suspend,
    Tier,
    snapshot_in_use,
)

from .harness import GiB, Harness, world

S = RuntimeState


def _of(h: Harness, kind: type) -> list:
    return [a for a in h.plans[-1].actions if isinstance(a, kind)]


def _leased(**kw) -> Harness:
    h = Harness(world(gpus=(40, 40), **kw))
    h.register("a", 10)
    h.register("b", 10)
    h.acquire("a", client="holder")
    h.settle()
    return h


def test_evict_drain_waits_for_leases_and_stops_granting() -> None:
    h = _leased()
    h.send(EvictRequested("e1", "a", Tier.HOST))
    assert not _of(h, Suspend)
    late = h.acquire("a", client="late")
    assert late not in h.grants
    assert h.plans[-1].decisions[0].reason is Reason.QUEUE_YIELDING
    h.send(ClientGone("holder"))
    [move] = _of(h, Suspend)
    assert (move.model, move.level) == ("a", Tier.HOST)
    h.complete(move)
    assert _of(h, EvictFinished) == [EvictFinished("e1", h.rt("a").id, "a", S.SUSPENDED_HOST)]
    h.settle()  # the queued request brings it back
    assert late in h.grants and h.grants[late].restored_from is Tier.GPU


def test_evict_drain_times_out_and_the_runtime_keeps_serving() -> None:
    h = _leased()
    h.send(EvictRequested("e1", "a", Tier.DISK, drain_timeout_s=5.0))
    assert h.plans[-1].wake_at == 5.0
    h.tick(5.0)
    [done] = _of(h, EvictFinished)
    assert done.error is not None and done.error.code is Code.DEADLINE_EXCEEDED
    assert h.rt("a").evict is None and h.rt("a").state is S.RESIDENT
    assert h.acquire("a", client="x") in h.grants


def test_evict_abort_revokes_leases_and_aborts_requests() -> None:
    h = _leased()
    h.send(RequestStarted("a"))
    h.send(EvictRequested("e1", "a", Tier.DROP, EvictMode.ABORT))
    [end] = _of(h, EndLease)
    assert end.why is LeaseEnd.REVOKED and end.error.code is Code.ABORTED
    assert _of(h, AbortRequests) and [d.model for d in _of(h, Drop)] == ["a"]
    h.settle()
    assert h.rt("a").state is S.COLD and "e1" not in h.rejects


def test_evict_of_a_pinned_model_is_failed_precondition() -> None:
    h = _leased()
    h.register("p", 1, pinned=True)
    h.send(EvictRequested("e1", "p", Tier.HOST))
    assert h.rejects["e1"].code is Code.FAILED_PRECONDITION


def test_evict_to_a_full_tier_is_resource_exhausted() -> None:
    h = _leased(host=0)
    h.send(ClientGone("holder"))
    h.send(EvictRequested("e1", "a", Tier.HOST))
    [done] = _of(h, EvictFinished)
    assert done.error is not None and done.error.code is Code.RESOURCE_EXHAUSTED
    assert h.rt("a").state is S.RESIDENT


def test_evict_of_a_runtime_already_lower_finishes_at_once() -> None:
    h = _leased()
    h.send(EvictRequested("e1", "b", Tier.HOST))
    assert _of(h, EvictFinished) == [EvictFinished("e1", h.rt("b").id, "b", S.COLD)]


def test_drain_moves_runtimes_off_and_places_nothing_new_there() -> None:
    h = _leased()
    h.send(ClientGone("holder"))
    h.send(DrainRequested("d1", 0, to_tier=Tier.DEEP))
    assert _of(h, DrainStarted) == [DrainStarted("d1", 0, (h.rt("a").id,))]
    [move] = _of(h, Suspend)
    assert (move.model, move.level) == ("a", Tier.DEEP)
    h.settle()
    assert h.rt("a").state is S.SUSPENDED_DEEP
    h.acquire("b")
    assert [load.gpu for load in _of(h, Load)] == [1]
    h.settle()
    # a's worker is bound to the drained GPU: it is dropped and loaded on the other one.
    h.acquire("a", client="again")
    assert [d.model for d in _of(h, Drop)] == ["a"]
    h.settle()
    assert h.rt("a").at.gpu == 1 and h.grants["r3"].gpu == 1
    h.send(DrainRequested("d2", 0, undrain=True))
    assert 0 not in h.state.draining


def test_drain_falls_down_the_tiers_when_the_asked_one_is_full() -> None:
    h = _leased(host=0)
    h.send(ClientGone("holder"))
    h.send(DrainRequested("d1", 0))  # HOST by default, but there is no host budget
    [move] = _of(h, Suspend)
    assert (move.level, move.write_snapshot) == (Tier.DISK, True)


def test_prefetch_to_gpu_into_free_room() -> None:
    h = Harness(world(gpus=(40,), keep_alive_s=30.0))
    h.register("a", 10)
    h.send(PrefetchRequested("p1", "a", Tier.GPU))
    [load] = _of(h, Load)
    h.complete(load)
    assert _of(h, PrefetchDone) == [PrefetchDone("p1", "a", S.RESIDENT)]
    assert not h.state.leases
    assert h.state.models["a"].last_used == h.now  # keep-alive protects it from now


def test_prefetch_never_pushes_out_a_more_valuable_runtime() -> None:
    h = Harness(world(gpus=(24,)))
    h.register("hot", 20)
    h.register("cold", 20)
    for _ in range(20):
        h.acquire("hot", client="hot")
        h.settle()
    h.send(ClientGone("hot"))
    h.send(PrefetchRequested("p1", "cold", Tier.GPU))
    assert h.rejects["p1"].code is Code.RESOURCE_EXHAUSTED
    assert h.rt("hot").state is S.RESIDENT
    # The reverse is allowed: hot is worth more than the cold runtime in its way.
    h.send(EvictRequested("e1", "hot", Tier.DROP))
    h.settle()
    h.acquire("cold", client="cold")
    h.settle()
    h.send(ClientGone("cold"))
    h.send(PrefetchRequested("p2", "hot", Tier.GPU))
    assert [m.model for m in _of(h, Suspend)] == ["cold"]


def test_prefetch_to_host_loads_into_host_ram() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("a", 10)
    h.send(PrefetchRequested("p1", "a", Tier.HOST))
    [load] = _of(h, Load)
    assert (load.target, load.keep_host_copy) == (S.SUSPENDED_HOST, True)
    h.complete(load)
    assert _of(h, PrefetchDone) == [PrefetchDone("p1", "a", S.SUSPENDED_HOST)]


def test_a_host_prefetch_from_cold_needs_room_for_the_whole_runtime_on_a_gpu() -> None:
    """The worker builds the engine on the GPU (graphs are captured there) before it moves
    the weights to host RAM: the load holds the full footprint until it ends (issue 13)."""
    h = Harness(world(gpus=(24,)))
    h.register("a", 10)
    h.register("b", 10)
    h.acquire("a", client="holder")  # leased: no GPU runtime is evicted for a prefetch anyway
    h.settle()
    fp = h.state.models["b"].spec.footprint
    assert 24 * GiB - fp.resident < fp.resident  # b's context and residue fit, b does not
    h.send(PrefetchRequested("p1", "b", Tier.HOST))
    assert not _of(h, Load)
    assert h.rejects["p1"].reason == "NO_ROOM"
    assert h.rt("b").state is S.COLD


def test_a_host_prefetch_from_cold_counts_the_full_footprint_while_it_loads() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("a", 10)
    h.send(PrefetchRequested("p1", "a", Tier.HOST))
    [load] = _of(h, Load)
    fp = h.state.models["a"].spec.footprint
    held = h.state.held(h.rt("a"))
    assert (held.gpu, held.gpu_bytes, held.host) == (load.gpu, fp.resident, fp.weights)
    h.complete(load)
    settled = h.state.held(h.rt("a"))
    assert (settled.gpu_bytes, settled.host) == (fp.context + fp.residue, fp.weights)


def test_a_host_prefetch_from_disk_needs_only_the_context_and_residue() -> None:
    """From SUSPENDED_DISK the worker reads the snapshot straight into its host copy and maps
    no arena: the resume holds the context and residue on the GPU, never the weights."""
    h = Harness(world(gpus=(24,)))
    h.register("a", 10)
    h.register("b", 10)
    h.acquire("b", client="b")
    h.settle()
    h.send(ClientGone("b"))
    h.send(EvictRequested("e1", "b", Tier.DISK))
    h.settle()
    h.acquire("a", client="holder")
    h.settle()
    fp = h.state.models["b"].spec.footprint
    h.send(PrefetchRequested("p1", "b", Tier.HOST))
    [resume] = _of(h, Resume)
    assert (resume.source, resume.target, resume.keep_host_copy) == (
        Tier.DISK,
        S.SUSPENDED_HOST,
        True,
    )
    held = h.state.held(h.rt("b"))
    assert (held.gpu_bytes, held.host) == (fp.context + fp.residue, fp.weights)
    h.complete(resume)
    assert _of(h, PrefetchDone) == [PrefetchDone("p1", "b", S.SUSPENDED_HOST)]


def test_a_snapshot_in_use_cannot_be_deleted() -> None:
    h = Harness(world(gpus=(40,), host=0))
    h.register("a", 10)
    h.register("b", 10)
    h.acquire("a", client="a")
    h.settle()
    h.send(ClientGone("a"))
    h.send(EvictRequested("e1", "a", Tier.DISK))
    h.settle()
    assert h.rt("a").state is S.SUSPENDED_DISK and snapshot_in_use(h.state, "a")
    with pytest.raises(FailedPrecondition):
        h.send(SnapshotDeleted("a"))
    h.send(EvictRequested("e2", "a", Tier.DROP))
    h.settle()
    assert h.rt("a").state is S.SNAPSHOT and not snapshot_in_use(h.state, "a")
    h.send(SnapshotDeleted("a"))
    assert h.rt("a").state is S.COLD


def test_pinning_cancels_an_eviction_waiting_behind_a_load() -> None:
    # Found by the stateful test in CI: an eviction ordered while the runtime was loading
    # survived a pin (only idle runtimes had their order cancelled), and moved the pinned
    # runtime off its GPU once the load finished.
    h = Harness(world(gpus=[40], host=24))
    h.register("m", 6)
    h.acquire("m")  # starts the load
    (load,) = [m for m in h.moves.values() if isinstance(m, Load)]
    h.send(EvictRequested("e1", "m", Tier.HOST, EvictMode.DRAIN))
    assert h.rt("m").evict is not None and h.rt("m").op is not None
    h.send(PinChanged("m", True))
    (finished,) = _of(h, EvictFinished)
    assert finished.error is not None and finished.error.reason == "PINNED"
    h.complete(load)
    h.send(ClientGone("c"))  # the lease ends: nothing may move the pinned runtime now
    h.settle()
    assert not [a for p in h.plans[-3:] for a in p.actions if isinstance(a, Suspend)]
    assert h.rt("m").state is S.RESIDENT


def test_deep_orders_are_refused_where_deep_suspend_is_off() -> None:
    h = _leased(deep_suspend=False)
    h.send(ClientGone("holder"))
    h.send(EvictRequested("e1", "a", Tier.DEEP))
    assert h.rejects["e1"].code is Code.FAILED_PRECONDITION
    assert h.rejects["e1"].reason == "DEEP_SUSPEND_DISABLED"
    h.send(DrainRequested("d1", 0, to_tier=Tier.DEEP))
    assert h.rejects["d1"].reason == "DEEP_SUSPEND_DISABLED"
    assert h.rt("a").state is S.RESIDENT and not _of(h, Suspend)


def test_a_drain_falls_back_past_deep_where_it_is_off() -> None:
    h = _leased(deep_suspend=False, host=0)  # no room in host RAM: HOST (and DEEP) are full
    h.send(ClientGone("holder"))
    h.send(DrainRequested("d1", 0, to_tier=Tier.HOST))
    [move] = _of(h, Suspend)
    assert move.level is Tier.DISK
