"""`torpor run` and `torpor make-demo` as a user runs them: subprocesses of the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams

TORPOR = [sys.executable, "-m", "torpor.cli"]


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORPOR, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = torpor(
        "make-demo",
        str(out),
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--vocab",
        "400",
        "--seed",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    return out


def test_make_demo_writes_the_requested_shape(demo: Path) -> None:
    config = json.loads((demo / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 1
    assert config["vocab_size"] == 400
    tok = json.loads((demo / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE"
    ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert ids == set(range(400))  # every id of the model decodes


def test_run_json_greedy_with_prompt_ids(demo: Path) -> None:
    proc = torpor(
        "run",
        str(demo),
        "--prompt-ids",
        "5,6,7,8",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == [5, 6, 7, 8]  # exactly as given: no BOS added
    assert len(out["token_ids"]) == len(out["logprobs"]) == 12
    engine = Engine.load(demo, EngineOptions(max_seq_len=256))
    (expected,) = engine.generate_all(
        [
            GenerationRequest(
                "x", (5, 6, 7, 8), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            )
        ]
    )
    assert out["token_ids"] == list(expected.token_ids)
    assert out["text"] == expected.text
    assert out["logprobs"] == pytest.approx(list(expected.logprobs), abs=1e-5)


def test_run_text_prompt_adds_bos_and_streams(demo: Path) -> None:
    proc = torpor("run", str(demo), "Hello world", "--max-tokens", "8", "--seed", "1", "--json")
    out = json.loads(proc.stdout)
    engine = Engine.load(demo, EngineOptions(max_seq_len=256))
    assert out["prompt_ids"] == engine.encode("Hello world")
    assert out["prompt_ids"][0] == engine.tokenizer.bos_token_id  # type: ignore[union-attr]
    plain = torpor("run", str(demo), "Hello world", "--max-tokens", "8", "--seed", "1")
    assert plain.returncode == 0
    assert plain.stdout.rstrip("\n") == out["text"]
    assert "tokens" in plain.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature=-1.0 is invalid"),
        (["--top-p", "2"], "top_p=2.0 is invalid"),
        (["--dtype", "fp8", "--device", "cpu"], "fp8 needs a CUDA GPU"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    ],
)
def test_run_errors_are_one_line(demo: Path, args: list[str], message: str) -> None:
    prompt = [] if "--prompt-ids" in args else ["hi"]
    proc = torpor("run", str(demo), *prompt, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_run_missing_directory(tmp_path: Path) -> None:
    proc = torpor("run", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr
