"""GPU scenarios for the CUDA pager backend, one per process: `python cuda_scenarios.py NAME`.

Each scenario runs in a fresh process (test_cuda_arena.py spawns them) so that the device
memory it measures with `torch.cuda.mem_get_info` belongs to it alone and a crash cannot take
the test session down. A scenario passes when it returns; any exception exits non-zero.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch

from torpor.errors import FailedPrecondition, ResourceExhausted, TorporError
from torpor.log import configure
from torpor.worker.pager import Arena, HostBuffer
from torpor.worker.pager.cuda import CudaBackend
from torpor.worker.pager.graph_pool import GraphPool

MiB = 1024 * 1024
GiB = 1024 * MiB
# mem_get_info moves in 2 MiB pages and the driver keeps some bookkeeping of its own.
SLACK = 64 * MiB

SCENARIOS: dict[str, Callable[[], None]] = {}


def scenario(fn: Callable[[], None]) -> Callable[[], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def free_bytes() -> int:
    """Free device memory, with torch's cache of its own ordinary allocations emptied."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def assert_near(actual: int, expected: int, what: str) -> None:
    assert abs(actual - expected) <= SLACK, (
        f"{what}: {actual / MiB:.0f} MiB, expected ≈ {expected / MiB:.0f} MiB"
    )


@scenario
def unmap_releases_device_memory_and_keeps_addresses() -> None:
    # Every reading is taken right around the verb it checks: torch's first kernels load their
    # modules into device memory too, which would blur a comparison with an older baseline.
    backend = CudaBackend(0)
    torch.cuda.init()
    with Arena("weights", GiB, backend, handle_bytes=256 * MiB) as arena:
        assert backend.granularity() % (2 * MiB) == 0
        before = free_bytes()
        arena.map()
        assert_near(before - free_bytes(), GiB, "map took")
        w = arena.tensor(8 * MiB, (4096, 4096), torch.bfloat16)
        assert w.device == torch.device("cuda", 0)
        assert w.data_ptr() == arena.address + 8 * MiB
        w.fill_(1.0)
        assert float(w.float().mean()) == 1.0

        mapped = free_bytes()
        arena.unmap()
        assert_near(free_bytes() - mapped, GiB, "unmap released")
        arena.map()
        assert_near(mapped - free_bytes(), 0, "remap took back more or less than it released")
        assert arena.tensor(8 * MiB, (4096, 4096), torch.bfloat16).data_ptr() == w.data_ptr()
        w.fill_(2.0)  # the old view works again at the same address
        assert float(w.float().mean()) == 2.0
        mapped = free_bytes()
    assert_near(free_bytes() - mapped, GiB, "close released")


