"""Pager benchmarks (issue 3): suspend and resume of a paged runtime at each level, against
floors measured in the same run; one JSON line per figure appended to --out.

    python bench/pager_gpu.py context  --out F
    python bench/pager_gpu.py runtime  --shape 8b  --out F --store DIR [--levels host,deep,disk]
    python bench/pager_gpu.py runtime  --shape 70b --out F --levels host,deep
    python bench/pager_gpu.py baseline --shape 8b  --out F

- context: NVML's bytes of a fresh process holding only a CUDA context and cuBLAS; the
  residual-bytes target of a host-suspended runtime is this + 256 MiB.
- runtime: a Llama-3-8B-shaped bf16 or Llama-3-70B-shaped fp8 runtime with random weights
  generated on the GPU (no checkpoint that size fits the host's disk), loaded into arenas.
  Floors first: pinned host->device copy; for the disk level, O_DIRECT parallel reads of the
  snapshot's own chunk files. Then --cycles suspend/resume cycles per level. Each resume is
  timed as a request arriving for the suspended runtime: resume, then the first token of a
  128-token prompt (TTFT), then a check that 16 greedy tokens are bit-identical to the ones
  produced before any suspend. With --keeper on (the default, as torpord runs it), the GPU's
  keeper holds the host copy locked and fills deep resumes; each record says `via`.
- baseline: the driver's whole-process checkpoint and restore (`cuCheckpointProcess*`, what
  cuda-checkpoint and CRIU-based snapshots use) of the same runtime shape loaded the plain
  way, with nothing released first.

`--device cpu --shape tiny` runs the same code on the CPU backend, to check the script
without a GPU (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from engine_gpu import LLAMA3_8B  # bench/ is on the path when this runs as a script
from pin_probe import numa_pages

from tests.pager.nvsmi import process_gpu_bytes

GiB = 1 << 30
MiB = 1 << 20
PROMPT = tuple(range(1000, 1128))  # 128 token ids, valid in every shape's vocabulary

SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "8b": (LLAMA3_8B, "bfloat16"),
    "70b": (
        LLAMA3_8B
        | {
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
        },
        "fp8",
    ),
    "tiny": (
        LLAMA3_8B
        | {
            "vocab_size": 2048,
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "float32",
        },
        "float32",
    ),
}


# -- plumbing -------------------------------------------------------------------------------


def emit(out: Path, record: dict[str, Any]) -> None:
    record["t"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def shape_dir(shape: str) -> tuple[Path, int, str]:
    """A directory holding only the shape's config.json; its layer count and dtype."""
    config, dtype = SHAPES[shape]
    path = Path(f"/tmp/torpor-bench/shape-{shape}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path, config["num_hidden_layers"], dtype


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def device_used() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- floors ---------------------------------------------------------------------------------


def pinned_h2d_floor(nbytes: int = 8 * GiB) -> float:
    """Bytes/s of one pinned host -> device copy from a single registration into cudaMalloc
    memory (median of 5 after a warm-up): the best case the resume path is held against."""
    from torpor.worker.pager.cuda import CudaBackend
    from torpor.worker.pager.host import HostBuffer

    host = HostBuffer(nbytes, pinner=CudaBackend(0), pin_piece=nbytes)  # one registration
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        start = time.perf_counter()
        dev.copy_(host.tensor, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    host.close()
    del dev
    torch.cuda.empty_cache()
    return nbytes / median(times[1:])


def disk_read_floor(store: Any, pieces: list[Any], threads: int, device: str) -> float:
    """Bytes/s of O_DIRECT reads of the snapshot's chunk files by `threads` readers into
    pinned buffers (no hashing, no device copy): what the disk itself gives."""
    from torpor.worker.pager.backend import round_up
    from torpor.worker.pager.stream import StagingRing, _read_file

    pinner = None
    if device.startswith("cuda"):
        from torpor.worker.pager.cuda import CudaBackend

        pinner = CudaBackend(0)
    ring = StagingRing(threads, max(p.ref.size for p in pieces), pinner)
    drop_page_cache()

    def read(i: int) -> int:
        view = ring.buffers[i].tensor.numpy().data
        total = 0
        for p in pieces[i::threads]:
            _read_file(store.path(p.ref.hash), view[: round_up(p.ref.size, 4096)], True)
            total += p.ref.size
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(threads)))
    seconds = time.perf_counter() - start
    ring.close()
    return total / seconds


# -- serving --------------------------------------------------------------------------------


def first_token_s(rt: Any, tag: str) -> float:
    start = time.perf_counter()
    return first_token(rt, tag)[0] - start


