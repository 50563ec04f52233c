"""Where the CLI finds torpord: `--address HOST:PORT`, `--socket PATH`, `$TORPOR_SOCKET`, or
the socket the daemon itself would use by default.

`default_socket` mirrors how scheduler/daemon_config.py derives `daemon.socket` (the config file,
then `TORPOR_DAEMON_*` variables, then `<runtime_dir>/torpord.sock` with systemd's
`$RUNTIME_DIRECTORY`), without importing it: the full config pulls in SQLAlchemy and checks
every key, and `torpor ps` must start fast and must not fail over an unrelated bad key.
tests/cli/test_target.py keeps the two in step.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import InvalidArgument
from torpor.paths import default_runtime_dir

SOCKET_NAME = "torpord.sock"
DEFAULT_CONFIG_PATH = Path("/etc/torpor/torpord.toml")


@dataclass(frozen=True, slots=True)
class Target:
    """A daemon endpoint: a Unix socket path or a TCP HOST:PORT (exactly one is set)."""

    socket: Path | None = None
    address: str | None = None

    @property
    def grpc_target(self) -> str:
        """The target string for `grpc.insecure_channel`."""
        return f"unix:{self.socket}" if self.socket is not None else str(self.address)

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket is not None else str(self.address)


def resolve_target(
    socket: Path | None, address: str | None, env: Mapping[str, str] | None = None
) -> Target:
    """The endpoint the options name; with neither, the daemon's default socket.

    `socket` already includes `$TORPOR_SOCKET` (typer reads the variable for `--socket`).
    """
    if socket is not None and address is not None:
        raise InvalidArgument("give --socket or --address, not both", reason="BAD_TARGET")
    if address is not None:
        return Target(address=_check_hostport(address))
    if socket is not None:
        return Target(socket=_path(str(socket)))
    return Target(socket=default_socket(os.environ if env is None else env))


def default_socket(env: Mapping[str, str]) -> Path:
    """The socket torpord listens on by default, as scheduler/daemon_config.py derives it.

    Later wins: the default (`/run/torpor` for root; torpor.paths) < `$RUNTIME_DIRECTORY` <
    the config file's `[daemon]` keys <
    `TORPOR_DAEMON_RUNTIME_DIR` / `TORPOR_DAEMON_SOCKET`; an explicit socket wins over one
    derived from a runtime directory.
    """
    file_keys = _config_file_daemon_keys(env)
    socket = env.get("TORPOR_DAEMON_SOCKET") or file_keys.get("socket")
    if socket:
        return _path(socket)
    runtime = (
        env.get("TORPOR_DAEMON_RUNTIME_DIR")
        or file_keys.get("runtime_dir")
        or env.get("RUNTIME_DIRECTORY", "").split(":")[0]  # systemd joins several with ':'
        or str(default_runtime_dir(env))
    )
    return _path(runtime) / SOCKET_NAME


def _config_file_daemon_keys(env: Mapping[str, str]) -> dict[str, str]:
    """`socket` and `runtime_dir` of the daemon's config file's [daemon] table, when the file
    is readable; an unreadable or broken file is torpord's to report, not the client's."""
    path = Path(env["TORPOR_CONFIG"]) if env.get("TORPOR_CONFIG") else DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as f:
            table = tomllib.load(f).get("daemon", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: str(table[k]) for k in ("socket", "runtime_dir") if str(table.get(k, "")).strip()}


def _path(text: str) -> Path:
    """A path as the daemon's config reads one: stripped, `~` expanded, made absolute."""
    return Path(text.strip()).expanduser().absolute()


def _check_hostport(text: str) -> str:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(
            f"--address must be HOST:PORT (e.g. 127.0.0.1:7070 or [::1]:7070), got {text!r}",
            reason="BAD_TARGET",
            metadata={"address": text},
        )
    return f"{host}:{int(port)}"
