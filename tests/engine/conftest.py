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
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(
        tmp_path_factory.mktemp("demo") / "demo",
        DemoSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=384),
    )
