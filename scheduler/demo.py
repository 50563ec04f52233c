"""`torpord --demo`: three small demo models, made once in the state directory and
registered, sized so that the default simulated device (256 MiB) holds two of them but not
all three, which makes swapping visible."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from torpor.errors import AlreadyExists, Internal
from torpor.log import get_logger
from torpor.v1 import common_pb2

if TYPE_CHECKING:
    from torpor.scheduler.registry import ModelRegistry

log = get_logger("demo")

# (name, seed): each about 110 MiB as a float32 runtime (weights 103 MiB + KV cache). The
# size comes from the layers, not the vocabulary: the demo tokenizer learns about a thousand
# real tokens from its small text, and a larger vocabulary would be padding.
DEMOS = (("demo-a", 1), ("demo-b", 2), ("demo-c", 3))
SHAPE = ["--layers", "6", "--hidden", "640", "--heads", "10", "--kv-heads", "2", "--vocab", "1024"]


async def ensure_demo_models(state_dir: Path, models: ModelRegistry) -> None:
    root = Path(state_dir) / "models"
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    for name, seed in DEMOS:
        target = root / name
        if not await asyncio.to_thread((target / "model.safetensors").is_file):
            await _make(target, seed)
        if name in models.sources:
            continue
        spec = common_pb2.ModelSpec(
            name=name,
            source=str(target),
            dtype=common_pb2.DTYPE_FLOAT32,
            max_batch=4,
            max_seq_len=512,
        )
        with contextlib.suppress(AlreadyExists):  # registered by an earlier start
            await models.register(spec)
        log.info("demo_model_ready", model=name, source=str(target))


async def _make(target: Path, seed: int) -> None:
    # A subprocess: making the checkpoint needs torch, which torpord never imports.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "torpor.cli",
        "make-demo",
        str(target),
        *SHAPE,
        "--seed",
        str(seed),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise Internal(
            f"make-demo {target} failed: {err.decode().strip()[-500:]}", reason="DEMO_FAILED"
        )
