"""The keepers of torpord's GPUs: one `torpor.worker.pager.keeper` process per GPU.

A keeper holds the page-locked host copies of the GPU's deep-suspended runtimes and fills
their arenas back at DMA speed on a deep resume (worker/pager/keeper.py). It is started
lazily, when the first worker for its GPU is spawned, and every later worker of that GPU is
given its socket (`torpor-worker --keeper PATH`). A keeper that died is started again at the
next spawn for its GPU; one that will not start is logged, and the workers start without
one until `retry_after_s` has passed: deep resumes then copy through staging buffers, which
is slower but loses nothing. Keepers are stopped after the workers.

Sockets: `<runtime_dir>/keepers/<device>.sock`, with `:` replaced (`cuda-0.sock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from torpor.errors import TorporError
from torpor.keeper import KeeperProcess, hello
from torpor.log import get_logger
from torpor.scheduler import procinfo
from torpor.scheduler.supervisor import _wait_pidfd

log = get_logger("keepers")

KEEPER_MODULE = "torpor.worker.pager.keeper"
"""What a keeper runs (`python -m`, torpor/keeper.py): how a leftover one is recognized."""
KEEPER_KINDS = ("cuda",)
"""Device kinds whose workers get a keeper: only a GPU's deep suspend needs one."""
KEEPER_CONTEXT = 640 * 1024**2
"""GPU memory a keeper holds on its GPU, outside every runtime's footprint: its CUDA context
(543 MB measured on an H200 at start; 588 MiB on an H100 once it has filled an arena, the
ledger test of 2026-12-07), rounded up. torpord adds it to each GPU's reserve."""


class Keepers:
    """The keeper process of each device that has had a worker, started on demand."""

    def __init__(
        self,
        runtime_dir: Path,
        *,
        enabled: bool = True,
        start_timeout: float = 60.0,
        log_level: str = "info",
        retry_after_s: float = 30.0,
        kinds: Iterable[str] = KEEPER_KINDS,
    ) -> None:
        self.dir = Path(runtime_dir) / "keepers"
        self.enabled = enabled
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.retry_after_s = retry_after_s
        self.kinds = tuple(kinds)
        self.processes: dict[str, KeeperProcess] = {}  # device -> its keeper (maybe dead)
        self._ensuring: dict[str, asyncio.Task[Path | None]] = {}
        self._failed_at: dict[str, float] = {}  # device -> monotonic time of a failed start
        self._watchers: set[asyncio.Task[None]] = set()
        self._closed = False

    def wants(self, device: str) -> bool:
        """Whether workers on `device` get a keeper (cuda and cuda:N by default)."""
        return self.enabled and device.partition(":")[0] in self.kinds

    def socket(self, device: str) -> Path:
        return self.dir / f"{device.replace(':', '-')}.sock"

    def running(self) -> int:
        """Keepers alive now (safe to call from any thread: the metrics' scrape)."""
        return sum(keeper.alive() for keeper in list(self.processes.values()))

    async def ensure(self, device: str, python: str) -> Path | None:
        """The socket of `device`'s keeper, started first if none is running; None if the
        device gets no keeper, or its keeper would not start.

        Concurrent calls for one device share one start, and a caller that is cancelled does
        not cancel it: the keeper it starts is still known to `stop`.
        """
        if self._closed or not self.wants(device):
            return None
        task = self._ensuring.get(device)
        if task is None or task.done():
            task = asyncio.create_task(self._ensure(device, python), name=f"keeper-{device}")
            self._ensuring[device] = task
        return await asyncio.shield(task)

    async def _ensure(self, device: str, python: str) -> Path | None:
        keeper = self.processes.get(device)
        if keeper is not None:
            if keeper.alive():
                return keeper.path
            del self.processes[device]
            log.warning("keeper_restarting", device=device, pid=keeper.pid)
            keeper.stop(grace_s=0)  # already exited: this only closes its pipe
        failed = self._failed_at.get(device)
        if failed is not None and time.monotonic() - failed < self.retry_after_s:
            return None
        keeper = KeeperProcess(self.socket(device), device, python, self.log_level)
        try:
            await asyncio.to_thread(keeper.start, self.start_timeout)
        except Exception as exc:  # no keeper is no loss: deep resumes take the slower path
            await asyncio.to_thread(keeper.stop, 0)
            self._failed_at[device] = time.monotonic()
            log.error(
                "keeper_failed",
                device=device,
                socket=str(keeper.path),
                error=str(exc),
                reason=exc.reason if isinstance(exc, TorporError) else type(exc).__name__,
                retry_after_s=self.retry_after_s,
            )
            return None
        self._failed_at.pop(device, None)
        self.processes[device] = keeper
        watcher = asyncio.create_task(self._watch(device, keeper), name=f"watch-keeper-{device}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return keeper.path

    async def _watch(self, device: str, keeper: KeeperProcess) -> None:
        """Log a keeper's exit the moment it happens, unless it was asked to stop."""
        proc, pid = keeper.proc, keeper.pid
        if proc is None or pid is None:
            return
        await _wait_pidfd(pid)
        if self.processes.get(device) is keeper:  # not stopped by us
            log.error("keeper_exited", device=device, pid=pid, returncode=proc.poll())

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop every keeper (SIGTERM, SIGKILL after `grace_s`); none starts after this."""
        self._closed = True
        pending = [task for task in self._ensuring.values() if not task.done()]
        if pending:
            await asyncio.wait(pending)
        keepers, self.processes = self.processes, {}
        await asyncio.gather(
            *(asyncio.to_thread(_stop, device, k, grace_s) for device, k in keepers.items())
        )
        for watcher in list(self._watchers):
            watcher.cancel()

    async def stop_leftovers(self, grace_s: float = 10.0) -> list[int]:
        """Stop the keepers an earlier torpord left running; returns their pids.

        A socket in our keepers directory that answers `hello` is such a keeper (its own
        keepers are all started later): it gets SIGTERM, then SIGKILL after `grace_s`, and is
        waited for, since a keeper removes its socket path as it stops. Dead sockets are
        removed. The pid it names is signalled only if /proc shows that process to be a
        keeper on that very socket: a pid is never taken on trust (issue 12).
        """
        stopped = []
        mine = {k.pid for k in self.processes.values()}
        for path in sorted(self.dir.glob("*.sock")):
            pid = await asyncio.to_thread(_hello_pid, path)
            if pid is None:
                path.unlink(missing_ok=True)
                continue
            if pid in mine or pid == os.getpid():
                continue
            why = procinfo.not_ours(pid, KEEPER_MODULE, path)
            if why:
                log.warning("leftover_keeper_not_ours", socket=str(path), pid=pid, why=why)
                continue
            log.warning("leftover_keeper_stopped", socket=str(path), pid=pid)
            await _terminate(pid, grace_s)
            path.unlink(missing_ok=True)
            stopped.append(pid)
        return stopped


def _stop(device: str, keeper: KeeperProcess, grace_s: float) -> None:
    proc, pid = keeper.proc, keeper.pid
    keeper.stop(grace_s)
    if proc is not None:
        log.info("keeper_stopped", device=device, pid=pid, returncode=proc.returncode)


def _hello_pid(path: Path) -> int | None:
    """The pid of the keeper that answers at `path`, or None."""
    try:
        pid = hello(path).get("pid")
    except TorporError:
        return None
    return pid if isinstance(pid, int) else None


async def _terminate(pid: int, grace_s: float) -> None:
    """SIGTERM `pid` (not our child), SIGKILL after `grace_s`; returns once it has exited."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_wait_pidfd(pid), grace_s if sig == signal.SIGTERM else None)
            return
