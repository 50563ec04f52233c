"""The ledger test on CUDA (`gpu`-marked; skipped without a GPU): the same tour as
test_ledger.py against torpord with `--backend cuda` and its keeper on. Device reality is
what NVML reports per process (the workers and the keeper, read from outside: inside a
checkpointed process NVML would block); host reality is each worker's host copy and staging
buffers (its Status), and the keeper's mapped host copies are listed with it. While keepers
are on, torpord sets 576 MiB aside on each GPU for the keeper's CUDA context (CONFIG.md); the
keeper's device bytes are checked against that. Run on a lent GPU host with
`pytest -m gpu tests/ledger`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import start_torpord
from tests.ledger import tour as t
from tests.ledger.books import Probe, nvml_device_bytes

pytestmark = pytest.mark.gpu

KEEPER_CONTEXT = 576 << 20
"""What torpord sets aside on each GPU for the keeper's CUDA context (543 MB measured)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return t.make_models(tmp_path_factory.mktemp("ledger-models-gpu"))


def test_reality_never_exceeds_the_ledger_on_cuda(tmp_path: Path, models: Path) -> None:
    state = tmp_path / "state"
    daemon = start_torpord(
        state,
        models,
        memory=0,
        backend="cuda",
        TORPOR_STORE_CAPACITY=str(t.store_capacity(models, cuda=True)),
        TORPOR_BUDGETS_HOST_MEMORY=str(4 << 30),
    )
    probe = Probe(
        daemon,
        runtime_dir=state / "run",
        snapshot_dir=state / "snapshots",
        gpu_probe=nvml_device_bytes,
        keeper_allowance=KEEPER_CONTEXT,
    )
    try:
        for name in (*t.SMALL, t.BIG):
            daemon.register(name, models / name)
        t.run(t.Tour(daemon, probe, settle_s=1.0))
    finally:
        probe.close()
        assert daemon.stop() == 0
