"""torpord's socket path helpers (scheduler/server.py `_prepare`, `remove_stale_socket`):
only a stale socket, one nothing answers on, is ever removed (issue 12)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.errors import FailedPrecondition
from torpor.scheduler.server import _prepare, remove_stale_socket


def stale_socket(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # closed without unlinking: what a crash leaves
    return path


@pytest.fixture
def live_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        yield path


def test_a_missing_path_is_prepared(tmp_path: Path) -> None:
    _prepare(tmp_path / "sub" / "torpord.sock")
    assert (tmp_path / "sub").is_dir()


def test_a_stale_socket_is_removed(tmp_path: Path) -> None:
    path = stale_socket(tmp_path / "torpord.sock")
    _prepare(path)
    assert not path.exists()
    remove_stale_socket(stale_socket(path))
    assert not path.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_what_is_not_a_socket_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "torpord.sock"
    if kind == "file":
        path.write_text("data")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(stale_socket(tmp_path / "target.sock"))
    with pytest.raises(FailedPrecondition, match="is not a socket") as refused:
        _prepare(path)
    assert refused.value.reason == "SOCKET_PATH_IN_USE" and str(path) in str(refused.value)
    remove_stale_socket(path)
    assert path.exists() or path.is_symlink()


def test_a_live_socket_is_refused_and_kept(live_socket: Path) -> None:
    with pytest.raises(FailedPrecondition, match="another server") as refused:
        _prepare(live_socket)
    assert refused.value.reason == "SOCKET_PATH_IN_USE"
    remove_stale_socket(live_socket)
    assert live_socket.is_socket()
