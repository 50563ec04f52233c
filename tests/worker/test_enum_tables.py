"""Every enum member through the worker's one translation table, `worker/convert.py`
(issue 13): both ways where both exist, and every torpor.v1 value other than UNSPECIFIED
mapped or refused with INVALID_ARGUMENT, so a member added without a mapping fails here.
No trimming of names: the tier a runtime resumes from is its residency's SuspendLevel."""

from __future__ import annotations

from typing import Any

import pytest

from torpor.errors import InvalidArgument
from torpor.v1 import common_pb2
from torpor.worker import convert
from torpor.worker.engine.model_config import canonical_dtype
from torpor.worker.engine.requests import FinishReason
from torpor.worker.pager.paged_state import LEVEL_OF, SUSPENDED, PagedState, SuspendLevel

UNDEFINED = 99


def refused(fn: Any, *args: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    return info.value


def test_every_dtype_is_one_the_engine_takes() -> None:
    for value in common_pb2.Dtype.values():
        name = convert.dtype(value)
        assert name == "auto" if value == 0 else canonical_dtype(name) == name
    assert refused(convert.dtype, UNDEFINED).reason == "BAD_DTYPE"


def test_every_load_format_is_one_the_worker_takes() -> None:
    for value in common_pb2.LoadFormat.values():
        assert convert.load_format(value) in {"checkpoint", "dummy"}
    assert convert.load_format(common_pb2.LOAD_FORMAT_DUMMY) == "dummy"
    assert convert.load_format(common_pb2.LOAD_FORMAT_UNSPECIFIED) == "checkpoint"
    assert refused(convert.load_format, UNDEFINED).reason == "BAD_LOAD_FORMAT"


def test_suspend_levels_both_ways() -> None:
    for level in SuspendLevel:
        assert convert.level(convert.TIERS[level.value]) is level
    assert set(convert.TIERS) == {level.value for level in SuspendLevel}
    takes = {common_pb2.TIER_HOST, common_pb2.TIER_DEEP, common_pb2.TIER_DISK}
    for value in [*common_pb2.Tier.values(), UNDEFINED]:
        if value in takes:
            assert convert.level(value) in SuspendLevel
        else:  # GPU, DROP, SOURCE, UNSPECIFIED: not a level a worker suspends to
            assert refused(convert.level, value).reason == "BAD_SUSPEND_LEVEL"


def test_every_residency_has_a_state_and_suspended_ones_a_tier() -> None:
    states = [convert.STATES[r] for r in PagedState]
    assert (
        len(set(states)) == len(PagedState) and common_pb2.RUNTIME_STATE_UNSPECIFIED not in states
    )
    for level, residency in SUSPENDED.items():  # the tier a resume from it reports
        assert LEVEL_OF[residency] is level
        assert convert.level(convert.TIERS[LEVEL_OF[residency].value]) is level


def test_every_finish_reason_both_ways() -> None:
    messages = [convert.FINISH[f] for f in FinishReason]
    assert sorted(messages) == sorted(v for v in common_pb2.FinishReason.values() if v != 0)


def test_every_exchange_side_is_a_side_or_refused() -> None:
    from google.protobuf.duration_pb2 import Duration

    from torpor.exchange_board import Side
    from torpor.v1 import worker_pb2

    def request(side: int) -> worker_pb2.WorkerExchangeRequest:
        return worker_pb2.WorkerExchangeRequest(
            side=side, board_path="/run/b", timeout=Duration(seconds=1)
        )

    for value in worker_pb2.ExchangeSide.values():
        if value == worker_pb2.EXCHANGE_SIDE_UNSPECIFIED:
            assert refused(convert.exchange, request(value)).reason == "BAD_EXCHANGE"
        else:
            assert convert.exchange(request(value))[0] in set(Side)
    assert {convert.exchange(request(v))[0] for v in convert.SIDES} == set(Side)
    assert refused(convert.exchange, request(UNDEFINED)).reason == "BAD_EXCHANGE"
