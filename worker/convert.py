"""The worker's side of the wire: torpor.v1 messages to engine and pager dataclasses, and back.

This is the worker's one translation table for enums (issue 13): service.py calls it, and
tests/worker/test_enum_tables.py sends every member through it, both ways where both exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration

from torpor.errors import InvalidArgument
from torpor.exchange_board import Side
from torpor.v1 import common_pb2, worker_pb2
from torpor.worker.engine.requests import FinishReason
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.paged_state import SUSPENDED, PagedState, SuspendLevel

DTYPES: dict[int, str] = {
    common_pb2.DTYPE_UNSPECIFIED: "auto",
    common_pb2.DTYPE_FLOAT32: "float32",
    common_pb2.DTYPE_BFLOAT16: "bfloat16",
    common_pb2.DTYPE_FLOAT16: "float16",
    common_pb2.DTYPE_FP8: "fp8",
}
# A Load's weights: "checkpoint" (the safetensors) or "dummy" (random, shaped by config.json).
LOAD_FORMATS: dict[int, str] = {
    common_pb2.LOAD_FORMAT_UNSPECIFIED: "checkpoint",
    common_pb2.LOAD_FORMAT_CHECKPOINT: "checkpoint",
    common_pb2.LOAD_FORMAT_DUMMY: "dummy",
}
LEVELS: dict[int, SuspendLevel] = {
    common_pb2.TIER_HOST: SuspendLevel.HOST,
    common_pb2.TIER_DEEP: SuspendLevel.DEEP,
    common_pb2.TIER_DISK: SuspendLevel.DISK,
}
# LEVELS' inverse, by SuspendLevel value (a ResumeReport's tier).
TIERS: dict[str, common_pb2.Tier] = {
    "host": common_pb2.TIER_HOST,
    "deep": common_pb2.TIER_DEEP,
    "disk": common_pb2.TIER_DISK,
}
STATES: dict[PagedState, common_pb2.RuntimeState] = {
    PagedState.RESIDENT: common_pb2.RUNTIME_STATE_RESIDENT,
    PagedState.SUSPENDED_HOST: common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
    PagedState.SUSPENDED_DEEP: common_pb2.RUNTIME_STATE_SUSPENDED_DEEP,
    PagedState.SUSPENDED_DISK: common_pb2.RUNTIME_STATE_SUSPENDED_DISK,
    # Part way through an exchange swap (or stopped in one): a transition torpord finishes.
    PagedState.EXCHANGING: common_pb2.RUNTIME_STATE_SUSPENDING,
    PagedState.CLOSED: common_pb2.RUNTIME_STATE_COLD,
}
FINISH: dict[FinishReason, common_pb2.FinishReason] = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def dtype(value: int) -> str:
    try:
        return DTYPES[value]
    except KeyError:
        raise InvalidArgument(f"unknown dtype enum value {value}", reason="BAD_DTYPE") from None


def load_format(value: int) -> str:
    try:
        return LOAD_FORMATS[value]
    except KeyError:
        raise InvalidArgument(
            f"unknown load_format enum value {value}", reason="BAD_LOAD_FORMAT"
        ) from None


def level(tier: int) -> SuspendLevel:
    if tier not in LEVELS:
        name = common_pb2.Tier.Name(tier) if tier in common_pb2.Tier.values() else str(tier)
        raise InvalidArgument(
            f"a worker suspends to HOST, DEEP or DISK, not {name}",
            reason="BAD_SUSPEND_LEVEL",
            metadata={"level": name},
        )
    return LEVELS[tier]


TARGETS: dict[int, PagedState] = {
    common_pb2.RUNTIME_STATE_RESIDENT: PagedState.RESIDENT,
    common_pb2.RUNTIME_STATE_SUSPENDED_HOST: PagedState.SUSPENDED_HOST,
}
"""Where a Load or a Resume may end (worker.proto: `target`)."""


def target(value: int, verb: str) -> PagedState:
    """The residency a Load or Resume ends in; InvalidArgument for any other state."""
    if value not in TARGETS:
        raise InvalidArgument(
            f"a {verb} ends RUNTIME_STATE_RESIDENT or RUNTIME_STATE_SUSPENDED_HOST, not "
            f"{_name(common_pb2.RuntimeState, value)}: the target is required",
            reason="BAD_TARGET",
            metadata={"target": _name(common_pb2.RuntimeState, value)},
        )
    return TARGETS[value]


def resume_source(tier: int) -> PagedState:
    """The suspended residency a Resume's `source` names; InvalidArgument for any other tier."""
    if tier not in LEVELS:
        raise InvalidArgument(
            f"a resume starts from TIER_HOST, TIER_DEEP or TIER_DISK, not "
            f"{_name(common_pb2.Tier, tier)}: the source is required",
            reason="BAD_RESUME_SOURCE",
            metadata={"source": _name(common_pb2.Tier, tier)},
        )
    return SUSPENDED[LEVELS[tier]]


SIDES: dict[int, Side] = {
    worker_pb2.EXCHANGE_SIDE_OUT: Side.OUT,
    worker_pb2.EXCHANGE_SIDE_IN: Side.IN,
}
MAX_EXCHANGE_TIMEOUT_S = 3600.0


def exchange(request: worker_pb2.WorkerExchangeRequest) -> tuple[Side, Path, float]:
    """The side, board and timeout of an Exchange; InvalidArgument BAD_EXCHANGE otherwise."""
    if request.side not in SIDES:
        raise InvalidArgument(
            f"an exchange side is EXCHANGE_SIDE_OUT or EXCHANGE_SIDE_IN, not "
            f"{_name(worker_pb2.ExchangeSide, request.side)}",
            reason="BAD_EXCHANGE",
            metadata={"side": _name(worker_pb2.ExchangeSide, request.side)},
        )
    board = Path(request.board_path)
    if not request.board_path or not board.is_absolute():
        raise InvalidArgument(
            f"the exchange board must be an absolute path, not {request.board_path!r}",
            reason="BAD_EXCHANGE",
        )
    timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 0
    if not 0 < timeout <= MAX_EXCHANGE_TIMEOUT_S:
        raise InvalidArgument(
            f"an exchange's timeout must be in (0, {MAX_EXCHANGE_TIMEOUT_S:.0f}] s, not "
            f"{timeout} s",
            reason="BAD_EXCHANGE",
        )
    return SIDES[request.side], board, timeout


def tier_name(value: int) -> str:
    """A Tier's name for a message, or its number when it has none."""
    return _name(common_pb2.Tier, value)


def _name(enum: Any, value: int) -> str:
    return str(enum.Name(value)) if value in enum.values() else str(value)


def sampling(msg: common_pb2.SamplingParams, prompt_len: int, max_seq_len: int) -> SamplingParams:
    """Engine sampling parameters; the proto's zeros mean "the default" (see common.proto)."""
    return SamplingParams(
        max_tokens=msg.max_tokens or max(1, max_seq_len - prompt_len),
        temperature=msg.temperature,
        top_p=msg.top_p if 0 < msg.top_p < 1 else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
