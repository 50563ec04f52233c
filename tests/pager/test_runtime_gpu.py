"""The paged runtime on a real GPU: each scenario of runtime_gpu_scenarios.py in its own
process, plus a restore into a new worker process on CUDA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pager.runtime_gpu_scenarios import SCENARIOS

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    # A bounded wait: a driver call that hangs (the process checkpoint, say) fails this test
    # rather than the whole GPU session.
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        check=False,
    )


# Deep suspend last: it depends on the driver's process checkpoint, the least proven path.
@pytest.mark.parametrize("name", sorted(SCENARIOS, key=lambda n: (n.startswith("deep"), n)))
def test_runtime_scenario(name: str) -> None:
    result = run("tests.pager.runtime_gpu_scenarios", name)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert f"OK {name}" in result.stdout


def test_restore_in_a_new_worker_on_cuda(tmp_path: Path) -> None:
    from torpor.worker.engine.demo import DemoSpec, make_demo

    source = make_demo(
        tmp_path / "src", DemoSpec(layers=2, hidden=512, heads=8, kv_heads=2, vocab=2048)
    )
    store = tmp_path / "store"
    a = run(
        "tests.pager.restore_child",
        "snapshot",
        str(source),
        str(store),
        str(tmp_path / "a.json"),
        "cuda",
    )
    assert a.returncode == 0, a.stderr[-4000:]
    original = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps(original["manifest"]))
    shutil.rmtree(source)
    b = run(
        "tests.pager.restore_child",
        "restore",
        str(tmp_path / "m.json"),
        str(store),
        str(tmp_path / "w"),
        str(tmp_path / "b.json"),
        "cuda",
    )
    assert b.returncode == 0, b.stderr[-4000:]
    restored = json.loads((tmp_path / "b.json").read_text())
    assert restored["tokens"] == original["tokens"]
    assert restored["logprobs"] == original["logprobs"]
