"""A torpord start-up that fails partway unwinds exactly what it had started (issue 13, "the
daemon's shell"), with real torpord processes on the CPU backend.

Each failure is injected at a different step: the catalog (early, right after the locks), the
metrics port, and the TCP listen address (late: after the catalog, the event log, the
recorder's sweeper, the leftover workers' stop and the models' load). Each exits 1 with one
clear line, no traceback, and leaves nothing behind: no socket, no worker record, both locks
released (no pid left in them), so the next torpord on the same directories starts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import footprint_bytes, start_torpord
from torpor.scheduler.instance import LOCK_NAME, holder_pid


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def run_torpord(
    state_dir: Path, model_root: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """torpord with start_torpord's layout (socket and runtime directory in `state_dir`),
    run to its end: one whose start-up fails exits at once."""
    environ = {
        **os.environ,
        "TORPOR_DAEMON_MODEL_ROOTS": str(model_root),
        "TORPOR_DAEMON_RUNTIME_DIR": str(state_dir / "run"),
        "TORPOR_DAEMON_LOG_LEVEL": "warning",
        **env,
    }
    argv = [sys.executable, "-m", "torpor.scheduler.daemon", "--state-dir", str(state_dir)]
    argv += ["--socket", str(state_dir / "torpord.sock"), *args]
    argv += ["--backend", "cpu", "--cpu-devices", "1", "--cpu-device-memory", "64MiB"]
    try:
        return subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("torpord kept running: its start-up did not fail") from exc


def assert_nothing_left(state_dir: Path) -> None:
    assert not (state_dir / "torpord.sock").exists()
    assert list((state_dir / "run").glob("workers/*.json")) == []
    for directory in (state_dir, state_dir / "run"):  # released: its pid cleared
        assert holder_pid(directory / LOCK_NAME) is None, directory


@pytest.fixture
def registered(tmp_path: Path, model_root: Path) -> Path:
    """A state directory whose catalog has a model, and which has run a worker."""
    state_dir = tmp_path / "state"
    daemon = start_torpord(state_dir, model_root, memory=int(2.5 * footprint_bytes(model_root)))
    daemon.register("alpha", model_root / "alpha")
    daemon.generate("alpha", [1, 2, 3], max_tokens=1)
    assert daemon.stop() == 0
    return state_dir


def test_a_listen_address_in_use_late_in_start_up_unwinds_everything(
    registered: Path, model_root: Path, busy_port: int
) -> None:
    refused = run_torpord(
        registered,
        model_root,
        "--listen",
        f"127.0.0.1:{busy_port}",
        TORPOR_DAEMON_TCP_AUTH="false",
    )
    assert refused.returncode == 1, refused.stderr
    assert f"torpord: cannot listen on 127.0.0.1:{busy_port}" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert_nothing_left(registered)
    again = start_torpord(registered, model_root, memory=int(2.5 * footprint_bytes(model_root)))
    try:
        assert [c.token_ids for c in again.generate("alpha", [1, 2, 3], max_tokens=1)]
    finally:
        assert again.stop() == 0


def test_a_metrics_port_in_use_is_refused_before_the_socket_appears(
    registered: Path, model_root: Path, busy_port: int
) -> None:
    refused = run_torpord(registered, model_root, "--metrics-port", str(busy_port))
    assert refused.returncode == 1, refused.stderr
    assert "torpord: cannot serve metrics" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert_nothing_left(registered)


def test_a_catalog_that_cannot_be_opened_unwinds_the_locks(
    tmp_path: Path, model_root: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "catalog.db").write_bytes(b"not a database, " * 512)
    refused = run_torpord(state_dir, model_root, "--metrics-port", "0")
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("torpord: "), refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert_nothing_left(state_dir)
