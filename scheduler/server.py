"""torpord's gRPC server: Scheduler, Admin, the standard health service and reflection, on a
Unix socket (mode from the config, 0660 by default) and optionally on TCP."""

from __future__ import annotations

import contextlib
import enum
import os
import socket as pysocket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from torpor.errors import FailedPrecondition
from torpor.scheduler.admin import AdminService
from torpor.scheduler.api import SchedulerService
from torpor.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from torpor.scheduler.daemon import Daemon

SERVICES = (
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class Server:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(daemon), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(daemon), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    async def start(self) -> None:
        cfg = self.daemon.config.daemon
        socket = Path(cfg.socket)
        _prepare(socket)
        self.server.add_insecure_port(f"unix://{socket}")
        if cfg.listen and self.server.add_insecure_port(cfg.listen) == 0:
            raise FailedPrecondition(f"cannot listen on {cfg.listen}", reason="LISTEN_FAILED")
        await self.server.start()
        os.chmod(socket, cfg.socket_mode)
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        _remove(Path(self.daemon.config.daemon.socket))


def check_socket_path(socket: Path) -> None:
    """FailedPrecondition SOCKET_PATH_IN_USE unless `socket` is missing or a stale socket:
    torpord checks this at start-up, before it opens the catalog or stops any leftover."""
    _socket_state(socket)


def _prepare(socket: Path) -> None:
    """Make way for our socket: only a stale socket (one nothing answers on) is removed.

    A regular file, a directory or a socket another server answers on (a second torpord) is
    a start-up error: `--socket` never deletes what is not ours to delete (issue 12).
    """
    socket.parent.mkdir(parents=True, exist_ok=True)
    if _socket_state(socket) is _SocketState.STALE:
        socket.unlink(missing_ok=True)  # a socket file left by a crash


def _remove(socket: Path) -> None:
    """At shutdown, after the server stopped: remove our socket, if it is still a stale
    socket (a path someone replaced meanwhile is not ours any more)."""
    with contextlib.suppress(FailedPrecondition):
        if _socket_state(socket) is _SocketState.STALE:
            socket.unlink(missing_ok=True)


class _SocketState(enum.Enum):
    MISSING = "missing"
    STALE = "stale"  # a socket file that nothing answers on


def _socket_state(path: Path) -> _SocketState:
    """MISSING or STALE; FailedPrecondition SOCKET_PATH_IN_USE for anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return _SocketState.MISSING
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(
            f"socket path {path} exists and is not a socket; torpord will not remove it: "
            "choose another daemon.socket (--socket), or move the file away",
            reason="SOCKET_PATH_IN_USE",
            metadata={"socket": path},
        )
    if _answers(path):
        raise FailedPrecondition(
            f"socket path {path} is in use: another server (a second torpord?) answers on it; "
            "stop it first, or choose another daemon.socket (--socket)",
            reason="SOCKET_PATH_IN_USE",
            metadata={"socket": path},
        )
    return _SocketState.STALE


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket `path` (refused: stale)."""
    with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:  # a full backlog: someone listens, and is busy
            return True
        except OSError as exc:  # EACCES and the like: not ours to judge, nor to remove
            raise FailedPrecondition(
                f"cannot tell whether socket path {path} is in use ({exc}); torpord will not "
                "remove it: choose another daemon.socket (--socket)",
                reason="SOCKET_PATH_IN_USE",
                metadata={"socket": path},
            ) from exc
    return True
