"""Admission: byte-accurate placement, loads and grants, and requests that can never fit."""

from __future__ import annotations

from torpor.errors import Code
from torpor.scheduler.core import (
    ClientGone,
    DrainRequested,
    Drop,
    Footprint,
    GpuSpec,
    Grant,
    Load,
    PinChanged,
    Reason,
    Resume,
    RuntimeState,
    Suspend,
    Tier,
    TransitionCompleted,
    initial_state,
)
from torpor.scheduler.core.world import PolicyConfig

from .harness import GiB, Harness, footprint, world

S = RuntimeState


def _loads(plan) -> list[Load]:
    return [a for a in plan.actions if isinstance(a, Load)]


def test_a_model_that_fits_is_loaded_then_granted() -> None:
    h = Harness(world())
    h.register("a", 10)
    rid = h.acquire("a")
    [load] = _loads(h.plans[-1])
    assert (load.gpu, load.source, load.target, load.incarnation) == (0, Tier.SOURCE, S.RESIDENT, 1)
    assert load.keep_host_copy  # the host budget has room: the next suspend is an unmap
    assert h.rt("a").state is S.LOADING
    assert rid not in h.grants
    h.settle()
    assert h.grants[rid].restored_from is Tier.SOURCE
    assert h.rt("a").state is S.RESIDENT


def test_a_resident_model_is_granted_in_the_same_step() -> None:
    h = Harness(world())
    h.register("a", 10)
    h.acquire("a")
    h.settle()
    rid = h.acquire("a", client="other")
    assert h.grants[rid].restored_from is Tier.GPU
    assert h.state.leases_on(h.rt("a").id) == 2
    assert h.plans[-1].decisions[0].reason is Reason.RESIDENT


def _resident_a(spare: int) -> Harness:
    fa, fb = footprint(10), footprint(12)
    state = initial_state(
        (GpuSpec(0, fa.resident + fb.resident + spare),),
        host_budget=0,
        disk_budget=0,
        config=PolicyConfig(min_residency_s=0),
    )
    h = Harness(state)
    h.register("a", 10, fp=fa)
    h.register("b", 12, fp=fb)
    h.acquire("a", client="a")
    h.settle()
    h.send(ClientGone("a"))
    return h


def test_admission_is_byte_accurate() -> None:
    h = _resident_a(spare=0)
    h.acquire("b")
    assert [type(a) for a in h.plans[-1].actions] == [Load]  # exactly enough room

    h = _resident_a(spare=-1)
    h.acquire("b")
    # One byte short: a goes first (no host or disk budget, so it is dropped).
    assert [(type(a), a.model) for a in h.plans[-1].actions] == [(Drop, "a")]


def test_never_fits_fails_at_once_and_is_not_queued() -> None:
    h = Harness(world(gpus=(40, 24)))
    h.register("huge", 39)  # 41 GiB resident
    rid = h.acquire("huge")
    error = h.rejects[rid]
    assert error.code is Code.FAILED_PRECONDITION
    assert error.reason == "NEVER_FITS"
    assert "huge" not in h.state.queues
    assert h.plans[-1].decisions[0].reason is Reason.NEVER_FITS


def test_reserved_margin_counts_against_capacity() -> None:
    state = initial_state(
        (GpuSpec(0, 40 * GiB, reserved_bytes=4 * GiB),), host_budget=0, disk_budget=0
    )
    h = Harness(state)
    h.register("m", 34.5)  # 36.56 GiB > 36 GiB usable
    assert h.rejects[h.acquire("m")].reason == "NEVER_FITS"


def test_pinned_runtimes_that_leave_no_room_fail_at_once() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("p", 20, pinned=True)
    h.register("q", 20)
    h.acquire("p")
    h.settle()
    rid = h.acquire("q")
    assert h.rejects[rid].code is Code.FAILED_PRECONDITION
    assert h.rejects[rid].reason == "BLOCKED_BY_PINNED"
    h.send(PinChanged("p", False))
    rid = h.acquire("q")
    assert rid not in h.rejects  # unpinned: q queues for p's room


def test_every_gpu_draining_is_unavailable() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("a", 10)
    h.send(DrainRequested("d1", 0))
    error = h.rejects[h.acquire("a")]
    assert (error.code, error.reason) == (Code.UNAVAILABLE, "NO_GPU")


def test_two_waiters_never_count_the_same_free_bytes() -> None:
    h = Harness(world(gpus=(40,)))
    for name, weights in (("x", 20), ("a", 15), ("b", 15)):
        h.register(name, weights)
    h.acquire("x", client="x")
    h.settle()
    h.send(ClientGone("x"))
    # Free: 40 - 22.06 = 17.94 GiB. a takes 17.06 of it; b must then evict x.
    ra = h.acquire("a")
    rb = h.acquire("b")
    plan = h.plans[-1]
    assert [(type(a), a.model) for a in plan.actions] == [(Suspend, "x")]
    decisions = {d.model: d for d in plan.decisions}
    assert decisions["b"].reason is Reason.EVICT
    assert [v.model for v in decisions["b"].victims] == ["x"]
    h.settle()
    assert ra in h.grants and rb in h.grants


def test_a_suspended_runtime_resumes_on_its_gpu_from_host() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("a", 18)
    h.register("b", 18)
    h.acquire("a", client="a")
    h.settle()
    h.send(ClientGone("a"))
    h.acquire("b", client="b")
    h.settle()
    assert h.rt("a").state is S.SUSPENDED_HOST
    h.send(ClientGone("b"))
    rid = h.acquire("a")
    resumes = [a for a in h.plans[-1].actions if isinstance(a, Resume)]
    suspends = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert [s.model for s in suspends] == ["b"] and not resumes  # room first, then resume
    h.settle()
    assert h.grants[rid].restored_from is Tier.HOST
    assert isinstance(h.grants[rid], Grant)


def test_footprint_measured_by_the_worker_replaces_the_estimate() -> None:
    h = Harness(world())
    h.register("a", 10)
    h.acquire("a")
    [load] = _loads(h.plans[-1])
    measured = Footprint(weights=11 * GiB, kv=GiB, context=GiB)
    del h.moves[(load.runtime_id, load.seq)]
    h.send(TransitionCompleted(load.runtime_id, load.seq, S.RESIDENT, measured))
    assert h.state.models["a"].spec.footprint == measured
