"""The worker's side of the keeper (keeper.py), and a handle on a keeper process.

`KeeperClient` is one connection, one request at a time. Any trouble with the connection is
`Unavailable` (reason KEEPER_GONE), and the next request connects again; the copies a lost
connection held are gone, so `held` tells a caller whether to hold again. Errors the keeper
answers keep their torpor code.
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
from torpor.log import get_logger
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.host import HostBuffer
from torpor.worker.pager.wire import Receiver, send

log = get_logger("pager.keeper")

HOLD_TIMEOUT_S = 600.0
"""Locking a copy runs at about 5 GB/s: a 72 GB copy takes 12 to 15 s."""
FILL_TIMEOUT_S = 120.0


class KeeperClient:
    """A worker's connection to the keeper of its GPU. Thread-safe (one request at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._receiver: Receiver | None = None
        self._lock = threading.Lock()
        self._held: set[str] = set()  # names held on the current connection

    def held(self, name: str) -> bool:
        """Whether the keeper holds `name` (on this connection: a lost one held nothing)."""
        return name in self._held

    def hello(self) -> dict[str, Any]:
        return self._request({"op": "hello"}, [], FILL_TIMEOUT_S)

    def hold(self, name: str, buffer: HostBuffer) -> dict[str, Any]:
        """Have the keeper map and lock `buffer` (made `shared`); returns when it is locked."""
        fd = buffer.share()
        try:
            reply = self._request(
                {"op": "hold", "name": name, "nbytes": buffer.nbytes}, [fd], HOLD_TIMEOUT_S
            )
        finally:
            os.close(fd)
        self._held.add(name)
        return reply

    def fill(self, name: str, arena: Arena, nbytes: int) -> dict[str, Any]:
        """Have the keeper copy the first `nbytes` of copy `name` into the mapped `arena`."""
        exported = arena.export(nbytes)
        try:
            return self._request(
                {"op": "fill", "name": name, "nbytes": nbytes, "sizes": [n for _, n in exported]},
                [fd for fd, _ in exported],
                FILL_TIMEOUT_S,
            )
        finally:
            for fd, _ in exported:
                os.close(fd)

    def drop(self, name: str) -> None:
        """Have the keeper let go of copy `name` (nothing if it does not hold it)."""
        if name in self._held:
            self._held.discard(name)
            self._request({"op": "drop", "name": name}, [], FILL_TIMEOUT_S)

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _request(self, message: dict[str, Any], fds: list[int], timeout: float) -> dict[str, Any]:
        with self._lock:
            try:
                sock, receiver = self._connect()
                sock.settimeout(timeout)
                send(sock, message, fds)
                reply, extra = receiver.recv()
                for fd in extra:
                    os.close(fd)
            except (OSError, EOFError, Unavailable) as exc:
                self._disconnect()
                raise Unavailable(
                    f"the keeper at {self.path} did not answer {message.get('op')}: {exc!r}",
                    reason="KEEPER_GONE",
                    metadata={"socket": str(self.path)},
                ) from exc
        if not reply.get("ok"):
            raise error_for(
                Code(reply.get("code", "INTERNAL")),
                f"the keeper refused {message.get('op')}: {reply.get('error')}",
                reason=reply.get("reason"),
            )
        return reply

    def _connect(self) -> tuple[socket.socket, Receiver]:
        if self._sock is None or self._receiver is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self._sock, self._receiver = sock, Receiver(sock)
        return self._sock, self._receiver

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._receiver is not None:
            self._receiver.close()
        self._sock, self._receiver = None, None
        self._held.clear()


class KeeperProcess:
    """A keeper process started here, for one device: `start` waits until it listens."""

    def __init__(self, path: Path, device: str, python: str = sys.executable) -> None:
        self.path = Path(path)
        self.device = device
        self.python = python
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> KeeperProcess:
        """Spawn it and wait for its `ready` (Unavailable KEEPER_FAILED if it never comes)."""
        command = [self.python, "-m", "torpor.worker.pager.keeper"]
        command += ["--socket", str(self.path), "--device", self.device]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
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
