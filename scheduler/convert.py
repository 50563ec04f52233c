"""torpord's side of the wire: torpor.v1 messages to core and store dataclasses, and back.

This is torpord's one translation table for enums (issue 13): every other module of torpord
calls it, and tests/scheduler/test_enum_tables.py sends every member through it. The core's
RuntimeState, Tier and EvictMode are IntEnums whose values are the proto's numbers, so they
convert by value (`RuntimeState(value)`, `common_pb2.Tier.Name(tier.value)`); the store's
enums and the event log's kinds have a table each. The names torpord gives its enums in
metrics and the event log are `labels.py`'s.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from torpor.errors import InvalidArgument
from torpor.scheduler.core import Decision, EvictMode, RuntimeState, Tier, VictimChoice
from torpor.store.records import ModelRegistration
from torpor.store.schema import BandwidthTier, DType, LoadFormat, SnapshotState
from torpor.v1 import admin_pb2, common_pb2

_DTYPES: dict[DType, common_pb2.Dtype] = {
    DType.FLOAT32: common_pb2.DTYPE_FLOAT32,
    DType.BFLOAT16: common_pb2.DTYPE_BFLOAT16,
    DType.FLOAT16: common_pb2.DTYPE_FLOAT16,
    DType.FP8: common_pb2.DTYPE_FP8,
}
_DTYPE_OF: dict[int, DType] = {v: k for k, v in _DTYPES.items()}
_LOAD_FORMATS: dict[LoadFormat, common_pb2.LoadFormat] = {
    LoadFormat.CHECKPOINT: common_pb2.LOAD_FORMAT_CHECKPOINT,
    LoadFormat.DUMMY: common_pb2.LOAD_FORMAT_DUMMY,
}
_LOAD_FORMAT_OF: dict[int, LoadFormat] = {v: k for k, v in _LOAD_FORMATS.items()}
_SNAPSHOT_STATES: dict[SnapshotState, admin_pb2.SnapshotState] = {
    SnapshotState.WRITING: admin_pb2.SNAPSHOT_STATE_WRITING,
    SnapshotState.COMPLETE: admin_pb2.SNAPSHOT_STATE_COMPLETE,
    SnapshotState.CORRUPT: admin_pb2.SNAPSHOT_STATE_CORRUPT,
}
EVENT_KINDS: dict[str, admin_pb2.EventKind] = {
    "model_registered": admin_pb2.EVENT_KIND_MODEL_REGISTERED,
    "model_unregistered": admin_pb2.EVENT_KIND_MODEL_UNREGISTERED,
    "state_changed": admin_pb2.EVENT_KIND_STATE_CHANGED,
    "eviction": admin_pb2.EVENT_KIND_EVICTION,
    "lease_granted": admin_pb2.EVENT_KIND_LEASE_GRANTED,
    "lease_released": admin_pb2.EVENT_KIND_LEASE_RELEASED,
    "lease_expired": admin_pb2.EVENT_KIND_LEASE_EXPIRED,
    "worker_exited": admin_pb2.EVENT_KIND_WORKER_EXITED,
    "snapshot_created": admin_pb2.EVENT_KIND_SNAPSHOT_CREATED,
    "snapshot_deleted": admin_pb2.EVENT_KIND_SNAPSHOT_DELETED,
    "snapshot_corrupt": admin_pb2.EVENT_KIND_SNAPSHOT_CORRUPT,
    "pinned_changed": admin_pb2.EVENT_KIND_PINNED_CHANGED,
    "gpu_draining_changed": admin_pb2.EVENT_KIND_GPU_DRAINING_CHANGED,
    "snapshot_failed": admin_pb2.EVENT_KIND_SNAPSHOT_FAILED,
}
"""The event log's kinds (the catalog stores these strings) and their EventKind."""
_EVENT_KIND_NAMES: dict[int, str] = {v: k for k, v in EVENT_KINDS.items()}
BANDWIDTH_TIERS: dict[Tier, BandwidthTier | None] = {
    Tier.GPU: None,  # nothing restores from the GPU
    Tier.HOST: BandwidthTier.HOST_TO_GPU,
    # A deep resume's copy goes through staging buffers (its host copy was unlocked), a path
    # of its own: folding it into HOST_TO_GPU would make every host restore look slower.
    Tier.DEEP: None,
    Tier.DISK: BandwidthTier.DISK_READ,
    Tier.DROP: None,
    Tier.SOURCE: None,  # a cold load's time is mostly the checkpoint's parsing
}
"""The catalog's measured path that a restore from each tier is a sample of (None: none)."""
COST_FIELDS: dict[BandwidthTier, str] = {
    BandwidthTier.HOST_TO_GPU: "host_to_gpu",
    BandwidthTier.DISK_READ: "disk_read",
    BandwidthTier.GPU_TO_HOST: "gpu_to_host",
    BandwidthTier.DISK_WRITE: "disk_write",
}
"""The field of the core's `Costs` that each measured path sets."""


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
    msg: common_pb2.ModelSpec,
    source: str,
    default_dtype: DType,
    default_max_seq_len: int,
    chat_template: str = "",
) -> ModelRegistration:
    """A registration as the catalog stores it (validated there: name, bounds), with the
    checkpoint's dtype and max_seq_len where the message leaves them unset, and the
    registration's chat template."""
    return ModelRegistration(
        name=msg.name,
        source_path=source,
        dtype=dtype(msg.dtype) or default_dtype,
        max_batch=msg.max_batch or 8,
        max_seq_len=msg.max_seq_len or default_max_seq_len,
        priority=msg.priority,
        pinned=msg.pinned,
        keep_alive_s=float(msg.keep_alive_s),
        chat_template=chat_template,
        load_format=load_format(msg.load_format),
    )


