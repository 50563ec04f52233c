"""Victims: who goes first (score), who never goes (protections), and to which tier."""

from __future__ import annotations

import math

import pytest

from torpor.scheduler.core import (
    ClientGone,
    Drop,
    Reason,
    RequestFinished,
    RequestStarted,
    RuntimeState,
    Suspend,
    Tier,
)
from torpor.scheduler.core.world import Costs

from .harness import GiB, Harness, world

S = RuntimeState


def _resident(h: Harness, *names: str, uses: dict[str, int] | None = None) -> None:
    """Make each model resident, used `uses[name]` times, and idle again."""
    for name in names:
        for _ in range((uses or {}).get(name, 1)):
            h.acquire(name, client=name)
            h.settle()
        h.send(ClientGone(name))


def _suspends(plan) -> list[Suspend | Drop]:
    return [a for a in plan.actions if isinstance(a, Suspend | Drop)]


def test_lowest_score_goes_first() -> None:
    h = Harness(world(gpus=(40,)))
    for name in "abcd":
        h.register(name, 10)  # 12.06 GiB resident: three fill the GPU
    _resident(h, "a", "b", "c", uses={"a": 5, "b": 1, "c": 3})
    h.acquire("d")
    decision = h.plans[-1].decisions[0]
    assert decision.reason is Reason.EVICT
    assert [v.model for v in decision.victims] == ["b"]  # the least used
    [move] = _suspends(h.plans[-1])
    assert (move.model, move.level) == ("b", Tier.HOST)


def test_score_is_reuse_times_restore_cost_per_gib_plus_priority() -> None:
    costs = Costs()
    h = Harness(world(gpus=(40,), costs=costs, rate_half_life_s=100.0))
    h.register("a", 10, priority=3)
    h.register("b", 18)
    h.register("c", 20)
    _resident(h, "a", "b")
    h.acquire("c")
    [victim] = h.plans[-1].decisions[0].victims
    fp = h.state.models[victim.model].spec.footprint
    rate = 1 * math.log(2) / 100.0  # one request, no time passed
    restore = costs.map_s + fp.weights / costs.host_to_gpu
    freed = fp.resident - fp.context - fp.residue
    expected = rate * restore / (freed / GiB) + (3 if victim.model == "a" else 0)
    assert victim.score == pytest.approx(expected)
    assert victim.model == "b"  # a's priority 3 outweighs its smaller size
    assert victim.gpu_bytes_freed == freed


def test_at_equal_use_the_cheaper_restore_per_gib_goes_first() -> None:
    h = Harness(world(gpus=(44,)))
    h.register("small", 8)
    h.register("big", 16)
    h.register("new", 16)
    _resident(h, "small", "big")
    h.acquire("new")
    # Restore time grows with the weights; per GiB freed the small one is a little cheaper
    # (its fixed parts are a larger share), and it frees enough.
    assert [v.model for v in h.plans[-1].decisions[0].victims] == ["small"]


def test_the_tier_a_victim_would_drop_to_enters_its_score() -> None:
    h = Harness(world(gpus=(42,), host=20))
    for name in "abc":
        h.register(name, 18)
    _resident(h, "a", "b")  # a keeps a host copy; no room is left for b's
    h.acquire("c")
    [victim] = h.plans[-1].decisions[0].victims
    # a can go to HOST (a fast restore); b would have to go to DISK (a slow one).
    assert (victim.model, victim.to_tier) == ("a", Tier.HOST)


@pytest.mark.parametrize("guard", ["leased", "serving", "keep_alive", "young"])
def test_protected_runtimes_are_never_victims(guard: str) -> None:
    young = 30.0 if guard == "young" else 0.0
    h = Harness(world(gpus=(40,), min_residency_s=young, starvation_wait_s=1e6))
    h.register("a", 20, keep_alive_s=60 if guard == "keep_alive" else 0)
    h.register("b", 20)
    h.acquire("a", client="a")
    h.settle()
    if guard == "serving":
        h.send(RequestStarted("a"))
    if guard != "leased":
        h.send(ClientGone("a"))
    h.acquire("b", client="b")
    plan = h.plans[-1]
    assert not _suspends(plan)
    assert plan.decisions[0].reason is Reason.QUEUE_BUSY
    # The protection ends; then, and only then, a goes.
    if guard == "leased":
        h.send(ClientGone("a"), dt=1)
    elif guard == "serving":
        h.send(RequestFinished("a"), dt=1)
    else:
        wake = plan.wake_at
        assert wake == pytest.approx(60.0 if guard == "keep_alive" else 30.0)
        h.tick(wake - h.now - 0.001)
        assert not _suspends(h.plans[-1])
        h.tick(0.001)
    assert [m.model for m in _suspends(h.plans[-1])] == ["a"]


def test_busy_runtimes_are_named_as_blockers() -> None:
    h = Harness(world(gpus=(40,)))
    h.register("a", 20)
    h.register("b", 20)
    h.acquire("a", client="a")
    h.settle()
    h.acquire("b")
    decision = h.plans[-1].decisions[0]
    assert decision.blockers == (h.rt("a").id,)
    assert not decision.admit


def test_tier_is_host_when_the_host_budget_allows() -> None:
    h = Harness(world(gpus=(40,), host=64))
    h.register("a", 20)
    h.register("b", 20)
    _resident(h, "a")
    h.acquire("b")
    [move] = _suspends(h.plans[-1])
    assert isinstance(move, Suspend)
    assert (move.level, move.write_snapshot) == (Tier.HOST, False)


