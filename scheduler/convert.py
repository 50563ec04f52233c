"""torpord's side of the wire: torpor.v1 messages to core and store dataclasses, and back.

The core's RuntimeState, Tier and EvictMode are IntEnums whose values are the proto's
numbers (a core test checks it), so enums convert by value.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from torpor.errors import InvalidArgument
from torpor.scheduler.core import Decision, EvictMode, RuntimeState, Tier, VictimChoice
from torpor.store.records import ModelSpec
from torpor.store.schema import DType
from torpor.v1 import admin_pb2, common_pb2

_DTYPES = {
    common_pb2.DTYPE_FLOAT32: DType.FLOAT32,
    common_pb2.DTYPE_BFLOAT16: DType.BFLOAT16,
    common_pb2.DTYPE_FLOAT16: DType.FLOAT16,
    common_pb2.DTYPE_FP8: DType.FP8,
}
_DTYPE_ENUM = {v: k for k, v in _DTYPES.items()}


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return d


def timestamp(when: datetime | float) -> Timestamp:
    t = Timestamp()
    if isinstance(when, datetime):
        t.FromDatetime(when.astimezone(UTC))
    else:
        t.FromNanoseconds(int(when * 1e9))
    return t


class Clocks:
    """Converts the core's monotonic time to wall-clock time and back."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()

    def wall(self, monotonic: float) -> float:
        return monotonic + self.offset

    def monotonic(self, wall: float) -> float:
        return wall - self.offset


def model_spec(
    msg: common_pb2.ModelSpec, source: str, default_dtype: DType, default_max_seq_len: int
) -> ModelSpec:
    """A registration as the catalog stores it (validated there: name, bounds), with the
    checkpoint's dtype and max_seq_len where the message leaves them unset."""
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        if msg.dtype != common_pb2.DTYPE_UNSPECIFIED:
            raise InvalidArgument(f"unknown dtype enum value {msg.dtype}", reason="BAD_DTYPE")
        dtype = default_dtype
    return ModelSpec(
        name=msg.name,
        source_path=source,
        dtype=dtype,
        max_batch=msg.max_batch or 8,
        max_seq_len=msg.max_seq_len or default_max_seq_len,
        priority=msg.priority,
        pinned=msg.pinned,
        keep_alive_s=float(msg.keep_alive_s),
    )


def spec_message(spec: ModelSpec) -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(
        name=spec.name,
        source=spec.source_path,
        dtype=_DTYPE_ENUM[spec.dtype],
        max_batch=spec.max_batch,
        max_seq_len=spec.max_seq_len,
        priority=spec.priority,
        pinned=spec.pinned,
        keep_alive_s=int(spec.keep_alive_s),
    )


def tier_name(t: Tier) -> str:
    """The proto enum name of a core tier (messages take enum names as well as numbers)."""
    return f"TIER_{t.name}"


def state_name(s: RuntimeState) -> str:
    return f"RUNTIME_STATE_{s.name}"


def tier(value: int, allowed: tuple[Tier, ...], what: str) -> Tier:
    try:
        parsed = Tier(value)
    except ValueError:
        parsed = None
    if parsed not in allowed:
        names = ", ".join(t.name for t in allowed)
        raise InvalidArgument(
            f"{what} must be one of {names}", reason="BAD_TIER", metadata={"value": value}
        )
    assert parsed is not None
    return parsed


_EVICT_MODES = {
    admin_pb2.EVICT_MODE_UNSPECIFIED: EvictMode.DRAIN,  # documented default
    admin_pb2.EVICT_MODE_DRAIN: EvictMode.DRAIN,
    admin_pb2.EVICT_MODE_ABORT: EvictMode.ABORT,
}


def evict_mode(value: int) -> EvictMode:
    """The core's mode for a proto EvictMode; an undefined number is INVALID_ARGUMENT, never
    a silent DRAIN."""
    mode = _EVICT_MODES.get(value)  # type: ignore[call-overload]
    if mode is None:
        raise InvalidArgument(
            f"mode={value} is invalid: must be EVICT_MODE_DRAIN or EVICT_MODE_ABORT",
            reason="BAD_ENUM",
            metadata={"field": "mode", "value": value},
        )
    return mode


def victim(v: VictimChoice) -> common_pb2.Victim:
    return common_pb2.Victim(
        model=v.model,
        runtime_id=v.runtime_id,
        gpu=v.gpu or 0,
        to_tier=tier_name(v.to_tier),
        bytes_freed=v.gpu_bytes_freed,
        score=v.score,
    )


def explain(decision: Decision) -> admin_pb2.ExplainResponse:
    reply = admin_pb2.ExplainResponse(
        admit=decision.admit,
        reason=decision.detail,
        reason_code=decision.reason.value,
        victims=[victim(v) for v in decision.victims],
        estimate=duration(decision.estimate_s),
        source_tier=tier_name(decision.source_tier),
        required_bytes=decision.required_bytes,
    )
    if decision.gpu is not None:
        reply.gpu = decision.gpu
    return reply
