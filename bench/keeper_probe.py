"""Can a second process that owns the page-locked host copy fill a deep-resumed worker's
arena at DMA speed, so that the worker itself holds no locked memory at its checkpoint?

    python bench/keeper_probe.py --gib 16 --cycles 3 --out F

This process plays the worker: a CUDA context (torch), a host copy in a memfd (not locked
here), and an arena of exportable VMM handles. A child plays the keeper: it maps the memfd
and page-locks it, in 128 MiB registrations. Each cycle the worker releases its arena, is
checkpointed and restored by the driver (through torpor's controller), maps new handles,
exports them as file descriptors and sends them to the keeper, which imports and maps them
and copies the host copy in. Every step is timed, and the bytes are checked.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
PIECE = 128 << 20


def _check(name: str, result: Any) -> Any:
    from cuda.bindings import driver as cu

    status, *rest = result if isinstance(result, tuple) else (result,)
    if status != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{name}: {status.name}")
    return rest[0] if len(rest) == 1 else rest


def _context() -> Any:
    from cuda.bindings import driver as cu

    _check("cuInit", cu.cuInit(0))
    dev = _check("cuDeviceGet", cu.cuDeviceGet(0))
    ctx = _check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(dev))
    _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(ctx))
    return ctx


def _access() -> Any:
    from cuda.bindings import driver as cu

    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return access


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(msg).encode()
    header = len(data).to_bytes(4, "little")
    socket.send_fds(sock, [header + data], list(fds)) if fds else sock.sendall(header + data)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 253)
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
        more = sock.recv(1 << 20)
        if not more:
            raise EOFError
        data += more
    return json.loads(data[4:]), list(fds)


# -- the keeper -------------------------------------------------------------------------------


def keeper(path: str) -> None:
    from cuda.bindings import driver as cu

    _context()
    stream = _check("cuStreamCreate", cu.cuStreamCreate(1))  # non-blocking
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    host = 0
    fd_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    while True:
        try:
            msg, fds = _recv(conn)
        except EOFError:
            return
        t0 = time.perf_counter()
        if msg["op"] == "hold":
            nbytes = msg["nbytes"]
            mm = mmap.mmap(fds[0], nbytes, mmap.MAP_SHARED)
            os.close(fds[0])
            host = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            for off in range(0, nbytes, PIECE):
                n = min(PIECE, nbytes - off)
                _check("cuMemHostRegister", cu.cuMemHostRegister(host + off, n, 1))
            _send(conn, {"pin_s": time.perf_counter() - t0})
        elif msg["op"] == "fill":
            sizes, total = msg["sizes"], sum(msg["sizes"])
            handles = []
            for fd in fds:
                handles.append(_check("import", cu.cuMemImportFromShareableHandle(fd, fd_type)))
                os.close(fd)
            t_import = time.perf_counter()
            base = int(_check("reserve", cu.cuMemAddressReserve(total, 0, 0, 0)))
            at = base
            for h, n in zip(handles, sizes, strict=True):
                _check("cuMemMap", cu.cuMemMap(at, n, 0, h, 0))
                at += n
            _check("cuMemSetAccess", cu.cuMemSetAccess(base, total, [_access()], 1))
            t_map = time.perf_counter()
            for off in range(0, total, PIECE):
                n = min(PIECE, total - off)
                _check("copy", cu.cuMemcpyHtoDAsync(base + off, host + off, n, stream))
            _check("sync", cu.cuStreamSynchronize(stream))
            t_copy = time.perf_counter()
            at = base
            for h, n in zip(handles, sizes, strict=True):
                _check("cuMemUnmap", cu.cuMemUnmap(at, n))
                _check("cuMemRelease", cu.cuMemRelease(h))
                at += n
            _check("free", cu.cuMemAddressFree(base, total))
            t_end = time.perf_counter()
            _send(
                conn,
                {
                    "import_s": t_import - t0,
                    "map_s": t_map - t_import,
                    "copy_s": t_copy - t_map,
                    "copy_gbps": total / (t_copy - t_map) / 1e9,
                    "unmap_s": t_end - t_copy,
                },
            )


# -- the worker -------------------------------------------------------------------------------


class Arena:
    def __init__(self, nbytes: int, handle: int) -> None:
        from cuda.bindings import driver as cu

        self.nbytes, self.handle = nbytes, handle
        self.prop = cu.CUmemAllocationProp()
        self.prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = 0
        self.prop.requestedHandleTypes = (
            cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        self.base = int(_check("reserve", cu.cuMemAddressReserve(nbytes, 0, 0, 0)))
        self.handles: list[Any] = []

    def map(self) -> None:
        from cuda.bindings import driver as cu

        for off in range(0, self.nbytes, self.handle):
            h = _check("cuMemCreate", cu.cuMemCreate(self.handle, self.prop, 0))
            _check("cuMemMap", cu.cuMemMap(self.base + off, self.handle, 0, h, 0))
            self.handles.append(h)
        _check("access", cu.cuMemSetAccess(self.base, self.nbytes, [_access()], 1))

    def export(self) -> list[int]:
        from cuda.bindings import driver as cu

        kind = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return [
            int(_check("export", cu.cuMemExportToShareableHandle(h, kind, 0))) for h in self.handles
        ]

    def unmap(self) -> None:
        from cuda.bindings import driver as cu

        for i, h in enumerate(self.handles):
            _check("cuMemUnmap", cu.cuMemUnmap(self.base + i * self.handle, self.handle))
            _check("cuMemRelease", cu.cuMemRelease(h))
        self.handles = []


def worker(args: argparse.Namespace) -> None:
    import torch

    from tests.pager.nvsmi import process_gpu_bytes
    from torpor.worker.pager import checkpoint

    nbytes, handle = args.gib * GiB, args.handle_mib << 20
    torch.zeros(1, device="cuda")
    (torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")).sum().item()
    _context()
    out = args.out.open("a")

    def emit(record: dict[str, Any]) -> None:
        record = {"bench": "keeper_probe", "gib": args.gib, "handle_mib": args.handle_mib} | record
        print(json.dumps(record), flush=True)
        out.write(json.dumps(record) + "\n")
        out.flush()

    t0 = time.perf_counter()
    memfd = os.memfd_create("torpor-probe-copy")
    os.ftruncate(memfd, nbytes)
    mm = mmap.mmap(memfd, nbytes, mmap.MAP_SHARED)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    for g in range(args.gib):
        host[g * GiB : (g + 1) * GiB].fill_(g % 251 + 1)
    fill_s = time.perf_counter() - t0

    sock_path = f"/tmp/keeper-probe-{os.getpid()}.sock"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--keeper", sock_path], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    _send(sock, {"op": "hold", "nbytes": nbytes}, [memfd])
    held, _ = _recv(sock)
    emit(
        {
            "step": "hold",
            "host_fill_s": fill_s,
            "keeper_pin_s": held["pin_s"],
            "keeper_gpu_bytes": process_gpu_bytes(proc.pid),
        }
    )

    arena = Arena(nbytes, handle)
    controller = checkpoint.Controller(os.getpid()).start()

    def fill(record: dict[str, Any]) -> None:
        t = time.perf_counter()
        arena.map()
        t_map = time.perf_counter()
        fds = arena.export()
        t_export = time.perf_counter()
        sizes = [handle] * len(fds)
        _send(sock, {"op": "fill", "sizes": sizes}, fds)
        for fd in fds:
            os.close(fd)
        reply, _ = _recv(sock)
        t_fill = time.perf_counter()
        device = torch.as_tensor(_View(arena.base, nbytes), device="cuda")
        ok = all(
            int(device[g * GiB + k].item()) == g % 251 + 1
            for g in range(args.gib)
            for k in (0, GiB // 2, GiB - 1)
        )
        record |= {
            "map_s": t_map - t,
            "export_s": t_export - t_map,
            "keeper_fill_s": t_fill - t_export,
            "fill_total_s": t_fill - t,
            "bytes_ok": ok,
        } | {f"keeper_{k}": v for k, v in reply.items()}

    first: dict[str, Any] = {"step": "first_fill"}
    fill(first)
    emit(first)
    for cycle in range(args.cycles):
        rec: dict[str, Any] = {"step": "cycle", "cycle": cycle}
        torch.cuda.synchronize()
        t = time.perf_counter()
        arena.unmap()
        rec["release_s"] = time.perf_counter() - t
        rec["suspend_s"] = controller.run("suspend", 60)
        rec["suspended_bytes"] = process_gpu_bytes()
        rec["restore_s"] = controller.run("resume", 60)
        t = time.perf_counter()
        fill(rec)
        rec["resume_total_s"] = rec["restore_s"] + rec["fill_total_s"]
        rec["steps"] = list(checkpoint.HISTORY)[-2:]
        emit(rec)
    controller.close()
    sock.close()
    proc.wait(timeout=30)


class _View:
    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "version": 3,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--handle-mib", type=int, default=512)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("keeper-probe.jsonl"))
    parser.add_argument("--keeper")
    args = parser.parse_args()
    if args.keeper:
        keeper(args.keeper)
    else:
        worker(args)


if __name__ == "__main__":
    main()