def first_token(rt: Any, tag: str) -> tuple[float, tuple[int, ...]]:
    """When (perf_counter) the first token of a greedy request came, and its 16 tokens."""
    from torpor.worker.engine.requests import GenerationRequest
    from torpor.worker.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    deltas = iter(rt.loop.submit(GenerationRequest(f"ttft-{tag}", PROMPT, params)))
    tokens = list(next(deltas).token_ids)
    came = time.perf_counter()
    for delta in deltas:
        tokens += delta.token_ids
    return came, tuple(tokens)


def greedy_tokens(loop: Any, tag: str) -> tuple[int, ...]:
    from torpor.worker.engine.requests import GenerationRequest, GenerationResult
    from torpor.worker.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    req = GenerationRequest(f"check-{tag}", PROMPT, params)
    return GenerationResult.collect(req.request_id, list(loop.submit(req))).token_ids


# -- phases ---------------------------------------------------------------------------------


def context(out: Path) -> None:
    """A fresh process with a CUDA context and a cuBLAS handle, nothing else."""
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    emit(
        out,
        {
            "bench": "pager_context",
            "nvml_process_bytes": process_gpu_bytes(),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    )


def runtime(args: argparse.Namespace) -> None:
    from torpor.store.chunks import ChunkStore
    from torpor.worker.engine.demo import RandomFiller
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.pager.paged_state import SuspendLevel
    from torpor.worker.pager.placement import PagerOptions
    from torpor.worker.pager.runtime import PagedRuntime

    out, shape, device = args.out, args.shape, args.device
    cuda = device.startswith("cuda")
    # "hostsync": the host level with the streamed resume off (the copy first, then serving).
    levels = [
        (SuspendLevel(x.removesuffix("sync")), x.endswith("sync")) for x in args.levels.split(",")
    ]
    base = {"shape": shape, "device": device}
    h2d = pinned_h2d_floor() if cuda else float("nan")
    emit(out, base | {"bench": "pager_floor_h2d", "pinned_h2d_GBps": h2d / 1e9})

    model_dir, layers, dtype = shape_dir(shape)
    options = EngineOptions(max_batch=8, max_seq_len=1024, dtype=dtype)
    keeper = start_keeper(device) if cuda and args.keeper == "on" else None
    start = time.perf_counter()
    pager = PagerOptions(
        device=device,
        stage_threads=args.stage_threads,
        keeper_socket=str(keeper.path) if keeper is not None else None,
    )
    rt = PagedRuntime.load(model_dir, options, pager, filler=RandomFiller(layers))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    rt.wait_host_copy()
    host_copy_s = time.perf_counter() - start
    start = time.perf_counter()
    while keeper is not None and not rt.host_copy.kept and time.perf_counter() - start < 300:
        time.sleep(0.05)
    kept_s = time.perf_counter() - start if keeper is not None else None
    expected = greedy_tokens(rt.loop, "expected")
    resident_ttft = [first_token_s(rt, f"resident-{i}") for i in range(5)]
    sync(device)
    weights = rt.engine.memory.weights.nbytes
    emit(
        out,
        base
        | {
            "bench": "pager_load",
            "dtype": dtype,
            "load_s": load_s,
            "host_copy_wait_s": host_copy_s,
            "keeper": keeper is not None,
            "kept": rt.host_copy.kept,
            "kept_after_s": kept_s,
            "keeper_gpu_bytes": process_gpu_bytes(keeper.pid) if keeper is not None else None,
            "weight_bytes": weights,
            "kv_bytes": rt.engine.memory.kv.nbytes,
            "arena_bytes": rt.placement.mapped_bytes(),
            "nvml_process_bytes_resident": process_gpu_bytes(),
            "first_tokens": list(expected[:4]),
            "resident_first_token_s": median(resident_ttft),
            "host_numa_pages": numa_pages(rt.host.address) if rt.host is not None else None,
        },
    )
    store = ChunkStore(args.store)
    for level, unstreamed in levels:
        rt.options = dataclasses.replace(pager, stream_resume=not unstreamed)
        floor = disk_floor(rt, store, out, base) if level is SuspendLevel.DISK else h2d
        name = f"pager_{level.value}{'_sync' if unstreamed else ''}"
        for cycle in range(args.cycles if level is not SuspendLevel.DISK else 2):
            try:
                one_cycle(
                    rt, level, store, out, base | {"cycle": cycle, "bench": name}, expected, floor
                )
            except Exception as exc:  # report it and go on with the next level
                emit(out, base | {"bench": name, "error": repr(exc)})
                if rt.residency.value != "resident":
                    return
                break
    if cuda:
        emit(out, base | {"bench": "pager_graph_bytes", **graph_bytes(rt)})
    rt.close()
    if keeper is not None:
        keeper.stop()


def start_keeper(device: str) -> Any:
    """The GPU's keeper (worker/pager/keeper.py), as torpord runs it."""
    import tempfile

    from torpor.keeper import KeeperProcess

    index = torch.device(device).index or 0
    return KeeperProcess(Path(tempfile.mkdtemp()) / "keeper.sock", f"cuda:{index}").start()


def graph_bytes(rt: Any) -> dict[str, Any]:
    """NVML's bytes of the host-suspended runtime before and after its captured graphs are
    destroyed: what the graph executables themselves hold on the device (their nodes and
    kernel parameters; their memory pool is in an arena and already released)."""
    import gc

    from torpor.worker.pager.paged_state import SuspendLevel

    rt.suspend(SuspendLevel.HOST)
    torch.cuda.synchronize()
    before = process_gpu_bytes()
    graphs = len(getattr(rt.engine._decoder, "graphs", {}))
    rt.engine.disable_graphs()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    after = process_gpu_bytes()
    return {"graphs": graphs, "nvml_with_graphs": before, "nvml_without_graphs": after}


def residual_breakdown() -> dict[str, Any]:
    """What a host-suspended runtime still holds on the GPU, and what each release frees:
    torch's allocator segments outside the arenas, the context's limits (local memory for
    kernel stacks is sized by the largest kernel launched), and NVML's bytes after clearing
    cuBLAS's workspaces and after resetting the stack limit."""
    from torpor.worker.pager.cuda import driver

    cu = driver()
    segments: dict[str, int] = {}
    for seg in torch.cuda.memory_snapshot():
        key = (
            f"{seg.get('segment_type')} {seg.get('total_size', 0) >> 20}MiB "
            f"pool={seg.get('segment_pool_id')} stream={seg.get('stream')} "
            f"alloc={seg.get('allocated_size', 0) >> 20}MiB"
        )
        segments[key] = segments.get(key, 0) + 1
    limits = {}
    for name in ("STACK_SIZE", "MALLOC_HEAP_SIZE", "PRINTF_FIFO_SIZE"):
        err, value = cu.cuCtxGetLimit(getattr(cu.CUlimit, f"CU_LIMIT_{name}"))
        limits[name] = int(value) if int(err) == 0 else f"error {int(err)}"
    out: dict[str, Any] = {
        "torch_reserved": torch.cuda.memory_reserved(),
        "torch_allocated": torch.cuda.memory_allocated(),
        "segments": segments,
        "limits": limits,
        "nvml": process_gpu_bytes(),
    }
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        out["nvml_after_cublas_clear"] = process_gpu_bytes()
    stack = limits["STACK_SIZE"]
    if isinstance(stack, int):
        err = cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, stack)
        torch.cuda.synchronize()
        out["nvml_after_stack_reset"] = process_gpu_bytes()
        out["stack_reset_err"] = int(err[0] if isinstance(err, tuple) else err)
    return out


