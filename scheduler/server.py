"""torpord's gRPC server: Scheduler, Admin, the standard health service and reflection, on a
Unix socket (mode from the config, 0660 by default) and optionally on TCP."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from torpor.errors import FailedPrecondition
from torpor.scheduler.admin import AdminService
from torpor.scheduler.api import SchedulerService
from torpor.scheduler.decoding import DecodeGuard
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
        self.server = grpc.aio.server(interceptors=[DecodeGuard()])
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


def _prepare(socket: Path) -> None:
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # a socket file left by a crash


def _remove(socket: Path) -> None:
    socket.unlink(missing_ok=True)
