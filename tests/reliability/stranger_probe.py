"""Run as a second local user by test_security_user.py: try to reach one torpord's files and
sockets, and print what each try gave, as JSON {check: "denied" | "allowed: ..."}.

Usage: python -m tests.reliability.stranger_probe STATE_DIR RUNTIME_DIR TCP_ADDRESS
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path


def _try(action: Callable[[], object]) -> str:
    try:
        result = action()
    except PermissionError:
        return "denied"
    except OSError as exc:
        return f"error: {exc!r}"
    return f"allowed: {result!r}"[:300]


def _connect(path: Path) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
    return "connected"


def _read(path: Path) -> int:
    with open(path, "rb") as f:
        return len(f.read(64))


def _first(pattern: str, root: Path, found: list[str]) -> Path:
    """A path the test found as root (passed in argv), so that a denied listing does not
    hide whether the file itself is readable."""
    for p in found:
        if Path(p).match(pattern):
            return Path(p)
    return root / "missing"


def _tcp(address: str) -> str:
    """Admin and Scheduler calls over TCP with no token and with a wrong one."""
    try:
        import grpc

        from torpor.v1 import admin_pb2, admin_pb2_grpc
    except ImportError as exc:
        return f"error: {exc!r}"

    out = []
    with grpc.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for metadata in (None, (("authorization", "Bearer not-a-token"),)):
            try:
                admin.ListResidency(admin_pb2.ListResidencyRequest(), timeout=10, metadata=metadata)
                out.append("served")
            except grpc.RpcError as exc:
                out.append(exc.code().name)
    if all(code in ("UNAUTHENTICATED", "PERMISSION_DENIED") for code in out):
        return "denied"
    return f"allowed: {out}"


def main() -> None:
    state, runtime, address, *paths = sys.argv[1:]
    state_dir, run_dir = Path(state), Path(runtime)
    checks = {
        "daemon_socket": lambda: _connect(state_dir / "torpord.sock"),
        "state_dir_listing": lambda: sorted(os.listdir(state_dir)),
        "catalog_db": lambda: _read(state_dir / "catalog.db"),
        "chunk_file": lambda: _read(_first("*/chunks/??/??/*", state_dir, paths)),
        "store_id": lambda: _read(state_dir / "snapshots" / "store-id"),
        "runtime_dir_listing": lambda: sorted(os.listdir(run_dir / "workers")),
        "worker_record": lambda: _read(_first("*/workers/*.json", run_dir, paths)),
        "worker_socket": lambda: _connect(_first("*/workers/*.sock", run_dir, paths)),
        "tokens_file": lambda: _read(state_dir.parent / "tokens"),
    }
    result = {name: _try(action) for name, action in checks.items()}
    result["tcp_without_token"] = _tcp(address)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