def disk_floor(rt: Any, store: Any, out: Path, base: dict[str, Any]) -> float:
    """Write the snapshot (timed), then measure the raw read floor on its chunk files."""
    report = rt.snapshot(store)
    manifest = report.manifest
    emit(
        out,
        base
        | {
            "bench": "pager_snapshot",
            "seconds": report.seconds,
            "bytes": manifest.weight_bytes,
            "new_bytes": report.new_bytes,
            "GBps": manifest.weight_bytes / report.seconds / 1e9,
            "chunks": len(manifest.pieces),
        },
    )
    floor = disk_read_floor(store, list(manifest.pieces), rt.options.reader_threads, rt_dev(rt))
    emit(out, base | {"bench": "pager_floor_disk", "odirect_read_GBps": floor / 1e9})
    return floor


def rt_dev(rt: Any) -> str:
    return str(rt.engine.device)


def one_cycle(
    rt: Any,
    level: Any,
    store: Any,
    out: Path,
    base: dict[str, Any],
    expected: tuple[int, ...],
    floor: float,
) -> None:
    """One suspend, then a request arriving: resume, first token, identical tokens."""
    device = rt_dev(rt)
    s = rt.suspend(level, store=store)
    sync_ok = level.value != "deep"  # a checkpointed process must make no CUDA call
    if sync_ok:
        sync(device)
    suspended = {
        "nvml_process_bytes_suspended": process_gpu_bytes(),
        "device_used_suspended": device_used() if sync_ok else None,
    }
    page_cache_dropped = drop_page_cache() if level.value == "disk" else None
    if level.value == "host" and base["cycle"] == 0 and device.startswith("cuda"):
        suspended["residual"] = residual_breakdown()
    start = time.perf_counter()
    r = rt.resume()
    resumed = time.perf_counter()
    came, racing = first_token(rt, f"{level.value}-{base['cycle']}")
    ttft, arrival_to_first_token = came - resumed, came - start
    weights_in_s = rt.wait_weights()  # a streamed resume: the copy's own time on the device
    suspended["second_first_token_s"] = first_token_s(rt, f"{level.value}-{base['cycle']}-2")
    same = greedy_tokens(rt.loop, f"{level.value}-{base['cycle']}") == expected
    # Bytes over the time to the last one in: with a streamed resume that is the copy's
    # device time plus the mapping before it, not the (much shorter) time to serving.
    refill_s = r.seconds
    if weights_in_s is not None:  # the copy began after the mapping, during the enqueueing
        refill_s = r.phases["map"] + r.phases["finish"] + weights_in_s
    record = base | {
        "streamed": r.streamed,
        "via": r.via,
        "suspend_s": s.seconds,
        "suspend_phases": s.phases,
        "gpu_bytes_released": s.gpu_bytes_released,
        "resume_s": r.seconds,
        "weights_in_s": refill_s,
        "resume_GBps": r.bytes / refill_s / 1e9,
        "resume_phases": r.phases,
        "first_token_after_resume_s": ttft,
        "arrival_to_first_token_s": arrival_to_first_token,
        "bit_identical_tokens": same and racing == expected,
        **suspended,
    }
    if level.value == "deep":
        from torpor.worker.pager import checkpoint

        record["controllers"] = list(checkpoint.HISTORY)[-2:]
        relock = time.perf_counter()
        host = rt.host
        while host is not None and not host.pinned and time.perf_counter() - relock < 120:
            time.sleep(0.01)
        record["relocked_after_s"] = time.perf_counter() - relock
    if level.value == "disk":
        record |= {
            "page_cache_dropped": page_cache_dropped,
            "fraction_of_read_floor": record["resume_GBps"] * 1e9 / floor,
        }
    else:
        record["fraction_of_pinned_floor"] = record["resume_GBps"] * 1e9 / floor
    emit(out, record)


