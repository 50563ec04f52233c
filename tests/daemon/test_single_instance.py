"""One torpord per state directory and per runtime directory (issue 12, "One daemon per host"),
with real torpord processes on the CPU backend.

A second torpord on either directory is refused before it touches anything, naming the running
daemon's pid; the first keeps its workers. A socket path is only ever removed when it is a
stale socket. A stale worker record naming a pid that now belongs to an unrelated process does
not get that process killed. Worker sockets are named per daemon start, so two daemons never
pick the same name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, footprint_bytes, start_torpord
from tests.helpers import assert_eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_torpord(
    state_dir: Path, runtime_dir: Path, sock: Path, model_root: Path, metrics_port: int = 0
) -> subprocess.CompletedProcess[str]:
    """torpord run to its end: one that is refused exits at once. A torpord that starts
    serving instead is killed after 30 s (what today's main does with a regular file)."""
    env = {
        **os.environ,
        "TORPOR_DAEMON_MODEL_ROOTS": str(model_root),
        "TORPOR_DAEMON_RUNTIME_DIR": str(runtime_dir),
        "TORPOR_DAEMON_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "torpor.scheduler.daemon", "--state-dir", str(state_dir)]
    argv += ["--socket", str(sock), "--metrics-port", str(metrics_port)]
    argv += ["--backend", "cpu", "--cpu-devices", "1", "--cpu-device-memory", "64MiB"]
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("torpord was not refused: it kept running") from exc


def worker_sockets(runtime_dir: Path) -> list[str]:
    """The socket names of the workers that torpord recorded in `runtime_dir`."""
    records = sorted((runtime_dir / "workers").glob("*.json"))
    return [Path(json.loads(r.read_text())["socket"]).name for r in records]


@pytest.fixture
def first(tmp_path: Path, model_root: Path) -> Iterator[Torpord]:
    daemon = start_torpord(
        tmp_path / "first",
        model_root,
        memory=int(2.5 * footprint_bytes(model_root)),
        metrics_port=free_port(),
    )
    daemon.register("alpha", model_root / "alpha")
    yield daemon
    assert daemon.stop() == 0


def test_a_second_torpord_is_refused_and_the_first_keeps_its_workers(
    first: Torpord, tmp_path: Path, model_root: Path
) -> None:
    before = first.generate("alpha", [1, 2, 3])
    pid = first.runtime("alpha").worker_pid
    assert pid
    run = first.state_dir / "run"
    metrics_port = int(first.proc.args[first.proc.args.index("--metrics-port") + 1])
    own = tmp_path / "second"
    attempts = {
        # The same state and runtime directories and socket, and the first's metrics port: on
        # main this one stopped the first's workers and only then failed on the port.
        "both": (first.state_dir, run, first.socket, metrics_port),
        "state dir": (first.state_dir, own / "run", own / "a.sock", 0),
        "runtime dir": (own / "state", run, own / "b.sock", 0),
    }
    for what, (state_dir, runtime_dir, sock, port) in attempts.items():
        refused = run_torpord(state_dir, runtime_dir, sock, model_root, port)
        assert refused.returncode != 0, what
        assert f"pid {first.proc.pid}" in refused.stderr, (what, refused.stderr)
        assert "already running" in refused.stderr, (what, refused.stderr)
        assert "Traceback" not in refused.stderr, (what, refused.stderr)
    # A daemon of its own directories on the first's socket: a live socket is not taken.
    live = run_torpord(own / "c", own / "c" / "run", first.socket, model_root)
    assert live.returncode != 0 and str(first.socket) in live.stderr, live.stderr
    assert "Traceback" not in live.stderr, live.stderr
    assert first.socket.is_socket()
    # The first's worker is the one it had, and it still serves the same tokens.
    assert first.proc.poll() is None
    assert first.runtime("alpha").worker_pid == pid
    assert [c.token_ids for c in first.generate("alpha", [1, 2, 3])] == [
        c.token_ids for c in before
    ]


def test_a_socket_path_that_is_a_regular_file_is_refused_and_kept(
    tmp_path: Path, model_root: Path
) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not a socket\n")
    refused = run_torpord(tmp_path / "state", tmp_path / "run", precious, model_root)
    assert refused.returncode != 0
    assert str(precious) in refused.stderr and "not a socket" in refused.stderr, refused.stderr
    assert precious.read_text() == "not a socket\n"
    assert not (tmp_path / "state" / "catalog.db").exists()  # refused before anything moved


def test_a_runtime_dir_too_long_for_worker_sockets_is_refused_at_start(
    tmp_path: Path, model_root: Path
) -> None:
    # On main torpord started, and then every worker failed to bind its socket.
    runtime_dir = tmp_path / ("r" * 90)
    refused = run_torpord(tmp_path / "state", runtime_dir, tmp_path / "d.sock", model_root)
    assert refused.returncode != 0
    assert "daemon.runtime_dir" in refused.stderr and "too long" in refused.stderr, refused.stderr


def test_a_stale_record_naming_an_unrelated_process_does_not_get_it_killed(
    tmp_path: Path, model_root: Path
) -> None:
    # A worker record left by an earlier torpord, whose pid now belongs to another process.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state_dir = tmp_path / "state"
        records = state_dir / "run" / "workers"
        records.mkdir(parents=True)
        record = {
            "pid": bystander.pid,
            "runtime_id": "#1",
            "model": "alpha",
            "device": "cpu",
            "socket": str(records / "0123456789abcdef.sock"),
            "store": str(state_dir / "snapshots"),
            "handle_size": "512MiB",
            "graph_pool": "512MiB",
            "log_level": "warning",
            "python": sys.executable,
        }
        (records / "#1.json").write_text(json.dumps(record))
        daemon = start_torpord(state_dir, model_root, memory=64 * 1024**2)
        try:
            assert bystander.poll() is None, "the restarted torpord killed an unrelated process"
            assert not (records / "#1.json").exists()  # the stale record is gone
        finally:
            assert daemon.stop() == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_after_kill_9_a_restarted_torpord_takes_the_lock_and_stops_its_own_leftover_worker(
    first: Torpord, model_root: Path
) -> None:
    # The other side of the checks above: a real leftover of this runtime directory is still
    # recognized (module, socket, start time) and stopped, and kill -9 leaves no stale lock.
    first.generate("alpha", [1, 2, 3], max_tokens=1)
    pid = first.runtime("alpha").worker_pid
    first.proc.kill()
    first.proc.wait()
    assert running(pid)  # the worker outlived its torpord: a leftover
    again = start_torpord(
        first.state_dir, model_root, memory=int(2.5 * footprint_bytes(model_root))
    )
    first.proc, first.channel = again.proc, again.channel  # the fixture stops this one
    assert_eventually(lambda: running(pid), lambda alive: not alive, timeout=30)
    assert len(again.generate("alpha", [1, 2, 3], max_tokens=2)[-1].token_ids) > 0
    assert again.runtime("alpha").worker_pid not in (0, pid)


def test_worker_sockets_do_not_collide_across_daemons(tmp_path: Path, model_root: Path) -> None:
    # Both daemons' first runtime is #1: on main both workers got the same socket name. The
    # name now starts with a token drawn at each daemon start (a restart is a new start too).
    memory = int(2.5 * footprint_bytes(model_root))
    daemons = [start_torpord(tmp_path / d, model_root, memory=memory) for d in ("a", "b")]
    try:
        for daemon in daemons:
            daemon.register("alpha", model_root / "alpha")
            daemon.generate("alpha", [1, 2, 3], max_tokens=1)
        names = [worker_sockets(d.state_dir / "run") for d in daemons]
    finally:
        assert [d.stop() for d in daemons] == [0, 0]
    assert all(len(n) == 1 for n in names) and names[0] != names[1], names
    assert all(len(n[0]) <= 24 for n in names), names  # Unix socket paths are short


def test_make_run_keeps_its_runtime_directory_in_the_checkout() -> None:
    # Never /run/torpor (a systemd torpord's), nor the user's default runtime directory.
    root = Path(__file__).parents[2]
    dry = subprocess.run(
        ["make", "-n", "-o", "install", "run"], cwd=root, capture_output=True, text=True, check=True
    )
    (command,) = [line for line in dry.stdout.splitlines() if "bin/torpord" in line]
    assert "TORPOR_DAEMON_RUNTIME_DIR=.state/run " in command, command
    assert "--state-dir .state " in command and "--socket .state/run/torpord.sock" in command
