"""The OpenAI-compatible HTTP API against gRPC on the same torpord (issue 14): time to first
token and tokens/s of the same streamed generation through `POST /v1/completions` and
through `Scheduler.Generate`, at 1 and 64 concurrent clients.

    .venv/bin/python bench/http_bench.py [--out .bench/http.jsonl] [--clients 1,64]
        [--rounds 40] [--max-tokens 16] [--backend cpu|cuda] [--model DIR --dtype bf16]

A real torpord (a subprocess; on the CPU backend a demo model on one simulated device) with
its HTTP API on a free loopback port. Both paths send the same greedy request (fixed prompt
token ids, `ignore_eos`), streamed; the HTTP client is aiohttp reading the server-sent events
itself, so the figure is the server's and the wire's, not an SDK's parsing. Rounds alternate
between the paths, so drift hits both alike. TTFT is from sending the request to the first
event that carries a token; tokens/s is a request's tokens after the first over the time
after the first. The floor is the gRPC path measured
in the same run: the report gives HTTP's p50 minus gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_bench import Daemon, git_describe, summary

from torpor.scheduler.footprint import estimate
from torpor.v1 import common_pb2, scheduler_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

MODEL = "bench"
PROMPT = list(range(1, 33))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def via_grpc(d: Daemon, i: int, max_tokens: int) -> tuple[float, float, int]:
    request = scheduler_pb2.GenerateRequest(
        model=MODEL,
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async for chunk in d.scheduler[i % len(d.scheduler)].Generate(request, timeout=300):
        if chunk.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return first, time.perf_counter() - start, tokens


async def via_http(http: aiohttp.ClientSession, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async with http.post("/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for raw in reply.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and not first:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


async def one_round(
    d: Daemon, http: aiohttp.ClientSession, path: str, n: int, max_tokens: int
) -> list[tuple[float, float, int]]:
    if path == "grpc":
        calls = [via_grpc(d, i, max_tokens) for i in range(n)]
    else:
        calls = [via_http(http, max_tokens) for _ in range(n)]
    return list(await asyncio.gather(*calls))


def rates(results: list[tuple[float, float, int]]) -> list[float]:
    return [(t - 1) / (total - first) for first, total, t in results if t > 1 and total > first]


async def run(args: argparse.Namespace) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="torpor-http-") as tmp, args.out.open("a") as sink:

        def emit(record: dict[str, Any]) -> None:
            record = {"bench": "http", "at": stamp, **record}
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        work = Path(tmp)
        if args.model is None:
            spec = DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024, seed=0)
            model_dir = make_demo(work / "models" / MODEL, spec)
            dtype = common_pb2.DTYPE_FLOAT32
        else:
            model_dir = args.model
            dtype = common_pb2.Dtype.Value(f"DTYPE_{args.dtype.upper()}")
        fp = estimate(model_dir, "float32", 64, 512, cuda=False).resident
        port = free_port()
        os.environ["TORPOR_DAEMON_HTTP_LISTEN"] = f"127.0.0.1:{port}"
        d = Daemon(work, model_dir, 2 * fp, channels=4, backend=args.backend)
        http = aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}",
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=300),
        )
        try:
            await d.wait_serving()
            await d.scheduler[0].RegisterModel(
                scheduler_pb2.RegisterModelRequest(
                    spec=common_pb2.ModelSpec(
                        name=MODEL,
                        source=str(model_dir),
                        dtype=dtype,
                        max_batch=64,
                        max_seq_len=512,
                    )
                ),
                timeout=600,
            )
            for path in ("grpc", "http"):  # warm: the load, then both paths' connections
                await one_round(d, http, path, max(args.clients), args.max_tokens)
            emit(
                {
                    "phase": "setup",
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "python": platform.python_version(),
                    "grpcio": grpc.__version__,
                    "aiohttp": aiohttp.__version__,
                    "commit": git_describe(),
                    "backend": args.backend,
                    "model": str(args.model or "demo 2x256"),
                    "max_tokens": args.max_tokens,
                    "prompt_tokens": len(PROMPT),
                }
            )
            for n in args.clients:
                got: dict[str, list[tuple[float, float, int]]] = {"grpc": [], "http": []}
                walls: dict[str, list[float]] = {"grpc": [], "http": []}
                for r in range(args.rounds):
                    for path in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                        t0 = time.perf_counter()
                        got[path] += await one_round(d, http, path, n, args.max_tokens)
                        walls[path].append(time.perf_counter() - t0)
                for path, results in got.items():
                    tokens = sum(t for _, _, t in results)
                    emit(
                        {
                            "phase": "generate",
                            "path": path,
                            "clients": n,
                            "ttft": summary([f for f, _, _ in results]),
                            "total": summary([t for _, t, _ in results]),
                            "tokens_per_s_p50": statistics.median(rates(results) or [0.0]),
                            "aggregate_tokens_per_s": tokens / sum(walls[path]),
                        }
                    )
        finally:
            await http.close()
            status = await d.stop()
            emit({"phase": "teardown", "torpord_exit_status": status})
    print("clients path  ttft p50 ms  ttft p90 ms  tok/s p50  agg tok/s")
    by = {(r["clients"], r["path"]): r for r in records if r["phase"] == "generate"}
    for (n, path), r in sorted(by.items()):
        ttft = r["ttft"]
        print(
            f"{n:>7} {path:>4} {ttft['p50_ms']:>12.2f} {ttft['p90_ms']:>12.2f}"
            f" {r['tokens_per_s_p50']:>10.1f} {r['aggregate_tokens_per_s']:>10.1f}"
        )
    for n in sorted({n for n, _ in by}):
        delta = by[(n, "http")]["ttft"]["p50_ms"] - by[(n, "grpc")]["ttft"]["p50_ms"]
        print(f"clients {n}: HTTP adds {delta:+.2f} ms p50 to time to first token over gRPC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/http.jsonl"))
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--rounds", type=int, default=40, help="rounds per path and level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", type=Path, help="a checkpoint directory (default: a demo model)")
    parser.add_argument("--dtype", default="bfloat16", help="with --model")
    args = parser.parse_args()
    if args.model is not None:
        args.model = args.model.resolve()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
