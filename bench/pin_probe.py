"""What pinned host memory costs, by the kind of pages behind it: faulting in, registering
with the driver, DMA bandwidth, unregistering and registering again, and the driver's process
checkpoint and restore (deep suspend) of a process that holds it registered.

    python bench/pin_probe.py [MODE...] --gib N --out F     (default: all modes, in order)

Modes (each in a fresh child process): `small` (4 KiB pages: MADV_NOHUGEPAGE), `thp`
(transparent huge pages: MADV_HUGEPAGE, what HostBuffer asks for), `hugetlb` (2 MiB pages
from the kernel's reserved pool, MAP_HUGETLB; the parent reserves them first, as root);
`stage`: unlocked memory to the GPU through `HostStager` (the deep-resume path), by threads
and staging-buffer size, against the driver's own copy from pageable memory; `hostalloc` and
`vmmhost`: pinned memory the driver allocates itself (cuMemHostAlloc; cuMemCreate on the
host), checkpointed with its contents checked; `unmap`: releasing a large VMM arena by
handle size, handle by handle against one unmap of the whole range.
The deep-suspend cost of a 70B-shaped runtime grew with its registered host memory (about
25 ms per GB each way); this says whether the kind of page, or unregistering first, helps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("small", "thp", "hugetlb", "stage", "hostalloc", "vmmhost", "unmap")
GiB = 1 << 30
PIECE = 128 << 20
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MAP_HUGETLB = 14, 15, 0x40000


def smaps_huge(address: int) -> dict[str, int]:
    """AnonHugePages / Private_Hugetlb (kB) of the mapping that starts at `address`."""
    out: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.endswith("kB"):
            inside = int(line.split("-", 1)[0], 16) == address
        elif inside and line.split(":")[0] in ("AnonHugePages", "Private_Hugetlb", "Rss"):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


def numa_pages(address: int) -> dict[str, int]:
    """Pages per NUMA node (numa_maps' N<node>=<pages>) of the mapping at `address`."""
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        if int(line.split()[0], 16) == address:
            return {f: int(n) for f, n in (x.split("=") for x in line.split() if x[:1] == "N")}
    return {}


def h2d_gbps(host: Any, nbytes: int) -> float:
    """GB/s of copying `nbytes` of `host` to the GPU in PIECE-sized copies on a side stream
    (into a 1 GiB device buffer, reused), the way the pager copies a host copy back."""
    import torch

    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.cuda.stream(stream):
        for off in range(0, nbytes, PIECE):
            d = off % GiB
            dst[d : d + PIECE].copy_(host[off : off + PIECE], non_blocking=True)
    stream.synchronize()
    seconds = time.perf_counter() - t
    del dst
    torch.cuda.empty_cache()  # nothing of it stays on the device for a checkpoint
    torch.cuda.synchronize()
    return nbytes / seconds / 1e9


def checkpoint_cycle(controller: Any, timeout_s: float) -> list[float]:
    """Seconds of the driver's checkpoint, then restore, of this process."""
    time.sleep(3)  # the controller's start-up (from this process's start) must not count
    return [controller.run(action, timeout_s) for action in ("suspend", "resume")]


def child(mode: str, nbytes: int, timeout_s: float) -> dict[str, object]:

    from torpor.worker.pager import checkpoint
    from torpor.worker.pager.cpu import (
        MAP_ANONYMOUS,
        MAP_PRIVATE,
        PROT_READ_WRITE,
        host_view,
        sys_madvise,
        sys_mmap,
    )
    from torpor.worker.pager.cuda import CudaBackend

    backend = CudaBackend(0)
    controller = checkpoint.Controller(os.getpid()).start()
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_HUGETLB if mode == "hugetlb" else 0)
    address = sys_mmap(0, nbytes, PROT_READ_WRITE, flags)
    if mode != "hugetlb":
        sys_madvise(address, nbytes, MADV_HUGEPAGE if mode == "thp" else MADV_NOHUGEPAGE)
    host = host_view(address, nbytes)
    record: dict[str, object] = {"mode": mode, "bytes": nbytes}
    t = time.perf_counter()
    host.fill_(7)
    record["fault_in_s"] = time.perf_counter() - t
    record |= smaps_huge(address) | {"numa_pages": numa_pages(address)}
    pieces = range(address, address + nbytes, PIECE)

    def register() -> float:
        t = time.perf_counter()
        for a in pieces:
            backend.pin_host(a, PIECE)
        return time.perf_counter() - t

    def unregister() -> float:
        t = time.perf_counter()
        for a in pieces:
            backend.unpin_host(a)
        return time.perf_counter() - t

    record["register_s"] = register()
    record["h2d_GBps"] = h2d_gbps(host, nbytes)
    record["unregister_s"] = unregister()
    record["reregister_s"] = register()
    # The driver's checkpoint with the memory registered, then without it.
    record["ckpt_registered"] = checkpoint_cycle(controller, timeout_s)
    unregister()
    record["ckpt_unregistered"] = checkpoint_cycle(controller, timeout_s)
    controller.close()
    return record


