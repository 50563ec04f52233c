"""Faults on the CUDA backend (`gpu`-marked; skipped without a GPU): kill -9 of a worker
during a deep suspend, a deep resume and the keeper's fill (the keeper taking its locked host
copy in the background after a load), and of torpord during the deep suspend and resume
(issue 12, "Standing suites").

The same harness and checks as test_faults.py (tests/reliability/faults.py): the call in
flight ends before its deadline, no runtime is left in a transitional state, no worker,
keeper, temp file or socket is left that torpord does not account for, and the model serves
the greedy tokens it gave before the first kill. torpord runs with `--backend cuda` on the host's
GPU with the daemon tests' float32 demo models (as bench/daemon_gpu.sh runs its tour), and
its keeper on (the default). Run on a lent GPU host with `bench/gpu.sh tests` or
`make test-reliability`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import MODELS
from tests.reliability import scale
from tests.reliability.faults import FaultHarness, run_phase

pytestmark = [pytest.mark.gpu, pytest.mark.reliability]

CASES = [
    ("suspend_deep", "worker"),
    ("suspend_deep", "torpord"),
    ("resume_deep", "worker"),
    ("resume_deep", "torpord"),
    ("keeper_fill", "worker"),
]


@pytest.mark.parametrize(("phase", "victim"), CASES)
def test_kill_in_gpu_phase(
    phase: str,
    victim: str,
    tmp_path: Path,
    model_root: Path,
) -> None:
    rng = scale.seeded(f"faults-gpu-{phase}-{victim}")
    harness = FaultHarness(tmp_path / "state", model_root, 0, MODELS, backend="cuda")
    run_phase(harness, phase, victim, rng)  # the reference: the GPU daemon's own tokens
