"""`make proto`: the committed stubs are current, the check notices a changed or removed
.proto, and the stubs import on the GPU hosts' grpcio and protobuf."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torpor import protogen

pytest.importorskip("grpc_tools")

# What the GPU hosts run (seen on an H200 host on 2026-11-28). Generated code refuses a
# runtime older than its generator, patch level included.
GPU_HOST_GRPCIO = (1, 84, 0)
GPU_HOST_PROTOBUF = (7, 36, 2)


def _protogen(proto_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m torpor.protogen` on the tree under `proto_root`."""
    env = {**os.environ, "PYTHONPATH": str(proto_root)}
    return subprocess.run(
        [sys.executable, "-m", "torpor.protogen", *args],
        cwd=proto_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of the repository's proto/ tree, so that the real one is never touched."""
    root = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_committed_stubs_are_current() -> None:
    result = _protogen(protogen.PROTO_ROOT, "--check")
    assert result.returncode == 0, result.stderr


def test_check_fails_after_a_proto_changes_and_passes_once_regenerated(proto_copy: Path) -> None:
    assert _protogen(proto_copy, "--check").returncode == 0
    common = proto_copy / "torpor" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\n// Added by a test.\nmessage Probe {}\n")

    stale = _protogen(proto_copy, "--check")
    assert stale.returncode == 1
    assert "common_pb2.py" in stale.stderr
    assert "scheduler_pb2.py" not in stale.stderr

    assert _protogen(proto_copy).returncode == 0
    assert _protogen(proto_copy, "--check").returncode == 0
    assert "class Probe(" in (proto_copy / "torpor" / "v1" / "common_pb2.pyi").read_text()
    assert _protogen(protogen.PROTO_ROOT, "--check").returncode == 0  # the real tree is intact


def test_check_fails_on_stubs_of_a_removed_proto(proto_copy: Path) -> None:
    (proto_copy / "torpor" / "v1" / "worker.proto").unlink()
    result = _protogen(proto_copy, "--check")
    assert result.returncode == 1
    assert "worker_pb2_grpc.py" in result.stderr

    assert _protogen(proto_copy).returncode == 0
    assert not (proto_copy / "torpor" / "v1" / "worker_pb2.py").exists()


def test_another_generator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protogen.metadata, "version", lambda name: "1.84.2")
    with pytest.raises(SystemExit, match=r"grpcio-tools==1\.84\.0 \(found 1\.84\.2\)"):
        protogen.main(["--check"])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.mark.parametrize("stub", sorted(protogen.PACKAGE_DIR.glob("*_pb2_grpc.py")), ids=str)
def test_grpc_stubs_accept_the_gpu_hosts_grpcio(stub: Path) -> None:
    found = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", stub.read_text(), re.M)
    assert found is not None
    assert found[1] == protogen.GRPC_TOOLS_VERSION
    assert _version(found[1]) <= GPU_HOST_GRPCIO


@pytest.mark.parametrize("stub", sorted(protogen.PACKAGE_DIR.glob("*_pb2.py")), ids=str)
def test_message_stubs_accept_the_gpu_hosts_protobuf(stub: Path) -> None:
    pattern = r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),"
    found = re.search(pattern, stub.read_text())
    assert found is not None
    assert tuple(int(part) for part in found.groups()) <= GPU_HOST_PROTOBUF
