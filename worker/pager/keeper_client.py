"""The worker's side of the keeper (keeper.py). How to start one, and its wire, are in the
shared package (`torpor.keeper`, `torpor.fdwire`): torpord starts keepers without importing
the worker.

`KeeperClient` is one connection, one request at a time. Any trouble with the connection is
`Unavailable` (reason KEEPER_GONE), and the next request connects again; the copies a lost
connection held are gone, so `held` tells a caller whether to hold again. Errors the keeper
answers keep their torpor code.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from torpor.errors import Unavailable
from torpor.fdwire import Receiver
from torpor.keeper import answer, connect, exchange
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.host import HostBuffer

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
        """The keeper's pid, device and held bytes, on this client's connection."""
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
                if self._sock is None or self._receiver is None:
                    self._sock = connect(self.path, timeout)
                    self._receiver = Receiver(self._sock)
                reply = exchange(self._sock, self._receiver, self.path, message, fds, timeout)
            except Unavailable:
                self._disconnect()
                raise
        return answer(reply, str(message.get("op")))

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._receiver is not None:
            self._receiver.close()
        self._sock, self._receiver = None, None
        self._held.clear()
