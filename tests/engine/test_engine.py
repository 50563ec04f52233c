"""Continuous batching, sampling, stopping and streaming through the engine's own API."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from torpor.worker.engine.engine import Engine
from torpor.worker.engine.loop import EngineLoop
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import FinishReason, GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> Engine:
    return Engine.load(demo_dir, EngineOptions(max_batch=4, max_seq_len=256))


def prompts(engine: Engine) -> list[list[int]]:
    texts = ["Hello", "The quick brown fox jumps over", "Pages move from the device to the host"]
    texts += ["a", "Numbers too: one two three four five six seven eight nine ten"]
    return [engine.encode(t) for t in texts]


def alone(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> GenerationResult:
    (result,) = engine.generate_all([GenerationRequest("alone", tuple(prompt), params)])
    return result


def test_batched_equals_alone(engine: Engine) -> None:
    ps = prompts(engine)
    assert len({len(p) for p in ps}) == len(ps)  # different lengths
    # More requests than slots: some wait, join as others leave.
    requests = [GenerationRequest(f"r{i}", tuple(p), GREEDY) for i, p in enumerate(ps)]
    batched = engine.generate_all(requests)
    for prompt, result in zip(ps, batched, strict=True):
        assert result.token_ids == alone(engine, prompt).token_ids
        assert result.finish is FinishReason.LENGTH
        assert len(result.token_ids) == GREEDY.max_tokens
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_requests_join_between_steps(engine: Engine) -> None:
    ps = prompts(engine)
    first = GenerationRequest("first", tuple(ps[1]), GREEDY)
    engine.add_request(first)
    collected = {"first": [], "late": []}
    for _ in range(5):
        for d in engine.step():
            collected[d.request_id].append(d)
    engine.add_request(GenerationRequest("late", tuple(ps[2]), GREEDY))
    while engine.has_work():
        for d in engine.step():
            collected[d.request_id].append(d)
    assert (
        GenerationResult.collect("first", collected["first"]).token_ids
        == alone(engine, ps[1]).token_ids
    )
    assert (
        GenerationResult.collect("late", collected["late"]).token_ids
        == alone(engine, ps[2]).token_ids
    )


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = prompts(engine)[1]
    params = SamplingParams(
        max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True
    )
    a, b = alone(engine, prompt, params), alone(engine, prompt, params)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    other = alone(engine, prompt, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert other.token_ids != a.token_ids
    # ... and batched with others, the seed still decides alone.
    batch = engine.generate_all(
        [
            GenerationRequest("x", tuple(prompt), params),
            GenerationRequest("y", tuple(prompts(engine)[0]), GREEDY),
        ]
    )
    assert batch[0].token_ids == a.token_ids


def test_top_k_one_is_greedy_and_logprobs_are_raw(engine: Engine) -> None:
    prompt = prompts(engine)[2]
    greedy = alone(engine, prompt)
    topk1 = alone(
        engine,
        prompt,
        SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True),
    )
    assert topk1.token_ids == greedy.token_ids
    assert topk1.logprobs == pytest.approx(greedy.logprobs, abs=1e-6)
    logits = engine.model.prefill(torch.tensor(prompt), slot=0)
    assert greedy.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)
    assert all(lp <= 0 for lp in greedy.logprobs)


def test_top_p_keeps_only_the_nucleus(engine: Engine) -> None:
    prompt = prompts(engine)[0]
    logits = engine.model.prefill(torch.tensor(prompt), slot=0)
    probs = torch.softmax(logits, -1)
    top = int(probs.argmax())
    tiny_p = float(probs.max()) * 0.5  # the top token alone already exceeds this mass
    for seed in range(10):
        r = alone(
            engine, prompt, SamplingParams(max_tokens=1, temperature=1.0, top_p=tiny_p, seed=seed)
        )
        assert r.token_ids[0] == top


def test_stop_string_truncates_text_and_streams_consistently(engine: Engine) -> None:
    prompt = prompts(engine)[1]
    full = alone(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert len(full.text) > 6
    stop = full.text[3:6]
    deltas = list(
        engine.generate(
            GenerationRequest(
                "s",
                tuple(prompt),
                SamplingParams(max_tokens=40, temperature=0, stop=(stop,), ignore_eos=True),
            )
        )
    )
    result = GenerationResult.collect("s", deltas)
    assert result.finish is FinishReason.STOP
    assert result.text == full.text[: full.text.index(stop)]
    assert stop not in result.text
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_stop_token_ids_and_eos(engine: Engine) -> None:
    prompt = prompts(engine)[3]
    full = alone(engine, prompt)
    stop_token = full.token_ids[5]
    params = SamplingParams(
        max_tokens=24, temperature=0, stop_token_ids=(stop_token,), ignore_eos=True
    )
    r = alone(engine, prompt, params)
    assert r.finish is FinishReason.STOP
    assert r.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]


def test_text_deltas_concatenate_to_decoded_text(engine: Engine) -> None:
    prompt = engine.encode("Once upon a time there was")
    deltas = list(engine.generate(GenerationRequest("t", tuple(prompt), GREEDY)))
    assert len(deltas) == GREEDY.max_tokens
    result = GenerationResult.collect("t", deltas)
    assert engine.tokenizer is not None
    assert result.text == engine.tokenizer.decode(result.token_ids)


def test_abort_frees_the_slot(engine: Engine) -> None:
    engine.add_request(GenerationRequest("doomed", tuple(prompts(engine)[1]), GREEDY))
    engine.step()
    assert engine.num_running == 1
    engine.abort("doomed")
    (delta,) = engine.step()
    assert delta.finish is FinishReason.ABORT and engine.num_running == 0
    assert not engine.has_work()


def test_engine_loop_serves_concurrent_threads(engine: Engine) -> None:
    ps = prompts(engine)
    expected = {i: alone(engine, p).token_ids for i, p in enumerate(ps)}
    results: dict[int, tuple[int, ...]] = {}
    with EngineLoop(engine) as loop:

        def client(i: int) -> None:
            stream = loop.submit(GenerationRequest(f"c{i}", tuple(ps[i]), GREEDY))
            results[i] = GenerationResult.collect(f"c{i}", list(stream)).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == expected
        # A bad request fails its own stream only.
        with pytest.raises(Exception, match=r"EMPTY_PROMPT|empty"):
            list(loop.submit(GenerationRequest("bad", (), GREEDY)))
        with loop.paused() as paused_engine:
            assert not paused_engine.has_work()
    with pytest.raises(Exception, match="shutting down"):
        loop.submit(GenerationRequest("late", tuple(ps[0]), GREEDY))


def test_pause_parks_with_nothing_in_flight(engine: Engine) -> None:
    prompt = prompts(engine)[4]
    expected = alone(engine, prompt)
    with EngineLoop(engine) as loop:
        deltas = iter(loop.submit(GenerationRequest("p", tuple(prompt), GREEDY)))
        got = [next(deltas) for _ in range(3)]
        with loop.paused() as paused:
            assert paused.steps_in_flight == 0
            assert paused.num_running == 1  # the request keeps its slot
        got += list(deltas)
    assert GenerationResult.collect("p", got).token_ids == expected.token_ids


def test_steps_are_pipelined(engine: Engine) -> None:
    engine.add_request(GenerationRequest("pipe", tuple(prompts(engine)[0]), GREEDY))
    first = engine.step()  # prefill, launch step 1, read the prefill's token
    assert [len(d.token_ids) for d in first] == [1]
    assert engine.steps_in_flight == 1
    engine.flush()
    assert engine.steps_in_flight == 0
    while engine.has_work():
        engine.step()
