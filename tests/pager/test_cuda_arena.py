"""The CUDA backend on a real GPU: every scenario of cuda_scenarios.py in its own process.

A fresh process per scenario (as torch_memory_saver's tests do) keeps `mem_get_info` readings
about this scenario's memory alone, and keeps a driver fault from taking the session down.
Skipped where torch sees no GPU (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pager.cuda_scenarios import SCENARIOS

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).with_name("cuda_scenarios.py")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cuda_scenario(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), name],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert f"OK {name}" in result.stdout
