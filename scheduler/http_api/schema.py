"""An OpenAI request body, checked field by field and turned into torpor's Generate requests.

Every field is either used, accepted only at its neutral value (a `presence_penalty` of 0),
or refused with INVALID_ARGUMENT naming it (`tools`, `response_format`, images, audio, and
any field this table does not know): nothing is silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torpor.errors import InvalidArgument
from torpor.v1 import common_pb2, scheduler_pb2

MAX_TOP_LOGPROBS = 5
MAX_BATCH = 64
"""Most prompts in one completions request (a list of strings or of token-id lists)."""
COMPLETIONS_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` of /v1/completions; chat has none (up to max_seq_len)."""

COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "user",
        "logprobs",
        "top_k",
        "ignore_eos",
    }
)
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}

NEUTRAL: Mapping[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (0, 0.0, None),
    "frequency_penalty": lambda v: v in (0, 0.0, None),
    "repetition_penalty": lambda v: v in (1, 1.0, None),
    "logit_bias": lambda v: v in ({}, None),
    "best_of": lambda v: v in (1, None),
    "echo": lambda v: v in (False, None),
    "suffix": lambda v: v in ("", None),
    "store": lambda v: v in (False, None),
    "metadata": lambda v: v in ({}, None),
    "parallel_tool_calls": lambda v: v is None,
    "tool_choice": lambda v: v in ("none", None),
    "tools": lambda v: v in ([], None),
    "functions": lambda v: v in ([], None),
    "function_call": lambda v: v in ("none", None),
    "response_format": lambda v: v in ({"type": "text"}, None),
    "modalities": lambda v: v in (["text"], None),
    "audio": lambda v: v is None,
    "service_tier": lambda v: v in ("auto", "default", None),
}
"""Fields torpor does not implement, accepted only where their value asks for nothing."""

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Completion:
    """What a request asks for: one Generate request per prompt, and how to answer."""

    model: str
    requests: list[Any]
    """`scheduler_pb2.GenerateRequest`s, one per prompt (a batch: several)."""
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    user: str = ""
    prompts: list[str] = field(default_factory=list)
    """The prompt texts (for the request log; token-id prompts are empty)."""


def _bad(field_name: str, message: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"field": field_name})


def _check_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name, value in body.items():
        if name in known:
            continue
        accepts = NEUTRAL.get(name)
        if accepts is None:
            raise _bad(name, f"unrecognized field {name!r}", "UNKNOWN_FIELD")
        if not accepts(value):
            raise _bad(name, f"torpor does not implement {name!r}", "UNSUPPORTED_FIELD")


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"{name} must be a number")
    if not lo <= value <= hi:
        raise _bad(name, f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _int(body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer")
    if not lo <= value <= hi:
        raise _bad(name, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false")
    return value


def _stop(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "stop must be a non-empty string or a list of them")
    return list(stops)


def _sampling(body: Mapping[str, Any], default_max_tokens: int, chat: bool) -> Any:
    max_tokens = _int(body, "max_tokens", None, 1, 10_000_000)
    if chat:
        newer = _int(body, "max_completion_tokens", None, 1, 10_000_000)
        if newer is not None:
            max_tokens = newer
    n = _int(body, "n", 1, 1, 128)
    if n != 1:
        raise _bad("n", "torpor returns one choice per prompt: n must be 1")
    params = common_pb2.SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 0, 1 << 20) or 0,
        stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"),
    )
    seed = _int(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    if seed is not None:
        params.seed = seed % (1 << 64)
    return params


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", "stream_options takes only include_usage")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _bad("stream_options.include_usage", "include_usage must be true or false")
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required: the name of a registered model")
    return model


def _user(body: Mapping[str, Any]) -> str:
    user = body.get("user", "")
    if not isinstance(user, str) or len(user) > 256:
        raise _bad("user", "user must be a string of at most 256 characters")
    return user


def completion(body: Mapping[str, Any]) -> Completion:
    """A /v1/completions body."""
    _check_fields(body, COMPLETION_FIELDS)
    model = _model(body)
    stream = _bool(body, "stream")
    sampling = _sampling(body, COMPLETIONS_MAX_TOKENS, chat=False)
    top = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None:
        sampling.logprobs = True
        sampling.top_logprobs = top
    prompts = _prompts(body.get("prompt"))
    requests = []
    for prompt in prompts:
        request = scheduler_pb2.GenerateRequest(model=model, sampling=sampling)
        if isinstance(prompt, str):
            request.prompt_text = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        requests.append(request)
    return Completion(
        model,
        requests,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=top is not None,
        top_logprobs=top or 0,
        user=_user(body),
        prompts=[p if isinstance(p, str) else "" for p in prompts],
    )


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A string, a list of token ids, a list of strings (a batch) or a list of token-id
    lists (a batch)."""
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "prompt must not be empty")
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) and p for p in prompt):
            batch: list[str | list[int]] = list(prompt)
        elif all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
            batch = [list(p) for p in prompt]
        else:
            batch = []
        if batch:
            if len(batch) > MAX_BATCH:
                raise _bad("prompt", f"at most {MAX_BATCH} prompts in one request")
            return batch
    raise _bad(
        "prompt",
        "prompt must be a non-empty string, a list of token ids, or a list of either",
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def chat(body: Mapping[str, Any]) -> tuple[Completion, list[tuple[str, str]]]:
    """A /v1/chat/completions body, and its messages as (role, text) pairs."""
    _check_fields(body, CHAT_FIELDS)
    model = _model(body)
    stream = _bool(body, "stream")
    sampling = _sampling(body, 0, chat=True)
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    sampling.logprobs = logprobs
    sampling.top_logprobs = top
    messages = _messages(body.get("messages"))
    request = scheduler_pb2.GenerateRequest(model=model, sampling=sampling)
    done = Completion(
        model,
        [request],
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
        top_logprobs=top,
        user=_user(body),
    )
    return done, messages


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"{where} must be an object")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            name = sorted(extra)[0]
            raise _bad(f"{where}.{name}", f"torpor does not implement {where}.{name}")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
        out.append((role, _content(message.get("content"), f"{where}.content")))
    return out


def _content(value: Any, where: str) -> str:
    """Text content: a string, or a list of `{"type": "text", "text": ...}` parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _bad(
                    f"{where}[{j}]",
                    f"{where}[{j}]: torpor takes only text parts, not {kind or 'this'}",
                    "UNSUPPORTED_FIELD",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(where, f"{where} must be a string or a list of text parts")
