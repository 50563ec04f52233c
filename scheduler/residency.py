"""What is where, for `ListResidency` and `GetStatus`: GPUs with their bytes, and one row per
runtime with its state, tier, bytes, leases and estimated restore time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torpor.scheduler import convert
from torpor.scheduler.core import RuntimeState
from torpor.scheduler.core.costs import restore_seconds
from torpor.v1 import admin_pb2

if TYPE_CHECKING:
    from torpor.scheduler.daemon import Daemon


def accounted_gpu_bytes(d: Daemon) -> dict[int, int]:
    """GPU bytes the policy accounts to runtimes, per GPU."""
    state = d.controller.state
    used = {g.index: 0 for g in state.gpus}
    for runtime in state.runtimes.values():
        held = state.held(runtime)
        if held.gpu is not None:
            used[held.gpu] = used.get(held.gpu, 0) + held.gpu_bytes
    return used


def gpu_infos(d: Daemon) -> list[admin_pb2.GpuInfo]:
    state = d.controller.state
    accounted = accounted_gpu_bytes(d)
    infos = []
    for gpu in d.inventory.gpus():
        if d.cuda:  # NVML's own numbers: they include what is not torpor's
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


def runtime_infos(d: Daemon, model: str, include_cold: bool) -> list[admin_pb2.RuntimeInfo]:
    state = d.controller.state
    rows = []
    for name in sorted(state.models):
        if model and name != model:
            continue
        entry = state.models[name]
        runtime = state.runtimes[entry.runtime_id]
        if runtime.state is RuntimeState.COLD and not include_cold:
            continue
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
        )
        if runtime.gpu is not None:
            info.gpu = runtime.gpu
        if entry.last_used is not None:
            info.last_used.CopyFrom(convert.timestamp(d.clocks.wall(entry.last_used)))
            keep = entry.keep_alive_s(state.config)
            if keep > 0:
                info.keep_alive_until.CopyFrom(
                    convert.timestamp(d.clocks.wall(entry.last_used + keep))
                )
        worker = d.executor.worker(runtime.id)
        if worker is not None:
            info.worker_pid = worker.pid
        rows.append(info)
    return rows
