"""A GPU's keeper process, as the rest of torpor sees it: how to start one, how to ask it
who it is, and how its answers become errors. The keeper itself (`python -m
torpor.worker.pager.keeper`) and the worker's client are in the worker package; torpord
starts and checks keepers with this module alone, without importing the worker or torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from torpor.errors import Code, Unavailable, error_for
from torpor.fdwire import Receiver, send
from torpor.log import get_logger

log = get_logger("pager.keeper")

HELLO_TIMEOUT_S = 5.0


def answer(reply: dict[str, Any], op: str) -> dict[str, Any]:
    """`reply` when the keeper did `op`; else its error, with the keeper's code and reason."""
    if not reply.get("ok"):
        raise error_for(
            Code(reply.get("code", "INTERNAL")),
            f"the keeper refused {op}: {reply.get('error')}",
            reason=reply.get("reason"),
        )
    return reply


def connect(path: Path, timeout_s: float) -> socket.socket:
    """A connection to the keeper at `path`; Unavailable (KEEPER_GONE) if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise _gone(path, "connect", exc) from exc
    return sock


def exchange(
    sock: socket.socket,
    receiver: Receiver,
    path: Path,
    message: dict[str, Any],
    fds: list[int],
    timeout_s: float,
) -> dict[str, Any]:
    """Send `message` with `fds` on a connection to the keeper at `path` and return its
    reply as it came (`answer` reads it); Unavailable (KEEPER_GONE) if the connection fails,
    ends or stays silent for `timeout_s`: the caller drops it."""
    try:
        sock.settimeout(timeout_s)
        send(sock, message, fds)
        reply, extra = receiver.recv()
    except (OSError, EOFError, Unavailable) as exc:
        raise _gone(path, str(message.get("op")), exc) from exc
    for fd in extra:  # a reply carries none
        os.close(fd)
    return reply


def _gone(path: Path, op: str, exc: BaseException) -> Unavailable:
    return Unavailable(
        f"the keeper at {path} did not answer {op}: {exc!r}",
        reason="KEEPER_GONE",
        metadata={"socket": str(path)},
    )


def hello(path: Path, timeout_s: float = HELLO_TIMEOUT_S) -> dict[str, Any]:
    """Ask the keeper at `path` for its pid, device and held bytes, on a connection of its
    own; Unavailable (KEEPER_GONE) if nothing answers within `timeout_s`."""
    sock = connect(path, timeout_s)
    try:
        reply = exchange(sock, Receiver(sock), path, {"op": "hello"}, [], timeout_s)
    finally:
        sock.close()
    return answer(reply, "hello")


class KeeperProcess:
    """A keeper process started here, for one device: `start` waits until it listens."""

    def __init__(
        self, path: Path, device: str, python: str = sys.executable, log_level: str = "info"
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.python = python
        self.log_level = log_level
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            *(self.python, "-m", "torpor.worker.pager.keeper"),
            *("--socket", str(self.path), "--device", self.device, "--log-level", self.log_level),
        ]

    def start(self, timeout_s: float = 120.0) -> KeeperProcess:
        """Spawn it and wait for its `ready` (Unavailable KEEPER_FAILED if it never comes)."""
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().strip()
        finally:
            timer.cancel()
        if line != "ready":
            self.stop()
            raise Unavailable(
                f"the keeper for {self.device} did not start (said {line!r})",
                reason="KEEPER_FAILED",
                metadata={"device": self.device, "socket": str(self.path)},
            )
        log.info("keeper_started", device=self.device, pid=self.proc.pid, socket=str(self.path))
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
