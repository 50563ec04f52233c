"""Pager benchmarks on a GPU (issue 3): suspend and resume of a paged runtime at each level,
against floors measured in the same run, JSON lines appended to --out.

    python bench/pager_gpu.py 8b CKPT_DIR --out F --store DIR

CKPT_DIR is the Llama-3-8B-shaped checkpoint `bench/engine_gpu.py write-ckpt` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

GiB = 1 << 30


def emit(out: Path, record: dict) -> None:
    record["t"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def pinned_h2d_floor(nbytes: int = 8 * GiB) -> float:
    """Bytes/s of a pinned host → device copy (median of 5)."""
    from torpor.worker.pager.cuda import CudaBackend
    from torpor.worker.pager.host import HostBuffer

    host = HostBuffer(nbytes, pinner=CudaBackend(0))
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
    return nbytes / statistics.median(times[1:])


def disk_read_floor(store, pieces, threads: int) -> float:
    """Bytes/s of O_DIRECT parallel reads of the snapshot's chunk files into pinned buffers
    (no hashing, no device copy): what the disk itself gives."""
    from concurrent.futures import ThreadPoolExecutor

    from torpor.worker.pager.backend import round_up
    from torpor.worker.pager.cuda import CudaBackend
    from torpor.worker.pager.stream import StagingRing, _read_file

    ring = StagingRing(threads, max(p.ref.size for p in pieces), CudaBackend(0))
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")

    def read(i: int) -> int:
        buf = ring.buffers[i % threads]
        total = 0
        for p in pieces[i::threads]:
            view = buf.tensor.numpy().data[: round_up(p.ref.size, 4096)]
            _read_file(store.path(p.ref.hash), view, True)
            total += p.ref.size
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(threads)))
    seconds = time.perf_counter() - start
    ring.close()
    return total / seconds


def first_token_s(rt, prompt: tuple[int, ...]) -> float:
    from torpor.worker.engine.requests import GenerationRequest
    from torpor.worker.engine.sampling import SamplingParams

    start = time.perf_counter()
    stream = iter(
        rt.loop.submit(
            GenerationRequest(f"ttft-{start}", prompt, SamplingParams(max_tokens=1, temperature=0))
        )
    )
    next(stream)
    return time.perf_counter() - start


def tokens(rt, prompt: tuple[int, ...]) -> tuple[int, ...]:
    from torpor.worker.engine.requests import GenerationRequest, GenerationResult
    from torpor.worker.engine.sampling import SamplingParams

    req = GenerationRequest(
        f"check-{time.perf_counter()}",
        prompt,
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    )
    return GenerationResult.collect(req.request_id, list(rt.loop.submit(req))).token_ids


def bench_8b(ckpt: Path, out: Path, store_dir: Path) -> None:
    from torpor.store.chunks import ChunkStore
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.pager.placement import PagerOptions
    from torpor.worker.pager.runtime import PagedRuntime, SuspendLevel

    h2d = pinned_h2d_floor()
    emit(
        out,
        {"bench": "pager_floor", "pinned_h2d_GBps": h2d / 1e9, "gpu": torch.cuda.get_device_name()},
    )
    options = EngineOptions(max_batch=8, max_seq_len=1024, dtype="bfloat16")
    start = time.perf_counter()
    rt = PagedRuntime.load(ckpt, options, PagerOptions(device="cuda"))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    rt.wait_host_copy()
    host_copy_s = time.perf_counter() - start
    prompt = tuple(range(1, 129))
    expected = tokens(rt, prompt)
    weights = rt.engine.memory.weights.nbytes
    emit(
        out,
        {
            "bench": "pager_load",
            "model": "llama3-8b-shape",
            "load_s": load_s,
            "host_copy_wait_s": host_copy_s,
            "weight_bytes": weights,
            "arena_bytes": rt.placement.mapped_bytes(),
        },
    )

    for level in (SuspendLevel.HOST, SuspendLevel.HOST, SuspendLevel.HOST):
        s = rt.suspend(level)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        r = rt.resume()
        ttft = first_token_s(rt, prompt)
        same = tokens(rt, prompt) == expected
        emit(
            out,
            {
                "bench": "pager_host",
                "suspend_s": s.seconds,
                "resume_s": r.seconds,
                "resume_GBps": r.gbps,
                "fraction_of_pinned_floor": r.gbps * 1e9 / h2d,
                "first_token_after_resume_s": ttft,
                "bit_identical_tokens": same,
                "gpu_bytes_released": s.gpu_bytes_released,
                "device_used_while_suspended": total - free,
            },
        )

    store = ChunkStore(store_dir)
    snap = rt.snapshot(store)
    emit(
        out,
        {
            "bench": "pager_snapshot",
            "seconds": snap.seconds,
            "bytes": snap.manifest.weight_bytes,
            "new_bytes": snap.new_bytes,
            "GBps": snap.manifest.weight_bytes / snap.seconds / 1e9,
        },
    )
    floor = disk_read_floor(store, list(snap.manifest.pieces), rt.options.reader_threads)
    s = rt.suspend(SuspendLevel.DISK, store=store)
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
    r = rt.resume(store)
    same = tokens(rt, prompt) == expected
    emit(
        out,
        {
            "bench": "pager_disk",
            "suspend_s": s.seconds,
            "resume_s": r.seconds,
            "resume_GBps": r.gbps,
            "disk_read_floor_GBps": floor / 1e9,
            "fraction_of_read_floor": r.gbps * 1e9 / floor,
            "bit_identical_tokens": same,
        },
    )
    rt.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["8b"])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=Path("/tmp/torpor-bench/store"))
    args = parser.parse_args()
    bench_8b(args.ckpt, args.out, args.store)


if __name__ == "__main__":
    main()
