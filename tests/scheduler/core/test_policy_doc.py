"""The worked example of docs/POLICY.md ("Score"), number for number."""

from __future__ import annotations

import pytest

from torpor.scheduler.core import ClientGone, Reason, Tier, explain

from .harness import GiB, Harness, world


def _example(priority_b: int = 0) -> Harness:
    h = Harness(world(gpus=(40,), host=64))
    h.register("A", 10)
    h.register("B", 18, priority=priority_b)
    h.register("C", 20)
    for _ in range(6):
        h.acquire("A", client="a")
    for _ in range(2):
        h.acquire("B", client="b")
    h.settle()
    h.send(ClientGone("a"))
    h.send(ClientGone("b"))
    h.tick(60.0)
    return h


def test_worked_example() -> None:
    h = _example()
    rate = {m: h.state.models[m].rate.per_second(h.now, 300.0) for m in "AB"}
    assert rate["A"] == pytest.approx(0.01207, rel=1e-3)
    assert rate["B"] == pytest.approx(0.00402, rel=1e-3)
    decision = explain(h.state, "C", h.now)
    assert decision.reason is Reason.EVICT
    [b] = decision.victims
    assert (b.model, b.to_tier, b.gpu_bytes_freed) == ("B", Tier.HOST, int(19.5 * GiB))
    assert b.score == pytest.approx(7.48e-5, rel=1e-3)
    score_a = rate["A"] * (0.01 + 10 * GiB / 54.8e9) / 11.5
    assert score_a == pytest.approx(2.16e-4, rel=1e-3)
    assert decision.estimate_s == pytest.approx(23.68, abs=0.01)


def test_worked_example_with_priority() -> None:
    h = _example(priority_b=1)
    # Greedy takes A (lower score) then B, since A alone is not enough; the prune step then
    # spares A: B alone frees enough at a lower total score.
    [victim] = explain(h.state, "C", h.now).victims
    assert victim.model == "B"
    assert victim.score == pytest.approx(1.0000748, rel=1e-6)
