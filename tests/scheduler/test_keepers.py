"""The GPUs' keepers with real keeper processes (on device cpu, which a keeper serves too):
started lazily and once per device, started again after a death, given to the workers of
their device, stopped after them, and off where the config turns them off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.scheduler.test_supervisor import spec
from torpor.keeper import hello
from torpor.scheduler.daemon import keepers_enabled, policy_state
from torpor.scheduler.daemon_config import load_config
from torpor.scheduler.keepers import Keepers
from torpor.scheduler.supervisor import Supervisor, WorkerProcess
from torpor.v1 import worker_pb2


def hello_pid(path: Path) -> int:
    return int(hello(path)["pid"])


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie child counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
async def keepers(tmp_path: Path) -> AsyncIterator[Keepers]:
    """Keepers for cpu devices (the daemon's are for cuda ones), stopped after the test."""
    keepers = Keepers(tmp_path / "run", kinds=("cpu",), start_timeout=60)
    yield keepers
    await keepers.stop(grace_s=5)


def test_argv_has_keeper_only_when_set(tmp_path: Path) -> None:
    assert "--keeper" not in spec(tmp_path).argv()
    argv = spec(tmp_path, keeper=tmp_path / "k.sock").argv()
    assert argv[argv.index("--keeper") + 1] == str(tmp_path / "k.sock")


async def test_one_keeper_per_device_started_once_and_reused(
    tmp_path: Path, keepers: Keepers
) -> None:
    first, second = await asyncio.gather(
        keepers.ensure("cpu", sys.executable), keepers.ensure("cpu", sys.executable)
    )
    assert first == second == tmp_path / "run" / "keepers" / "cpu.sock"
    pid = keepers.processes["cpu"].pid
    assert pid is not None and hello_pid(first) == pid
    assert await keepers.ensure("cpu", sys.executable) == first
    assert keepers.processes["cpu"].pid == pid and keepers.running() == 1
    with capture_logs() as logs:
        await keepers.stop(grace_s=5)
    assert gone(pid) and keepers.running() == 0 and not first.exists()
    assert [e["event"] for e in logs] == ["keeper_stopped"] and logs[0]["pid"] == pid
    assert await keepers.ensure("cpu", sys.executable) is None  # none starts after stop


async def test_a_dead_keeper_is_logged_and_started_again(keepers: Keepers) -> None:
    path = await keepers.ensure("cpu", sys.executable)
    assert path is not None
    old = keepers.processes["cpu"].pid
    assert old is not None
    with capture_logs() as logs:
        os.kill(old, signal.SIGKILL)
        for _ in range(100):  # the watcher logs it as soon as the pidfd says so
            await asyncio.sleep(0.05)
            if logs:
                break
        assert logs and logs[0]["event"] == "keeper_exited" and logs[0]["pid"] == old
        assert logs[0]["returncode"] == -signal.SIGKILL and keepers.running() == 0
        assert await keepers.ensure("cpu", sys.executable) == path
    new = keepers.processes["cpu"].pid
    assert new != old and hello_pid(path) == new
    assert [e["pid"] for e in logs if e["event"] == "keeper_restarting"] == [old]


async def test_a_keeper_that_will_not_start_is_logged_and_retried_later(tmp_path: Path) -> None:
    keepers = Keepers(tmp_path / "run", kinds=("cpu",), retry_after_s=3600)
    with capture_logs() as logs:
        assert await keepers.ensure("cpu", "/bin/false") is None  # it exits without `ready`
        assert await keepers.ensure("cpu", sys.executable) is None  # not tried again yet
    assert [e["event"] for e in logs] == ["keeper_failed"]
    assert logs[0]["reason"] == "KEEPER_FAILED" and logs[0]["device"] == "cpu"
    assert keepers.running() == 0 and keepers.processes == {}
    keepers.retry_after_s = 0
    try:
        assert await keepers.ensure("cpu", sys.executable) is not None
    finally:
        await keepers.stop(grace_s=5)


async def test_no_keeper_for_other_devices_or_when_off(tmp_path: Path) -> None:
    default = Keepers(tmp_path / "run")
    assert default.wants("cuda:0") and default.wants("cuda") and not default.wants("cpu")
    assert await default.ensure("cpu", sys.executable) is None
    off = Keepers(tmp_path / "run", enabled=False, kinds=("cpu",))
    assert not off.wants("cpu") and not off.wants("cuda:1")
    assert await off.ensure("cpu", sys.executable) is None
    assert not (tmp_path / "run" / "keepers").exists()
    assert default.socket("cuda:3") == tmp_path / "run" / "keepers" / "cuda-3.sock"


async def test_workers_get_their_device_keeper_and_it_stops_after_them(
    tmp_path: Path, keepers: Keepers
) -> None:
    exits: asyncio.Queue[WorkerProcess] = asyncio.Queue()
    sup = Supervisor(tmp_path / "run", exits.put, keepers=keepers)
    worker = await sup.spawn(spec(tmp_path))
    keeper = tmp_path / "run" / "keepers" / "cpu.sock"
    assert worker.spec.keeper == keeper
    status = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=10)
    assert status.pid == worker.pid
    record = json.loads((tmp_path / "run" / "workers" / "r1.json").read_text())
    assert record["keeper"] == str(keeper)
    # The record round-trips: a restarted supervisor adopts the worker with the same spec.
    second = Supervisor(tmp_path / "run", lambda w: asyncio.sleep(0))
    adopted = await second.adopt()
    assert [w.spec for w in adopted] == [worker.spec]
    for w in adopted:
        await w.channel.close()
    keeper_pid = keepers.processes["cpu"].pid
    assert keeper_pid is not None and hello_pid(keeper) == keeper_pid
    await sup.stop_all(grace_s=10)
    assert (await asyncio.wait_for(exits.get(), 10)).returncode == 0
    assert gone(keeper_pid) and keepers.running() == 0


