"""A checkpoint whose config.json is a FIFO (issue 12): registration fails fast with
INVALID_ARGUMENT naming the file, and a burst of such registrations leaves torpord's
catalog calls (ListSnapshots, ListModels) answering at once. Real torpord over gRPC."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemon.conftest import (
    Torpord,
    TorporError,
    call,
    footprint_bytes,
    start_torpord,
)
from torpor.errors import Code
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2


@pytest.fixture
def fifo_model(model_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A model directory under the root: alpha's weights, and a FIFO for config.json."""
    target = model_root / f"fifo-{tmp_path.name}"
    target.mkdir()
    shutil.copy(model_root / "alpha" / "model.safetensors", target)
    os.mkfifo(target / "config.json")
    yield target
    _unblock(target / "config.json")
    shutil.rmtree(target)


def _register(daemon: Torpord, name: str, source: Path) -> None:
    spec = common_pb2.ModelSpec(
        name=name, source=str(source), dtype=common_pb2.DTYPE_FLOAT32, max_batch=4, max_seq_len=64
    )
    call(daemon.scheduler.RegisterModel, scheduler_pb2.RegisterModelRequest(spec=spec), timeout=10)


def _unblock(fifo: Path) -> None:
    """Release any reader still blocked opening the FIFO (torpord on main hangs there)."""
    for _ in range(64):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader is waiting
            return
        os.close(fd)


@pytest.fixture
def daemon(tmp_path: Path, model_root: Path) -> Iterator[Torpord]:
    d = start_torpord(tmp_path / "state", model_root, memory=3 * footprint_bytes(model_root))
    yield d
    if d.proc.poll() is None:
        d.proc.kill()  # a torpord whose threads block in open() may not stop on SIGTERM
    d.proc.wait(timeout=30)
    d.channel.close()


def test_fifo_config_is_refused_fast(daemon: Torpord, fifo_model: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TorporError) as err:
        _register(daemon, "fifo", fifo_model)
    assert err.value.code is Code.INVALID_ARGUMENT
    assert "config.json" in err.value.message and "FIFO" in err.value.message
    assert time.monotonic() - start < 5


def test_fifo_registrations_leave_the_catalog_answering(daemon: Torpord, fifo_model: Path) -> None:
    def register(i: int) -> str:
        try:
            _register(daemon, f"fifo{i}", fifo_model)
        except TorporError as exc:
            return exc.code.name
        return "OK"

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(register, range(8)))
    assert all(code != "OK" for code in codes), codes
    start = time.monotonic()
    call(daemon.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest(), timeout=5)
    call(daemon.scheduler.ListModels, scheduler_pb2.ListModelsRequest(), timeout=5)
    assert time.monotonic() - start < 5
