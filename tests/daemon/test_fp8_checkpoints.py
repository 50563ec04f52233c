"""A pre-quantized FP8 checkpoint (issue 15) registered through the `torpor` CLI with a real
torpord on the CPU backend: registered without a dtype it gets the checkpoint's declared one
(the CPU dequantizes it), it serves the tokens of a plain checkpoint of its dequantized
values (also resumed from disk and restored from its snapshot), fp8 is refused on this
backend, and a quantization torpor does not load is refused at registration, naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from tests.daemon.conftest import MAX_SEQ_LEN, call, start_torpord
from tests.engine import checkpoints
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

IDS = [5, 77, 300, 12, 900, 41]
SPEC = ("--max-batch", "4", "--max-seq-len", str(MAX_SEQ_LEN))


def _set(model_dir: Path, **config: object) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))


@pytest.fixture(scope="module")
def fp8_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ct`: a demo model as compressed-tensors publishes FP8 (declared bfloat16, as
    published checkpoints are); `plain`: its dequantized values, no quantization; `gptq`:
    `ct` claiming another method."""
    root = tmp_path_factory.mktemp("fp8-models")
    demo = make_demo(root / "demo", DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024))
    groups = {"group_0": {"targets": ["Linear"], **checkpoints.FP8_DYNAMIC}}
    ct = checkpoints.compressed_tensors(demo, root / "ct", groups)
    _set(ct, dtype="bfloat16")
    checkpoints.dequantized(ct, root / "plain")
    shutil.copytree(ct, root / "gptq")
    _set(root / "gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    return root


def test_the_cli_registers_an_fp8_checkpoint_and_it_serves(tmp_path: Path, fp8_root: Path) -> None:
    need = 3 * estimate(fp8_root / "plain", "bfloat16", 4, MAX_SEQ_LEN, cuda=False).resident
    memory = max(need, 16 << 20)  # the smallest simulated device
    daemon = start_torpord(tmp_path / "state", fp8_root, memory=memory)
    cli = Cli(daemon.socket)
    try:
        out = cli.ok("register", "ct", str(fp8_root / "ct"), *SPEC)
        assert out.startswith("registered ct: cold, bfloat16, ")  # no --dtype: declared one
        cli.ok("register", "plain", str(fp8_root / "plain"), "--dtype", "bf16", *SPEC)
        models = {m["name"]: m for m in cli.json("models", "--json")["models"]}
        # The same weights in the same dtype: the same footprint.
        assert models["ct"]["footprint_bytes"] == models["plain"]["footprint_bytes"]

        got = [t for c in daemon.generate("ct", IDS, max_tokens=12) for t in c.token_ids]
        want = [t for c in daemon.generate("plain", IDS, max_tokens=12) for t in c.token_ids]
        assert len(got) == 12 and got == want
        # Suspended to disk (a snapshot of its weights, with its config.json) and resumed;
        # then dropped, and restored from that snapshot by a new worker.
        for tier, state in (
            (common_pb2.TIER_DISK, common_pb2.RUNTIME_STATE_SUSPENDED_DISK),
            (common_pb2.TIER_DROP, common_pb2.RUNTIME_STATE_SNAPSHOT),
        ):
            call(daemon.admin.Evict, admin_pb2.EvictRequest(model="ct", to_tier=tier))
            assert daemon.runtime("ct").state == state
            again = [t for c in daemon.generate("ct", IDS, max_tokens=12) for t in c.token_ids]
            assert again == got
        greedy = ("--max-tokens", "8", "--temperature", "0", "--json")
        text = cli.json("generate", "ct", "The cat sat on the", *greedy)
        other = cli.json("generate", "plain", "The cat sat on the", *greedy)
        assert len(text["token_ids"]) == 8
        assert (text["token_ids"], text["text"]) == (other["token_ids"], other["text"])

        line = cli.fails(2, "register", "ct8", str(fp8_root / "ct"), "--dtype", "fp8", *SPEC)
        assert "fp8 needs a CUDA GPU" in line
        line = cli.fails(2, "register", "g", str(fp8_root / "gptq"), *SPEC)
        assert "quant_method 'gptq' is not supported" in line
        names = {m["name"] for m in cli.json("models", "--json")["models"]}
        assert names == {"ct", "plain"}
    finally:
        assert daemon.stop() == 0