async def test_cpu_workers_get_no_keeper_by_default(tmp_path: Path) -> None:
    sup = Supervisor(
        tmp_path / "run", lambda w: asyncio.sleep(0), keepers=Keepers(tmp_path / "run")
    )
    worker = await sup.spawn(spec(tmp_path))
    try:
        assert worker.spec.keeper is None
        record = json.loads((tmp_path / "run" / "workers" / "r1.json").read_text())
        assert "keeper" not in record  # a record without one still adopts (default None)
    finally:
        await sup.stop_all(grace_s=10)
    assert not (tmp_path / "run" / "keepers").exists()


async def test_leftover_keepers_are_stopped_and_dead_sockets_removed(
    tmp_path: Path, keepers: Keepers
) -> None:
    path = await keepers.ensure("cpu", sys.executable)
    assert path is not None
    old = keepers.processes["cpu"].pid
    stale = path.with_name("cuda-7.sock")  # a socket nobody listens on any more
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    restarted = Keepers(tmp_path / "run")  # the next torpord's
    with capture_logs() as logs:
        assert await restarted.stop_leftovers(grace_s=5) == [old]
    assert old is not None and gone(old) and not stale.exists()
    # (The first Keepers, in this same process, also sees its keeper exit: keeper_exited.)
    assert [e["pid"] for e in logs if e["event"] == "leftover_keeper_stopped"] == [old]


@pytest.mark.parametrize(
    ("cuda", "keeper", "deep_suspend", "enabled"),
    [
        (True, True, True, True),
        (True, False, True, False),  # [worker] keeper = false
        (True, True, False, False),  # nothing is deep-suspended: a keeper would hold nothing
        (False, True, True, False),  # cpu backend
    ],
)
def test_the_daemon_runs_keepers_per_config(
    cuda: bool, keeper: bool, deep_suspend: bool, enabled: bool
) -> None:
    config = load_config(None, {}, {"worker.keeper": keeper, "worker.deep_suspend": deep_suspend})
    assert keepers_enabled(config, cuda) is enabled
    assert load_config(None, {"TORPOR_WORKER_KEEPER": "off"}, {}).worker.keeper is False


def test_torpord_starts_keepers_without_importing_the_worker_or_torch() -> None:
    """ARCHITECTURE.md: the scheduler talks to workers and keepers as processes only."""
    code = (
        "import sys; import torpor.scheduler.daemon, torpor.scheduler.keepers; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torpor.worker')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("keeper", [True, False])
def test_with_keepers_the_policy_prices_deep_resumes_at_dma_speed_and_reserves_their_context(
    keeper: bool,
) -> None:
    """A keeper fills deep resumes at the host-to-GPU rate and holds a CUDA context on each
    GPU; the policy's costs and each GPU's reserve say so."""
    from torpor.scheduler.core import Costs
    from torpor.scheduler.inventory import from_config
    from torpor.scheduler.keepers import KEEPER_CONTEXT

    overrides = {"backend.kind": "cpu", "backend.cpu_devices": 1, "worker.keeper": keeper}
    config = load_config(None, {}, {**overrides, "backend.cpu_device_memory": "8GiB"})

    def measured(base: Costs) -> Costs:  # the recorder: a host-to-GPU rate measured before
        return dataclasses.replace(base, host_to_gpu=50e9)

    # cuda=True as on a GPU host; the (cpu) inventory is only read for sizes.
    state = policy_state(config, from_config(config.backend), measured, cuda=True)
    if keeper:
        assert state.costs.deep_refill == 50e9
        assert state.gpus[0].reserved_bytes == config.budgets.gpu_reserve + KEEPER_CONTEXT
    else:
        assert state.costs.deep_refill == Costs().deep_refill  # staged: 31 GB/s
        assert state.gpus[0].reserved_bytes == config.budgets.gpu_reserve


async def test_a_keeper_logs_at_the_daemons_level(tmp_path: Path) -> None:
    keepers = Keepers(tmp_path / "run", kinds=("cpu",), log_level="warning")
    try:
        await keepers.ensure("cpu", sys.executable)
        pid = keepers.processes["cpu"].pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")  # noqa: ASYNC240
        assert argv[argv.index("--log-level") + 1] == "warning"
    finally:
        await keepers.stop(grace_s=5)