@scenario
def host_copy_restores_bit_identical_content() -> None:
    backend = CudaBackend(0)
    with Arena("weights", 512 * MiB, backend, handle_bytes=128 * MiB) as arena:
        arena.map()
        weights = arena.tensor(0, (arena.nbytes // 2,), torch.bfloat16)
        weights.normal_(generator=torch.Generator("cuda").manual_seed(0))
        expected = weights.view(torch.int16).cpu()
        with HostBuffer.for_arena(arena) as host:
            assert host.pinned and host.tensor.is_pinned()
            host.copy_from(arena)
            arena.unmap()
            arena.map(zero=True)
            assert int(weights.view(torch.uint8).count_nonzero()) == 0
            host.copy_to(arena)
            assert torch.equal(weights.view(torch.int16).cpu(), expected)


@scenario
def captured_graph_replays_bit_identical_after_unmap_and_map() -> None:
    backend = CudaBackend(0)
    weights = Arena("weights", 64 * MiB, backend, handle_bytes=32 * MiB)
    graphs = Arena("graphs", 256 * MiB, backend, handle_bytes=128 * MiB)
    weights.map()
    graphs.map()
    w = weights.tensor(0, (2048, 2048), torch.bfloat16)  # 8 MiB
    x = weights.tensor(16 * MiB, (64, 2048), torch.bfloat16)
    w.normal_(generator=torch.Generator("cuda").manual_seed(1))
    x.normal_(generator=torch.Generator("cuda").manual_seed(2))
    pool = GraphPool(graphs)

    graph, out = capture_and_replay(pool, w, x)
    expected = out.clone()
    assert graphs.address <= out.data_ptr() < graphs.address + graphs.nbytes
    assert pool.allocator.used_bytes > 0

    with HostBuffer.for_arena(weights) as host:
        host.copy_from(weights)
        baseline = free_bytes()
        weights.unmap()
        graphs.unmap()
        assert_near(free_bytes() - baseline, weights.nbytes + graphs.nbytes, "suspend released")
        graphs.map()
        weights.map()
        host.copy_to(weights)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), "replay differs"


def capture_and_replay(
    pool: GraphPool, w: torch.Tensor, x: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture y = gelu(x @ w) @ w.T into the pool and replay it once: (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up cuBLAS outside the capture
        torch.nn.functional.gelu(x @ w) @ w.T
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with pool.graph(graph):
        out = torch.nn.functional.gelu(x @ w) @ w.T
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


@scenario
def failed_map_rolls_back_device_memory() -> None:
    backend = CudaBackend(0)
    torch.cuda.init()
    with Arena("rollback", GiB, backend, handle_bytes=256 * MiB) as arena:
        baseline = free_bytes()
        real_map, calls = backend.map, []

        def failing_map(address: int, allocation: object) -> None:
            calls.append(address)
            if len(calls) == 3:
                raise ResourceExhausted("injected", reason="INJECTED")
            real_map(address, allocation)  # type: ignore[arg-type]

        backend.map = failing_map  # type: ignore[method-assign]
        try:
            arena.map()
        except ResourceExhausted:
            pass
        else:
            raise AssertionError("the injected failure did not surface")
        backend.map = real_map  # type: ignore[method-assign]
        assert not arena.is_mapped
        assert_near(free_bytes(), baseline, "free memory after the rollback")
        arena.map()
        assert_near(baseline - free_bytes(), GiB, "mapping after the rollback took")


@scenario
def hundred_cycles_leak_nothing() -> None:
    backend = CudaBackend(0)
    torch.cuda.init()
    with Arena("cycles", 256 * MiB, backend, handle_bytes=64 * MiB) as arena:
        arena.map(zero=True)
        view = arena.tensor(0, (arena.nbytes,), torch.uint8)
        view.fill_(1)
        assert int(view.sum()) == arena.nbytes  # every kernel used below has run once
        mapped = free_bytes()
        for _ in range(100):
            arena.unmap()
            arena.map(zero=True)
            view.fill_(1)
        assert_near(free_bytes(), mapped, "free memory after 100 cycles")
        assert int(view.sum()) == arena.nbytes


@scenario
def verbs_work_from_another_thread() -> None:
    # Driver calls act on the calling thread's context; a fresh thread has none current.
    backend = CudaBackend(0)
    with Arena("threaded", 256 * MiB, backend, handle_bytes=64 * MiB) as arena:
        arena.map()
        view = arena.tensor(0, (arena.nbytes,), torch.uint8)
        view.fill_(3)
        errors: list[BaseException] = []

        def suspend_and_resume() -> None:
            try:
                arena.unmap()
                arena.map(zero=True)
            except BaseException as e:
                errors.append(e)

        worker = threading.Thread(target=suspend_and_resume)
        worker.start()
        worker.join()
        assert not errors, errors
        assert int(view.count_nonzero()) == 0
        view.fill_(4)
        assert int(view.sum()) == 4 * arena.nbytes


@scenario
def requested_address_is_used_when_free() -> None:
    backend = CudaBackend(0)
    first = Arena("first", 256 * MiB, backend)
    second = Arena("second", 256 * MiB, backend, address=first.address)
    assert not second.address_honored and second.address != first.address
    recorded = first.address
    first.close()
    second.close()
    again = Arena("again", 256 * MiB, backend, address=recorded)
    print(f"requested {recorded:#x} got {again.address:#x} honored={again.address_honored}")
    assert again.address_honored
    again.close()


@scenario
def driver_errors_are_typed() -> None:
    backend = CudaBackend(0)
    try:
        backend.create(1 << 50)  # a PiB of device memory
    except TorporError as e:
        assert e.reason.startswith("CUDA_ERROR_"), e.reason
        assert e.metadata["call"] == "cuMemCreate"
        print(f"cuMemCreate(1 PiB) -> {type(e).__name__} {e.reason}")
    else:
        raise AssertionError("cuMemCreate of a PiB succeeded")
    arena = Arena("closed", 64 * MiB, backend)
    arena.map()
    arena.unmap()
    try:
        arena.tensor(0, (16,), torch.float32)
    except FailedPrecondition:
        pass
    else:
        raise AssertionError("tensor() of an unmapped arena was allowed")
    arena.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in SCENARIOS:
        print(f"usage: {argv[0]} {{{','.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    configure(json=False, level="warning")
    SCENARIOS[argv[1]]()
    print(f"OK {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
