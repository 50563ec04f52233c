"""Every bad input gets a clear, typed error — never a crash or a hang."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> Engine:
    return Engine.load(demo_dir, EngineOptions(max_batch=2, max_seq_len=64))


def submit(engine: Engine, prompt: tuple[int, ...], **params: object) -> None:
    engine.add_request(GenerationRequest("bad", prompt, SamplingParams(**params)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "params", "reason"),
    [
        ((), {}, "EMPTY_PROMPT"),
        (tuple(range(1, 65)), {"max_tokens": 1}, "PROMPT_TOO_LONG"),
        ((1, 2, 3), {"max_tokens": 62}, "MAX_TOKENS_TOO_LARGE"),
        ((1, 384), {}, "TOKEN_OUT_OF_VOCAB"),
        ((1, -1), {}, "TOKEN_OUT_OF_VOCAB"),
        ((1, 2), {"temperature": -0.5}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"temperature": math.nan}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"temperature": 1e9}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"top_p": 0.0}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"top_p": 1.5}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"top_k": -1}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"top_k": 10**6}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"max_tokens": 0}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"seed": -1}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"seed": 2**64}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"stop": ("",)}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"stop": tuple("abcdefghijklmnopq")}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"stop_token_ids": (999,)}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"logprobs": True, "top_logprobs": 6}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"logprobs": True, "top_logprobs": -1}, "BAD_SAMPLING_PARAMS"),
        ((1, 2), {"top_logprobs": 1}, "BAD_SAMPLING_PARAMS"),  # without logprobs
    ],
)
def test_bad_requests(engine: Engine, prompt: tuple[int, ...], params: dict, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        submit(engine, prompt, **params)
    assert info.value.reason == reason
    assert not engine.has_work()  # nothing half-queued


def test_bad_request_message_names_the_value(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match=r"top_p=1\.5 .*\(0, 1\]"):
        submit(engine, (1, 2), top_p=1.5)
    with pytest.raises(InvalidArgument, match=r"64 tokens .* max_seq_len=64"):
        submit(engine, tuple(range(1, 65)), max_tokens=1)


def test_duplicate_request_id(engine: Engine) -> None:
    engine.add_request(GenerationRequest("dup", (1, 2), SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidArgument, match="already in use"):
        engine.add_request(GenerationRequest("dup", (1, 2), SamplingParams(max_tokens=2)))
    while engine.has_work():
        engine.step()


def copy_demo(demo_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(demo_dir, out)
    return out


def rewrite_tensors(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InvalidArgument, match=r"missing model.layers.1.mlp.up_proj.weight") as info:
        Engine.load(ckpt)
    assert info.value.reason == "CHECKPOINT_MISMATCH"


def test_mismatched_tensor(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)

    def shrink(t: dict) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :8
        ].clone()

    rewrite_tensors(ckpt, shrink)
    with pytest.raises(
        InvalidArgument, match=r"k_proj.weight has shape \[8, 64\], expected \[32, 64\]"
    ):
        Engine.load(ckpt)


def test_unexpected_tensor(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)
    rewrite_tensors(
        ckpt, lambda t: t.update({"model.layers.9.extra.weight": t["model.norm.weight"].clone()})
    )
    with pytest.raises(InvalidArgument, match=r"unexpected model.layers.9.extra.weight"):
        Engine.load(ckpt)


def test_missing_shard(hf_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "sharded"
    shutil.copytree(hf_checkpoints["llama_sharded"], ckpt)
    victim = sorted(ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InvalidArgument, match=re.escape(f"missing: {victim.name}")):
        Engine.load(ckpt)


def test_corrupt_safetensors(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgument, match="not a readable safetensors file"):
        Engine.load(ckpt)


def test_unsupported_architecture(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="unsupported architecture GPT2LMHeadModel") as info:
        Engine.load(ckpt)
    assert info.value.reason == "UNSUPPORTED_ARCHITECTURE"


def test_unsupported_rope(demo_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_demo(demo_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="unsupported rope scaling 'yarn'"):
        Engine.load(ckpt)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"no config.json"):
        Engine.load(tmp_path)


def test_fp8_on_cpu_is_refused(demo_dir: Path) -> None:
    with pytest.raises(FailedPrecondition, match="fp8 needs a CUDA GPU") as info:
        Engine.load(demo_dir, EngineOptions(dtype="fp8", device="cpu"))
    assert info.value.reason == "FP8_UNSUPPORTED"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (EngineOptions(max_batch=0), "max_batch=0"),
        (EngineOptions(max_seq_len=8), "max_seq_len=8"),
        (EngineOptions(dtype="int4"), "unsupported dtype 'int4'"),
        (EngineOptions(max_seq_len=8192), "exceeds the model's max_position_embeddings=4096"),
        (EngineOptions(device="tpu"), "device"),
    ],
)
def test_bad_engine_options(demo_dir: Path, options: EngineOptions, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Engine.load(demo_dir, options)
