"""Measure torpord on this machine (CPU backend): `Acquire` latency on a resident model under
many concurrent clients, and the cost of proxying `Generate` through torpord against calling
the worker directly (docs/BENCHMARKS.md quotes the figures; issue 5).

    .venv/bin/python bench/daemon_bench.py [--out .bench/daemon.jsonl] [--clients 1,100,1000]

What it does:
1. writes a small demo model, starts a real torpord (a subprocess: CPU backend, one simulated
   device, its own temporary state and runtime dirs, metrics off, log level warning),
   registers the model and makes it resident with one implicit-acquire Generate;
2. Acquire: for each N of `--clients`, `--rounds` rounds in which N clients start at once,
   each opens an `Acquire` stream and times from the call to the READY event; once all N
   hold their lease, each gives it back with `Release` and reads its stream to its end (the
   daemon's lease count is checked back at 0). The clients are coroutines of one asyncio
   loop in this process, `grpc.aio`, spread round-robin over `--channels` channels (each its
   own connection: a local subchannel pool). The floor, measured the same way in the same
   run, its rounds interleaved with Acquire's: the health service's `Watch` (a server stream
   answered at once and held open, like Acquire; ended by cancelling it), and two unary
   RPCs, the health `Check` and `Admin.GetStatus`. Before each N, and before step 3, the
   script waits until torpord is idle: its audit trail is written behind the calls, and
   that work must not leak into the next measurement (how long it took is recorded);
3. Generate: the same greedy request (fixed prompt token ids, `ignore_eos`) for max_tokens 1
   and 16, sent one at a time on three paths: straight to the worker's socket
   (`Worker.Generate` at the READY event's `worker_endpoint`), through `Scheduler.Generate`
   with a held lease, and through `Scheduler.Generate` with `model=` (implicit acquire).
   Paths run in short blocks (`--block`), rotated, so drift and other load hit all three
   alike; each block's CPU seconds of torpord and of the worker are read from /proc. Times
   are client-side: to the first chunk with a token (TTFT) and to the end of the stream. The
   answering process's own `usage.timings` are kept too (the worker's on the direct call,
   torpord's, from the request's arrival, when it proxies), so the transport to it can be
   told apart from what happens inside;
4. writes one JSON line per figure to `--out` and prints a table.

The client process and torpord (and its worker) share this machine's cores: on a small VM
the client's own cost is inside every figure, which is why the floor matters.
The worker runs with one torch intra-op thread (`--worker-threads`, OMP_NUM_THREADS): on a
2-core machine shared with torpord and the clients, two threads spin-wait on both cores,
double the worker's CPU for the same speed, and turn every preemption into a long stall.
`--profile-daemon FILE` runs torpord under cProfile (for finding where the time goes; the
figures of such a run are inflated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from torpor.scheduler.footprint import estimate
from torpor.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from torpor.worker.engine.demo import DemoSpec, make_demo

MODEL = "bench"
MAX_SEQ_LEN = 256
MAX_BATCH = 4
PROMPT = [3 + (k * 37) % 400 for k in range(24)]
PATHS = ("direct", "lease", "implicit")
_TICK = os.sysconf("SC_CLK_TCK")


# -- statistics -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- torpord ----------------------------------------------------------------------------------


class Daemon:
    """A torpord subprocess on the CPU backend and the aio channels to it."""

    def __init__(
        self,
        work: Path,
        model_dir: Path,
        device_memory: int,
        channels: int,
        profile: Path | None = None,
        worker_threads: int = 0,
        backend: str = "cpu",
    ) -> None:
        self.state = work / "state"
        self.socket = self.state / "torpord.sock"
        env = {
            **os.environ,
            "TORPOR_DAEMON_MODEL_ROOTS": str(model_dir.parent),
            # Its own runtime dir: the default (/run/torpor) is shared by every torpord on the
            # host, and a torpord stops the workers it finds recorded there at start-up.
            "TORPOR_DAEMON_RUNTIME_DIR": str(work / "run"),
            "TORPOR_DAEMON_LOG_LEVEL": "warning",
        }
        if worker_threads:  # torch's intra-op threads in the worker (torpord passes its env on)
            env["OMP_NUM_THREADS"] = str(worker_threads)
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        self.argv = [
            sys.executable,
            *profiler,
            "-m",
            "torpor.scheduler.daemon",
            "--state-dir",
            str(self.state),
            "--socket",
            str(self.socket),
            "--metrics-port",
            "0",
            "--backend",
            backend,
            *(
                ["--cpu-devices", "1", "--cpu-device-memory", str(device_memory)]
                if backend == "cpu"
                else []
            ),
        ]
        self.proc = subprocess.Popen(self.argv, env=env)
        # Each channel its own connection: without a local subchannel pool, channels to the
        # same target with the same arguments share one.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.insecure_channel(f"unix://{self.socket}", options=options)
            for _ in range(channels)
        ]
        self.scheduler = [scheduler_pb2_grpc.SchedulerStub(c) for c in self.channels]
        self.admin = [admin_pb2_grpc.AdminStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]

    async def wait_serving(self, within_s: float = 60) -> None:
        end = time.monotonic() + within_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torpord exited with status {self.proc.returncode}")
            try:
                reply = await self.health[0].Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"torpord did not serve within {within_s} s")
            await asyncio.sleep(0.1)
        for channel in self.channels[1:]:
            await channel.channel_ready()

    async def runtime(self) -> admin_pb2.RuntimeInfo:
        reply = await self.admin[0].ListResidency(
            admin_pb2.ListResidencyRequest(include_cold=True), timeout=30
        )
        return next(r for r in reply.runtimes if r.model == MODEL)

    async def stop(self) -> int:
        for channel in self.channels:
            await channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 60)


async def wait_idle(d: Daemon, within_s: float = 900) -> dict[str, float]:
    """Wait until torpord uses under 5% of a core over two half-second samples in a row:
    work it queued for later (its audit trail's writes) must not leak into the next phase."""
    start, cpu = time.perf_counter(), cpu_seconds(d.proc.pid)
    quiet = 0
    while quiet < 2 and time.perf_counter() - start < within_s:
        before = cpu_seconds(d.proc.pid)
        await asyncio.sleep(0.5)
        quiet = quiet + 1 if cpu_seconds(d.proc.pid) - before < 0.025 else 0
    return {
        "idle_after_s": time.perf_counter() - start,
        "cpu_s_until_idle": cpu_seconds(d.proc.pid) - cpu,
        "events_in_catalog": count_events(d),
    }


def count_events(d: Daemon) -> int:
    """Rows in the catalog's audit trail (read-only, beside the daemon's own connection)."""
    db = sqlite3.connect(f"file:{d.state / 'catalog.db'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


def git_describe() -> str:
    """The checkout's commit, with "+dirty" when files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}+dirty" if dirty else head or "unknown"


def request(max_tokens: int, **target: str) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        **target,
    )


# -- Acquire under concurrency --------------------------------------------------------------


async def stream_round(d: Daemon, n: int, rpc: str = "acquire") -> dict[str, Any]:
    """N clients open a stream at once and time its first answer (Acquire: READY), hold it
    until all are answered, then end it (Acquire: Release, then read to the end; the floor,
    the health service's Watch: cancel)."""
    settled = 0
    all_settled = asyncio.Event()
    errors: dict[str, int] = {}
    latencies: list[float] = []
    releases: list[float] = []
    not_ready_events = 0
    sent: list[float] = []
    ready_at: list[float] = []

    barrier_cpu = [0.0, 0.0]  # torpord's and this process's CPU seconds once all are served

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == n:
            barrier_cpu[:] = [cpu_seconds(d.proc.pid), time.process_time()]
            all_settled.set()

    async def client(i: int) -> None:
        nonlocal not_ready_events
        stub = d.scheduler[i % len(d.scheduler)]
        start = time.perf_counter()
        sent.append(start)
        if rpc == "acquire":
            call = stub.Acquire(scheduler_pb2.AcquireRequest(model=MODEL), timeout=120)
        else:
            call = d.health[i % len(d.health)].Watch(health_pb2.HealthCheckRequest(), timeout=120)
        lease = None
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    errors["EOF_BEFORE_READY"] = errors.get("EOF_BEFORE_READY", 0) + 1
                    break
                if rpc != "acquire":
                    now = time.perf_counter()
                    latencies.append(now - start)
                    ready_at.append(now)
                    lease = ""
                    break
                if event.HasField("ready"):
                    now = time.perf_counter()
                    latencies.append(now - start)
                    ready_at.append(now)
                    lease = event.ready.lease_id
                    break
                not_ready_events += 1
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
        settle()
        await all_settled.wait()
        if not lease:  # no lease, or the floor: cancel the stream
            call.cancel()
            return
        start = time.perf_counter()
        await d.scheduler[i % len(d.scheduler)].Release(
            scheduler_pb2.ReleaseRequest(lease_id=lease), timeout=60
        )
        releases.append(time.perf_counter() - start)
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            key = f"after_release:{exc.code().name}"
            errors[key] = errors.get(key, 0) + 1

    cpu, own = cpu_seconds(d.proc.pid), time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(n)))
    wall = time.perf_counter() - wall
    grant_cpu, grant_own = barrier_cpu[0] - cpu, barrier_cpu[1] - own
    cpu, own = cpu_seconds(d.proc.pid) - cpu, time.process_time() - own
    leases_left = (await d.runtime()).leases if rpc == "acquire" else 0
    span = (max(ready_at) - min(sent)) if ready_at else float("nan")
    return {
        "latencies": latencies,
        "releases": releases,
        "errors": errors,
        "not_ready_events": not_ready_events,
        "grant_span_s": span,
        "wall_s": wall,
        "daemon_cpu_s": cpu,
        "client_cpu_s": own,
        "grant_daemon_cpu_s": grant_cpu,
        "grant_client_cpu_s": grant_own,
        "leases_left": leases_left,
    }


async def unary_round(d: Daemon, n: int, rpc: str) -> dict[str, Any]:
    """N clients send one trivial unary RPC at once: the transport's own cost."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent: list[float] = []
    done_at: list[float] = []

    def method(i: int) -> Callable[[], Awaitable[Any]]:
        if rpc == "health_check":
            stub = d.health[i % len(d.health)]
            return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=120)
        admin = d.admin[i % len(d.admin)]
        return lambda: admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=120)

    async def client(i: int) -> None:
        call = method(i)
        start = time.perf_counter()
        sent.append(start)
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            return
        now = time.perf_counter()
        latencies.append(now - start)
        done_at.append(now)

    cpu, own = cpu_seconds(d.proc.pid), time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(n)))
    wall = time.perf_counter() - wall
    cpu, own = cpu_seconds(d.proc.pid) - cpu, time.process_time() - own
    span = (max(done_at) - min(sent)) if done_at else float("nan")
    return {
        "latencies": latencies,
        "errors": errors,
        "grant_span_s": span,
        "wall_s": wall,
        "daemon_cpu_s": cpu,
        "client_cpu_s": own,
    }


async def one_round(d: Daemon, n: int, rpc: str) -> dict[str, Any]:
    if rpc in ("acquire", "health_watch"):
        return await stream_round(d, n, rpc)
    return await unary_round(d, n, rpc)


async def bench_acquire(
    d: Daemon, clients: list[int], rounds: int, emit: Callable[[dict[str, Any]], None]
) -> None:
    acquires = 0
    for n in clients:
        idle = await wait_idle(d)
        emit(
            {"phase": "idle_wait", "before": f"acquire N={n}", "acquires_so_far": acquires, **idle}
        )
        reps = rounds if n > 1 else rounds * 50  # one client: many sequential rounds
        pooled: dict[str, list[dict[str, Any]]] = {
            "acquire": [],
            "health_watch": [],
            "health_check": [],
            "get_status": [],
        }
        kinds = list(pooled)

        for rpc in kinds:  # warm-up, not recorded
            await one_round(d, n, rpc)
        for rep in range(reps):  # interleaved, the order rotated every round
            for rpc in kinds[rep % 4 :] + kinds[: rep % 4]:
                pooled[rpc].append(await one_round(d, n, rpc))
        acquires += n * (reps + 1)
        emit(
            {
                "phase": "events_backlog",
                "after": f"acquire N={n}",
                "acquires_so_far": acquires,
                "events_in_catalog": count_events(d),
            }
        )
        for rpc, results in pooled.items():
            lat = [x for r in results for x in r["latencies"]]
            errors: dict[str, int] = {}
            for r in results:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            spans = [r["grant_span_s"] for r in results]

            def per_call(key: str, results: list[dict[str, Any]] = results) -> float:
                return sum(r[key] for r in results) / max(
                    1, sum(len(r["latencies"]) for r in results)
                )

            record: dict[str, Any] = {
                "phase": "acquire",
                "rpc": rpc,
                "clients": n,
                "rounds": reps,
                **summary(lat),
                "ok": len(lat),
                "errors": errors,
                # N answers in the time from the first send to the last answer, median round
                "throughput_per_s": n / statistics.median(spans),
                "round_p50_ms": [round(percentile(r["latencies"], 50) * 1e3, 3) for r in results]
                if n > 1
                else None,
                # CPU per call, the whole round (for Acquire: acquire, release, stream end)
                "daemon_cpu_ms_per_call": 1e3 * per_call("daemon_cpu_s"),
                "client_cpu_ms_per_call": 1e3 * per_call("client_cpu_s"),
            }
            if "grant_daemon_cpu_s" in results[0]:
                # the first phase alone: from the first send until every client is answered
                record["grant_daemon_cpu_ms_per_call"] = 1e3 * per_call("grant_daemon_cpu_s")
                record["grant_client_cpu_ms_per_call"] = 1e3 * per_call("grant_client_cpu_s")
            if rpc == "acquire":
                record["release"] = summary([x for r in results for x in r["releases"]])
                record["non_ready_events"] = sum(r["not_ready_events"] for r in results)
                record["leases_left_after_release"] = max(r["leases_left"] for r in results)
            emit(record)


# -- Generate: proxied against direct ---------------------------------------------------------


async def timed_stream(call: Any) -> tuple[float, float, list[int], Any]:
    """(TTFT, total, tokens, usage) of a streaming Generate call, client-side."""
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    usage = None
    async for chunk in call:
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
        tokens.extend(chunk.token_ids)
        if chunk.HasField("usage"):
            usage = chunk.usage
    total = time.perf_counter() - start
    return first if first is not None else total, total, tokens, usage


async def bench_generate(
    d: Daemon, reps: int, block: int, emit: Callable[[dict[str, Any]], None]
) -> None:
    # A lease held for the whole phase (the longest TTL), and the worker's endpoint from it.
    hold = d.scheduler[0].Acquire(
        scheduler_pb2.AcquireRequest(model=MODEL, lease_ttl=duration_pb2.Duration(seconds=3600))
    )
    while not (event := await hold.read()).HasField("ready"):
        pass
    lease, endpoint = event.ready.lease_id, event.ready.worker_endpoint
    worker_channel = grpc.aio.insecure_channel(endpoint)
    worker = worker_pb2_grpc.WorkerStub(worker_channel)
    worker_pid = (await worker.Status(worker_pb2.WorkerStatusRequest())).pid
    scheduler = d.scheduler[0]

    def call(path: str, max_tokens: int) -> Any:
        if path == "direct":
            forward = worker_pb2.WorkerGenerateRequest(
                prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParams(
                    max_tokens=max_tokens, temperature=0, ignore_eos=True
                ),
            )
            return worker.Generate(forward, timeout=60)
        if path == "lease":
            return scheduler.Generate(request(max_tokens, lease_id=lease), timeout=60)
        return scheduler.Generate(request(max_tokens, model=MODEL), timeout=60)

    try:
        for max_tokens in (1, 16):
            samples: dict[str, dict[str, list[float]]] = {
                p: {"ttft": [], "total": [], "s_ttft": [], "s_total": [], "d_cpu": [], "w_cpu": []}
                for p in PATHS
            }
            tokens_seen: dict[str, set[tuple[int, ...]]] = {p: set() for p in PATHS}
            for path in PATHS:  # warm-up
                for _ in range(5):
                    await timed_stream(call(path, max_tokens))
            for b in range(max(1, reps // block)):
                order = PATHS[b % 3 :] + PATHS[: b % 3]
                for path in order:
                    s = samples[path]
                    d_cpu, w_cpu = cpu_seconds(d.proc.pid), cpu_seconds(worker_pid)
                    for _ in range(block):
                        ttft, total, tokens, usage = await timed_stream(call(path, max_tokens))
                        s["ttft"].append(ttft)
                        s["total"].append(total)
                        s["s_ttft"].append(usage.timings.first_token.ToNanoseconds() / 1e9)
                        s["s_total"].append(usage.timings.total.ToNanoseconds() / 1e9)
                        tokens_seen[path].add(tuple(tokens))
                    s["d_cpu"].append((cpu_seconds(d.proc.pid) - d_cpu) / block)
                    s["w_cpu"].append((cpu_seconds(worker_pid) - w_cpu) / block)
            direct = samples["direct"]
            base_ttft = statistics.median(direct["ttft"])
            base_total = statistics.median(direct["total"])
            for path in PATHS:
                s = samples[path]
                ttft, total = statistics.median(s["ttft"]), statistics.median(s["total"])
                emit(
                    {
                        "phase": "generate",
                        "path": path,
                        "max_tokens": max_tokens,
                        "n": len(s["total"]),
                        "ttft_p50_ms": ttft * 1e3,
                        "ttft_p90_ms": percentile(s["ttft"], 90) * 1e3,
                        "total_p50_ms": total * 1e3,
                        "total_p90_ms": percentile(s["total"], 90) * 1e3,
                        # `usage.timings` as the answering process measured them: the worker
                        # for the direct call, torpord (from the request's arrival) when it
                        # proxies; the rest of the client's time is the transport to it
                        "server_ttft_p50_ms": statistics.median(s["s_ttft"]) * 1e3,
                        "server_total_p50_ms": statistics.median(s["s_total"]) * 1e3,
                        "ttft_overhead_ms": (ttft - base_ttft) * 1e3,
                        "ttft_ratio": ttft / base_ttft,
                        "total_overhead_ms": (total - base_total) * 1e3,
                        "total_ratio": total / base_total,
                        # means: a block is a few clock ticks, their sum is what counts
                        "daemon_cpu_ms_per_request": statistics.fmean(s["d_cpu"]) * 1e3,
                        "worker_cpu_ms_per_request": statistics.fmean(s["w_cpu"]) * 1e3,
                        "same_tokens_as_direct": tokens_seen[path] == tokens_seen["direct"]
                        and len(tokens_seen[path]) == 1,
                    }
                )
    finally:
        await worker_channel.close()
        await scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=lease), timeout=30)
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await hold.read() is not grpc.aio.EOF:
                pass


# -- report -----------------------------------------------------------------------------------


def print_table(records: list[dict[str, Any]]) -> None:
    print()
    print("Acquire on a resident model, N concurrent clients (ms; floor: health Watch, same")
    print("shape, and unary Check/GetStatus; cpu: ms of CPU per call until all are answered)")
    print(
        f"{'N':>5} {'rpc':<13} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} "
        f"{'calls/s':>8} {'d.cpu':>6} {'c.cpu':>6}  errors"
    )
    for r in records:
        if r.get("phase") != "acquire":
            continue
        d_cpu = r.get("grant_daemon_cpu_ms_per_call", r["daemon_cpu_ms_per_call"])
        c_cpu = r.get("grant_client_cpu_ms_per_call", r["client_cpu_ms_per_call"])
        print(
            f"{r['clients']:>5} {r['rpc']:<13} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['throughput_per_s']:>8.0f} "
            f"{d_cpu:>6.2f} {c_cpu:>6.2f}  {r['errors'] or '-'}"
        )
    print()
    print("Generate, sequential, one greedy request (ms, medians; overhead against direct)")
    print(
        f"{'tok':>4} {'path':<9} {'ttft':>7} {'total':>7} {'+ttft':>7} {'x':>6} "
        f"{'+total':>7} {'x':>6} {'server':>7} {'d.cpu':>6} {'w.cpu':>6} {'same':>5}"
    )
    for r in records:
        if r.get("phase") != "generate":
            continue
        print(
            f"{r['max_tokens']:>4} {r['path']:<9} {r['ttft_p50_ms']:>7.2f} "
            f"{r['total_p50_ms']:>7.2f} {r['ttft_overhead_ms']:>7.2f} {r['ttft_ratio']:>6.2f} "
            f"{r['total_overhead_ms']:>7.2f} {r['total_ratio']:>6.2f} "
            f"{r['server_total_p50_ms']:>7.2f} {r['daemon_cpu_ms_per_request']:>6.2f} "
            f"{r['worker_cpu_ms_per_request']:>6.2f} "
            f"{r['same_tokens_as_direct']!s:>5}"
        )


async def run(args: argparse.Namespace) -> None:
    import torch

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    with tempfile.TemporaryDirectory(prefix="torpor-bench-") as tmp, out.open("a") as sink:

        def emit(record: dict[str, Any]) -> None:
            record = {"bench": "daemon", "at": stamp, **record}
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        work = Path(tmp)
        spec = DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024, seed=0)
        model_dir = make_demo(work / "models" / MODEL, spec)
        fp = estimate(model_dir, "float32", MAX_BATCH, MAX_SEQ_LEN, cuda=False).resident
        d = Daemon(work, model_dir, 2 * fp, args.channels, args.profile_daemon, args.worker_threads)
        try:
            t0 = time.perf_counter()
            await d.wait_serving()
            started = time.perf_counter() - t0
            await d.scheduler[0].RegisterModel(
                scheduler_pb2.RegisterModelRequest(
                    spec=common_pb2.ModelSpec(
                        name=MODEL,
                        source=str(model_dir),
                        dtype=common_pb2.DTYPE_FLOAT32,
                        max_batch=MAX_BATCH,
                        max_seq_len=MAX_SEQ_LEN,
                    )
                ),
                timeout=60,
            )
            t0 = time.perf_counter()
            _, cold, _, _ = await timed_stream(
                d.scheduler[0].Generate(request(1, model=MODEL), timeout=120)
            )
            runtime = await d.runtime()
            emit(
                {
                    "phase": "setup",
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                    "machine": platform.machine(),
                    "kernel": platform.release(),
                    "python": platform.python_version(),
                    "grpcio": grpc.__version__,
                    "commit": git_describe(),
                    "torch": torch.__version__,
                    "torch_threads_default": torch.get_num_threads(),
                    "worker_threads": args.worker_threads or "default",
                    "model": {
                        "layers": spec.layers,
                        "hidden": spec.hidden,
                        "heads": spec.heads,
                        "kv_heads": spec.kv_heads,
                        "vocab": spec.vocab,
                        "dtype": "float32",
                        "footprint_bytes": fp,
                    },
                    "prompt_tokens": len(PROMPT),
                    "channels": args.channels,
                    "torpord_start_s": started,
                    "cold_generate_s": cold,
                    "state": common_pb2.RuntimeState.Name(runtime.state),
                }
            )
            await bench_acquire(d, args.clients, args.rounds, emit)
            idle = await wait_idle(d)
            emit({"phase": "idle_wait", "before": "generate", **idle})
            await bench_generate(d, args.reps, args.block, emit)
        finally:
            t0 = time.perf_counter()
            status = await d.stop()
            stop_s = time.perf_counter() - t0
            emit(
                {
                    "phase": "teardown",
                    "torpord_exit_status": status,
                    "stop_s": stop_s,
                    "loadavg": os.getloadavg(),
                }
            )
    print_table(records)
    print(f"\nwrote {len(records)} records to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/daemon.jsonl"))
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 100, 1000],
        help="concurrency levels for Acquire, comma-separated (default 1,100,1000)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="Acquire rounds per level")
    parser.add_argument("--channels", type=int, default=4, help="client channels (connections)")
    parser.add_argument("--reps", type=int, default=300, help="Generate requests per path")
    parser.add_argument("--block", type=int, default=5, help="Generate requests per block")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for the worker (0: torch's default). 1 by default: on a small "
        "machine shared with torpord and the clients, more intra-op threads spin-wait on "
        "every core and turn any preemption into a long stall",
    )
    parser.add_argument(
        "--profile-daemon",
        type=Path,
        help="run torpord under cProfile, stats to this file (inflates every figure)",
    )
    args = parser.parse_args()
    if args.profile_daemon:
        args.profile_daemon = args.profile_daemon.resolve()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
