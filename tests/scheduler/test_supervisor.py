"""Worker supervision with real torpor-worker processes: start, crash noticed at once,
adoption by a restarted supervisor, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from torpor.errors import Unavailable
from torpor.scheduler import procinfo
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
    # Its socket too, not only when its runtime starts again (issue 12, found by the fault
    # suite's registration-worker case).
    assert not worker.spec.socket.exists()


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
    assert not gone.spec.socket.exists()  # removed on the watch path of an adopted worker
    await first.stop_all(grace_s=5)


async def test_an_exit_removes_only_a_stale_socket_of_its_own(tmp_path: Path) -> None:
    """What lies at an exited worker's socket path is removed only if it is a socket that
    nothing answers on: a file put there is not torpord's to delete, and neither is the
    socket of the runtime's next worker, already started."""
    exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
    sup = Supervisor(tmp_path / "run", exits.put)
    worker = await sup.spawn(spec(tmp_path, "r1"))
    worker.spec.socket.unlink()
    worker.spec.socket.write_text("not a socket")
    worker.signal(signal.SIGKILL)
    await asyncio.wait_for(exits.get(), 10)
    assert worker.spec.socket.read_text() == "not a socket"
    worker.spec.socket.unlink()
    again = await sup.spawn(spec(tmp_path, "r1"))
    await worker.channel.close()  # (closed already: only the newer worker counts below)
    await sup._exited(worker)  # a late report of the first one's exit
    assert sup.workers["r1"] is again and again.spec.socket.exists()
    await sup.stop_all(grace_s=5)


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


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child stays in /proc until it is reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # killed and reaped
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def write_record(tmp: Path, rid: str, pid: int, socket: Path, **extra: object) -> Path:
    """A worker record in the format Supervisor._record writes (json of pid and the spec)."""
    record = {"pid": pid, "runtime_id": rid, "model": "m", "device": "cpu"}
    record |= {"socket": str(socket), "store": str(tmp / "store"), **extra}
    path = tmp / "run" / "workers" / f"{rid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


async def test_a_record_whose_pid_is_now_another_process_gets_no_signal(tmp_path: Path) -> None:
    # The pid of a stale record, reused by an unrelated process: on main it was SIGKILLed.
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        path = write_record(tmp_path, "old", bystander.pid, tmp_path / "old.sock")
        assert await Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0)).adopt() == []
        assert bystander.returncode is None and not path.exists()
        assert running(bystander.pid)
    finally:
        bystander.kill()
        await bystander.wait()


async def test_a_worker_started_at_another_time_than_recorded_gets_no_signal(
    tmp_path: Path,
) -> None:
    # Even a real worker on the recorded socket is not the recorded process if it started at
    # another time (its pid was reused by a worker of someone else): neither adopted nor
    # stopped. A record with the right start time is adopted.
    first = Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0))
    worker = await first.spawn(spec(tmp_path))
    path = tmp_path / "run" / "workers" / "r1.json"
    record = json.loads(path.read_text())
    assert record["start_ticks"] == procinfo.started(worker.pid).ticks  # type: ignore[union-attr]
    path.write_text(json.dumps({**record, "start_ticks": record["start_ticks"] - 1}))
    assert await Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0)).adopt() == []
    assert not path.exists()
    status = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=10)
    assert status.pid == worker.pid  # still alive and serving
    path.write_text(json.dumps(record))
    adopted = await Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0)).adopt()
    assert [w.pid for w in adopted] == [worker.pid]
    await first.stop_all(grace_s=5)


def test_procinfo_names_a_process_by_module_socket_and_start(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    code = "import sys, time; time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-m", "torpor.worker.main", "--socket", str(sock)]
    )
    try:
        start = procinfo.started(proc.pid)
        assert start is not None and start == procinfo.started(proc.pid)
        assert procinfo.not_ours(proc.pid, "torpor.worker.main", sock, start) == ""
        assert "reused" in procinfo.not_ours(
            proc.pid, "torpor.worker.main", sock, dataclasses.replace(start, ticks=start.ticks + 1)
        )
        assert "not a" in procinfo.not_ours(proc.pid, "torpor.worker.pager.keeper", sock)
        assert "not serving" in procinfo.not_ours(proc.pid, "torpor.worker.main", tmp_path / "x")
    finally:
        proc.kill()
        proc.wait()
    assert procinfo.not_ours(proc.pid, "torpor.worker.main", sock) == "no such process"
