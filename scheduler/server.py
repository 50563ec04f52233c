"""torpord's gRPC server: Scheduler, Admin, the standard health service and reflection, on a
Unix socket (mode from the config, 0660 by default) and optionally on TCP.

The two endpoints are two grpc.aio servers sharing the same servicers: the socket's file
mode is its guard, while the TCP server checks a bearer token on every call
(torpor.scheduler.auth) and serves TLS when daemon.tls_cert is set (issue 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket as pysocket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from torpor.errors import FailedPrecondition
from torpor.scheduler.admin import AdminService
from torpor.scheduler.api import SchedulerService
from torpor.scheduler.auth import TokenInterceptor, Tokens, load_tokens, server_credentials
from torpor.scheduler.decoding import DecodeGuard
from torpor.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from torpor.scheduler.daemon_config import DaemonSection

SERVICES = (
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class Server:
    """The endpoints of `config` (daemon.socket, daemon.listen), serving both services."""

    def __init__(
        self, config: DaemonSection, scheduler: SchedulerService, admin: AdminService
    ) -> None:
        self.config = config
        self.health = health.aio.HealthServicer()
        self.scheduler = scheduler
        self._admin = admin
        self.server = self._build(())
        self.tcp: grpc.aio.Server | None = None

    def _build(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
        # The token check first: a refused call's body is never decoded.
        server = grpc.aio.server(interceptors=[*interceptors, DecodeGuard()])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.scheduler, server)
        admin_pb2_grpc.add_AdminServicer_to_server(self._admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def start(self) -> None:
        cfg = self.config
        if cfg.listen:
            self.tcp = self._tcp_server(cfg)  # its files are read before the socket appears
        socket = Path(cfg.socket)
        _prepare(socket)
        self.server.add_insecure_port(f"unix://{socket}")
        await self.server.start()
        os.chmod(socket, cfg.socket_mode)
        if self.tcp is not None:
            await self.tcp.start()
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _tcp_server(self, cfg: DaemonSection) -> grpc.aio.Server:
        """The TCP endpoint, bound: the token check unless tcp_auth is off (loopback only,
        config.py makes sure), and TLS when a certificate is configured."""
        interceptors = []
        if cfg.tcp_auth:
            assert cfg.tokens_file is not None  # DaemonSection._check_tcp
            interceptors.append(TokenInterceptor(Tokens(load_tokens(cfg.tokens_file))))
        server = self._build(interceptors)
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                port = server.add_secure_port(cfg.listen, creds)
            else:
                port = server.add_insecure_port(cfg.listen)
        except RuntimeError:  # what grpc raises for an address in use (older ones return 0)
            port = 0
        if port == 0:
            raise FailedPrecondition(
                f"cannot listen on {cfg.listen}: the address is in use or not this host's; "
                "choose another daemon.listen (--listen)",
                reason="LISTEN_FAILED",
                metadata={"field": "daemon.listen", "value": cfg.listen},
            )
        return server

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        servers = [self.server] if self.tcp is None else [self.server, self.tcp]
        await asyncio.gather(*(server.stop(grace) for server in servers))
        remove_stale_socket(Path(self.config.socket))


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


def remove_stale_socket(socket: Path) -> None:
    """Once its server has stopped (torpord's at shutdown, a worker that exited): remove
    the socket, if it is still a stale socket (a path someone replaced meanwhile, or a
    server that answers on it now, is not ours any more)."""
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
