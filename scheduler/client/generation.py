"""`torpor generate`: stream a generation's text to stdout, or print it as one JSON object.

The flags and their defaults are those of the standalone `torpor run`, so the same command
line samples the same way with or without the daemon.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated

import typer

from torpor.scheduler.client import render, shapes
from torpor.scheduler.client.commands import JsonOption, ModelArg
from torpor.scheduler.client.progress import for_output
from torpor.scheduler.client.session import session, wants_json
from torpor.v1 import common_pb2, scheduler_pb2


@dataclass
class Generation:
    """The chunks of one Generate stream, joined; `usage` comes with the last chunk."""

    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    usage: common_pb2.Usage | None = None
    token_logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    show_token_logprobs: bool = False  # --logprobs N: the JSON object carries them

    def add(self, chunk: common_pb2.GenerateChunk) -> None:
        self.token_ids += chunk.token_ids
        self.pieces.append(chunk.text)
        self.logprobs += chunk.logprobs
        self.token_logprobs += chunk.token_logprobs
        if chunk.HasField("usage"):
            self.usage = chunk.usage

    def as_json(self, model: str) -> shapes.Json:
        """`torpor generate --json`."""
        u = self.usage if self.usage is not None else common_pb2.Usage()
        t = u.timings
        extra: shapes.Json = {}
        if self.show_token_logprobs:
            extra["token_logprobs"] = [
                {**_token(e.chosen), "top": [_token(t) for t in e.top]} for e in self.token_logprobs
            ]
        return {
            "model": model,
            "token_ids": self.token_ids,
            "text": "".join(self.pieces),
            "logprobs": self.logprobs,
            "finish_reason": shapes.enum_name(common_pb2.FinishReason, u.finish_reason),
            "restored_from": shapes.enum_name(common_pb2.Tier, u.restored_from),
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "gpu": u.gpu if self.usage is not None else None,
            "runtime_id": u.runtime_id or None,
            "timings": {
                "queued_s": shapes.seconds(t, "queued"),
                "restore_s": shapes.seconds(t, "restore"),
                "first_token_s": shapes.seconds(t, "first_token"),
                "total_s": shapes.seconds(t, "total"),
            },
            **extra,
        }


def _token(t: common_pb2.TokenLogprob) -> shapes.Json:
    """One token of `--logprobs N`: its bytes as a list of byte values (a token may hold part
    of a UTF-8 character), as OpenAI's API gives them."""
    return {"token_id": t.token_id, "logprob": t.logprob, "bytes": list(t.token_bytes)}


def generate(
    ctx: typer.Context,
    name: ModelArg,
    prompt: Annotated[
        str, typer.Argument(metavar="PROMPT", help="Prompt text.", show_default=False)
    ],
    max_tokens: Annotated[int, typer.Option(min=0, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k most likely; 0 keeps all.")] = 0,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="A stop string (repeatable).")] = None,
    priority: Annotated[int, typer.Option(help="-100..100, added to the model's.")] = 0,
    logprobs: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=5,
            metavar="N",
            help="With --json: each token's bytes and its N (0..5) most likely alternatives.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate from a prompt on the daemon, streaming the text as it comes.

    The daemon acquires a runtime implicitly (queueing, evicting and restoring first when
    needed). A summary goes to stderr; --json prints one object instead.
    """
    as_json = wants_json(ctx, as_json)
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop or [],
        logprobs=as_json,  # the JSON object carries them; text output has no use for them
        top_logprobs=(logprobs or 0) if as_json else 0,
    )
    request = scheduler_pb2.GenerateRequest(
        model=name, prompt_text=prompt, sampling=sampling, priority=priority
    )
    result = Generation(show_token_logprobs=as_json and logprobs is not None)
    with session(ctx) as conn:
        view = for_output(as_json)
        view.waiting("wait", f"waiting for {name}")
        try:
            for chunk in conn.stream(conn.scheduler.Generate, request):
                view.close()
                result.add(chunk)
                if not as_json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except BaseException:
            # A stream that breaks after some text (an ABORT eviction, a dead worker, Ctrl-C)
            # ends that text's line, so the one-line reason that follows is a line of its own.
            if not as_json and any(result.pieces):
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        finally:
            view.close()
    if as_json:
        render.print_json(result.as_json(name))
    else:
        sys.stdout.write("\n")
        print(summary(result.as_json(name)), file=sys.stderr, flush=True)


def summary(doc: shapes.Json) -> str:
    """`[16 tokens, length; restored from host in 820 ms, first token 850 ms, total 1.20 s]`."""
    t = doc["timings"]
    source, restore = doc["restored_from"], render.secs(t["restore_s"])
    if source == "gpu":
        where = "resident"
    elif source == "source":
        where = f"cold load in {restore}"
    else:
        where = f"restored from {source or '?'} in {restore}"
    return (
        f"[{len(doc['token_ids'])} tokens, {doc['finish_reason']}; {where}, first token "
        f"{render.secs(t['first_token_s'])}, total {render.secs(t['total_s'])}]"
    )
