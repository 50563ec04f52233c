"""Explain: the decision an Acquire would get now, without executing anything."""

from __future__ import annotations

import pytest

from torpor.errors import NotFound
from torpor.scheduler.core import ClientGone, Reason, RuntimeState, Tier, explain

from .harness import GiB, Harness, world

S = RuntimeState


def _two_models() -> Harness:
    h = Harness(world(gpus=(40,)))
    h.register("a", 20)
    h.register("b", 20)
    h.acquire("a", client="a")
    h.settle()
    h.send(ClientGone("a"))
    return h


def test_explain_shows_victims_tiers_and_an_estimate_and_changes_nothing() -> None:
    h = _two_models()
    before = h.state
    decision = explain(h.state, "b", h.now)
    assert h.state is before and not h.state.queues
    assert decision.admit and decision.reason is Reason.EVICT
    assert decision.gpu == 0 and decision.source_tier is Tier.SOURCE
    [victim] = decision.victims
    assert (victim.model, victim.to_tier, victim.frm) == ("a", Tier.HOST, S.RESIDENT)
    assert victim.gpu_bytes_freed > 0 and victim.score > 0
    costs = h.state.costs
    load = costs.worker_start_s + 20 * GiB / costs.cold_load + costs.graph_capture_s
    assert decision.estimate_s == pytest.approx(victim.seconds + load)
    assert decision.required_bytes == h.state.models["b"].spec.footprint.resident


def test_explain_is_what_acquire_then_does() -> None:
    h = _two_models()
    decision = explain(h.state, "b", h.now)
    h.acquire("b")
    assert h.plans[-1].decisions[0] == decision


def test_explain_of_a_resident_model() -> None:
    h = _two_models()
    decision = explain(h.state, "a", h.now)
    assert (decision.reason, decision.estimate_s, decision.gpu) == (Reason.RESIDENT, 0.0, 0)


def test_explain_of_a_model_that_never_fits() -> None:
    h = _two_models()
    h.register("huge", 60)
    decision = explain(h.state, "huge", h.now)
    assert decision.reason is Reason.NEVER_FITS and not decision.admit


def test_explain_names_the_busy_runtimes_it_would_wait_for() -> None:
    h = _two_models()
    h.acquire("a", client="holder")
    decision = explain(h.state, "b", h.now)
    assert decision.reason is Reason.QUEUE_BUSY and decision.blockers == (h.rt("a").id,)


def test_explain_of_an_unknown_model_is_not_found() -> None:
    h = _two_models()
    with pytest.raises(NotFound):
        explain(h.state, "nope", h.now)
