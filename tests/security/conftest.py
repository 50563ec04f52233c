"""A small demo checkpoint to copy into each test's model root, and a torpord per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, start_torpord
from torpor.scheduler.footprint import estimate
from torpor.worker.engine.demo import DemoSpec, make_demo

MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(
        tmp_path_factory.mktemp("security-demo") / "demo",
        DemoSpec(layers=2, hidden=128, heads=4, kv_heads=2, vocab=512, seed=3),
    )


@pytest.fixture
def roots(tmp_path: Path, demo_template: Path) -> tuple[Path, Path]:
    """(the model root, holding `demo`; a directory outside it, holding `demo` too)."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    for top in (root, outside):
        shutil.copytree(demo_template, top / "demo")
    return root, outside


@pytest.fixture
def daemon(tmp_path: Path, roots: tuple[Path, Path]) -> Iterator[Torpord]:
    root, _ = roots
    need = estimate(root / "demo", "float32", 4, MAX_SEQ_LEN, cuda=False).resident
    d = start_torpord(tmp_path / "state", root, memory=max(16 << 20, 3 * need))
    yield d
    if d.stop() != 0:
        raise AssertionError("torpord did not exit cleanly")
