"""systemd readiness: `READY=1` (and friends) over $NOTIFY_SOCKET, as sd_notify(3) does.

No libsystemd binding is needed: the protocol is one datagram on a Unix socket whose path is
in the environment (a leading '@' means the abstract namespace).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to systemd; False when
    not run by systemd (no NOTIFY_SOCKET)."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True
