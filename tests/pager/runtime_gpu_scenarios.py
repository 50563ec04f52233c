"""GPU scenarios for the paged runtime, one per process:
`python -m tests.pager.runtime_gpu_scenarios NAME`.

Each builds a small random Llama in bf16 on the GPU, with CUDA graphs, and checks what the
CPU tests check, plus the device's own accounting (`mem_get_info`, NVML).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.pager.nvsmi import process_gpu_bytes
from torpor.keeper import KeeperProcess
from torpor.log import configure
from torpor.store.chunks import ChunkStore
from torpor.worker.engine.demo import DemoSpec, make_demo
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.paged_state import PagedState, SuspendLevel
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime

MiB = 1 << 20
SCENARIOS: dict[str, Callable[[Path], None]] = {}
OPTIONS = EngineOptions(max_batch=4, max_seq_len=512, dtype="bfloat16")
PAGER = PagerOptions(device="cuda", graph_pool_bytes=256 * MiB)
PARAMS = (
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
)


def scenario(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def model(tmp: Path) -> Path:
    spec = DemoSpec(layers=4, hidden=1024, heads=8, kv_heads=2, vocab=4096, seed=1)
    return make_demo(tmp / "model", spec)


def generate(rt: PagedRuntime) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    prompt = tuple(rt.engine.encode("The scheduler wakes the model and the tokens flow"))
    out = []
    for i, params in enumerate(PARAMS):
        r = GenerationResult.collect(
            str(i), list(rt.loop.submit(GenerationRequest(str(i), prompt, params)))
        )
        out.append((r.token_ids, r.logprobs))
    return out


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def pointers(rt: PagedRuntime) -> list[int]:
    return [t.data_ptr() for t in rt.engine.memory.weight_tensors.values()] + [
        rt.engine.memory.kv_tensor.data_ptr()
    ]


@scenario
def every_level_keeps_addresses_and_tokens(tmp: Path) -> None:
    rt = PagedRuntime.load(model(tmp), OPTIONS, PAGER)
    assert rt.engine.graphs_enabled
    store = ChunkStore(tmp / "store")
    before, where = generate(rt), pointers(rt)
    for level in (SuspendLevel.HOST, SuspendLevel.DISK):  # deep has its own scenario
        mapped = rt.placement.mapped_bytes()
        free = free_bytes()
        rt.suspend(level, store=store)
        gained = free_bytes() - free
        assert gained >= mapped - 64 * MiB, (level, gained, mapped)
        rt.resume()
        assert pointers(rt) == where
        assert not rt.engine.memory.kv_tensor.any()
        assert generate(rt) == before, level
    rt.close()


@scenario
def deep_suspend_holds_no_gpu_memory(tmp: Path) -> None:
    rt = PagedRuntime.load(model(tmp), OPTIONS, PAGER)
    before, where = generate(rt), pointers(rt)
    assert (process_gpu_bytes() or 0) > 0
    host = rt.wait_host_copy()
    assert host is not None and host.pinned
    rt.suspend(SuspendLevel.DEEP)
    used = process_gpu_bytes()  # asked from outside: NVML in a locked process blocks
    assert used == 0, f"{used} bytes still on the GPU"
    assert host.pinned_bytes == 0  # unlocked before the checkpoint
    rt.resume()  # the copy comes back through staging buffers
    assert pointers(rt) == where
    assert generate(rt) == before
    deadline = time.monotonic() + 60
    while not host.pinned:  # locked again in the background
        assert time.monotonic() < deadline, "the host copy was not locked again"
        time.sleep(0.05)
    rt.suspend(SuspendLevel.HOST)
    rt.resume()
    assert generate(rt) == before
    rt.suspend(SuspendLevel.DEEP)
    rt.resume()
    rt.suspend(SuspendLevel.HOST)  # at once: the relock stops part way
    rt.resume()
    assert generate(rt) == before
    rt.close()


@scenario
def deep_resume_through_the_keeper(tmp: Path) -> None:
    """The keeper holds the copy locked in its own process: the worker holds nothing at its
    checkpoint, and the keeper fills the arena back through imported VMM handles."""
    keeper = KeeperProcess(tmp / "keeper.sock", "cuda:0").start()
    try:
        options = dataclasses.replace(PAGER, keeper_socket=str(keeper.path))
        rt = PagedRuntime.load(model(tmp), OPTIONS, options)
        before, where = generate(rt), pointers(rt)
        host = rt.wait_host_copy()
        assert host is not None and host.pinned and host.shared
        deadline = time.monotonic() + 60
        while not rt.host_copy.kept:
            assert time.monotonic() < deadline, "the keeper did not take the copy"
            time.sleep(0.05)
        for _ in range(3):
            rt.suspend(SuspendLevel.DEEP)
            assert process_gpu_bytes() == 0 and host.pinned_bytes == 0
            report = rt.resume()
            assert report.via == "keeper", report
            assert pointers(rt) == where
            assert generate(rt) == before
        assert (process_gpu_bytes(keeper.pid) or 0) < 1 << 30  # its context, no arenas left
        keeper.stop()  # lost: the next deep resume goes through staging buffers
        rt.suspend(SuspendLevel.DEEP)
        assert rt.resume().via == "staging"
        assert generate(rt) == before
        rt.close()
    finally:
        keeper.stop()


@scenario
def hundred_cycles_leak_nothing(tmp: Path) -> None:
    rt = PagedRuntime.load(model(tmp), OPTIONS, PAGER)
    rt.wait_host_copy()
    rt.suspend(SuspendLevel.HOST)
    rt.resume()
    base = free_bytes()
    for _ in range(100):
        rt.suspend(SuspendLevel.HOST)
        rt.resume()
    assert abs(free_bytes() - base) <= 64 * MiB
    generate(rt)
    rt.close()


@scenario
def disk_to_host_maps_nothing_on_the_device(tmp: Path) -> None:
    """A prefetch to host from disk (issue 13): the snapshot goes into a pinned host copy,
    the device's free bytes do not move, and the host resume after it streams the same
    tokens. Then without a host copy: a suspend to HOST pins and copies on its own path."""
    rt = PagedRuntime.load(model(tmp), OPTIONS, PAGER)
    store = ChunkStore(tmp / "store")
    before, where = generate(rt), pointers(rt)
    rt.suspend(SuspendLevel.DISK, store=store)
    free = free_bytes()
    report = rt.resume(target=PagedState.SUSPENDED_HOST)
    assert rt.residency is PagedState.SUSPENDED_HOST and rt.peak_mapped_bytes == 0
    assert abs(free_bytes() - free) <= 8 * MiB, free_bytes() - free
    host = rt.wait_host_copy()
    assert host is not None and host.pinned and report.bytes == host.nbytes
    assert rt.resume().streamed
    assert pointers(rt) == where and generate(rt) == before
    rt.suspend(SuspendLevel.DISK, store=store)
    rt.resume(keep_host_copy=False)
    assert rt.wait_host_copy() is None and rt.memory().host_bytes == 0
    assert generate(rt) == before
    rt.suspend(SuspendLevel.HOST)  # no copy: made now, then unmapped
    assert rt.memory().host_bytes == rt.engine.memory.weights.nbytes
    rt.resume()
    assert generate(rt) == before
    rt.close()


class CudaWorker:
    """A `torpor-worker` process on the GPU, driven over its socket as torpord drives it."""

    def __init__(self, tmp: Path, name: str) -> None:
        import subprocess

        import grpc

        from torpor.v1 import worker_pb2_grpc

        self.socket = tmp / f"{name}.sock"
        argv = [sys.executable, "-m", "torpor.worker.main", "--socket", str(self.socket)]
        argv += ["--store", str(tmp / "store"), "--device", "cuda", "--log-level", "warning"]
        argv += ["--graph-pool", "256MiB"]
        self.proc = subprocess.Popen(argv)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=120)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    def load(self, model_dir: Path) -> None:
        from torpor.v1 import common_pb2, worker_pb2

        request = worker_pb2.WorkerLoadRequest(
            model=model_dir.name,
            source=common_pb2.TIER_SOURCE,
            model_dir=str(model_dir),
            model_roots=[str(model_dir.parent)],
            dtype=common_pb2.DTYPE_BFLOAT16,
            max_batch=OPTIONS.max_batch,
            max_seq_len=OPTIONS.max_seq_len,
            target=common_pb2.RUNTIME_STATE_RESIDENT,
            keep_host_copy=False,  # host RAM holds one copy: the other's
        )
        list(self.stub.Load(request, timeout=300))

    def tokens(self) -> list[int]:
        from torpor.v1 import common_pb2, worker_pb2

        request = worker_pb2.WorkerGenerateRequest(
            request_id="g",
            prompt_token_ids=common_pb2.TokenIds(ids=[1, 5, 9, 17, 33, 65, 129]),
            sampling=common_pb2.SamplingParams(max_tokens=24, ignore_eos=True),
        )
        return [t for c in self.stub.Generate(request, timeout=120) for t in c.token_ids]

    def status(self) -> Any:
        from torpor.v1 import worker_pb2

        return self.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=30)

    def exchange(self, side: int, board: Path) -> Any:
        from google.protobuf.duration_pb2 import Duration

        from torpor.v1 import worker_pb2

        request = worker_pb2.WorkerExchangeRequest(
            side=side, board_path=str(board), timeout=Duration(seconds=120)
        )
        return self.stub.Exchange(request, timeout=150)

    def close(self) -> None:
        from torpor.v1 import worker_pb2

        with contextlib.suppress(Exception):
            self.stub.Shutdown(worker_pb2.WorkerShutdownRequest(), timeout=30)
        self.proc.wait(timeout=60)
        self.channel.close()


def timed_exchange(
    out: CudaWorker, into: CudaWorker, board_path: Path, host_slack: int, gpu_slack: int
) -> tuple[float, int]:
    """Both sides of an exchange at once, as torpord runs them (each worker its own process),
    the device's free memory sampled all through; (seconds, least free bytes seen)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from torpor.exchange_board import Board
    from torpor.v1 import worker_pb2

    board = Board.create(board_path, host_slack, gpu_slack)
    low = [free_bytes()]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            low.append(torch.cuda.mem_get_info()[0])
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(2) as pool:
            sides = [
                pool.submit(out.exchange, worker_pb2.EXCHANGE_SIDE_OUT, board_path),
                pool.submit(into.exchange, worker_pb2.EXCHANGE_SIDE_IN, board_path),
            ]
            for side in sides:
                side.result()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        board.close()
        board_path.unlink()
    return seconds, min(low)


