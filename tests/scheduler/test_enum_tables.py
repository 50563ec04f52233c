"""Every enum member through every one of torpord's translation tables (issue 13).

torpord keeps one table per boundary: `scheduler/convert.py` between its own enums (the
core's, the store's) and torpor.v1's, and `scheduler/labels.py` for the names it gives them
in metrics and the event log. Each test sends every member through its table, both ways
where both exist, and every torpor.v1 value other than UNSPECIFIED must be mapped or refused
with INVALID_ARGUMENT: a member added to either side without a mapping fails here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from torpor.errors import InvalidArgument
from torpor.scheduler import convert, labels
from torpor.scheduler.core import (
    Costs,
    Decision,
    Drop,
    EvictMode,
    LeaseEnd,
    Load,
    Reason,
    Resume,
    RuntimeState,
    Suspend,
    Tier,
    TransitionCompleted,
)
from torpor.scheduler.executor import Executor
from torpor.scheduler.metrics import Metrics
from torpor.store.schema import BandwidthTier, DType, LoadFormat, SnapshotState
from torpor.v1 import admin_pb2, common_pb2

UNDEFINED = 99  # a number no torpor.v1 enum defines


def refused(fn: Any, *args: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    return info.value


def defined(enum: Any) -> list[int]:
    """The enum's numbers other than UNSPECIFIED (0)."""
    return [v for v in enum.values() if v != 0]


def test_load_formats_both_ways() -> None:
    for fmt in LoadFormat:
        assert convert.load_format(convert.load_format_message(fmt)) is fmt
    assert {convert.load_format(v) for v in defined(common_pb2.LoadFormat)} == set(LoadFormat)
    assert convert.load_format(common_pb2.LOAD_FORMAT_UNSPECIFIED) is LoadFormat.CHECKPOINT
    assert refused(convert.load_format, UNDEFINED).reason == "BAD_LOAD_FORMAT"


def test_dtypes_both_ways() -> None:
    for dtype in DType:
        assert convert.dtype(convert.dtype_message(dtype)) is dtype
    assert {convert.dtype(v) for v in defined(common_pb2.Dtype)} == set(DType)
    assert convert.dtype(common_pb2.DTYPE_UNSPECIFIED) is None  # the checkpoint's own
    assert refused(convert.dtype, UNDEFINED).reason == "BAD_DTYPE"


def test_tiers_by_value_both_ways() -> None:
    every = tuple(Tier)
    for tier in Tier:
        message = common_pb2.Tier.Value(convert.tier_name(tier))
        assert message == tier.value
        assert convert.tier(message, every, "tier") is tier
    assert {convert.tier(v, every, "tier") for v in defined(common_pb2.Tier)} == set(Tier)
    for value in (common_pb2.TIER_UNSPECIFIED, UNDEFINED):
        assert refused(convert.tier, value, every, "tier").reason == "BAD_TIER"
    # A field that takes some tiers refuses the others.
    assert refused(convert.tier, common_pb2.TIER_DROP, (Tier.GPU,), "tier").reason == "BAD_TIER"


def test_runtime_states_by_value_both_ways() -> None:
    for state in RuntimeState:
        message = common_pb2.RuntimeState.Value(convert.state_name(state))
        assert message == state.value
        assert convert.runtime_state(message) is state
    assert {convert.runtime_state(v) for v in defined(common_pb2.RuntimeState)} == set(RuntimeState)
    for value in (common_pb2.RUNTIME_STATE_UNSPECIFIED, UNDEFINED):
        assert refused(convert.runtime_state, value).reason == "BAD_ENUM"


def test_evict_modes() -> None:
    for mode in EvictMode:
        assert convert.evict_mode(admin_pb2.EvictMode.Value(f"EVICT_MODE_{mode.name}")) is mode
    assert {convert.evict_mode(v) for v in defined(admin_pb2.EvictMode)} == set(EvictMode)
    assert convert.evict_mode(admin_pb2.EVICT_MODE_UNSPECIFIED) is EvictMode.DRAIN  # default
    assert refused(convert.evict_mode, UNDEFINED).reason == "BAD_ENUM"


def test_snapshot_states() -> None:
    messages = [convert.snapshot_state(s) for s in SnapshotState]
    assert sorted(messages) == sorted(defined(admin_pb2.SnapshotState))  # one each, all of them


def test_event_kinds_both_ways() -> None:
    assert sorted(convert.EVENT_KINDS.values()) == sorted(defined(admin_pb2.EventKind))
    for kind, value in convert.EVENT_KINDS.items():
        assert convert.event_kind_name(value) == kind
    for value in (admin_pb2.EVENT_KIND_UNSPECIFIED, UNDEFINED):
        assert refused(convert.event_kind_name, value).reason == "BAD_ENUM"


