"""OpenAI response bodies from torpor's GenerateChunks: whole replies, stream chunks, errors.

The `torpor` object of a reply is what `torpor generate --json` shows of the same request:
the tier it was restored from, the runtime and GPU that served it, and its timings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from torpor.errors import WIRE, TorporError
from torpor.v1 import common_pb2

FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class Choice:
    """One prompt's generation, as its chunks arrive."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    usage: Any = None  # common_pb2.Usage, once the last chunk came

    def add(self, chunk: Any) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(token_logprobs(chunk))
        if chunk.HasField("usage"):
            self.usage = chunk.usage

    @property
    def finish_reason(self) -> str | None:
        return None if self.usage is None else FINISH.get(self.usage.finish_reason)


def token_logprobs(chunk: Any) -> list[dict[str, Any]]:
    """Each token's log-probability, as OpenAI's chat `logprobs.content` entries. The text of
    a token is its bytes decoded (a token that is part of a character shows U+FFFD, and
    `bytes` carries it exactly)."""
    details = chunk.token_logprobs
    out = []
    for i, logprob in enumerate(chunk.logprobs):
        entry: dict[str, Any] = {"token": "", "logprob": logprob, "bytes": None, "top_logprobs": []}
        if i < len(details):
            chosen = details[i].chosen
            entry["token"] = chosen.token_bytes.decode("utf-8", "replace")
            entry["bytes"] = list(chosen.token_bytes)
            entry["top_logprobs"] = [
                {
                    "token": t.token_bytes.decode("utf-8", "replace"),
                    "logprob": t.logprob,
                    "bytes": list(t.token_bytes),
                }
                for t in details[i].top
            ]
        out.append(entry)
    return out


def extension(usage: Any) -> dict[str, Any] | None:
    """The `torpor` object: where the model was restored from, what served it, and when."""
    if usage is None:
        return None
    t = usage.timings
    tier = common_pb2.Tier.Name(usage.restored_from).removeprefix("TIER_").lower()
    return {
        "restored_from": None if tier == "unspecified" else tier,
        "runtime_id": usage.runtime_id or None,
        "gpu": usage.gpu,
        "timings": {
            "queued_s": _seconds(t.queued),
            "restore_s": _seconds(t.restore),
            "first_token_s": _seconds(t.first_token),
            "total_s": _seconds(t.total),
        },
    }


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def usage_of(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(c.usage.prompt_tokens for c in choices if c.usage is not None)
    completion = sum(c.usage.completion_tokens for c in choices if c.usage is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_logprobs(choice: Choice, top: int) -> dict[str, Any]:
    """/v1/completions' logprobs: parallel lists, and the offset of each token in the text."""
    tokens, offsets, position = [], [], 0
    for entry in choice.logprobs:
        tokens.append(entry["token"])
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in choice.logprobs],
        "top_logprobs": [
            {t["token"]: t["logprob"] for t in e["top_logprobs"][:top]} for e in choice.logprobs
        ]
        if top
        else None,
        "text_offset": offsets,
    }


def completion(rid: str, model: str, choices: list[Choice], logprobs: int | None) -> Any:
    """A whole /v1/completions reply."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": "".join(c.text),
                "logprobs": None if logprobs is None else _completion_logprobs(c, logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage_of(choices),
        "torpor": extension(choices[0].usage)
        if len(choices) == 1
        else {"choices": [extension(c.usage) for c in choices]},  # a batch: one per prompt
    }


def chat(rid: str, model: str, choice: Choice, logprobs: bool) -> Any:
    """A whole /v1/chat/completions reply."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": {"content": choice.logprobs} if logprobs else None,
                "finish_reason": choice.finish_reason,
            }
        ],
        "usage": usage_of([choice]),
        "torpor": extension(choice.usage),
    }


def completion_chunk(rid: str, model: str, index: int, chunk: Any, top: int | None) -> Any:
    """One server-sent event of a streamed /v1/completions reply."""
    one = Choice(index)
    one.add(chunk)
    doc: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": index,
                "text": chunk.text,
                "logprobs": None if top is None else _completion_logprobs(one, top),
                "finish_reason": one.finish_reason,
            }
        ],
    }
    if one.usage is not None:
        doc["torpor"] = extension(one.usage)
    return doc


def chat_chunk(rid: str, model: str, chunk: Any | None, logprobs: bool, first: bool = False) -> Any:
    """One server-sent event of a streamed /v1/chat/completions reply (the first carries
    the role; `chunk` None: the role alone)."""
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
    one = Choice(0)
    if chunk is not None:
        one.add(chunk)
        if chunk.text:
            delta["content"] = chunk.text
    doc: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": {"content": one.logprobs} if logprobs and one.logprobs else None,
                "finish_reason": one.finish_reason,
            }
        ],
    }
    if one.usage is not None:
        doc["torpor"] = extension(one.usage)
    return doc


def usage_chunk(rid: str, model: str, kind: str, choices: list[Choice]) -> Any:
    """The last event of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage_of(choices),
    }


def error(err: TorporError) -> tuple[int, dict[str, Any]]:
    """OpenAI's error body for a torpor error, and its HTTP status (errors.WIRE)."""
    wire = WIRE[err.code]
    return wire.http, {
        "error": {
            "message": err.message,
            "type": wire.openai_type,
            "param": err.metadata.get("field"),
            "code": err.reason,
        }
    }


def event(doc: Any) -> bytes:
    """A server-sent event carrying `doc`."""
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
