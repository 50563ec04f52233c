"""The keeper's wire: JSON messages with file descriptors over a Unix stream socket.

A message is a 4-byte little-endian length and that many bytes of JSON. Descriptors travel
as SCM_RIGHTS ancillary data on the message's first byte. The kernel passes at most
`MAX_FDS` per message, so a message with more goes as `{"op": "fds"}` messages carrying the
first descriptors, then the message itself with the rest; the receiver gathers them
(`Receiver`).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from torpor.errors import InvalidArgument, Unavailable

MAX_FDS = 250
"""Descriptors per message (the kernel's limit, SCM_MAX_FD, is 253)."""
MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send `message` with `fds` (not closed here: the caller still owns them)."""
    fds = list(fds or [])
    while len(fds) > MAX_FDS:
        _send_one(sock, {"op": "fds"}, fds[:MAX_FDS])
        fds = fds[MAX_FDS:]
    _send_one(sock, message, fds)


def _send_one(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    data = json.dumps(message).encode()
    frame = len(data).to_bytes(4, "little") + data
    try:
        sent = socket.send_fds(sock, [frame], fds) if fds else sock.send(frame)
        if sent < len(frame):
            sock.sendall(frame[sent:])
    except OSError as e:
        raise Unavailable(f"the keeper connection broke: {e}", reason="KEEPER_GONE") from e


class Receiver:
    """Reads messages from one socket, gathering the descriptors of `fds` messages into the
    next real one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: list[int] = []

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and its descriptors (the caller owns them); EOFError at the end."""
        while True:
            message = self._one()
            if message.get("op") != "fds":
                fds, self._fds = self._fds, []
                return message, fds

    def _one(self) -> dict[str, Any]:
        while len(self._buffer) < 4:
            self._read()
        size = int.from_bytes(self._buffer[:4], "little")
        if size > MAX_MESSAGE:
            raise InvalidArgument(f"a {size}-byte message is too long", reason="BAD_MESSAGE")
        while len(self._buffer) < 4 + size:
            self._read()
        data, self._buffer = self._buffer[4 : 4 + size], self._buffer[4 + size :]
        try:
            message = json.loads(data)
        except ValueError as e:
            raise InvalidArgument(f"a message is not JSON: {e}", reason="BAD_MESSAGE") from e
        if not isinstance(message, dict):
            raise InvalidArgument("a message must be a JSON object", reason="BAD_MESSAGE")
        return message

    def _read(self) -> None:
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, MAX_FDS + 3)
        self._fds.extend(fds)
        if not data:
            raise EOFError
        self._buffer += data

    def close(self) -> None:
        """Close descriptors received and not yet handed out."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