def test_bandwidth_paths() -> None:
    """Every tier says which measured path its restores feed (None: not measured), and
    every path names a field of the core's costs."""
    assert set(convert.BANDWIDTH_TIERS) == set(Tier)
    fields = {f.name for f in dataclasses.fields(Costs)}
    assert set(convert.COST_FIELDS) == set(BandwidthTier)
    assert set(convert.COST_FIELDS.values()) <= fields
    assert len(set(convert.COST_FIELDS.values())) == len(BandwidthTier)


def test_every_decision_reason_is_its_own_code() -> None:
    for reason in Reason:
        reply = convert.explain(Decision("m", reason, "why"))
        assert reply.reason_code == reason.name


# -- labels: metrics and the event log ----------------------------------------------------


def test_state_labels_are_the_metric_states() -> None:
    assert set(labels.STATE_LABELS) == set(RuntimeState)
    m = Metrics()
    m.set_runtime_states({labels.STATE_LABELS[s]: 1 for s in RuntimeState})  # all accepted
    assert len(set(labels.STATE_LABELS.values())) == len(RuntimeState)


def test_tier_labels_are_the_metric_tiers() -> None:
    assert set(labels.TIER_LABELS) == set(Tier)
    assert len(set(labels.TIER_LABELS.values())) == len(Tier)
    m = Metrics()
    for tier in (Tier.HOST, Tier.DEEP, Tier.DISK):
        m.observe_suspend(labels.TIER_LABELS[tier], 0.1)
        m.observe_resume(labels.TIER_LABELS[tier], 0.1)
    for tier in (Tier.HOST, Tier.DEEP, Tier.DISK, Tier.DROP):
        m.eviction("admin", labels.TIER_LABELS[tier])
    for tier in (Tier.GPU, Tier.HOST, Tier.DISK):
        m.set_tier_bytes(0, labels.TIER_LABELS[tier], 1)


def test_every_restore_source_has_a_hit_and_a_load_label() -> None:
    sources = set(Tier) - {Tier.DROP}  # DROP is only an eviction target
    assert set(labels.HIT_LABELS) == sources
    m = Metrics()
    for tier in sources:
        m.hit(labels.HIT_LABELS[tier])
    assert set(labels.LOAD_LABELS) == {Tier.DISK, Tier.SOURCE}  # what a new worker loads from
    for tier in labels.LOAD_LABELS:
        m.observe_load(labels.LOAD_LABELS[tier], 0.1)


def test_every_lease_end_is_an_event_kind() -> None:
    assert set(labels.LEASE_END_EVENTS) == set(LeaseEnd)
    assert set(labels.LEASE_END_EVENTS.values()) <= set(convert.EVENT_KINDS)


def test_every_transition_has_a_name() -> None:
    assert set(labels.ACTION_LABELS) == {Load, Resume, Suspend, Drop}
    assert len(set(labels.ACTION_LABELS.values())) == 4


class _RecordingExecutor(Executor):
    """A stand-in: each transition method records that it ran, and touches no worker."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def _load(self, action: Load) -> TransitionCompleted:
        self.ran.append("_load")
        return TransitionCompleted(action.runtime_id, action.seq)

    async def _resume(self, action: Resume) -> TransitionCompleted:
        self.ran.append("_resume")
        return TransitionCompleted(action.runtime_id, action.seq)

    async def _suspend(self, action: Suspend) -> TransitionCompleted:
        self.ran.append("_suspend")
        return TransitionCompleted(action.runtime_id, action.seq)

    async def _drop(self, action: Drop) -> TransitionCompleted:
        self.ran.append("_drop")
        return TransitionCompleted(action.runtime_id, action.seq)


def test_the_executor_dispatches_every_transition_on_its_type_with_stand_in_methods() -> None:
    actions = {
        Load: Load("m#1", "m", 1, 0, Tier.SOURCE, RuntimeState.RESIDENT, 1, False),
        Resume: Resume("m#1", "m", 2, Tier.HOST, RuntimeState.RESIDENT, False),
        Suspend: Suspend("m#1", "m", 3, Tier.HOST, write_snapshot=False),
        Drop: Drop("m#1", "m", 4),
    }
    assert set(actions) == set(labels.ACTION_LABELS)
    ex = _RecordingExecutor()
    for kind, action in actions.items():
        done = asyncio.run(ex._dispatch(action))
        assert done.seq == action.seq and ex.ran[-1] == f"_{labels.ACTION_LABELS[kind]}"
