"""Probe the CUDA pager backend end to end on a GPU host, and print what it measured.

    python bench/pager_probe.py [--gib 4] [--handles 2M,64M,512M,1G] [--reps 5]

1. VMM map / unmap of an arena in handles of several sizes: time, and the bytes the device
   really gained and lost (`cudaMemGetInfo`).
2. A retained pinned host buffer: pinning time, device→host and host→device copy bandwidth,
   and bit-identical content after unmap, map and copy back.
3. A graph pool: a CUDA graph captured into a `GraphPool`, reading weights from an arena; both
   arenas unmapped (suspend), remapped and refilled (resume); the replay must be bit-identical.

Every check is an assertion: any error or mismatch ends the probe with a traceback and exit
status 1. Timings are wall-clock around synchronous calls (each verb waits for the device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

from torpor.log import configure
from torpor.units import format_size, parse_size
from torpor.worker.pager import Arena, HostBuffer
from torpor.worker.pager.cuda import CudaBackend, check, driver
from torpor.worker.pager.graph_pool import GraphPool

MiB = 1024 * 1024
SLACK = 64 * MiB  # mem_get_info granularity plus the driver's own bookkeeping


def free_bytes() -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def timed(fn: Callable[[], object]) -> float:
    """Seconds that `fn` took, the device idle before and after."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def expect_freed(before: int, after: int, nbytes: int, what: str) -> None:
    assert abs((after - before) - nbytes) <= SLACK, (
        f"{what}: free memory moved by {format_size(after - before)}, "
        f"expected {format_size(nbytes)}"
    )


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


def probe_handles(backend: CudaBackend, nbytes: int, handles: list[int], reps: int) -> None:
    rows = []
    for handle in handles:
        with Arena("probe", nbytes, backend, handle_bytes=handle) as arena:
            maps, unmaps = [], []
            for _ in range(reps):
                before = free_bytes()
                maps.append(timed(arena.map))
                expect_freed(free_bytes(), before, arena.nbytes, "map")
                unmaps.append(timed(arena.unmap))
                expect_freed(before, free_bytes(), 0, "unmap")
            rows.append(
                [
                    format_size(arena.handle_bytes),
                    str(len(arena.handle_extents())),
                    f"{statistics.median(maps) * 1e3:.2f}",
                    f"{statistics.median(unmaps) * 1e3:.2f}",
                    "yes",
                ]
            )
    header = ["handle", "handles", "map ms", "unmap+release ms", "bytes verified"]
    table(f"VMM map/unmap of {format_size(nbytes)} (median of {reps})", header, rows)


def probe_host(backend: CudaBackend, nbytes: int) -> None:
    with Arena("weights", nbytes, backend) as arena:
        arena.map()
        data = arena.tensor(0, (arena.nbytes // 2,), torch.bfloat16)
        data.normal_(generator=torch.Generator("cuda").manual_seed(0))
        checksum = data.view(torch.int16).sum(dtype=torch.int64).item()
        pin_s = time.perf_counter()
        host = HostBuffer.for_arena(arena)
        pin_s = time.perf_counter() - pin_s
        with host:
            assert host.pinned and host.tensor.is_pinned(), "host buffer is not pinned"
            d2h = timed(lambda: host.copy_from(arena))
            unmap = timed(arena.unmap)
            remap = timed(lambda: arena.map(zero=True))
            assert int(data.view(torch.uint8).count_nonzero()) == 0, "zeroed map is not zero"
            h2d = timed(lambda: host.copy_to(arena))
            after = data.view(torch.int16).sum(dtype=torch.int64).item()
            assert after == checksum, "content differs after the host round trip"
            assert torch.equal(data.view(torch.int16).cpu(), host.tensor.view(torch.int16))
    gbps = nbytes / 1e9
    rows = [
        ["pin (cuMemHostRegister)", f"{pin_s * 1e3:.1f}", f"{gbps / pin_s:.1f}"],
        ["device -> pinned host", f"{d2h * 1e3:.1f}", f"{gbps / d2h:.1f}"],
        ["unmap + release", f"{unmap * 1e3:.1f}", ""],
        ["map + zero", f"{remap * 1e3:.1f}", ""],
        ["pinned host -> device", f"{h2d * 1e3:.1f}", f"{gbps / h2d:.1f}"],
    ]
    table(f"host tier, {format_size(nbytes)}, bit-identical: yes", ["step", "ms", "GB/s"], rows)


def probe_graph_pool(backend: CudaBackend, pool_bytes: int) -> None:
    weights = Arena("weights", 512 * MiB, backend)
    graphs = Arena("graphs", pool_bytes, backend)
    weights.map()
    graphs.map()
    pool = GraphPool(graphs)
    w = weights.tensor(0, (8192, 8192), torch.bfloat16)  # 128 MiB
    x = weights.tensor(256 * MiB, (64, 8192), torch.bfloat16)
    w.normal_(std=0.01, generator=torch.Generator("cuda").manual_seed(1))
    x.normal_(generator=torch.Generator("cuda").manual_seed(2))

    def layers() -> torch.Tensor:
        h = x
        for _ in range(4):
            h = torch.nn.functional.gelu(h @ w)
        return h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers()  # warm-up outside the capture (cuBLAS handles, workspaces)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with pool.graph(graph):
        out = layers()
    graph.replay()
    torch.cuda.synchronize()
    expected = out.clone()
    assert graphs.address <= out.data_ptr() < graphs.address + graphs.nbytes, "output not in pool"

    host = HostBuffer.for_arena(weights)
    host.copy_from(weights)
    before = free_bytes()
    suspend = timed(lambda: (weights.unmap(), graphs.unmap()))
    expect_freed(before, free_bytes(), weights.nbytes + graphs.nbytes, "suspend")
    resume = timed(lambda: (graphs.map(), weights.map(), host.copy_to(weights)))
    out.zero_()
    replay = timed(graph.replay)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), "replay differs"
    rows = [
        [
            "pool in use / high water",
            format_size(pool.allocator.used_bytes) + " / " + format_size(pool.allocator.high_water),
        ],
        ["suspend (unmap weights + pool)", f"{suspend * 1e3:.2f} ms"],
        ["resume (map both + H2D weights)", f"{resume * 1e3:.2f} ms"],
        ["replay after resume", f"{replay * 1e3:.2f} ms, bit-identical: yes"],
    ]
    table("graph pool (4 × gelu(x @ W), W 8192×8192 bf16)", ["what", "measured"], rows)
    host.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--gib", type=float, default=4.0, help="arena size for the map timings")
    parser.add_argument("--handles", default="2MiB,64MiB,512MiB,1GiB")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--host-gib", type=float, default=4.0)
    parser.add_argument("--pool", default="512MiB", help="graph pool arena size")
    args = parser.parse_args(argv)
    configure(json=False, level="warning")
    try:
        backend = CudaBackend(args.device)
        torch.cuda.set_device(args.device)
        version = check("cuDriverGetVersion", driver().cuDriverGetVersion())
        print(
            f"{torch.cuda.get_device_name()} · driver API {version} · torch {torch.__version__} "
            f"· VMM granularity {format_size(backend.granularity())}"
        )
        handles = [parse_size(h) for h in args.handles.split(",")]
        probe_handles(backend, int(args.gib * 1024**3), handles, args.reps)
        probe_host(backend, int(args.host_gib * 1024**3))
        probe_graph_pool(backend, parse_size(args.pool))
    except BaseException:
        traceback.print_exc()
        print("\nPROBE FAILED", file=sys.stderr)
        return 1
    print("\nPROBE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
