"""The keeper alone, at any size: can a second process that keeps the host copy page-locked
fill a deep-resumed worker's arena at DMA speed, so that the worker itself holds no locked
memory at its checkpoint?

    python bench/keeper_probe.py --gib 16 --cycles 3 --out F

This process plays the worker, with no engine: a CUDA context (torch), a host copy in a memfd
(`HostBuffer(shared=True)`, not locked here) and an arena of exportable VMM handles
(`CudaBackend(exportable=True)`). A real keeper (`KeeperProcess`) takes the copy and locks it.
Each cycle the worker releases its arena, is checkpointed and restored by the driver (through
torpor's controller), maps the arena again and has the keeper fill it (`KeeperClient.fill`:
export, import, map, copy). Every step is timed, and sampled bytes are checked.

The figures in `bench/results/2026-11-28/keeper-probe-run13.jsonl` came from this probe's
first version, which made the same driver calls by hand before the keeper existed (git
history); it also timed the export apart.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30


def probe(args: argparse.Namespace) -> None:
    import torch

    from tests.pager.nvsmi import process_gpu_bytes
    from torpor.keeper import KeeperProcess
    from torpor.worker.pager import checkpoint
    from torpor.worker.pager.arena import Arena
    from torpor.worker.pager.cuda import CudaBackend
    from torpor.worker.pager.host import HostBuffer
    from torpor.worker.pager.keeper_client import KeeperClient

    nbytes = args.gib * GiB
    torch.zeros(1, device="cuda")
    (torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")).sum().item()
    out = args.out.open("a")

    def emit(record: dict[str, Any]) -> None:
        record = {"bench": "keeper_probe", "gib": args.gib, "handle_mib": args.handle_mib} | record
        print(json.dumps(record), flush=True)
        out.write(json.dumps(record) + "\n")
        out.flush()

    start = time.perf_counter()
    host = HostBuffer(nbytes, shared=True)  # no pinner: nothing is locked in this process
    for g in range(args.gib):
        host.tensor[g * GiB : (g + 1) * GiB].fill_(g % 251 + 1)
    fill_s = time.perf_counter() - start

    keeper = KeeperProcess(Path(tempfile.mkdtemp()) / "keeper.sock", "cuda:0").start()
    client = KeeperClient(keeper.path)
    backend = CudaBackend(0, exportable=True)
    arena = Arena("probe", nbytes, backend, handle_bytes=args.handle_mib << 20)
    controller = checkpoint.Controller(os.getpid()).start()
    try:
        held = client.hold("copy", host)
        emit(
            {
                "step": "hold",
                "host_fill_s": fill_s,
                "keeper_pin_s": held["seconds"],
                "keeper_gpu_bytes": process_gpu_bytes(keeper.pid),
            }
        )

        def fill(record: dict[str, Any]) -> None:
            start = time.perf_counter()
            arena.map()
            mapped = time.perf_counter()
            reply = client.fill("copy", arena, nbytes)
            filled = time.perf_counter()
            device = arena.tensor(0, (nbytes,), torch.uint8)
            ok = all(
                int(device[g * GiB + k].item()) == g % 251 + 1
                for g in range(args.gib)
                for k in (0, GiB // 2, GiB - 1)
            )
            record |= {
                "map_s": mapped - start,
                "keeper_fill_s": filled - mapped,  # export, and the keeper's whole answer
                "fill_total_s": filled - start,
                "bytes_ok": ok,
            } | {f"keeper_{k}": v for k, v in reply.items() if k != "ok"}

        first: dict[str, Any] = {"step": "first_fill"}
        fill(first)
        emit(first)
        for cycle in range(args.cycles):
            rec: dict[str, Any] = {"step": "cycle", "cycle": cycle}
            torch.cuda.synchronize()
            start = time.perf_counter()
            arena.unmap()
            rec["release_s"] = time.perf_counter() - start
            rec["suspend_s"] = controller.run("suspend", 60)
            rec["suspended_bytes"] = process_gpu_bytes()
            rec["restore_s"] = controller.run("resume", 60)
            fill(rec)
            rec["resume_total_s"] = rec["restore_s"] + rec["fill_total_s"]
            rec["steps"] = list(checkpoint.HISTORY)[-2:]
            emit(rec)
    finally:
        controller.close()
        client.close()
        keeper.stop()
        arena.close()
        host.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--handle-mib", type=int, default=512)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("keeper-probe.jsonl"))
    probe(parser.parse_args())


if __name__ == "__main__":
    main()