def stage_sweep(nbytes: int) -> dict[str, object]:
    """Unlocked (transparent huge page) memory to the GPU through HostStager, by threads and
    staging-buffer size: the deep-resume path."""
    import torch

    from torpor.worker.pager.cpu import (
        MAP_ANONYMOUS,
        MAP_PRIVATE,
        PROT_READ_WRITE,
        host_view,
        sys_madvise,
        sys_mmap,
    )
    from torpor.worker.pager.cuda import CudaBackend
    from torpor.worker.pager.stream import HostStager, StagingRing

    backend = CudaBackend(0)
    address = sys_mmap(0, nbytes, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    sys_madvise(address, nbytes, MADV_HUGEPAGE)
    src = host_view(address, nbytes)
    src.fill_(3)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    record: dict[str, object] = {"mode": "stage", "bytes": nbytes}
    for threads in (2, 4, 8, 12):
        for mib in (16, 32, 64):
            stager = HostStager(threads, StagingRing(threads + 2, mib << 20, backend))
            stager(src, dst, [(0, 1 << 30)])  # warm: threads, first touch of the ring
            torch.cuda.synchronize()
            t = time.perf_counter()
            stager(src, dst, [(0, nbytes)])
            torch.cuda.synchronize()
            record[f"GBps_t{threads}_{mib}MiB"] = nbytes / (time.perf_counter() - t) / 1e9
            stager.close()
    t = time.perf_counter()
    dst.copy_(src)  # the driver's own pageable path, for comparison
    torch.cuda.synchronize()
    record["GBps_pageable_copy"] = nbytes / (time.perf_counter() - t) / 1e9
    return record


def driver_host_memory(mode: str, nbytes: int, timeout_s: float) -> dict[str, object]:
    """Host memory the driver allocates itself, pinned from the start: `hostalloc`
    (cuMemHostAlloc) or `vmmhost` (cuMemCreate on the host, mapped for the GPU and the CPU in
    1 GiB handles). Does the driver's checkpoint treat it more cheaply than registered memory,
    and does it keep its contents?"""
    import torch

    from torpor.worker.pager import checkpoint
    from torpor.worker.pager.cpu import host_view
    from torpor.worker.pager.cuda import CudaBackend, check, driver

    CudaBackend(0)  # cuInit; its primary context made current
    cu = driver()
    controller = checkpoint.Controller(os.getpid()).start()
    record: dict[str, object] = {"mode": mode, "bytes": nbytes}
    t = time.perf_counter()
    if mode == "hostalloc":
        address = int(check("cuMemHostAlloc", cu.cuMemHostAlloc(nbytes, 0)))
    else:
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
        prop.location.id = 0
        address = int(check("cuMemAddressReserve", cu.cuMemAddressReserve(nbytes, 1 << 30, 0, 0)))
        for off in range(0, nbytes, GiB):
            handle = check("cuMemCreate", cu.cuMemCreate(GiB, prop, 0))
            check("cuMemMap", cu.cuMemMap(address + off, GiB, 0, handle, 0))
        descs = []
        for kind, ident in (
            (cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE, 0),
            (cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA, 0),
        ):
            d = cu.CUmemAccessDesc()
            d.location.type, d.location.id = kind, ident
            d.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            descs.append(d)
        check("cuMemSetAccess", cu.cuMemSetAccess(address, nbytes, descs, len(descs)))
    record["alloc_s"] = time.perf_counter() - t
    host = host_view(address, nbytes)
    t = time.perf_counter()
    host.fill_(7)
    record["fill_s"] = time.perf_counter() - t
    host[::4096].copy_(torch.arange(nbytes // 4096 + (nbytes % 4096 > 0)).to(torch.uint8))
    expected = int(host[::4096].sum())
    record["h2d_GBps"] = h2d_gbps(host, nbytes)
    record["ckpt"] = checkpoint_cycle(controller, timeout_s)
    record["kept_contents"] = int(host[::4096].sum()) == expected
    controller.close()
    return record


def unmap_costs(nbytes: int) -> dict[str, object]:
    """Releasing a large VMM arena (what a host suspend does): per handle size, the time to
    unmap and release handle by handle (the arena today), the unmap and release calls apart,
    one cuMemUnmap over the whole range, then the releases, and `early_release`: each handle
    released right after it is mapped (the mapping keeps it), so that the unmap frees it."""
    from torpor.worker.pager.cuda import CudaBackend, check, driver

    backend = CudaBackend(0)
    cu = driver()
    record: dict[str, object] = {"mode": "unmap", "bytes": nbytes}
    big = tuple(h for h in (8 * GiB, 32 * GiB) if nbytes % h == 0)
    for handle in (512 << 20, GiB, 2 * GiB, *big):
        reservation = backend.reserve(nbytes)
        base = reservation.address
        hows = ("per_handle", "whole_range", "threads4", "threads8", "early_release")
        for how in hows if handle <= 2 * GiB else ("per_handle",):
            allocations = []
            t = time.perf_counter()
            for off in range(0, nbytes, handle):
                allocation = backend.create(handle)
                backend.map(base + off, allocation)
                allocations.append((off, allocation))
                if how == "early_release":
                    backend.release(allocation)
            backend.set_access(base, nbytes)
            record[f"map_{handle >> 20}MiB_{how}_ms"] = (time.perf_counter() - t) * 1e3
            unmap = release = 0.0
            t = time.perf_counter()
            if how == "early_release":
                u = time.perf_counter()
                for off, _ in allocations:
                    backend.unmap(base + off, handle)
                unmap = time.perf_counter() - u
            elif how == "per_handle":
                for off, allocation in allocations:
                    u = time.perf_counter()
                    backend.unmap(base + off, handle)
                    r = time.perf_counter()
                    backend.release(allocation)
                    unmap += r - u
                    release += time.perf_counter() - r
            elif how.startswith("threads"):
                from concurrent.futures import ThreadPoolExecutor

                u = time.perf_counter()
                for off, _ in allocations:
                    backend.unmap(base + off, handle)
                r = time.perf_counter()
                unmap = r - u
                with ThreadPoolExecutor(int(how.removeprefix("threads"))) as pool:
                    list(pool.map(lambda a: backend.release(a[1]), allocations))
                release = time.perf_counter() - r
            else:
                u = time.perf_counter()
                check("cuMemUnmap", cu.cuMemUnmap(base, nbytes))
                unmap = time.perf_counter() - u
                r = time.perf_counter()
                for _, allocation in allocations:
                    backend.release(allocation)
                release = time.perf_counter() - r
            total = time.perf_counter() - t
            key = f"{handle >> 20}MiB_{how}"
            record |= {
                f"unmap_release_{key}_ms": total * 1e3,
                f"unmap_only_{key}_ms": unmap * 1e3,
                f"release_only_{key}_ms": release * 1e3,
            }
        backend.free(reservation)
    return record


def reserve_huge_pages(nbytes: int) -> dict[str, object]:
    """Ask the kernel for enough 2 MiB pages (root only); report what it gave."""
    want = nbytes // (2 << 20) + 16
    path = Path("/proc/sys/vm/nr_hugepages")
    try:
        path.write_text(str(want))
    except OSError as exc:
        return {"hugepages_error": str(exc)}
    return {"hugepages_wanted": want, "hugepages_got": int(path.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("modes", nargs="*", default=list(MODES))
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    nbytes = args.gib * GiB
    if args.child:
        mode = args.modes[0]
        if mode == "stage":
            result = stage_sweep(nbytes)
        elif mode == "unmap":
            result = unmap_costs(nbytes)
        elif mode in ("hostalloc", "vmmhost"):
            result = driver_host_memory(mode, nbytes, args.timeout)
        else:
            result = child(mode, nbytes, args.timeout)
        print(json.dumps(result), flush=True)
        return
    for mode in args.modes:
        extra = reserve_huge_pages(nbytes) if mode == "hugetlb" else {}
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    mode,
                    "--child",
                    "--gib",
                    str(args.gib),
                    "--out",
                    str(args.out),
                ],
                capture_output=True,
                text=True,
                timeout=args.timeout * 4 + 120,
            )
            lines = proc.stdout.strip().splitlines()
            record = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
            if proc.returncode:
                record |= {"rc": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            record = {"error": "child timed out"}
        if "hugepages_got" in extra:
            Path("/proc/sys/vm/nr_hugepages").write_text("0")
        record |= extra | {
            "bench": "pin_probe",
            "mode": mode,
            "wall_s": time.perf_counter() - start,
        }
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