@scenario
def exchange_trades_places_within_one_copy(tmp: Path) -> None:
    """Two workers (two processes, as torpord runs them) trade places on the GPU four times
    through Worker.Exchange: tokens survive, the device's free memory never drops below what
    one runtime plus the slack leaves, and each exchange's wall time is printed against its
    bytes. (Two runtimes in one process share torch's caching allocator and its pluggable
    graph pools; a first try that way failed in a graph replay, so this is the shape that
    counts.)"""
    from torpor.v1 import common_pb2, worker_pb2

    small_spec = DemoSpec(layers=2, hidden=1024, heads=8, kv_heads=2, vocab=4096, seed=2)
    models = (model(tmp), make_demo(tmp / "small", small_spec))
    big, small = CudaWorker(tmp, "big"), CudaWorker(tmp, "small")
    try:
        big.load(models[0])
        small.load(models[1])
        want = {id(big): big.tokens(), id(small): small.tokens()}
        small.stub.Suspend(worker_pb2.WorkerSuspendRequest(level=common_pb2.TIER_HOST), timeout=120)
        slack = 512 * MiB
        floor = free_bytes() - slack  # the least free device memory an exchange may leave
        resident, waiting = big, small
        for n in range(4):
            # Host RAM is not what this checks (the CPU tests do): room for the larger copy.
            seconds, low = timed_exchange(resident, waiting, tmp / f"board{n}", 1 << 30, slack)
            resident, waiting = waiting, resident
            moved = waiting.status().host_bytes
            print(f"exchange {n}: {seconds:.3f} s ({moved / 1e9:.3f} GB out)")
            assert low >= floor - 256 * MiB, (n, low, floor)
            assert resident.status().state == common_pb2.RUNTIME_STATE_RESIDENT
            assert waiting.status().state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
            assert resident.tokens() == want[id(resident)], n
    finally:
        big.close()
        small.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in SCENARIOS:
        print(f"usage: {argv[0]} {{{','.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    configure(json=False, level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        SCENARIOS[argv[1]](Path(tmp))
    print(f"OK {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
