"""Which state of a process the driver's process checkpoint (deep suspend) handles: each
variant builds one kind of CUDA state in a fresh child process, then checkpoints and restores
it through torpor's controller, with every driver step traced and bounded.

    python bench/deep_probe.py [VARIANT...] --out F     (default: all, in order)

Variants add to `plain` (a CUDA context, 1 GiB tensor, a cuBLAS matmul): `pinned` (1 GiB of
registered host memory), `vmm` (a 1 GiB arena mapped, used and unmapped: the reservation
stays), `graph` (a captured CUDA graph), `runtime` (a small PagedRuntime, deep-suspended the
way the worker does it). A child that hangs dumps the stacks of all its threads.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.pager.nvsmi import process_gpu_bytes

VARIANTS = ("plain", "pinned", "vmm", "graph", "runtime")
GiB = 1 << 30


def child(variant: str, timeout_s: float) -> dict[str, object]:
    import torch

    from torpor.worker.pager import checkpoint

    keep: list[object] = []
    x = torch.randn(GiB // 4, device="cuda")
    a = torch.randn(1024, 1024, device="cuda")
    (a @ a).sum().item()
    if variant == "pinned":
        from torpor.worker.pager.cuda import CudaBackend
        from torpor.worker.pager.host import HostBuffer

        host = HostBuffer(GiB, pinner=CudaBackend(0))
        host.tensor.fill_(1)
        keep.append(host)
    if variant == "vmm":
        from torpor.worker.pager.arena import Arena
        from torpor.worker.pager.cuda import CudaBackend

        arena = Arena("probe", GiB, CudaBackend(0), handle_bytes=512 << 20)
        arena.map()
        arena.tensor(0, GiB // 4, torch.float32).fill_(2)
        torch.cuda.synchronize()
        arena.unmap()
        keep.append(arena)
    if variant == "graph":
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            y = a @ a
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            y = a @ a
        g.replay()
        keep += [g, y]
    torch.cuda.synchronize()
    record: dict[str, object] = {"variant": variant, "resident_bytes": process_gpu_bytes()}
    if variant == "runtime":
        return record | runtime_deep(timeout_s)
    record["suspend_s"] = checkpoint.run_controller("suspend", os.getpid(), timeout_s)
    record["suspended_bytes"] = process_gpu_bytes()
    record["resume_s"] = checkpoint.run_controller("resume", os.getpid(), timeout_s)
    record["check"] = float(x[:10].sum().item())
    return record


def runtime_deep(timeout_s: float) -> dict[str, object]:
    import tempfile

    from torpor.worker.engine.demo import DemoSpec, make_demo
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.pager import checkpoint
    from torpor.worker.pager.paged_state import SuspendLevel
    from torpor.worker.pager.placement import PagerOptions
    from torpor.worker.pager.runtime import PagedRuntime

    checkpoint.DEFAULT_TIMEOUT_S = timeout_s
    spec = DemoSpec(layers=4, hidden=1024, heads=8, kv_heads=2, vocab=4096, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_demo(Path(tmp) / "m", spec)
        rt = PagedRuntime.load(
            model,
            EngineOptions(max_batch=4, max_seq_len=512, dtype="bfloat16"),
            PagerOptions(device="cuda", graph_pool_bytes=256 << 20),
        )
        rt.wait_host_copy()
        s = rt.suspend(SuspendLevel.DEEP)
        suspended = process_gpu_bytes()
        r = rt.resume()
        rt.close()
    return {"suspend_s": s.seconds, "suspended_bytes": suspended, "resume_s": r.seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    if args.child:
        faulthandler.dump_traceback_later(args.timeout * 2 + 15, exit=True)
        try:
            print(json.dumps(child(args.variants[0], args.timeout)), flush=True)
        except Exception as exc:
            print(json.dumps({"variant": args.variants[0], "error": str(exc)}), flush=True)
        return
    for variant in args.variants:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, variant, "--child", "--out", str(args.out)],
                capture_output=True,
                text=True,
                timeout=args.timeout * 2 + 40,
            )
            lines = proc.stdout.strip().splitlines()
            record = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
            record |= {"variant": variant, "rc": proc.returncode}
            if proc.returncode or "error" in record:
                record["stderr_tail"] = proc.stderr[-3000:]
        except subprocess.TimeoutExpired as exc:
            record = {"variant": variant, "error": "child timed out", "stderr": str(exc.stderr)}
        record |= {"bench": "deep_probe", "wall_s": time.perf_counter() - start}
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
