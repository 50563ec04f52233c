"""Progress bars appear on a terminal and nowhere else: the CLI runs on a pseudo-terminal,
and `--json` there is still exactly one JSON document."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess

from rich.console import Console

from tests.cli.conftest import Cli, client_env
from tests.cli.fake_daemon import FakeTorpord
from torpor.scheduler.client.progress import TerminalProgress
from torpor.scheduler.client.streams import _until_ready
from torpor.v1 import common_pb2, scheduler_pb2

ACQUIRE = scheduler_pb2.AcquireEvent
MiB = 1024**2


def on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal; its status and output."""
    primary, secondary = pty.openpty()
    env = client_env(TERM="xterm-256color", COLUMNS="160")
    proc = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_evict_on_a_terminal_shows_progress(cli: Cli) -> None:
    code, out = on_a_terminal(cli.argv("evict", "demo-a", "--to", "host"))
    assert code == 0, out
    assert "evicting demo-a (rt-a0) to host" in out and "90.0/90.0 MiB" in out
    assert "evicted demo-a (rt-a0): now suspended_host" in out


def test_json_on_a_terminal_has_no_progress(cli: Cli) -> None:
    code, out = on_a_terminal(cli.argv("evict", "demo-a", "--to", "host", "--json"))
    assert code == 0, out
    assert "\x1b" not in out
    assert json.loads(out)["runtimes"][0]["runtime_id"] == "rt-a0"


def test_progress_is_off_on_a_pipe(cli: Cli, daemon: FakeTorpord) -> None:
    proc = cli("generate", "demo-a", "hi", "--max-tokens", "2")
    assert proc.stdout == "Once upon\n" and "waiting" not in proc.stderr
    assert cli.ok("evict", "demo-a", "--to", "host").count("\n") == 1


def test_acquire_progress_shows_queue_evictions_and_restore_bytes() -> None:
    events = [
        ACQUIRE(queued=ACQUIRE.Queued(position=1, queue_depth=2)),
        ACQUIRE(evicting=ACQUIRE.Evicting(victims=[common_pb2.Victim(
            model="demo-a", gpu=0, to_tier=common_pb2.TIER_DISK, bytes_freed=64 * MiB)])),
        ACQUIRE(restoring=common_pb2.TransferProgress(
            tier=common_pb2.TIER_HOST, bytes_done=32 * MiB, bytes_total=64 * MiB)),
        ACQUIRE(restoring=common_pb2.TransferProgress(
            tier=common_pb2.TIER_HOST, bytes_done=64 * MiB, bytes_total=64 * MiB)),
        ACQUIRE(ready=ACQUIRE.Ready(lease_id="l-1", gpu=0)),
        ACQUIRE(queued=ACQUIRE.Queued()),  # never read: READY ends the wait
    ]  # fmt: skip
    screen = io.StringIO()
    view = TerminalProgress(Console(file=screen, force_terminal=True, width=120))
    messages = iter(events)
    ready = _until_ready(messages, view, "demo-c")
    assert ready.lease_id == "l-1" and next(messages).HasField("queued")
    out = screen.getvalue()
    assert "demo-c: queued, 1 ahead (2 in queue)" in out
    assert "evicting demo-a from gpu 0 to disk, freeing 64.0 MiB" in out
    assert "restoring demo-c from host" in out and "64.0/64.0 MiB" in out
