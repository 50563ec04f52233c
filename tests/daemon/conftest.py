"""A real torpord (a subprocess, CPU backend, SQLite in a temp dir) and three small demo
models, for the daemon's integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from torpor.errors import TorporError
from torpor.rpc_status import from_rpc_error
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from torpor.worker.engine.demo import DemoSpec, make_demo

MODELS = ("alpha", "beta", "gamma")
MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("daemon-models")
    for seed, name in enumerate(MODELS):
        # About 8 MiB each: the simulated device (16 MiB at least) holds two of three.
        make_demo(
            root / name, DemoSpec(layers=2, hidden=256, heads=4, kv_heads=2, vocab=1024, seed=seed)
        )
    return root


def footprint_bytes(model_root: Path) -> int:
    return estimate(model_root / "alpha", "float32", 4, MAX_SEQ_LEN, cuda=False).resident


@dataclass
class Torpord:
    """A running torpord and stubs connected to it."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    socket: Path
    channel: grpc.Channel

    @property
    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel)

    def register(self, name: str, source: Path, **spec: object) -> common_pb2.Model:
        fields = {
            "dtype": common_pb2.DTYPE_FLOAT32,
            "max_batch": 4,
            "max_seq_len": MAX_SEQ_LEN,
            **spec,
        }
        request = scheduler_pb2.RegisterModelRequest(
            spec=common_pb2.ModelSpec(name=name, source=str(source), **fields)
        )
        return call(self.scheduler.RegisterModel, request).model

    def generate(
        self, model: str, ids: list[int], max_tokens: int = 8, **kw: object
    ) -> list[common_pb2.GenerateChunk]:
        request = scheduler_pb2.GenerateRequest(
            model=model,
            prompt_token_ids=common_pb2.TokenIds(ids=ids),
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True
            ),
            **kw,
        )
        return call(self.scheduler.Generate, request, timeout=120)

    def residency(self) -> admin_pb2.ListResidencyResponse:
        return call(self.admin.ListResidency, admin_pb2.ListResidencyRequest(include_cold=True))

    def runtime(self, model: str) -> admin_pb2.RuntimeInfo:
        return next(r for r in self.residency().runtimes if r.model == model)

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def call(method, request, timeout: float = 60):
    """A unary or streaming call; a TorporError instead of an RpcError."""
    try:
        result = method(request, timeout=timeout)
        return list(result) if hasattr(result, "__next__") else result
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def start_torpord(
    state_dir: Path,
    model_root: Path,
    memory: int,
    metrics_port: int = 0,
    backend: str = "cpu",
    stderr: Any = None,
    **env: str,
) -> Torpord:
    """torpord on `memory` bytes of one simulated device; `stderr` (a file) captures its log.
    With backend="cuda" it runs on the host's GPUs instead (`memory` unused; the gpu-marked
    faults of tests/reliability)."""
    socket = state_dir / "torpord.sock"
    environ = {
        **os.environ,
        "TORPOR_DAEMON_MODEL_ROOTS": str(model_root),
        # Its own runtime directory: worker records there belong to this torpord alone.
        "TORPOR_DAEMON_RUNTIME_DIR": str(state_dir / "run"),
        "TORPOR_POLICY_MIN_RESIDENCY_S": "0",
        "TORPOR_DAEMON_LOG_LEVEL": "warning",
        **env,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.scheduler.daemon",
            "--state-dir",
            str(state_dir),
            "--socket",
            str(socket),
            "--metrics-port",
            str(metrics_port),
            *(
                ["--backend", "cpu", "--cpu-devices", "1", "--cpu-device-memory", str(memory)]
                if backend == "cpu"
                else ["--backend", backend]
            ),
        ],
        env=environ,
        stderr=stderr,
    )
    channel = grpc.insecure_channel(f"unix://{socket}")
    try:
        ready = grpc.channel_ready_future(channel)
        for _ in range(120):  # 60 s, but stop at once if torpord exits
            try:
                ready.result(timeout=0.5)
                break
            except grpc.FutureTimeoutError:
                if proc.poll() is not None:
                    raise AssertionError(f"torpord exited with status {proc.returncode}") from None
        else:
            raise AssertionError("torpord did not serve within 60 s")
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    except BaseException:
        proc.kill()
        raise
    return Torpord(proc, state_dir, socket, channel)


@pytest.fixture
def torpord(tmp_path: Path, model_root: Path) -> Iterator[Torpord]:
    """torpord on one simulated device that holds two of the three models."""
    daemon = start_torpord(
        tmp_path / "state", model_root, memory=int(2.5 * footprint_bytes(model_root))
    )
    for name in MODELS:
        daemon.register(name, model_root / name)
    yield daemon
    assert daemon.stop() == 0


__all__ = ["MODELS", "TorporError", "Torpord", "call", "start_torpord"]