def baseline(args: argparse.Namespace) -> None:
    """The driver's whole-process checkpoint of the runtime with nothing released first."""
    from torpor.worker.engine.demo import RandomFiller
    from torpor.worker.engine.engine import Engine
    from torpor.worker.engine.loop import EngineLoop
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.pager import checkpoint

    model_dir, layers, dtype = shape_dir(args.shape)
    options = EngineOptions(max_batch=8, max_seq_len=1024, dtype=dtype, device=args.device)
    engine = Engine.load(model_dir, options, filler=RandomFiller(layers))
    loop = EngineLoop(engine).start()
    expected = greedy_tokens(loop, "expected")
    sync(args.device)
    resident = process_gpu_bytes()
    pid = os.getpid()
    checkpoint_s = checkpoint.run_controller("suspend", pid, timeout_s=240)
    suspended = process_gpu_bytes()
    restore_s = checkpoint.run_controller("resume", pid, timeout_s=240)
    same = greedy_tokens(loop, "after") == expected
    emit(
        args.out,
        {
            "bench": "pager_baseline_whole_process",
            "shape": args.shape,
            "weight_bytes": engine.memory.weights.nbytes,
            "nvml_process_bytes_resident": resident,
            "nvml_process_bytes_checkpointed": suspended,
            "checkpoint_s": checkpoint_s,
            "restore_s": restore_s,
            "restore_GBps": (resident or 0) / restore_s / 1e9,
            "bit_identical_tokens": same,
            "controllers": list(checkpoint.HISTORY)[-2:],
        },
    )
    loop.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["context", "runtime", "baseline"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=Path("/tmp/torpor-bench/store"))
    parser.add_argument("--levels", default="host,deep,disk")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--stage-threads", type=int, default=12)
    parser.add_argument("--keeper", choices=["on", "off"], default="on")
    args = parser.parse_args()
    from torpor.log import configure

    configure(json=False, level="warning")
    phases: dict[str, Callable[[], None]] = {
        "context": lambda: context(args.out),
        "runtime": lambda: runtime(args),
        "baseline": lambda: baseline(args),
    }
    phases[args.phase]()


if __name__ == "__main__":
    main()
