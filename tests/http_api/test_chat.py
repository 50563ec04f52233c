"""/v1/chat/completions through the official `openai` SDK against a real torpord (issue 14):
the checkpoint's chat template, streaming and not, text parts, and 64 concurrent streams over
three models that do not all fit."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import openai
import pytest

from tests.daemon.conftest import MODELS, call
from tests.http_api.conftest import Served
from torpor.v1 import common_pb2, scheduler_pb2

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def grpc_chat(served: Served, model: str, messages: list[dict[str, str]], seed: int) -> str:
    """The same conversation through Scheduler.Generate's prompt_chat."""
    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_chat=common_pb2.ChatPrompt(
            messages=[
                common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages
            ],
            add_generation_prompt=True,
        ),
        sampling=common_pb2.SamplingParams(
            max_tokens=8, temperature=1.0, top_p=1.0, seed=seed, ignore_eos=True
        ),
    )
    return "".join(c.text for c in call(served.daemon.scheduler.Generate, request, timeout=120))


def test_a_chat_reply_is_the_grpc_chat_generation(served: Served, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=8, seed=5, extra_body={"ignore_eos": True}
    )
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == grpc_chat(served, "alpha", HELLO, seed=5)
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.model_extra["torpor"]["timings"]["total_s"] > 0  # type: ignore[index]


def test_text_parts_are_joined_as_one_content(client: openai.OpenAI) -> None:
    be, brief, hello = ({"type": "text", "text": t} for t in ("Be ", "brief.", "Hello"))
    parts = [{"role": "system", "content": [be, brief]}, {"role": "user", "content": [hello]}]
    ask = {"model": "alpha", "max_tokens": 6, "temperature": 0}
    joined = client.chat.completions.create(messages=HELLO, **ask, extra_body={"ignore_eos": True})
    split = client.chat.completions.create(messages=parts, **ask, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert split.choices[0].message.content == joined.choices[0].message.content


def test_a_chat_stream_starts_with_the_role_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="beta", messages=HELLO, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    events = list(
        client.chat.completions.create(
            model="beta",
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert events[-2].choices[0].finish_reason == "length"
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == 8


def test_an_image_part_or_a_tool_is_400_naming_it(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    cases = [
        ({"messages": [{"role": "user", "content": [image]}]}, "messages[0].content[0]"),
        ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ]
    for ask, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="alpha", max_tokens=1, **ask)  # type: ignore[arg-type]
        assert info.value.body["param"] == param, info.value.body  # type: ignore[index]


def test_a_model_without_a_chat_template_is_400(
    served: Served, client: openai.OpenAI, model_root: Path
) -> None:
    plain = model_root / "plain-http"  # under the model root; no test lists the root
    if not plain.exists():
        shutil.copytree(model_root / "alpha", plain)
        config = json.loads((plain / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (plain / "tokenizer_config.json").write_text(json.dumps(config))
        (plain / "chat_template.jinja").unlink(missing_ok=True)
    served.daemon.register("plain", plain)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=HELLO, max_tokens=1)
    assert info.value.body["code"] == "NO_CHAT_TEMPLATE"  # type: ignore[index]
    assert client.completions.create(model="plain", prompt="x", max_tokens=1).choices


def test_64_concurrent_streams_over_three_models_that_do_not_all_fit(served: Served) -> None:
    """The device holds two of the three models: the scheduler pages them while 64 streams
    run, and every stream gets the tokens its model gives alone."""
    sync = served.client()
    ask = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    expected = {
        m: sync.chat.completions.create(model=m, messages=HELLO, **ask).choices[0].message.content  # type: ignore[arg-type]
        for m in MODELS
    }

    async def one(client: openai.AsyncOpenAI, model: str) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=model,
            messages=HELLO,
            stream=True,
            **ask,  # type: ignore[arg-type]
        )
        text = "".join([e.choices[0].delta.content or "" async for e in stream if e.choices])
        return model, text

    async def all_of_them() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(
            base_url=served.base_url, api_key="none", max_retries=0, timeout=300
        )
        async with client:
            return await asyncio.gather(*(one(client, MODELS[i % 3]) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    for model, text in results:
        assert text == expected[model], model


def test_chat_logprobs_carry_bytes_and_top_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="alpha",
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(entry.bytes for entry in content)  # a special token's bytes are its text
    text = bytes(b for entry in content for b in entry.bytes or []).decode("utf-8", "replace")
    assert text.startswith(reply.choices[0].message.content or "")  # which skips them
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the most likely
        assert entry.top_logprobs[0].token == entry.token
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="alpha", messages=HELLO, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"  # type: ignore[index]