@pytest.mark.parametrize(
    ("disk", "snapshot", "expect"),
    [
        (200, False, (Tier.DISK, True)),  # write a snapshot within the disk budget
        (20, True, (Tier.DISK, False)),  # reuse the snapshot that exists
        (10, False, Tier.DROP),  # no room to write one: drop
    ],
)
def test_tier_falls_to_disk_then_drop(disk: float, snapshot: bool, expect) -> None:
    h = Harness(world(gpus=(40,), host=0, disk=disk))
    h.register("a", 20 if not snapshot else 18, snapshot=snapshot)
    h.register("b", 20)
    _resident(h, "a")
    h.acquire("b")
    [move] = _suspends(h.plans[-1])
    if expect is Tier.DROP:
        assert isinstance(move, Drop)
    else:
        assert isinstance(move, Suspend)
        assert (move.level, move.write_snapshot) == expect
    h.settle()
    assert h.rt("a").state is (S.SNAPSHOT if snapshot else S.COLD) or expect is not Tier.DROP


def test_host_ram_is_paged_down_to_make_room_for_a_more_valuable_victim() -> None:
    h = Harness(world(gpus=(42,), host=20))
    for name in "xyzw":
        h.register(name, 18)  # 20.06 GiB resident; host holds one 18 GiB copy
    _resident(h, "x")  # keeps its host copy (18 of 20 GiB)
    _resident(h, "y", uses={"y": 1})  # no room for a second copy
    _resident(h, "y", uses={"y": 10})  # y is hot
    _resident(h, "z")  # x (cold, host copy) goes to HOST for z
    assert h.rt("x").state is S.SUSPENDED_HOST
    h.acquire("w")
    plan = h.plans[-1]
    victims = plan.decisions[0].victims
    # x is paged from host RAM to disk so that the victim (z) can keep its weights in host RAM.
    assert [(v.model, v.to) for v in victims] == [
        ("x", S.SUSPENDED_DISK),
        ("z", S.SUSPENDED_HOST),
    ]
    # Only x's move can start now: z needs the host RAM that x frees.
    assert [(m.model, m.level, m.write_snapshot) for m in _suspends(plan)] == [
        ("x", Tier.DISK, True)
    ]
    h.complete(_suspends(plan)[0])
    assert [(m.model, m.level) for m in _suspends(h.plans[-1])] == [("z", Tier.HOST)]


def test_a_victim_goes_deep_when_its_context_is_needed_too() -> None:
    h = Harness(world(gpus=(22,)))
    h.register("a", 18)  # 20.06 GiB; HOST would leave 0.56 GiB on the GPU
    h.register("b", 19.5)  # 21.56 GiB: needs all but 0.44 GiB
    _resident(h, "a")
    h.acquire("b")
    [move] = _suspends(h.plans[-1])
    assert (move.model, move.level) == ("a", Tier.DEEP)


def test_a_worker_slot_is_freed_when_max_workers_is_reached() -> None:
    h = Harness(world(gpus=(40,), max_workers=2))
    for name in "abc":
        h.register(name, 5)
    _resident(h, "a", "b", uses={"a": 3, "b": 1})
    h.acquire("c")
    plan = h.plans[-1]
    assert [(type(m), m.model) for m in _suspends(plan)] == [(Drop, "b")]
    h.settle()
    assert h.rt("c").state is S.RESIDENT
    assert sum(rt.at.state.has_worker for rt in h.state.runtimes.values()) == 2


def test_greedy_over_eviction_is_pruned() -> None:
    h = Harness(world(gpus=(32,)))
    h.register("small", 2)  # 4.06 GiB; frees 3.5 GiB to HOST: cheapest per GiB, not enough
    h.register("big", 14)
    h.register("new", 14)
    _resident(h, "small", "big")
    h.acquire("new")
    # Greedy takes small, then big; big alone frees enough, so small is spared.
    assert [v.model for v in h.plans[-1].decisions[0].victims] == ["big"]


def test_no_victim_goes_deep_where_deep_suspend_is_off() -> None:
    h = Harness(world(gpus=(22,), deep_suspend=False))
    h.register("a", 18)
    h.register("b", 19.5)
    _resident(h, "a")
    h.acquire("b")
    # The context can only leave with the worker: a is dropped, not checkpointed.
    assert [(type(m), m.model) for m in _suspends(h.plans[-1])] == [(Drop, "a")]


def test_deep_costs_follow_the_unlocked_host_copy() -> None:
    """A deep suspend unlocks the host copy (the driver's checkpoint costs ~25 ms per locked
    GB) and the resume copies it back through staging buffers: both are in the estimates."""
    from torpor.scheduler.core.costs import demote_seconds, restore_seconds
    from torpor.scheduler.core.lifecycle import Residency, RuntimeState
    from torpor.scheduler.core.world import Footprint

    costs = Costs(deep_refill=30e9, unpin=40e9, restore_context_s=0.3, map_s=0.01)
    fp = Footprint(weights=60 * 10**9)
    host = Residency(RuntimeState.SUSPENDED_HOST, gpu=0, host_copy=True)
    deep = Residency(RuntimeState.SUSPENDED_DEEP, gpu=0, host_copy=True)
    assert restore_seconds(deep, fp, costs) == pytest.approx(0.3 + 0.01 + 2.0)
    assert restore_seconds(host, fp, costs) == pytest.approx(0.01 + 60e9 / costs.host_to_gpu)
    assert demote_seconds(host, deep, fp, costs) == pytest.approx(0.01 + costs.checkpoint_s + 1.5)
