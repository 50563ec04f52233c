"""Fixtures of the client CLI's tests: a fake torpord on a Unix socket, and the real `torpor`
CLI run as a subprocess against it (to completion, or running until it is stopped)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.fake_daemon import FakeTorpord

TORPOR = [sys.executable, "-m", "torpor.cli"]


def client_env(**extra: str) -> dict[str, str]:
    """The environment without any TORPOR_* or systemd variable of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    env.pop("RUNTIME_DIRECTORY", None)
    env["TORPOR_CONFIG"] = "/nonexistent/torpord.toml"  # not the host's /etc/torpor one
    return {**env, **extra}


class Cli:
    """`torpor --socket <the fake's socket> ...` as a subprocess."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def argv(self, *args: str) -> list[str]:
        return [*TORPOR, "--socket", str(self.socket), *args]

    def __call__(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=60, env=env or client_env()
        )

    def ok(self, *args: str) -> str:
        """stdout of a command that must succeed without a word on stderr."""
        proc = self(*args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def json(self, *args: str) -> Any:
        """The one JSON document a `--json` command prints."""
        return json.loads(self.ok(*args))

    def fails(self, code: int, *args: str) -> str:
        """The one-line reason of a command that must exit with `code`."""
        proc = self(*args)
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("torpor: error: "), proc.stderr
        return lines[0]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short temporary directory: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:
        yield Path(tmp)


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[FakeTorpord]:
    with FakeTorpord(socket_dir / "torpord.sock") as fake:
        yield fake


@pytest.fixture
def cli(daemon: FakeTorpord) -> Cli:
    return Cli(daemon.socket)


def _default_sigint() -> None:
    """In the child: Ctrl-C's default disposition. A suite started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so the CLI could not be stopped the way a user stops it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A CLI subprocess whose stdout lines arrive on a queue, read by a thread, so that a
    test waits for a line with a deadline instead of blocking forever."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
            preexec_fn=_default_sigint,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {timeout} s: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def output(self, timeout: float = 30.0) -> str:
        """All of stdout (the lines waited for included), once the process has ended."""
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)

    def stop(self, signum: int) -> tuple[int, str]:
        """Send `signum`; the exit status and stderr (a process that does not end within
        30 s fails the test instead of hanging it)."""
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def start(running: list[Running], argv: list[str]) -> Running:
    r = Running(argv)
    running.append(r)
    return r
