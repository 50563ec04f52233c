"""The two sets of books of a running torpord: what its core's ledger counts, and what its
processes really hold, per device, for host RAM and for disk (issue 13, "the budgets never
lie").

- The ledger: `Admin.ListResidency` (each runtime's gpu/host/disk bytes and GPU; the host and
  disk `MemoryBudget.used_bytes`; `GpuInfo.used_bytes`).
- Reality: each worker, asked over its own Unix socket (`torpor.v1.Worker/Status`): its
  arenas' mapped bytes, its host copy, its staging buffers; on CUDA the device bytes NVML sees
  per process (workers and keepers) instead of the arenas; and every file under the chunk
  store's directory, temp files included.

`take` reads both; `compare` says where reality exceeds the ledger. A reading is taken
between two reads of the ledger, and the ledger is the larger of the two, part by part: a
transition that starts or ends meanwhile is counted at its peak either way. `Sampler` takes
readings continuously while a step runs, so a transient the step's end no longer shows (a
load through the GPU, a staging ring) is caught too.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.daemon.conftest import Torpord
from torpor.v1 import common_pb2, worker_pb2, worker_pb2_grpc

GpuProbe = Callable[[list[int]], dict[int, int]]
"""pids -> device bytes each holds (NVML); None on the CPU backend, where the arenas are the
device."""


@dataclass(frozen=True)
class Ledger:
    """What torpord's core counts."""

    gpu: dict[int, int]  # per GPU index: the runtimes' gpu_bytes
    host: int  # the host MemoryBudget's used_bytes
    disk: int  # the disk MemoryBudget's used_bytes
    gpu_info_used: dict[int, int]  # GpuInfo.used_bytes (on CUDA, NVML's total)
    rows: tuple[str, ...]  # one line per runtime, for the failure message
    states: tuple[tuple[str, int], ...]  # (runtime id, state): is the reading consistent

    def max(self, other: Ledger) -> Ledger:
        gpus = self.gpu.keys() | other.gpu.keys()
        return Ledger(
            {g: max(self.gpu.get(g, 0), other.gpu.get(g, 0)) for g in gpus},
            max(self.host, other.host),
            max(self.disk, other.disk),
            self.gpu_info_used,
            self.rows,
            self.states,
        )


@dataclass(frozen=True)
class Reality:
    """What the processes hold and what is on disk."""

    gpu: dict[int, int]
    host: int
    disk: int
    parts: tuple[str, ...]  # one line per process or file group, for the failure message


@dataclass(frozen=True)
class Books:
    ledger: Ledger
    reality: Reality

    def excess(self) -> dict[str, str]:
        """Each budget ("gpu N", "host", "disk") where reality exceeds the ledger, with both
        numbers: empty when the books agree."""
        pairs = {
            **{
                f"gpu {g}": (self.reality.gpu.get(g, 0), self.ledger.gpu.get(g, 0))
                for g in sorted(self.reality.gpu.keys() | self.ledger.gpu.keys())
            },
            "host": (self.reality.host, self.ledger.host),
            "disk": (self.reality.disk, self.ledger.disk),
        }
        return {
            budget: f"{budget}: really {real} B > ledger {counted} B (+{real - counted})"
            for budget, (real, counted) in pairs.items()
            if real > counted
        }

    def over(self, budget: str) -> int:
        """Bytes by which reality exceeds the ledger in `budget` (negative: within it)."""
        if budget.startswith("gpu "):
            g = int(budget[4:])
            return self.reality.gpu.get(g, 0) - self.ledger.gpu.get(g, 0)
        if budget == "host":
            return self.reality.host - self.ledger.host
        return self.reality.disk - self.ledger.disk

    def report(self, step: str, when: str, budget: str) -> str:
        lines = [f"step {step!r} ({when}): {self.excess()[budget]}"]
        lines.append("ledger (ListResidency):")
        lines += [f"  {row}" for row in self.ledger.rows]
        lines.append(
            f"  gpu {self.ledger.gpu}  host.used {self.ledger.host}  disk.used {self.ledger.disk}"
            f"  GpuInfo.used {self.ledger.gpu_info_used}"
        )
        lines.append("reality:")
        lines += [f"  {part}" for part in self.reality.parts]
        return "\n".join(lines)


