"""A worker whose record cannot be written (the runtime directory's disk is full) is
stopped, and spawn raises a clean error naming the path (issue 12); a real worker process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.faults.fullfs import fill, small_tmpfs
from torpor.errors import ResourceExhausted
from torpor.scheduler.supervisor import Supervisor, WorkerProcess, WorkerSpec


async def test_a_record_on_a_full_runtime_dir_stops_the_worker(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "run", 1 << 20) as run:
        exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        sup = Supervisor(run, exits.put)
        fill(run)
        spec = WorkerSpec(
            runtime_id="r1",
            model="demo",
            device="cpu",
            socket=tmp_path / "r1.sock",
            store=tmp_path / "store",
            log_level="warning",
        )
        with pytest.raises(ResourceExhausted) as err:
            await asyncio.wait_for(sup.spawn(spec), 60)
        assert err.value.reason == "RUNTIME_DIR_FULL"
        assert err.value.metadata["path"] == str(run / "workers" / "r1.json")
        gone = await asyncio.wait_for(exits.get(), 30)  # the process it started is stopped
        assert gone.stopping and gone.exited.is_set()
        assert sup.workers == {} and list((run / "workers").iterdir()) == []
