"""The API edge's checks: each field of a Scheduler or Admin request against the limits that
the .proto comments and docs/API.md ("Limits") state, before anything moves.

The servicers call these first, so a bad value is refused with INVALID_ARGUMENT (a stable
`reason`, the field and the value in `metadata`) before a request is queued, a victim evicted
or a worker started: issue 12 found a Generate with temperature NaN that evicted a resident
model and cold-loaded another before the worker refused it. What depends on the model is
checked against `ModelLimits`, read at registration; the worker checks everything again and
alone knows how many tokens a text prompt makes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from torpor import chat_template
from torpor.errors import FailedPrecondition, InvalidArgument, NotFound
from torpor.scheduler.core.scheduler_state import Model
from torpor.store.names import check_source_length, validate_model_name
from torpor.v1 import common_pb2, scheduler_pb2

PRIORITY_MIN, PRIORITY_MAX = -100, 100
"""Priority of a model (ModelSpec) or of one request (Acquire, Generate, Explain)."""
LEASE_TTL_S = (1.0, 3600.0)
"""Acquire.lease_ttl and Renew.ttl."""
DRAIN_TIMEOUT_S = (0.0, 3600.0)
"""Evict.drain_timeout and Drain.drain_timeout (the config's daemon.drain_timeout_s bounds)."""
MAX_TEMPERATURE = 100.0
MAX_TOKENS = 10_000_000
"""SamplingParams.max_tokens (the worker's own bound); for_model() bounds it by max_seq_len."""
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 5
MAX_PROMPT_TOKEN_IDS = 1 << 20
MAX_BATCH = 1024
MAX_KEEP_ALIVE_S = 10 * 365 * 86400
"""ModelSpec.keep_alive_s: ten years, what the catalog stores."""
MAX_EVENT_ID = 2**63 - 1
"""Event ids are the catalog's 64-bit signed integers; WatchEvents.after_id above is refused."""

# google.protobuf's own ranges: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, and ±10,000 years.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_DURATION_SECONDS = 315_576_000_000
_NANOS = 999_999_999


def bad(field: str, value: object, rule: str, reason: str) -> InvalidArgument:
    """The error for one bad field: its name and value in the message and in metadata."""
    shown = repr(value) if isinstance(value, str) else str(value)
    return InvalidArgument(
        f"{field}={shown[:200]} is invalid: {rule}",
        reason=reason,
        metadata={"field": field, "value": shown[:200]},
    )


def required(value: str, field: str, reason: str = "MODEL_REQUIRED") -> str:
    """A name the request cannot do without (a model, a lease, a snapshot)."""
    if not value:
        raise bad(field, value, "it is required", reason)
    return value


def priority(value: int, field: str = "priority") -> int:
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise bad(field, value, f"must be in [{PRIORITY_MIN}, {PRIORITY_MAX}]", "BAD_PRIORITY")
    return value


def enum(value: int, descriptor: EnumDescriptor, field: str, allowed: Iterable[int] = ()) -> int:
    """A proto3 enum value (open enums decode unknown numbers too): a known one, and one of
    `allowed` when given."""
    names = {v.number: v.name for v in descriptor.values}
    choices = set(allowed) or set(names)
    if value not in choices:
        listed = ", ".join(names[n] for n in sorted(choices))
        raise bad(field, value, f"must be one of {listed}", "BAD_ENUM")
    return value


def timestamp(msg: Timestamp, field: str) -> datetime:
    """A Timestamp inside protobuf's range (years 1 to 9999), as an aware datetime."""
    if not _TIMESTAMP_SECONDS[0] <= msg.seconds <= _TIMESTAMP_SECONDS[1]:
        raise bad(field, msg.seconds, "seconds must be in years 1 to 9999", "BAD_TIMESTAMP")
    if not 0 <= msg.nanos <= _NANOS:
        raise bad(field, f"{msg.nanos}ns", f"nanos must be in [0, {_NANOS}]", "BAD_TIMESTAMP")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + timedelta(seconds=msg.seconds, microseconds=msg.nanos // 1000)


def timestamp_s(msg: Timestamp, field: str) -> float:
    """A valid Timestamp as seconds since the epoch."""
    timestamp(msg, field)
    return msg.seconds + msg.nanos / 1e9


def duration(
    msg: Duration, field: str, bounds: tuple[float, float], reason: str = "BAD_DURATION"
) -> float:
    """A valid Duration (seconds and nanos of one sign) within `bounds`, in seconds."""
    if abs(msg.seconds) > _DURATION_SECONDS or abs(msg.nanos) > _NANOS:
        raise bad(field, f"{msg.seconds}s {msg.nanos}ns", "out of range", reason)
    if (msg.seconds > 0 and msg.nanos < 0) or (msg.seconds < 0 and msg.nanos > 0):
        raise bad(field, f"{msg.seconds}s {msg.nanos}ns", "mixed signs", reason)
    seconds = msg.seconds + msg.nanos / 1e9
    lo, hi = bounds
    if not lo <= seconds <= hi:
        raise bad(field, f"{seconds:g}s", f"must be in [{lo:g}, {hi:g}] s", reason)
    return seconds


def event_id(value: int, field: str = "after_id") -> int:
    if value > MAX_EVENT_ID:
        raise bad(field, value, f"event ids are at most {MAX_EVENT_ID}", "BAD_EVENT_ID")
    return value


def sampling(msg: common_pb2.SamplingParams) -> None:
    """SamplingParams as common.proto bounds them; reason INVALID_SAMPLING."""
    _sample(msg.max_tokens <= MAX_TOKENS, "max_tokens", msg.max_tokens, f"at most {MAX_TOKENS}")
    _sample(
        math.isfinite(msg.temperature) and 0 <= msg.temperature <= MAX_TEMPERATURE,
        "temperature",
        msg.temperature,
        f"must be finite, in [0, {MAX_TEMPERATURE:g}]",
    )
    _sample(
        math.isfinite(msg.top_p) and 0 <= msg.top_p <= 1, "top_p", msg.top_p, "must be in [0, 1]"
    )
    _sample(
        len(msg.stop) <= MAX_STOP_STRINGS,
        "stop",
        len(msg.stop),
        f"at most {MAX_STOP_STRINGS} stop strings",
    )
    for text in msg.stop:
        size = len(text.encode())
        _sample(0 < size <= MAX_STOP_BYTES, "stop", repr(text), f"1..{MAX_STOP_BYTES} bytes each")
    count = len(msg.stop_token_ids)
    _sample(count <= MAX_STOP_TOKEN_IDS, "stop_token_ids", count, f"at most {MAX_STOP_TOKEN_IDS}")
    top = msg.top_logprobs
    _sample(top <= MAX_TOP_LOGPROBS, "top_logprobs", top, f"must be in [0, {MAX_TOP_LOGPROBS}]")
    _sample(top == 0 or msg.logprobs, "top_logprobs", top, "needs logprobs")


def _sample(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise bad(field, value, rule, "INVALID_SAMPLING")


def generate_request(msg: scheduler_pb2.GenerateRequest) -> str:
    """Check a GenerateRequest whole; its target, "model" or "lease_id"."""
    target = msg.WhichOneof("target")
    if target is None:
        raise InvalidArgument("Generate needs a model or a lease_id", reason="NO_TARGET")
    reasons = {"model": "MODEL_REQUIRED", "lease_id": "LEASE_REQUIRED"}
    required(getattr(msg, target), target, reasons[target])
    prompt = msg.WhichOneof("prompt")
    if prompt is None or (prompt == "prompt_text" and not msg.prompt_text):
        raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
    if prompt == "prompt_token_ids":
        prompt_token_ids(msg.prompt_token_ids)
    if prompt == "prompt_chat":
        chat_template.messages(msg.prompt_chat)  # roles, count, size
    sampling(msg.sampling)
    priority(msg.priority)  # ignored with a lease, but one rule for all
    return str(target)


@dataclass(frozen=True)
class ModelLimits:
    """What a registered model bounds in a request, known from its registration."""

    vocab_size: int  # 0: unknown, the worker checks token ids alone
    max_seq_len: int
    chat: bool = False  # it has a chat template (the registration's or the checkpoint's)


def for_model(msg: scheduler_pb2.GenerateRequest, limits: ModelLimits) -> None:
    """The checks of a GenerateRequest that depend on its model, made before it queues (the
    worker makes them again, with the same reasons)."""
    vocab, limit = limits.vocab_size, limits.max_seq_len
    if msg.WhichOneof("prompt") == "prompt_chat" and not limits.chat:
        raise FailedPrecondition(
            "this model has no chat template (none in its checkpoint, none registered): send "
            "prompt_text or prompt_token_ids, or register it with a chat template",
            reason="NO_CHAT_TEMPLATE",
        )
    ids = msg.prompt_token_ids.ids if msg.WhichOneof("prompt") == "prompt_token_ids" else ()
    if vocab:
        bad_ids = [t for t in ids if t >= vocab]
        if bad_ids:
            raise InvalidArgument(
                f"prompt token ids out of the vocabulary [0, {vocab}): {bad_ids[:5]}",
                reason="TOKEN_OUT_OF_VOCAB",
                metadata={"token_id": bad_ids[0], "vocab_size": vocab},
            )
        sample = msg.sampling
        _sample(sample.top_k <= vocab, "top_k", sample.top_k, f"must be in [0, {vocab}]")
        for t in sample.stop_token_ids:
            _sample(t < vocab, "stop_token_ids", t, f"must be in [0, {vocab})")
    prompt = max(len(ids), 1)  # a text prompt is at least one token
    if len(ids) >= limit:
        raise bad("prompt_token_ids", len(ids), f"must be < max_seq_len={limit}", "PROMPT_TOO_LONG")
    if prompt + msg.sampling.max_tokens > limit:
        raise bad(
            "max_tokens",
            msg.sampling.max_tokens,
            f"the prompt ({prompt} tokens) plus max_tokens exceeds max_seq_len={limit}",
            "MAX_TOKENS_TOO_LARGE",
        )


def prompt_token_ids(ids: common_pb2.TokenIds) -> None:
    if not ids.ids:
        raise bad("prompt_token_ids", "[]", "the prompt is empty", "EMPTY_PROMPT")
    if len(ids.ids) > MAX_PROMPT_TOKEN_IDS:
        raise bad(
            "prompt_token_ids", len(ids.ids), f"at most {MAX_PROMPT_TOKEN_IDS}", "PROMPT_TOO_LONG"
        )


def model_spec(msg: common_pb2.ModelSpec) -> None:
    """A RegisterModel spec, before its source is looked at."""
    validate_model_name(msg.name)  # first: a name never becomes a path
    if not msg.source:
        raise bad("spec.source", "", "the checkpoint directory is required", "NO_SOURCE")
    check_source_length(msg.source)
    enum(msg.dtype, common_pb2.Dtype.DESCRIPTOR, "spec.dtype")
    enum(msg.load_format, common_pb2.LoadFormat.DESCRIPTOR, "spec.load_format")
    if msg.max_batch > MAX_BATCH:
        raise bad("spec.max_batch", msg.max_batch, f"must be in [0, {MAX_BATCH}]", "BAD_MAX_BATCH")
    priority(msg.priority, "spec.priority")
    if msg.keep_alive_s > MAX_KEEP_ALIVE_S:
        raise bad(
            "spec.keep_alive_s",
            msg.keep_alive_s,
            f"at most {MAX_KEEP_ALIVE_S} (ten years)",
            "BAD_KEEP_ALIVE",
        )


def known_model(models: Mapping[str, Model], name: str, field: str = "model") -> Model:
    """A registered model: INVALID_ARGUMENT when the name is empty, NOT_FOUND when no model
    of that name is registered (or it is being unregistered)."""
    required(name, field)
    model = models.get(name)
    if model is None or model.unregistering:
        raise NotFound(
            f"no model {name!r} is registered", reason="MODEL_NOT_FOUND", metadata={"model": name}
        )
    return model
