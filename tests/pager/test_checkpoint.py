"""The deep-suspend controller's error paths (the GPU scenarios exercise it for real)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from torpor.errors import Unavailable
from torpor.worker.pager import checkpoint


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert checkpoint.main([]) == 2
    assert checkpoint.main(["freeze", "1"]) == 2
    assert checkpoint.main(["suspend", "self"]) == 2
    assert "suspend|resume|recover PID" in capsys.readouterr().err


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="needs a host without a driver")
def test_a_failed_controller_is_an_unavailable_error_naming_the_action() -> None:
    with pytest.raises(Unavailable) as info:
        checkpoint.run_controller("resume", os.getpid(), timeout_s=60)
    assert info.value.reason == "CHECKPOINT_FAILED"
    assert "deep resume" in str(info.value)


def test_a_failed_suspend_puts_the_process_back_to_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def controller(action: str, pid: int, timeout_s: float) -> float:
        calls.append(action)
        if action == "suspend":
            raise Unavailable("the checkpoint controller (suspend) did not finish in 1 s")
        return 0.1

    monkeypatch.setattr(checkpoint, "_controller", controller)
    with pytest.raises(Unavailable):
        checkpoint.run_controller("suspend", 1234, timeout_s=1)
    assert calls == ["suspend", "recover"]
    calls.clear()
    assert checkpoint.run_controller("resume", 1234) == 0.1
    assert calls == ["resume"]  # resume failures are the caller's to report, not to recover


def test_the_trace_tells_where_a_controllers_time_went() -> None:
    trace = (
        "started 1000.2500\ncuInit ...\ncuInit ok 0.120s\n"
        "cuCheckpointProcessLock ...\ncuCheckpointProcessLock ok 0.010s\n"
        "cuCheckpointProcessCheckpoint ...\ncuCheckpointProcessCheckpoint ok 4.900s\n"
    )
    assert checkpoint._steps(trace, spawned=1000.0) == {
        "startup_s": 0.25,
        "steps": {
            "cuInit": 0.12,
            "cuCheckpointProcessLock": 0.01,
            "cuCheckpointProcessCheckpoint": 4.9,
        },
    }


FAKE_SERVER = """
import json, sys, time
print("ready", flush=True)
for line in sys.stdin:
    action = line.strip()
    if action == "hang":
        time.sleep(60)
    print(json.dumps({"ok": action != "fail", "error": "boom", "steps": {"cuX": 0.5}}),
          flush=True)
"""


def fake_controller(tmp_path: Path) -> checkpoint.CheckpointController:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    return checkpoint.CheckpointController(1234, command=[sys.executable, str(script)]).start()


def test_a_persistent_controller_answers_each_action(tmp_path: Path) -> None:
    controller = fake_controller(tmp_path)
    try:
        assert checkpoint.run_controller("suspend", 1234, 10, controller) < 10
        assert checkpoint.HISTORY[-1]["steps"] == {"cuX": 0.5}
        assert checkpoint.run_controller("resume", 1234, 10, controller) < 10
        with pytest.raises(Unavailable) as info:
            controller.run("fail", 10)
        assert info.value.reason == "CHECKPOINT_FAILED" and "boom" in str(info.value)
        assert controller.run("resume", 10) < 10  # still serving after a failed action
    finally:
        controller.close()
    controller.close()  # idempotent


def test_a_hung_persistent_controller_is_killed_and_named(tmp_path: Path) -> None:
    controller = fake_controller(tmp_path)
    proc = controller._proc
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        controller.run("hang", 1.0)
    assert time.monotonic() - start < 5
    assert info.value.reason == "CHECKPOINT_TIMEOUT"
    assert proc is not None and proc.poll() is not None  # killed, reaped
    with pytest.raises(Unavailable) as again:
        controller.run("resume", 1.0)
    assert again.value.reason == "NO_CONTROLLER"


def test_the_server_runs_one_action_per_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    done: list[tuple[str, int]] = []
    monkeypatch.setattr(checkpoint, "_call", lambda name, *args: None)
    monkeypatch.setitem(checkpoint.ACTIONS, "suspend", lambda pid: done.append(("s", pid)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("suspend\nbogus\n"))
    assert checkpoint.serve(77) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ready"
    assert json.loads(lines[1])["ok"] is True
    assert json.loads(lines[2]) == {"ok": False, "error": "unknown action 'bogus'", "steps": {}}
    assert done == [("s", 77)]
