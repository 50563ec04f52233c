"""GPU scenarios for the paged runtime, one per process:
`python -m tests.pager.runtime_gpu_scenarios NAME`.

Each builds a small random Llama in bf16 on the GPU, with CUDA graphs, and checks what the
CPU tests check, plus the device's own accounting (`mem_get_info`, NVML).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def timed_exchange(
    out: PagedRuntime, into: PagedRuntime, board_path: Path, host_slack: int, gpu_slack: int
) -> tuple[float, int]:
    """Both sides of an exchange on two threads, the device's free memory sampled all
    through; (seconds, least free bytes seen). Raises the first side's error."""
    import threading

    from torpor.exchange_board import Board, Side

    board = Board.create(board_path, host_slack, gpu_slack)
    low = [free_bytes()]
    done = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        while not done.is_set():
            low.append(torch.cuda.mem_get_info()[0])
            time.sleep(0.001)

    def side(rt: PagedRuntime, s: Side) -> None:
        try:
            rt.exchange(s, Board.open(board_path), 120)
        except BaseException as exc:  # raised below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    sides = [
        threading.Thread(target=side, args=(out, Side.OUT)),
        threading.Thread(target=side, args=(into, Side.IN)),
    ]
    for t in sides:
        t.start()
    for t in sides:
        t.join()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    board.close()
    if errors:
        raise errors[0]
    return seconds, min(low)


@scenario
def exchange_trades_places_within_one_copy(tmp: Path) -> None:
    """Two runtimes on the GPU trade places through an exchange swap (both sides on threads of
    this process; in torpord they are two workers): tokens and addresses survive, the device's
    own free memory never drops below what one runtime plus the slack leaves, and the wall
    time of each exchange is printed against its bytes."""
    small_spec = DemoSpec(layers=2, hidden=1024, heads=8, kv_heads=2, vocab=4096, seed=2)
    pager = dataclasses.replace(PAGER, host_copy=False)
    big = PagedRuntime.load(model(tmp), OPTIONS, pager)
    small = PagedRuntime.load(make_demo(tmp / "small", small_spec), OPTIONS, pager)
    want = {id(big): (generate(big), pointers(big)), id(small): (generate(small), pointers(small))}
    small.suspend(SuspendLevel.HOST)
    slack = max(rt.placement.arenas["weights"].handle_bytes for rt in (big, small))
    floor = free_bytes() - slack  # the least free device memory an exchange may leave
    budget = big.placement.mapped_bytes() + slack
    resident, waiting = big, small
    for n in range(4):
        # The budgets hold the big one once, plus a handle: the slack is what they leave now.
        host_slack = big.engine.memory.weights.nbytes + slack - waiting.host_copy.nbytes
        gpu_slack = budget - resident.placement.mapped_bytes()
        seconds, low = timed_exchange(resident, waiting, tmp / f"board{n}", host_slack, gpu_slack)
        moved = resident.engine.memory.weights.nbytes + waiting.engine.memory.weights.nbytes
        print(f"exchange {n}: {seconds:.3f} s, {moved / seconds / 1e9:.2f} GB/s both ways")
        assert low >= floor - 64 * MiB, (n, low, floor)
        resident, waiting = waiting, resident
        tokens, where = want[id(resident)]
        assert pointers(resident) == where
        assert generate(resident) == tokens, n
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
