"""How the client commands fail: one line on stderr, nothing on stdout, and the exit status of
the error's code (scheduler/client/exits.py), for daemon errors and for a daemon that is not
there at all."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import TORPOR, Cli, client_env
from tests.cli.fake_daemon import FakeTorpord
from torpor.errors import Code
from torpor.scheduler.client.exits import EXIT_CODES

NOT_FOUND, INVALID, EXISTS, PRECONDITION, UNAVAILABLE, DEADLINE = 3, 2, 4, 5, 8, 7

# Every client command, with the arguments it needs, naming a model that does not exist.
ON_UNKNOWN_MODEL = [
    ("models", "nope"),
    ("unregister", "nope"),
    ("pin", "nope"),
    ("unpin", "nope"),
    ("explain", "nope"),
    ("evict", "nope", "--to", "host"),
    ("prefetch", "nope"),
    ("generate", "nope", "hello"),
    ("acquire", "nope"),
]
EVERY_COMMAND = [
    *ON_UNKNOWN_MODEL,
    ("ps",),
    ("models",),
    ("status",),
    ("register", "m", "/models/m"),
    ("events",),
    ("snapshots", "ls"),
    ("snapshots", "rm", "snap-x"),
    ("snapshots", "gc"),
]


def test_exit_codes_are_distinct_and_cover_every_code() -> None:
    assert set(EXIT_CODES) == set(Code)
    assert len(set(EXIT_CODES.values())) == len(Code)
    retryable = {c for c in Code if c in (Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED,
                                          Code.UNAVAILABLE, Code.ABORTED)}  # fmt: skip
    assert {EXIT_CODES[c] for c in retryable} == {6, 7, 8, 9}


@pytest.mark.parametrize("args", ON_UNKNOWN_MODEL, ids=lambda a: a[0])
def test_an_unknown_model_is_not_found(cli: Cli, args: tuple[str, ...]) -> None:
    assert cli.fails(NOT_FOUND, *args) == "torpor: error: model 'nope' is not registered"


def test_an_unknown_snapshot_is_not_found(cli: Cli) -> None:
    assert "snapshot 'snap-x' does not exist" in cli.fails(NOT_FOUND, "snapshots", "rm", "snap-x")


def test_json_errors_are_one_line_too(cli: Cli) -> None:
    cli.fails(NOT_FOUND, "--json", "explain", "nope")
    cli.fails(NOT_FOUND, "generate", "nope", "hi", "--json")


def test_daemon_errors_keep_their_codes(cli: Cli) -> None:
    assert "already registered" in cli.fails(EXISTS, "register", "demo-a", "/models/a")
    assert "huge needs 8.0 GiB" in cli.fails(PRECONDITION, "acquire", "huge")
    assert "demo-b is pinned" in cli.fails(PRECONDITION, "evict", "demo-b", "--to", "host")
    line = cli.fails(INVALID, "generate", "demo-a", "hi", "--temperature", "200")
    assert "temperature must be in [0, 100]" in line


def test_bad_values_are_refused_before_any_call(cli: Cli, daemon: FakeTorpord) -> None:
    assert "--dtype must be one of" in cli.fails(INVALID, "register", "m", "/m", "--dtype", "int4")
    assert "--kind 'bogus' is not an event kind" in cli.fails(INVALID, "events", "--kind", "bogus")
    assert "--since must be" in cli.fails(INVALID, "events", "--since", "yesterday")
    for args in (("evict", "demo-a", "--to", "gpu"), ("prefetch", "demo-a", "--to", "disk")):
        assert cli(*args).returncode == INVALID  # click's usage error
    assert daemon.calls == []


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=" ".join)
def test_a_missing_daemon_says_how_to_start_it(socket_dir: Path, args: tuple[str, ...]) -> None:
    missing = socket_dir / "none.sock"
    line = Cli(missing).fails(UNAVAILABLE, *args)
    assert line == (
        f"torpor: error: torpord is not running (no socket at {missing}); start it with "
        "`torpord` (or `make run` in a torpor checkout), or point --socket, $TORPOR_SOCKET or "
        "--address at a running one"
    )


def test_a_stale_socket_is_a_daemon_that_is_not_running(socket_dir: Path) -> None:
    stale = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a file, but nobody listens: connection refused
        assert f"nothing answers on {stale}" in Cli(stale).fails(UNAVAILABLE, "ps")


def test_a_tcp_address_where_nothing_listens(socket_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([*TORPOR, "--address", f"127.0.0.1:{port}", "ps"],
                          capture_output=True, text=True, timeout=60, env=client_env())  # fmt: skip
    assert proc.returncode == UNAVAILABLE
    assert f"torpord is not running (nothing answers at 127.0.0.1:{port})" in proc.stderr


def test_the_socket_comes_from_torpor_socket(daemon: FakeTorpord) -> None:
    env = client_env(TORPOR_SOCKET=str(daemon.socket))
    proc = subprocess.run([*TORPOR, "ps", "--json"], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # --address on the command line wins over the variable
    proc = subprocess.run([*TORPOR, "--address", "127.0.0.1:9", "ps"], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert "nothing answers at 127.0.0.1:9" in proc.stderr


def test_socket_and_address_together_are_refused(cli: Cli) -> None:
    assert "not both" in cli.fails(INVALID, "--address", "127.0.0.1:9", "ps")
    proc = subprocess.run([*TORPOR, "--address", "nowhere", "ps"], capture_output=True,
                          text=True, timeout=60, env=client_env())  # fmt: skip
    assert proc.returncode == INVALID
    assert proc.stderr.startswith("torpor: error: --address must be HOST:PORT")


def test_the_timeout_bounds_a_call(cli: Cli) -> None:
    proc = cli("--timeout", "0.3", "events", "--follow")  # the fake never ends a follow
    assert proc.returncode == DEADLINE
    assert len(proc.stdout.splitlines()) == 4  # what came before the deadline
    assert proc.stderr.startswith(f"torpor: error: no answer from torpord at unix:{cli.socket}")
    assert proc.stderr.endswith("in time (see --timeout)\n")


def test_client_commands_do_not_import_torch(daemon: FakeTorpord) -> None:
    code = (
        "import sys\n"
        "from torpor.cli import app\n"
        f"app(['--socket', {str(daemon.socket)!r}, 'ps', '--json'], standalone_mode=False)\n"
        "heavy = {'torch', 'torpor.worker', 'sqlalchemy'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=client_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert daemon.requests("ListResidency")  # the command really ran
