"""torpord's `Daemon` in this process (CPU backend, SQLite, no model): it starts once, its
shutdown is idempotent, and a start-up that fails partway unwinds what had started, in
reverse. The same through the real `torpord` command: tests/daemon/test_startup_unwind.py.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from torpor.errors import FailedPrecondition
from torpor.scheduler.daemon import Daemon
from torpor.scheduler.daemon_config import DaemonConfig, load_config
from torpor.scheduler.event_log import EventLog
from torpor.scheduler.executor import Executor
from torpor.scheduler.instance import LOCK_NAME, holder_pid
from torpor.scheduler.recorder import Recorder
from torpor.scheduler.registry import ModelRegistry
from torpor.scheduler.supervisor import Supervisor

STOPS = [(Supervisor, "stop_all"), (EventLog, "close"), (Recorder, "close"), (Executor, "drain")]


def config(tmp_path: Path) -> DaemonConfig:
    env = {"TORPOR_DAEMON_RUNTIME_DIR": str(tmp_path / "run")}
    overrides = {
        "daemon.state_dir": tmp_path / "state",
        "daemon.socket": tmp_path / "state" / "torpord.sock",
        "daemon.metrics_port": 0,
        "backend.kind": "cpu",
    }
    return load_config(None, env, overrides)


def released(tmp_path: Path) -> bool:
    return all(holder_pid(d / LOCK_NAME) is None for d in (tmp_path / "state", tmp_path / "run"))


async def test_a_daemon_starts_once_and_shuts_down_once(tmp_path: Path) -> None:
    daemon = Daemon(config(tmp_path))
    async with daemon:
        assert (tmp_path / "state" / "torpord.sock").is_socket()
        assert not released(tmp_path)
        with pytest.raises(RuntimeError, match="starts once"):
            await daemon.__aenter__()
    assert not (tmp_path / "state" / "torpord.sock").exists() and released(tmp_path)
    await daemon.shutdown()  # again: nothing left to stop


async def test_a_start_up_that_fails_late_unwinds_in_reverse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure injected into the models' load (a stand-in failure, after the catalog, the
    event log, the sweeper and the supervisor started) stops them all again."""
    stopped: list[str] = []

    async def fail(self: ModelRegistry, with_snapshot: set[str]) -> None:
        raise FailedPrecondition("injected", reason="INJECTED")

    monkeypatch.setattr(ModelRegistry, "load_all", fail)
    for owner, method in STOPS:
        original = getattr(owner, method)

        async def record(self: object, *args: object, _o: Any = original, _n: str = "") -> None:
            stopped.append(_n)
            await _o(self, *args)

        name = f"{owner.__name__}.{method}"
        monkeypatch.setattr(owner, method, functools.partialmethod(record, _n=name))
    daemon = Daemon(config(tmp_path))
    with pytest.raises(FailedPrecondition, match="injected"):
        await daemon.__aenter__()
    assert stopped == ["Executor.drain", "Supervisor.stop_all", "Recorder.close", "EventLog.close"]
    assert released(tmp_path) and not (tmp_path / "state" / "torpord.sock").exists()
    await daemon.shutdown()  # nothing was left to stop
