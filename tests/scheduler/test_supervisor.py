"""Worker supervision with real torpor-worker processes: start, crash noticed at once,
adoption by a restarted supervisor, stop."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from torpor.errors import Unavailable
from torpor.scheduler.supervisor import Supervisor, WorkerProcess, WorkerSpec
from torpor.v1 import worker_pb2


def spec(tmp: Path, rid: str = "r1", keeper: Path | None = None) -> WorkerSpec:
    return WorkerSpec(
        runtime_id=rid,
        model="demo",
        device="cpu",
        socket=tmp / f"{rid}.sock",
        store=tmp / "store",
        log_level="warning",
        keeper=keeper,
    )


async def test_crash_is_noticed_at_once(tmp_path: Path) -> None:
    exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
    sup = Supervisor(tmp_path / "run", exits.put)
    worker = await sup.spawn(spec(tmp_path))
    status = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=10)
    assert status.pid == worker.pid
    assert (tmp_path / "run" / "workers" / "r1.json").exists()
    worker.signal(signal.SIGKILL)
    gone = await asyncio.wait_for(exits.get(), 10)
    assert gone is worker and not worker.stopping and worker.returncode == -signal.SIGKILL
    assert "r1" not in sup.workers
    assert not (tmp_path / "run" / "workers" / "r1.json").exists()


async def test_stop_is_clean(tmp_path: Path) -> None:
    exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
    sup = Supervisor(tmp_path / "run", exits.put)
    await sup.spawn(spec(tmp_path))
    await sup.stop_all(grace_s=10)
    gone = await asyncio.wait_for(exits.get(), 10)
    assert gone.stopping and gone.returncode == 0


async def test_a_restarted_supervisor_adopts_live_workers(tmp_path: Path) -> None:
    first = Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0))
    worker = await first.spawn(spec(tmp_path, "keep"))
    pid = worker.pid
    # A stale record of a process that is gone must be cleaned up, not adopted.
    (tmp_path / "run" / "workers" / "stale.json").write_text(
        '{"pid": 999999, "runtime_id": "stale", "model": "m", "device": "cpu", '
        f'"socket": "{tmp_path}/stale.sock", "store": "{tmp_path}/store"}}'
    )
    exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
    second = Supervisor(tmp_path / "run", exits.put)
    adopted = await second.adopt()
    assert [w.pid for w in adopted] == [pid]
    assert not (tmp_path / "run" / "workers" / "stale.json").exists()
    os.kill(pid, signal.SIGKILL)  # an adopted worker's death is noticed too (pidfd)
    gone = await asyncio.wait_for(exits.get(), 10)
    assert gone.pid == pid
    await first.stop_all(grace_s=5)


async def test_a_worker_that_cannot_start_is_unavailable(tmp_path: Path) -> None:
    bad = WorkerSpec(
        runtime_id="bad",
        model="m",
        device="tpu",
        socket=tmp_path / "b.sock",
        store=tmp_path / "store",
        log_level="warning",
    )
    sup = Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0), start_timeout=60)
    with pytest.raises(Unavailable, match="exited with status"):
        await sup.spawn(bad)
