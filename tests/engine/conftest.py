from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine import checkpoints
from torpor.worker.engine.demo import DemoSpec, make_demo

BUILDERS = {
    "llama_gqa_llama3": checkpoints.llama_gqa_llama3,
    "mistral": checkpoints.mistral,
    "qwen2_tied": checkpoints.qwen2_tied,
    "llama_sharded": checkpoints.llama_sharded,
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def fp8_checkpoints(
    hf_checkpoints: dict[str, Path], demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Pre-quantized fp8 copies of the Llama and Qwen2 checkpoints, in each published form,
    and of the demo model (whose weights are scaled like a trained model's, so that fp8's
    rounding of activations stays small: the transformers-written ones amplify it)."""
    root = tmp_path_factory.mktemp("fp8")
    llama, qwen = hf_checkpoints["llama_gqa_llama3"], hf_checkpoints["qwen2_tied"]
    linear_dynamic = {"group_0": {"targets": ["Linear"], **checkpoints.FP8_DYNAMIC}}
    by_regex = {  # two groups: attention static per tensor, the MLP dynamic per channel
        "attn": {"targets": ["re:.*self_attn\\..*"], **checkpoints.FP8_STATIC},
        "mlp": {"targets": ["re:.*mlp\\..*"], **checkpoints.FP8_DYNAMIC},
    }
    ct, fbgemm = checkpoints.compressed_tensors, checkpoints.fbgemm_fp8
    return {
        "llama_ct_dynamic": ct(llama, root / "llama_ct_dynamic", linear_dynamic),
        # Static activations, weights per tensor, and lm_head quantized too (no ignore).
        "llama_ct_static": ct(
            llama,
            root / "llama_ct_static",
            {"group_0": {"targets": ["Linear"], **checkpoints.FP8_STATIC}},
            ignore=(),
        ),
        "llama_ct_regex": ct(llama, root / "llama_ct_regex", by_regex),
        "qwen2_ct_dynamic": ct(qwen, root / "qwen2_ct_dynamic", linear_dynamic),
        "llama_fbgemm": fbgemm(
            llama, root / "llama_fbgemm", ("model.layers.0.self_attn", "lm_head")
        ),
        "qwen2_fbgemm": fbgemm(qwen, root / "qwen2_fbgemm", ("lm_head",)),
        "demo_ct_dynamic": ct(demo_dir, root / "demo_ct_dynamic", linear_dynamic),
        "demo_ct_regex": ct(demo_dir, root / "demo_ct_regex", by_regex),
        # lm_head converted too: not in modules_to_not_convert.
        "demo_fbgemm": fbgemm(demo_dir, root / "demo_fbgemm", ("model.layers.0.self_attn",)),
    }


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(
        tmp_path_factory.mktemp("demo") / "demo",
        DemoSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=384),
    )
