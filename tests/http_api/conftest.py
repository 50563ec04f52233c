"""A real torpord (CPU backend, the three demo models of tests/daemon on one simulated device
that holds two of them) serving the OpenAI-compatible HTTP API on a loopback port of its
own, and the official `openai` SDK pointed at it."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.daemon import conftest as daemon_conftest
from tests.daemon.conftest import MODELS, Torpord, footprint_bytes, start_torpord

model_root = daemon_conftest.model_root  # the session's three demo checkpoints, shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    daemon: Torpord
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = "none", **kw: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=kw.pop("timeout", 120),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )


def serve(tmp: Path, model_root: Path, metrics_port: int = 0, **env: str) -> Served:
    port = free_port()
    daemon = start_torpord(
        tmp / "s",
        model_root,
        int(2.5 * footprint_bytes(model_root)),  # two of the three models fit
        metrics_port=metrics_port,
        TORPOR_DAEMON_RUNTIME_DIR=str(tmp / "run"),
        TORPOR_DAEMON_HTTP_LISTEN=f"127.0.0.1:{port}",
        **env,
    )
    for name in MODELS:
        daemon.register(name, model_root / name)
    return Served(daemon, port)


@pytest.fixture(scope="module")
def served(model_root: Path) -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:  # short: socket paths
        s = serve(Path(tmp), model_root)
        try:
            yield s
        finally:
            assert s.daemon.stop() == 0


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return served.client()
