"""/v1/models and /v1/completions through the official `openai` SDK against a real torpord
(issue 14): the same scheduler as gRPC, a suspended model held while it is restored and then
served, stop strings, logprobs, usage, and the torpor extension object."""

from __future__ import annotations

import openai
import pytest

from tests.daemon.conftest import MODELS, call
from tests.http_api.conftest import Served
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

PROMPT = "The cat sat on the"


def grpc_text(served: Served, model: str, prompt: str, max_tokens: int, seed: int) -> str:
    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_text=prompt,
        sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed, ignore_eos=True
        ),
    )
    chunks = call(served.daemon.scheduler.Generate, request, timeout=120)
    return "".join(c.text for c in chunks)


def evict(served: Served, model: str, tier: int) -> None:
    request = admin_pb2.EvictRequest(model=model, to_tier=tier)
    call(served.daemon.admin.Evict, request, timeout=60)


def test_models_lists_every_registered_model_with_its_residency(client: openai.OpenAI) -> None:
    page = client.models.list()
    assert [m.id for m in page.data] == list(MODELS)
    for m in page.data:
        assert m.object == "model" and m.owned_by == "torpor" and m.created > 0
        extra = m.model_extra["torpor"]  # type: ignore[index]
        assert set(extra) == {"state", "tier", "restore_estimate_s", "pinned"}
        assert extra["restore_estimate_s"] >= 0


def test_a_completion_is_the_grpc_generation_with_usage_and_timings(
    served: Served, client: openai.OpenAI
) -> None:
    reply = client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=8, seed=7, extra_body={"ignore_eos": True}
    )
    (choice,) = reply.choices
    assert choice.text == grpc_text(served, "alpha", PROMPT, 8, seed=7)
    assert choice.finish_reason == "length"
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + 8 and usage.prompt_tokens > 0
    ext = reply.model_extra["torpor"]  # type: ignore[index]
    assert ext["restored_from"] in {"gpu", "host", "deep", "disk", "source"}
    assert set(ext["timings"]) == {"queued_s", "restore_s", "first_token_s", "total_s"}
    assert ext["timings"]["total_s"] >= ext["timings"]["first_token_s"] > 0


def test_a_stream_ends_with_done_and_concatenates_to_the_whole_reply(
    client: openai.OpenAI,
) -> None:
    whole = client.completions.create(
        model="beta", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    events = list(
        client.completions.create(
            model="beta",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == whole.choices[0].text
    assert events[-2].choices[0].finish_reason == "length"
    usage = events[-1].usage  # include_usage: a last event with no choices
    assert events[-1].choices == [] and usage is not None and usage.completion_tokens == 10


@pytest.mark.parametrize("tier", [common_pb2.TIER_HOST, common_pb2.TIER_DISK])
def test_a_suspended_model_is_restored_and_answers_as_a_resident_one(
    served: Served, client: openai.OpenAI, tier: int
) -> None:
    ask = {"model": "gamma", "prompt": PROMPT, "max_tokens": 8, "seed": 11}
    resident = client.completions.create(**ask, extra_body={"ignore_eos": True})
    evict(served, "gamma", tier)
    restored = client.completions.create(**ask, extra_body={"ignore_eos": True})
    assert restored.choices[0].text == resident.choices[0].text
    name = common_pb2.Tier.Name(tier).removeprefix("TIER_").lower()
    assert restored.model_extra["torpor"]["restored_from"] == name  # type: ignore[index]


def test_a_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    ask = {"model": "alpha", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**ask, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full  # a stop string that is not only blanks
    cut = client.completions.create(**ask, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_give_one_number_per_token(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=6,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_a_batch_of_prompts_answers_each_in_order(client: openai.OpenAI) -> None:
    prompts = ["One", "Two two", PROMPT]
    batch = client.completions.create(
        model="alpha", prompt=prompts, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch.choices, strict=True):
        one = client.completions.create(
            model="alpha",
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert choice.text == one.choices[0].text
    assert batch.usage is not None and batch.usage.completion_tokens == 12


def test_a_token_id_prompt_is_used_as_given(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="alpha", prompt=[1, 2, 3, 4], max_tokens=3, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.usage is not None and reply.usage.prompt_tokens == 4


def test_top_logprobs_name_each_token_and_its_alternatives(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs) == 5
    for token, lp, top in zip(
        logprobs.tokens, logprobs.token_logprobs or [], logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == lp and top[token] == lp  # greedy: its own top choice
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])
