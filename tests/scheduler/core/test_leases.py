"""Leases: granted on READY, ref-counted, expiring, renewable, ended by their client."""

from __future__ import annotations

import pytest

from torpor.errors import NotFound
from torpor.scheduler.core import (
    ClientGone,
    EndLease,
    LeaseEnd,
    LeaseReleased,
    Renewed,
    RenewRequested,
    Suspend,
)

from .harness import Harness, world


def _granted(ttl: float | None = 10.0, **config) -> tuple[Harness, str]:
    h = Harness(world(gpus=(40,), **config))
    h.register("a", 20)
    h.register("b", 20)
    rid = h.acquire("a", lease_ttl_s=ttl)
    h.settle()
    return h, h.lease_of(rid)


def _ends(h: Harness) -> list[EndLease]:
    return [a for a in h.plans[-1].actions if isinstance(a, EndLease)]


def test_a_lease_expires_unless_renewed() -> None:
    h, lease = _granted(ttl=10.0)
    assert h.grants["r1"].expires_at == pytest.approx(10.0)
    assert h.plans[-1].wake_at == pytest.approx(10.0)
    h.tick(9.9)
    assert lease in h.state.leases
    h.tick(0.1)
    assert [(e.lease_id, e.why) for e in _ends(h)] == [(lease, LeaseEnd.EXPIRED)]
    assert lease not in h.state.leases


def test_renew_extends_from_now() -> None:
    h, lease = _granted(ttl=10.0)
    h.send(RenewRequested(lease), dt=8.0)
    [renewed] = [a for a in h.plans[-1].actions if isinstance(a, Renewed)]
    assert renewed.expires_at == pytest.approx(18.0)
    h.tick(9.0)
    assert lease in h.state.leases
    h.send(RenewRequested(lease, ttl_s=1e9))
    assert h.state.leases[lease].expires_at == pytest.approx(17.0 + 3600.0)  # clipped


def test_renewing_or_releasing_an_unknown_lease_is_not_found_and_changes_nothing() -> None:
    h, lease = _granted()
    before = h.state
    with pytest.raises(NotFound):
        h.send(RenewRequested("nope"))
    h.send(LeaseReleased(lease))
    assert [e.why for e in _ends(h)] == [LeaseEnd.RELEASED]
    after = h.state
    with pytest.raises(NotFound):
        h.send(LeaseReleased(lease))
    assert h.state is after and before is not after


def test_leases_are_counted_and_the_runtime_is_protected_until_the_last_one_ends() -> None:
    h, first = _granted(ttl=None)
    second = h.lease_of(h.acquire("a", client="other"))
    h.acquire("b", client="b")
    h.send(LeaseReleased(first))
    assert not [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    h.send(LeaseReleased(second))
    assert [a.model for a in h.plans[-1].actions if isinstance(a, Suspend)] == ["a"]


def test_an_expired_lease_frees_its_runtime_for_a_waiter() -> None:
    h, _lease = _granted(ttl=5.0)
    h.acquire("b", client="b")
    assert not [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    h.tick(5.0)
    assert [a.model for a in h.plans[-1].actions if isinstance(a, Suspend)] == ["a"]


def test_a_client_that_goes_away_loses_its_leases() -> None:
    h, lease = _granted()
    h.send(ClientGone("c"))
    assert [(e.lease_id, e.why, e.error) for e in _ends(h)] == [(lease, LeaseEnd.CLIENT_GONE, None)]
    assert not h.state.leases
