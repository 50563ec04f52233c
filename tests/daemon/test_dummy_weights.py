"""Dummy weights (issue 15, `load_format dummy`): a model registered from a directory with
config.json and no safetensors, served by a real torpord (CPU backend) with random weights
from a seed of its name: deterministic across loads, evicted to disk and restored like any
model, and still dummy after a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call, start_torpord
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

IDS = [5, 77, 300, 12, 900, 41]
DUMMY = common_pb2.LOAD_FORMAT_DUMMY


@pytest.fixture(scope="module")
def dummy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`real`: a demo checkpoint; `dummy`: its config.json and tokenizer, no safetensors;
    `bare`: its config.json alone; `empty`: nothing."""
    root = tmp_path_factory.mktemp("dummy-models")
    real = make_demo(root / "real", DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024))
    shutil.copytree(real, root / "dummy")
    (root / "dummy" / "model.safetensors").unlink()
    (root / "bare").mkdir()
    shutil.copy(real / "config.json", root / "bare" / "config.json")
    (root / "empty").mkdir()
    return root


def _tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _evict(daemon: Torpord, model: str, tier: int) -> None:
    call(daemon.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier))


def _start(tmp_path: Path, root: Path) -> Torpord:
    memory = 3 * estimate(root / "real", "float32", 4, MAX_SEQ_LEN, cuda=False).resident
    return start_torpord(tmp_path / "state", root, memory=memory)


def test_a_dummy_model_serves_deterministic_tokens_across_loads_disk_and_restart(
    tmp_path: Path, dummy_root: Path
) -> None:
    daemon = _start(tmp_path, dummy_root)
    try:
        model = daemon.register("dz", dummy_root / "dummy", load_format=DUMMY)
        assert model.spec.load_format == DUMMY
        real = daemon.register("real", dummy_root / "real")
        assert real.spec.load_format == common_pb2.LOAD_FORMAT_CHECKPOINT
        # The estimate from config.json is the real checkpoint's.
        assert model.footprint_bytes == real.footprint_bytes > 0

        first = _tokens(daemon.generate("dz", IDS, max_tokens=12))
        assert len(first) == 12
        # Another name is another seed: other weights, other tokens.
        daemon.register("dz2", dummy_root / "dummy", load_format=DUMMY)
        assert _tokens(daemon.generate("dz2", IDS, max_tokens=12)) != first

        # Dropped (no snapshot yet), then loaded again from its directory: the same weights.
        _evict(daemon, "dz", common_pb2.TIER_DROP)
        assert daemon.runtime("dz").state == common_pb2.RUNTIME_STATE_COLD
        assert _tokens(daemon.generate("dz", IDS, max_tokens=12)) == first

        # Suspended to disk (a snapshot of the generated weights) and restored.
        _evict(daemon, "dz", common_pb2.TIER_DISK)
        assert daemon.runtime("dz").state == common_pb2.RUNTIME_STATE_SUSPENDED_DISK
        assert _tokens(daemon.generate("dz", IDS, max_tokens=12)) == first

        # Its tokenizer came along: a text prompt works.
        text = scheduler_pb2.GenerateRequest(
            model="dz",
            prompt_text="The cat sat",
            sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        )
        assert len(_tokens(call(daemon.scheduler.Generate, text))) == 3
        _evict(daemon, "dz", common_pb2.TIER_DISK)
    finally:
        assert daemon.stop() == 0

    daemon = _start(tmp_path, dummy_root)  # the same state directory: the catalog kept it
    try:
        got = call(daemon.scheduler.GetModel, scheduler_pb2.GetModelRequest(name="dz"))
        assert got.model.spec.load_format == DUMMY
        assert got.model.snapshot_id  # restored from its snapshot
        assert _tokens(daemon.generate("dz", IDS, max_tokens=12)) == first
    finally:
        assert daemon.stop() == 0


def test_a_dummy_model_without_tokenizer_and_bad_directories(
    tmp_path: Path, dummy_root: Path
) -> None:
    daemon = _start(tmp_path, dummy_root)
    try:
        # config.json alone: token ids work, a text prompt is FAILED_PRECONDITION.
        daemon.register("bare", dummy_root / "bare", load_format=DUMMY)
        assert len(_tokens(daemon.generate("bare", IDS, max_tokens=4))) == 4
        text = scheduler_pb2.GenerateRequest(
            model="bare",
            prompt_text="hello",
            sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0),
        )
        with pytest.raises(FailedPrecondition) as precondition:
            call(daemon.scheduler.Generate, text)
        assert precondition.value.reason == "NO_TOKENIZER"
        assert "tokenizer.json" in str(precondition.value)

        # No config.json: INVALID_ARGUMENT naming it.
        with pytest.raises(InvalidArgument) as invalid:
            daemon.register("nothing", dummy_root / "empty", load_format=DUMMY)
        assert invalid.value.reason == "NO_CONFIG"
        assert "config.json" in str(invalid.value) and "dummy" in str(invalid.value)
        # Without dummy, a directory without safetensors is refused as before.
        with pytest.raises(InvalidArgument) as checkpoint:
            daemon.register("nodummy", dummy_root / "dummy")
        assert checkpoint.value.reason == "CHECKPOINT_INCOMPLETE"
    finally:
        assert daemon.stop() == 0


def test_the_cli_registers_and_shows_a_dummy_model(tmp_path: Path, dummy_root: Path) -> None:
    """`torpor register NAME DIR --load-format dummy`; `torpor models` has a WEIGHTS column
    (and `load_format` in its JSON), `torpor ps` names its runtimes `NAME (dummy)`."""
    daemon = _start(tmp_path, dummy_root)
    cli = Cli(daemon.socket)
    spec = ("--dtype", "float32", "--max-batch", "4", "--max-seq-len", str(MAX_SEQ_LEN))
    try:
        out = cli.ok("register", "cdz", str(dummy_root / "dummy"), *spec, "--load-format", "dummy")
        assert out.startswith("registered cdz: cold, float32, dummy weights, ")
        cli.ok("register", "creal", str(dummy_root / "real"), *spec)
        docs = {m["name"]: m for m in cli.json("models", "--json")["models"]}
        assert (docs["cdz"]["load_format"], docs["creal"]["load_format"]) == (
            "dummy",
            "checkpoint",
        )
        rows = {line.split()[0]: line.split() for line in cli.ok("models").splitlines()[1:]}
        assert cli.ok("models").splitlines()[0].split()[:4] == ["NAME", "STATE", "DTYPE", "WEIGHTS"]
        assert (rows["cdz"][3], rows["creal"][3]) == ("dummy", "checkpoint")

        daemon.generate("cdz", IDS, max_tokens=2)
        ps = cli.ok("ps", "--all")
        assert "cdz (dummy)" in ps and "creal (dummy)" not in ps
        assert [r["model"] for r in cli.json("ps", "--json")["runtimes"] if r["model"] == "cdz"]

        bad = cli.fails(2, "register", "x", str(dummy_root / "dummy"), "--load-format", "random")
        assert "--load-format must be one of checkpoint, dummy" in bad
        empty = cli.fails(2, "register", "y", str(dummy_root / "empty"), "--load-format", "dummy")
        assert "config.json" in empty
    finally:
        assert daemon.stop() == 0
