"""The CLI finds the daemon where the daemon's config puts it: `default_socket` agrees with
`load_config(...).daemon.socket` without importing the config module."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.errors import InvalidArgument
from torpor.scheduler.client.target import Target, default_socket, resolve_target
from torpor.scheduler.daemon_config import load_config

ENVS = [
    {},
    {"RUNTIME_DIRECTORY": "/run/a:/run/b"},
    {"RUNTIME_DIRECTORY": "/run/a", "TORPOR_DAEMON_RUNTIME_DIR": "/tmp/rt"},
    {"RUNTIME_DIRECTORY": "/run/a", "TORPOR_DAEMON_SOCKET": "/tmp/d.sock"},
    {"TORPOR_DAEMON_RUNTIME_DIR": " ~/rt ", "TORPOR_SOCKET": "/ignored/by/both"},
]
FILES = [
    None,
    '[daemon]\nruntime_dir = "/srv/rt"\n',
    '[daemon]\nsocket = "/srv/s.sock"\n',
    '[daemon]\nsocket = "/srv/s.sock"\nruntime_dir = "/srv/rt"\n[policy]\nqueue_bound = 3\n',
]


@pytest.mark.parametrize("toml", FILES)
@pytest.mark.parametrize("env", ENVS)
def test_default_socket_is_the_daemons(
    tmp_path: Path, env: dict[str, str], toml: str | None
) -> None:
    config = tmp_path / "torpord.toml"
    if toml is not None:
        config.write_text(toml)
    env = {**env, "TORPOR_CONFIG": str(config)}
    daemon = load_config(config if toml is not None else None, env=env).daemon.socket
    assert default_socket(env) == daemon


def test_a_broken_config_file_falls_back_to_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "torpord.toml"
    config.write_text("[daemon\nsocket = ")
    env = {"TORPOR_CONFIG": str(config), "RUNTIME_DIRECTORY": "/run/x"}
    assert default_socket(env) == Path("/run/x/torpord.sock")


def test_resolve_target() -> None:
    env = {"TORPOR_CONFIG": "/nonexistent"}
    assert resolve_target(None, None, env) == Target(socket=Path("/run/torpor/torpord.sock"))
    assert resolve_target(Path("/s.sock"), None, env).grpc_target == "unix:/s.sock"
    assert resolve_target(None, "[::1]:0080", env).grpc_target == "[::1]:80"
    for bad in ("localhost", ":80", "host:http", "host:70000"):
        with pytest.raises(InvalidArgument, match="HOST:PORT"):
            resolve_target(None, bad, env)
    with pytest.raises(InvalidArgument, match="not both"):
        resolve_target(Path("/s.sock"), "h:1", env)
