"""Security: a second local user, created for the test, reaches nothing of a running torpord
(issue 12, "Standing suites").

The test adds a throwaway user (random name, no home, no login shell; deleted at teardown)
and runs tests/reliability/stranger_probe.py as that user (`runuser`). torpord runs as this
user (root here) with its state dir and its runtime dir under a 0755 parent, as /var/lib and
/run are, so that only torpord's own modes stand in the way. The stranger must not:
connect to the daemon's Unix socket or to a worker's; list the state dir or the runtime dir;
read catalog.db, the store id, a chunk file, a worker record or the tokens file (made by
`torpor token new --append`); call Admin over TCP without a token or with a wrong one.
Skipped, saying why, without root, useradd or runuser.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import MODELS, call, footprint_bytes, start_torpord
from torpor.scheduler.daemon_config import DaemonSection
from torpor.v1 import admin_pb2, common_pb2

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
TORPOR_CLI = (sys.executable, "-m", "torpor.cli")
HAS_TCP_AUTH = "tokens_file" in {f.name for f in dataclasses.fields(DaemonSection)}

CHECKS = [
    pytest.param("daemon_socket"),
    pytest.param("worker_socket"),
    pytest.param("state_dir_listing"),
    pytest.param("catalog_db"),
    pytest.param("store_id"),
    pytest.param("chunk_file"),
    pytest.param("runtime_dir_listing"),
    pytest.param("worker_record"),
    pytest.param("tokens_file"),  # was 0644: scheduler/client/tokens.py makes it 0600
    pytest.param("tcp_without_token"),
]


@pytest.fixture(scope="module")
def stranger() -> Iterator[str]:
    """A throwaway local user; deleted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a throwaway user (useradd) and to run as it (runuser)")
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    name = f"trpx{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def probe(stranger: str, model_root: Path) -> Iterator[dict[str, str]]:
    """torpord with a model resident and one on disk; what the stranger got on each try."""
    parent = Path(tempfile.mkdtemp(prefix="torpor-sec-"))
    parent.chmod(0o755)  # like /var/lib and /run: only torpord's own modes protect its files
    port = _free_port()
    env = {"TORPOR_DAEMON_RUNTIME_DIR": str(parent / "run")}
    if HAS_TCP_AUTH:  # a tokens file made as docs/DEPLOY.md says; the stranger knows no token
        tokens = parent / "tokens"
        subprocess.run(
            [
                *TORPOR_CLI,
                "token",
                "new",
                "--scope",
                "admin",
                "--name",
                "ops",
                "--append",
                str(tokens),
            ],
            check=True,
            capture_output=True,
        )
        env["TORPOR_DAEMON_TOKENS_FILE"] = str(tokens)
    daemon = start_torpord(
        parent / "state",
        model_root,
        int(2.5 * footprint_bytes(model_root)),
        TORPOR_DAEMON_LISTEN=f"127.0.0.1:{port}",
        **env,
    )
    try:
        for name in MODELS[:2]:
            daemon.register(name, model_root / name)
        daemon.generate(MODELS[0], [1, 2, 3])  # a worker, its socket and record
        daemon.generate(MODELS[1], [1, 2, 3])
        call(
            daemon.admin.Evict,
            admin_pb2.EvictRequest(model=MODELS[1], to_tier=common_pb2.TIER_DISK),
        )
        found = [str(p) for p in parent.rglob("*") if p.is_file() or p.is_socket()]
        site = _probe_site(parent / "probe")
        command = [
            "runuser",
            "-u",
            stranger,
            "--",
            "env",
            f"PYTHONPATH={site}",
            _stranger_python(),
            str(site / "stranger_probe.py"),
            str(parent / "state"),
            str(parent / "run"),
            f"127.0.0.1:{port}",
            *found,
        ]
        result = subprocess.run(
            command, cwd=site, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        yield json.loads(result.stdout)
    finally:
        assert daemon.stop() == 0
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("check", CHECKS)
def test_second_user_reaches_nothing(probe: dict[str, str], check: str) -> None:
    assert probe[check] == "denied", f"{check}: {probe[check]}"


def _stranger_python() -> str:
    """An interpreter the stranger may run: this venv's may live under a private home (a
    pyenv in /root), so the system's python3 of the same version, given this venv's
    packages on PYTHONPATH."""
    for candidate in (f"/usr/bin/python3.{sys.version_info.minor}", sys.executable):
        if Path(candidate).exists() and _others_may_run(Path(candidate)):
            return candidate
    pytest.skip(f"no python3.{sys.version_info.minor} that another user may run")


def _others_may_run(path: Path) -> bool:
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def _probe_site(site: Path) -> Path:
    """The probe and what it imports (grpc, protobuf, torpor's stubs), copied where the
    stranger may read them: the checkout and its venv may sit under a private home (CI's
    clone, say), and the editable install's path hook is not read from PYTHONPATH."""
    import google.protobuf
    import grpc
    import typing_extensions  # grpc's one dependency

    packages = (
        Path(grpc.__file__).parent,
        Path(google.protobuf.__file__).parents[1],  # google: protobuf, rpc, _upb
        REPO / "proto" / "torpor",
    )
    for package in packages:
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("*.pyc"))
    for module in (Path(typing_extensions.__file__), Path(__file__).with_name("stranger_probe.py")):
        shutil.copy(module, site)
    for path in (site, *site.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return site


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