@dataclass
class Probe:
    """How to read one torpord's reality."""

    daemon: Torpord
    runtime_dir: Path
    snapshot_dir: Path
    gpu_probe: GpuProbe | None = None  # CUDA: NVML per pid
    keeper_allowance: int = 0  # CUDA: device bytes torpord sets aside for the keeper
    _channels: dict[Path, grpc.Channel] = field(default_factory=dict)

    def ledger(self) -> Ledger:
        reply = self.daemon.residency()
        gpu = {g.index: 0 for g in reply.gpus}
        rows = []
        for r in reply.runtimes:
            if r.HasField("gpu"):
                gpu[r.gpu] = gpu.get(r.gpu, 0) + r.gpu_bytes
            rows.append(
                f"{r.model} {r.runtime_id} {common_pb2.RuntimeState.Name(r.state)}"
                f" gpu{r.gpu if r.HasField('gpu') else '-'}={r.gpu_bytes}"
                f" host={r.host_bytes} disk={r.disk_bytes} pid={r.worker_pid}"
            )
        if self.gpu_probe is not None:
            # The keepers' contexts live in what torpord sets aside on each GPU.
            gpu = {g: n + self.keeper_allowance for g, n in gpu.items()}
        return Ledger(
            gpu,
            reply.host.used_bytes,
            reply.disk.used_bytes,
            {g.index: g.used_bytes for g in reply.gpus},
            tuple(rows),
            tuple((r.runtime_id, r.state) for r in reply.runtimes),
        )

    def workers(self) -> list[tuple[str, worker_pb2.WorkerStatusResponse]]:
        """(runtime id, Status) of every worker that answers on its socket."""
        out = []
        for sock in sorted((self.runtime_dir / "workers").glob("*.sock")):
            channel = self._channels.get(sock)
            if channel is None:
                channel = self._channels[sock] = grpc.insecure_channel(f"unix://{sock}")
            try:
                status = worker_pb2_grpc.WorkerStub(channel).Status(
                    worker_pb2.WorkerStatusRequest(), timeout=10
                )
            except grpc.RpcError:  # gone, or going: its memory is being given back
                continue
            out.append((sock.stem, status))
        return out

    def keepers(self) -> list[tuple[int, int]]:
        """(GPU index, pid) of each keeper: `<runtime_dir>/keepers/cuda-N.sock`."""
        out = []
        for sock in (self.runtime_dir / "keepers").glob("*.sock"):
            index = int(sock.stem.rpartition("-")[2]) if sock.stem[-1:].isdigit() else -1
            out += [(index, pid) for pid in _pids_with_socket(sock)]
        return out

    def reality(self, ledger: Ledger, gpu_of: dict[int | str, int]) -> Reality:
        parts = []
        gpu: dict[int, int] = {}
        host = 0
        workers = self.workers()
        keepers = self.keepers() if self.gpu_probe is not None else []
        device_bytes = (
            self.gpu_probe([s.pid for _, s in workers] + [pid for _, pid in keepers])
            if self.gpu_probe is not None
            else None
        )
        for runtime_id, s in workers:
            # The worker's word, and the kernel's: its memfd arena mappings, which a worker
            # still loading (no runtime yet, so no arenas in its Status) holds too.
            mapped = max(sum(a.mapped_bytes for a in s.arenas), _memfd_mapped(s.pid))
            on_gpu = mapped if device_bytes is None else device_bytes.get(s.pid, 0)
            index = gpu_of.get(s.pid, gpu_of.get(s.model, -1))  # -1: one it does not know
            gpu[index] = gpu.get(index, 0) + on_gpu
            host += s.host_bytes + s.staging_bytes
            parts.append(
                f"worker {s.model or '?'} {runtime_id} pid={s.pid}"
                f" {common_pb2.RuntimeState.Name(s.state)} gpu{index}={on_gpu}"
                f" (arenas {', '.join(f'{a.name}={a.mapped_bytes}' for a in s.arenas) or '-'};"
                f" /proc memfd arenas {_memfd_mapped(s.pid)})"
                f" host_copy={s.host_bytes} staging={s.staging_bytes}"
            )
        if device_bytes is not None:
            # A keeper maps the workers' host copies (memfds) and keeps them locked: the same
            # pages as the workers' host_bytes, but a copy that no live worker maps any more
            # is held by the keeper alone.
            in_workers: set[str] = set()
            for _, s in workers:
                in_workers |= memfds(s.pid, "torpor-host-copy").keys()
            for index, pid in keepers:
                held = device_bytes.get(pid, 0)  # its CUDA context
                gpu[index] = gpu.get(index, 0) + held
                copies = memfds(pid, "torpor-host-copy")
                alone = sum(n for inode, n in copies.items() if inode not in in_workers)
                host += alone
                parts.append(
                    f"keeper gpu{index} pid={pid} gpu={held} host copies mapped"
                    f" {sum(copies.values())}, of them no worker's {alone}"
                )
        disk, files = store_files(self.snapshot_dir)
        parts.append(f"store {self.snapshot_dir}: {disk} B in {len(files)} files")
        temps = [f for f in files if f[0].name.startswith(".tmp")]
        if temps:
            parts.append(f"  temp files: {[(p.name, n) for p, n in temps]}")
        return Reality(gpu, host, disk, tuple(parts))

    def consistent(self) -> Books | None:
        """Ledger, reality, ledger: a reading whose ledger is the larger of its two reads,
        part by part; None when a runtime changed state between them (an op that started
        and ended in between would not be counted by either read)."""
        before = self.ledger()
        reality = self.reality(before, _gpu_of(self.daemon))
        after = self.ledger()
        return Books(before.max(after), reality) if before.states == after.states else None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def _gpu_of(daemon: Torpord) -> dict[int | str, int]:
    """Worker pid, and model name, -> the GPU its runtime is bound to, as the ledger says
    (by name for a worker whose pid torpord has not published yet)."""
    rows = [r for r in daemon.residency().runtimes if r.HasField("gpu")]
    return {
        **{r.model: r.gpu for r in rows},
        **{r.worker_pid: r.gpu for r in rows if r.worker_pid},
    }


