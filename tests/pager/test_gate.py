"""Streamed resume: the stages of the model wait for the copy of exactly the weights they
read, in order, and the gate removes itself once the copy is done."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torpor.worker.engine.demo import DemoSpec, make_demo
from torpor.worker.engine.layout import Layout, TensorSpec
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.gate import WeightsGate, stage_ends
from torpor.worker.pager.paged_state import SuspendLevel
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime


def _layout(layers: int) -> Layout:
    specs = [TensorSpec("embed", (16, 8), torch.float32)]
    for i in range(layers):
        specs += [
            TensorSpec(f"layers.{i}.attn_norm", (8,), torch.float32),
            TensorSpec(f"layers.{i}.wqkv", (24, 8), torch.float32),
            TensorSpec(f"layers.{i}.w2", (8, 32), torch.float32),
        ]
    specs += [
        TensorSpec("norm", (8,), torch.float32),
        TensorSpec("lm_head", (16, 8), torch.float32),
    ]
    return Layout.plan("weights", specs, alignment=256)


def _end(layout: Layout, name: str) -> int:
    return next(e.end for e in layout.entries if e.spec.name == name)


def test_each_stage_needs_its_layer_and_the_next_norm() -> None:
    layout = _layout(3)
    ends = stage_ends(layout, 3)
    # stage i runs layer i, whose last fused add-norm reads layer i+1's attn_norm: the
    # prefix through layer i+1 (layer-ordered weights make it one layer ahead at most).
    assert ends[0] == _end(layout, "layers.1.w2")
    assert ends[1] == _end(layout, "layers.2.w2")
    assert ends[2] == _end(layout, "layers.2.w2") and ends[2] < layout.nbytes
    assert ends[3] == _end(layout, "lm_head")  # the head waits for everything
    assert ends == sorted(ends)


def test_weights_placed_out_of_order_make_a_stage_wait_longer() -> None:
    specs = [
        TensorSpec("layers.0.wqkv", (8,), torch.float32),
        TensorSpec("layers.1.wqkv", (8,), torch.float32),
        TensorSpec("embed", (8,), torch.float32),  # last: stage 0 must wait for it
    ]
    layout = Layout.plan("weights", specs, alignment=256)
    assert stage_ends(layout, 2)[0] == _end(layout, "embed")


class FakeEvent:
    def __init__(self, name: str, finished: bool = False) -> None:
        self.name, self.finished = name, finished

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True


def test_the_gate_waits_once_for_the_first_copy_that_covers_a_stage() -> None:
    events = [FakeEvent(f"e{i}") for i in range(5)]
    marks = [(0, events[0]), (100, events[1]), (200, events[2]), (300, events[3]), (400, events[4])]
    waited: list[str] = []
    gate = WeightsGate(marks, [150, 150, 200, 400], lambda e: waited.append(e.name))
    gate(0)  # needs 150 bytes: the copy that ends at 200
    gate(1)  # the same: no second wait
    gate(2)  # 200: covered by e2 already
    gate(3)
    gate(99)  # beyond the last stage: everything
    assert waited == ["e2", "e4"]
    assert not gate.done()
    gate.synchronize()
    assert gate.done()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = DemoSpec(layers=3, hidden=128, heads=4, kv_heads=2, vocab=512, seed=5)
    return make_demo(tmp_path_factory.mktemp("gate") / "demo", spec)


class RecordingGate:
    def __init__(self, calls_until_done: int) -> None:
        self.stages: list[int] = []
        self.left = calls_until_done

    def __call__(self, stage: int) -> None:
        self.stages.append(stage)
        self.left -= 1

    def done(self) -> bool:
        return self.left <= 0


def test_the_model_passes_every_stage_in_order_then_drops_a_finished_gate(
    model_dir: Path,
) -> None:
    rt = PagedRuntime.load(model_dir, EngineOptions(max_batch=2, max_seq_len=64), PagerOptions())
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        prompt = (1, 2, 3, 4)

        def run(name: str) -> GenerationResult:
            stream = rt.loop.submit(GenerationRequest(name, prompt, params))
            return GenerationResult.collect(name, list(stream))

        expected = run("plain").token_ids
        rt.suspend(SuspendLevel.HOST)
        gate = RecordingGate(calls_until_done=5)
        rt.resume()
        rt.engine.model.gate = gate  # as a streamed resume installs it (CUDA only)
        assert run("gated").token_ids == expected
        # Prefill: embed and layer 0 (stage 0), layers 1 and 2, then the head (stage 3);
        # the first decode step waits for everything; by its next check the gate is done
        # (the copy finished) and the model drops it.
        assert gate.stages == [0, 1, 2, 3, 3]
        assert rt.engine.model.gate is None
    finally:
        rt.close()
