"""No client waits forever (issue 12): without --timeout, a call that waits on a model stuck
in a transition (here a fake torpord that never answers) fails with DEADLINE_EXCEEDED, exit
7, after `WAIT_TIMEOUT_S` of silence. The CLI runs as a real subprocess whose only change is
that bound, shortened from 600 s so the tests are quick."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.cli.conftest import Cli, Running, client_env, start
from tests.cli.fake_daemon import FakeTorpord

DEADLINE = 7
SHORT_WAIT_S = 0.5


def shortened(cli: Cli, *args: str) -> list[str]:
    """`torpor --socket <fake> ARGS`, with WAIT_TIMEOUT_S set to SHORT_WAIT_S."""
    code = (
        "import sys\n"
        "from torpor.scheduler.client import connection\n"
        f"connection.WAIT_TIMEOUT_S = {SHORT_WAIT_S}\n"
        "from torpor.cli import app\n"
        "app(sys.argv[1:], prog_name='torpor')\n"
    )
    return [sys.executable, "-c", code, "--socket", str(cli.socket), *args]


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "demo-a", "hello"),
        ("evict", "demo-a", "--to", "host"),
        ("prefetch", "demo-c"),
        ("acquire", "demo-c"),
    ],
    ids=["generate", "evict", "prefetch", "acquire"],
)
def test_a_wedged_model_fails_the_waiting_command_with_exit_7(
    cli: Cli, daemon: FakeTorpord, args: tuple[str, ...]
) -> None:
    daemon.wedged = True
    proc = subprocess.run(
        shortened(cli, *args), capture_output=True, text=True, timeout=30, env=client_env()
    )
    assert proc.returncode == DEADLINE, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("torpor: error: no "), proc.stderr
    assert f"{SHORT_WAIT_S:g} s" in lines[0] and "--timeout" in lines[0]


def test_the_bound_is_on_silence_not_on_a_held_lease(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    """A held lease is silent by design: acquire keeps it past the bound (it renews it)."""
    daemon.lease_ttl_s = 2.0  # renewed about every second
    r = start(running, shortened(cli, "acquire", "demo-a"))
    r.wait_for_line("is ready")
    daemon.wait_for("Renew", count=2)  # well past SHORT_WAIT_S of silence on the stream
    assert r.proc.poll() is None
    code, _ = r.stop(signal.SIGINT)
    assert code == 0
    daemon.wait_for("Release")


def test_an_answering_daemon_is_not_cut_short(cli: Cli) -> None:
    proc = subprocess.run(
        shortened(cli, "generate", "demo-a", "hello", "--max-tokens", "4"),
        capture_output=True, text=True, timeout=30, env=client_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Once upon a time\n"


def test_the_timeout_flag_replaces_the_default_bound(cli: Cli, daemon: FakeTorpord) -> None:
    daemon.wedged = True
    proc = subprocess.run(
        [*shortened(cli, "--timeout", "0.2", "evict", "demo-a", "--to", "host")],
        capture_output=True, text=True, timeout=30, env=client_env(),
    )  # fmt: skip
    assert proc.returncode == DEADLINE
    assert "(see --timeout)" in proc.stderr