def memfds(pid: int, name: str) -> dict[str, int]:
    """Inode -> bytes mapped, of the memfds called `name` in /proc/PID/maps."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5] == f"/memfd:{name}":
                start, _, end = fields[0].partition("-")
                out[fields[4]] = out.get(fields[4], 0) + int(end, 16) - int(start, 16)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _memfd_mapped(pid: int) -> int:
    """Bytes of /proc/PID/maps mapped from the CPU backend's arena memfds (physical memory
    backing an arena; an unmapped arena is anonymous PROT_NONE memory instead)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if "/memfd:torpor-arena" in line:
                start, _, end = line.split()[0].partition("-")
                total += int(end, 16) - int(start, 16)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return total


STORE_METADATA = ("store-id", "locks")
"""Files of the store that hold no snapshot bytes: its id (33 B) and its lock files."""


def store_files(root: Path) -> tuple[int, list[tuple[Path, int]]]:
    """Every file under root and its size (chunks, manifests, temp files, orphans), but the
    store's metadata."""
    files = []
    for dirpath, dirs, names in os.walk(root):
        if Path(dirpath) == root:
            dirs[:] = [d for d in dirs if d not in STORE_METADATA]
            names = [n for n in names if n not in STORE_METADATA]
        for name in names:
            path = Path(dirpath) / name
            try:
                files.append((path, path.stat().st_size))
            except FileNotFoundError:  # renamed or removed while we walked
                continue
    return sum(n for _, n in files), files


def _pids_with_socket(sock: Path) -> list[int]:
    """Processes listening on a Unix socket path (from /proc/net/unix and fd links)."""
    inodes = set()
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(sock):
                inodes.add(fields[6])
    except FileNotFoundError:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.append(int(proc.name))
                    break
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return pids


def nvml_device_bytes(pids: list[int]) -> dict[int, int]:
    """Device bytes per pid, as NVML reports them (nvidia-smi; pynvml when importable).
    NVML is read from outside: inside a checkpointed process it would block."""
    wanted = set(pids)
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        try:
            held: dict[int, int] = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in wanted and proc.usedGpuMemory:
                        held[proc.pid] = held.get(proc.pid, 0) + int(proc.usedGpuMemory)
            return held
        finally:
            pynvml.nvmlShutdown()
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return parse_compute_apps(out, wanted)


def parse_compute_apps(out: str, wanted: set[int]) -> dict[int, int]:
    """`nvidia-smi --query-compute-apps=pid,used_memory` (csv, MiB) -> bytes per wanted pid,
    summed over GPUs."""
    held: dict[int, int] = {}
    for line in out.splitlines():
        pid_s, _, mib = (x.strip() for x in line.partition(","))
        if pid_s.isdigit() and int(pid_s) in wanted and mib.isdigit():
            held[int(pid_s)] = held.get(int(pid_s), 0) + int(mib) * (1 << 20)
    return held


class Sampler:
    """Readings taken continuously in a thread while a step runs; for each budget, the one
    whose reality exceeds its ledger most is kept."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.stop = threading.Event()
        self.worst: dict[str, Books] = {}  # by budget: the reading that exceeded it most
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                books = self.probe.consistent()
                if books is None:
                    continue
                self.samples += 1
                for budget in books.excess():
                    worst = self.worst.get(budget)
                    if worst is None or books.over(budget) > worst.over(budget):
                        self.worst[budget] = books
                self.stop.wait(0.02)
        except BaseException as exc:  # reported by the step, not lost in the thread
            self.error = exc


@contextmanager
def sampling(probe: Probe) -> Iterator[Sampler]:
    sampler = Sampler(probe)
    thread = threading.Thread(target=sampler.run, name="ledger-sampler", daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        sampler.stop.set()
        thread.join(timeout=60)
