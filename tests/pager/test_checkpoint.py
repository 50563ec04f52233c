"""The deep-suspend controller's error paths (the GPU scenarios exercise it for real)."""

from __future__ import annotations

import os

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