def spec_message(spec: ModelRegistration) -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(
        name=spec.name,
        source=spec.source_path,
        dtype=dtype_message(spec.dtype),
        max_batch=spec.max_batch,
        max_seq_len=spec.max_seq_len,
        priority=spec.priority,
        pinned=spec.pinned,
        keep_alive_s=int(spec.keep_alive_s),
        load_format=load_format_message(spec.load_format),
    )


def dtype(value: int) -> DType | None:
    """The store's dtype of a proto Dtype; None for DTYPE_UNSPECIFIED (the checkpoint's)."""
    if value == common_pb2.DTYPE_UNSPECIFIED:
        return None
    found = _DTYPE_OF.get(value)
    if found is None:
        raise InvalidArgument(f"unknown dtype enum value {value}", reason="BAD_DTYPE")
    return found


def dtype_message(d: DType) -> common_pb2.Dtype:
    return _DTYPES[d]


def load_format(value: int) -> LoadFormat:
    """The store's load format of a proto LoadFormat; UNSPECIFIED is the checkpoint's."""
    if value == common_pb2.LOAD_FORMAT_UNSPECIFIED:
        return LoadFormat.CHECKPOINT
    found = _LOAD_FORMAT_OF.get(value)
    if found is None:
        raise InvalidArgument(f"unknown load_format enum value {value}", reason="BAD_LOAD_FORMAT")
    return found


def load_format_message(f: LoadFormat) -> common_pb2.LoadFormat:
    return _LOAD_FORMATS[f]


def tier_name(t: Tier) -> str:
    """The proto enum name of a core tier (messages take enum names as well as numbers)."""
    return common_pb2.Tier.Name(t.value)


def state_name(s: RuntimeState) -> str:
    return common_pb2.RuntimeState.Name(s.value)


def runtime_state(value: int) -> RuntimeState:
    """The core's state of a proto RuntimeState (a worker's reply); UNSPECIFIED or a number
    the enum does not define is INVALID_ARGUMENT."""
    try:
        return RuntimeState(value)  # no member is 0: UNSPECIFIED is refused here too
    except ValueError:
        raise InvalidArgument(
            f"{value} is not a runtime state", reason="BAD_ENUM", metadata={"value": value}
        ) from None


def snapshot_state(s: SnapshotState) -> admin_pb2.SnapshotState:
    return _SNAPSHOT_STATES[s]


def event_kind_name(value: int) -> str:
    """The event log's kind of a proto EventKind; UNSPECIFIED or an undefined number is
    INVALID_ARGUMENT (a filter skips UNSPECIFIED before asking)."""
    kind = _EVENT_KIND_NAMES.get(value)
    if kind is None:
        raise InvalidArgument(
            f"kinds: {value} is not an event kind",
            reason="BAD_ENUM",
            metadata={"field": "kinds", "value": value},
        )
    return kind


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
        exchange=v.exchange,
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
