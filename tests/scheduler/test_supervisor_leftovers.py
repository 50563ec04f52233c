"""Leftover keepers are stopped only when /proc shows the pid a keeper socket names is a keeper
on that socket (issue 12): a pid is never taken on trust."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from torpor.fdwire import Receiver, send
from torpor.scheduler.keepers import Keepers


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture
def fake_keeper_socket(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A stand-in keeper: a socket in the keepers directory whose `hello` names the pid in
    the list it yields (set by the test), as a confused or hostile process might."""
    path = tmp_path / "run" / "keepers" / "cuda-0.sock"
    path.parent.mkdir(parents=True)
    named: list[int] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                Receiver(conn).recv()
                send(conn, {"ok": True, "pid": named[0], "device": "cuda:0"})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, named
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(5)


async def test_a_keeper_socket_naming_a_pid_that_is_no_keeper_gets_it_no_signal_stand_in(
    fake_keeper_socket: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, named = fake_keeper_socket
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    named.append(bystander.pid)
    try:
        with capture_logs() as logs:
            assert await Keepers(tmp_path / "run").stop_leftovers(grace_s=1) == []
        assert running(bystander.pid) and path.is_socket()  # neither signalled nor removed
        events = [e for e in logs if e["event"] == "leftover_keeper_not_ours"]
        assert [e["pid"] for e in events] == [bystander.pid]
        assert "not a torpor.worker.pager.keeper process" in events[0]["why"]
    finally:
        bystander.kill()
        await bystander.wait()
