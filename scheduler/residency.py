"""What is where, for `ListResidency` and `GetStatus`: GPUs with their bytes, and one row per
runtime with its state, tier, bytes, leases and estimated restore time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torpor.scheduler import convert
from torpor.scheduler.core import RuntimeState, SchedulerState
from torpor.scheduler.core.costs import restore_seconds
from torpor.v1 import admin_pb2

if TYPE_CHECKING:
    from torpor.scheduler.controller import Controller
    from torpor.scheduler.inventory import Inventory
    from torpor.scheduler.supervisor import WorkerProcess


class Workers(Protocol):
    """The worker process of a runtime, if it has one (the executor's)."""

    def worker(self, runtime_id: str) -> WorkerProcess | None: ...


def accounted_gpu_bytes(state: SchedulerState) -> dict[int, int]:
    """GPU bytes the policy accounts to runtimes, per GPU."""
    used = {g.index: 0 for g in state.gpus}
    for runtime in state.runtimes.values():
        held = state.held(runtime)
        if held.gpu is not None:
            used[held.gpu] = used.get(held.gpu, 0) + held.gpu_bytes
    return used


class ResidencyView:
    """What is where now: the policy state's bytes, the inventory's GPUs, the workers."""

    def __init__(
        self,
        controller: Controller,
        inventory: Inventory,
        workers: Workers,
        clocks: convert.Clocks,
    ) -> None:
        self.controller = controller
        self.inventory = inventory
        self.workers = workers
        self.clocks = clocks
        self.cuda = inventory.backend == "cuda"

    def tier_usage(self) -> tuple[int, int]:
        """Host and disk bytes of the ledger: the runtimes' host bytes; their snapshots plus
        the store's bytes outside them (docs/POLICY.md, "The disk budget")."""
        state = self.controller.state
        held = [state.held(r) for r in state.runtimes.values()]
        return sum(h.host for h in held), sum(h.disk for h in held) + state.disk_outside

    def gpus(self) -> list[admin_pb2.GpuInfo]:
        state = self.controller.state
        accounted = accounted_gpu_bytes(state)
        infos = []
        for gpu in self.inventory.gpus():
            if self.cuda:  # NVML's own numbers: they include what is not torpor's
                used, free = gpu.used_bytes, gpu.free_bytes
            else:  # a simulated device holds what the runtimes on it hold
                used = accounted.get(gpu.index, 0)
                free = max(0, gpu.total_bytes - used)
            infos.append(
                admin_pb2.GpuInfo(
                    index=gpu.index,
                    name=gpu.name,
                    uuid=gpu.uuid,
                    total_bytes=gpu.total_bytes,
                    used_bytes=used,
                    free_bytes=free,
                    draining=gpu.index in state.draining,
                )
            )
        return infos

    def runtimes(self, model: str, include_cold: bool) -> list[admin_pb2.RuntimeInfo]:
        state = self.controller.state
        rows = []
        for name in sorted(state.models):
            if model and name != model:
                continue
            entry = state.models[name]
            runtime = state.runtimes[entry.runtime_id]
            if runtime.state is RuntimeState.COLD and not include_cold:
                continue
            rows.append(self._row(state, name, entry, runtime))
        return rows

    def _row(
        self, state: SchedulerState, name: str, entry: Any, runtime: Any
    ) -> admin_pb2.RuntimeInfo:
        held = state.held(runtime)
        info = admin_pb2.RuntimeInfo(
            model=name,
            runtime_id=runtime.id,
            state=convert.state_name(runtime.state),
            tier=convert.tier_name(runtime.at.tier),  # a FAILED one: its snapshot, or source
            gpu_bytes=held.gpu_bytes,
            host_bytes=held.host,
            disk_bytes=held.disk,
            leases=state.leases_on(runtime.id),
            pinned=entry.spec.pinned,
            restore_estimate=convert.duration(
                restore_seconds(runtime.at, entry.spec.footprint, state.costs)
            ),
            host_copy=runtime.target().host_copy,
        )
        partner = runtime.op.partner if runtime.op is not None else None
        if partner is not None and partner in state.runtimes:
            info.exchange_with = state.runtimes[partner].model
        if runtime.gpu is not None:
            info.gpu = runtime.gpu
        if entry.last_used is not None:
            info.last_used.CopyFrom(convert.timestamp(self.clocks.wall(entry.last_used)))
            keep = entry.keep_alive_s(state.config)
            if keep > 0:
                info.keep_alive_until.CopyFrom(
                    convert.timestamp(self.clocks.wall(entry.last_used + keep))
                )
        worker = self.workers.worker(runtime.id)
        if worker is not None:
            info.worker_pid = worker.pid
        return info
