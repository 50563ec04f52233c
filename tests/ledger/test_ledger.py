"""The ledger test on the CPU backend (issue 13): a real torpord driven through prefetch,
eviction to each tier, resume from each tier, snapshot GC under a running resume and a full
store; during and after every step, what its processes hold (workers' arenas, host copies and
staging buffers; chunk files on disk) never exceeds what its core's ledger counts, for the
simulated device, host RAM and disk. See docs/RELIABILITY.md, "Ledger"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import start_torpord
from tests.ledger import tour as t
from tests.ledger.books import Probe


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return t.make_models(tmp_path_factory.mktemp("ledger-models"))


def test_reality_never_exceeds_the_ledger(tmp_path: Path, models: Path) -> None:
    # Room for every model at once, so nothing is evicted but by the tour itself.
    memory = 2 * t.resident(models, t.BIG, cuda=False) + 4 * t.resident(models, "alpha", cuda=False)
    state = tmp_path / "state"
    daemon = start_torpord(
        state,
        models,
        memory=memory,
        TORPOR_STORE_CAPACITY=str(t.store_capacity(models, cuda=False)),
        TORPOR_BUDGETS_HOST_MEMORY=str(1 << 30),
    )
    probe = Probe(daemon, runtime_dir=state / "run", snapshot_dir=state / "snapshots")
    try:
        for name in (*t.SMALL, t.BIG):
            daemon.register(name, models / name)
        t.run(t.Tour(daemon, probe))
    finally:
        probe.close()
        assert daemon.stop() == 0
