"""Deep suspend: the CUDA driver's process checkpoint of what remains after the arenas are
unmapped (the CUDA context and cuBLAS state, about 0.7 GiB on an H100), so a suspended
runtime holds zero GPU bytes.

The driver API (`cuCheckpointProcessLock/Checkpoint/Restore/Unlock`) is meant for an
external controller: locking blocks every further CUDA call of the target process. So the
worker does not call it on itself; it runs this module as a short-lived controller process
on its own pid:

    python -m torpor.worker.pager.checkpoint suspend PID   # lock, then checkpoint
    python -m torpor.worker.pager.checkpoint resume PID    # restore, then unlock
    python -m torpor.worker.pager.checkpoint recover PID   # whatever brings it back to running

The controller imports only `cuda.bindings`, never torch, so it starts in well under a
second. The virtual address reservations of the worker survive the checkpoint (remapping
afterwards and replaying a graph gave bit-identical output: docs/BENCHMARKS.md, "Probes on an
H100 host").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from torpor.errors import FailedPrecondition, Internal, Unavailable
from torpor.log import get_logger

log = get_logger("pager.checkpoint")

LOCK_TIMEOUT_MS = 10_000
DEFAULT_TIMEOUT_S = 60.0
"""How long a controller may take (the residue of a runtime checkpoints in seconds)."""
HISTORY: deque[dict[str, object]] = deque(maxlen=32)
"""The last controller runs: action, seconds, start-up and each driver call's seconds."""


_STEPS: dict[str, float] = {}  # in a controller process: the current action's driver calls


def _call(name: str, *args: object) -> Any:
    """Call `driver.<name>(*args)`, check its result, and trace it on stderr (the parent
    shows the trace when a step fails or hangs, so the step that hung is named)."""
    from cuda.bindings import driver

    print(f"{name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = getattr(driver, name)(*args)
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        error = driver.cuGetErrorName(err)[1]
        raise Unavailable(
            f"{name} failed: {error!r}", reason="CHECKPOINT_FAILED", metadata={"call": name}
        )
    seconds = time.perf_counter() - start
    _STEPS[name] = round(seconds, 4)
    print(f"{name} ok {seconds:.3f}s", file=sys.stderr, flush=True)
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def suspend(pid: int) -> None:
    """Lock the process's CUDA API and move its GPU state to host memory."""
    from cuda.bindings import driver

    _call("cuInit", 0)
    args = driver.CUcheckpointLockArgs()
    args.timeoutMs = LOCK_TIMEOUT_MS
    _call("cuCheckpointProcessLock", pid, args)
    try:
        _call("cuCheckpointProcessCheckpoint", pid, None)
    except Unavailable:
        # Never leave the process locked: its next CUDA call would block for good.
        driver.cuCheckpointProcessUnlock(pid, None)
        raise


def resume(pid: int) -> None:
    """Bring the process's GPU state back and unlock its CUDA API."""
    _call("cuInit", 0)
    _call("cuCheckpointProcessRestore", pid, None)
    _call("cuCheckpointProcessUnlock", pid, None)


def state(pid: int) -> str:
    """The process's checkpoint state: running, locked, checkpointed or failed."""
    _call("cuInit", 0)
    value = _call("cuCheckpointProcessGetState", pid)
    return str(value.name).removeprefix("CU_PROCESS_STATE_").lower()


def recover(pid: int) -> None:
    """Bring a process that a failed or killed controller left checkpointed or locked back
    to running (whatever step it was stopped at)."""
    if state(pid) == "checkpointed":
        _call("cuCheckpointProcessRestore", pid, None)
    if state(pid) == "locked":
        _call("cuCheckpointProcessUnlock", pid, None)


ACTIONS: dict[str, Callable[[int], None]] = {
    "suspend": suspend,
    "resume": resume,
    "recover": recover,
}


def run_controller(
    action: str,
    pid: int,
    timeout_s: float | None = None,
    controller: CheckpointController | None = None,
) -> float:
    """Run `action` on `pid` in a controller process (`controller`, a running one, or a
    fresh one for this action alone); return its seconds. When a suspend fails or hangs, a
    fresh controller puts the process back to running, so the caller's CUDA calls never
    block on a lock nobody holds."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        if controller is not None:
            try:
                return controller.run(action, timeout_s)
            except Unavailable as err:
                if err.reason != "NO_CONTROLLER":
                    raise
                controller.start()  # for next time; this action runs in a fresh one
        return _controller(action, pid, timeout_s)
    except Unavailable:
        if action == "suspend":
            with contextlib.suppress(Unavailable):
                _controller("recover", pid, timeout_s)
        raise


def _controller(action: str, pid: int, timeout_s: float) -> float:
    start, spawned = time.perf_counter(), time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", __name__, action, str(pid)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        trace = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        last = (trace.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(
            f"the checkpoint controller ({action}) did not finish in {timeout_s:.0f} s; "
            f"its last step: {last}",
            reason="CHECKPOINT_TIMEOUT",
            metadata={"action": action, "pid": pid},
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(
            f"deep {action} of process {pid} failed: {tail[0]}",
            reason="CHECKPOINT_FAILED",
            metadata={"action": action, "pid": pid},
        )
    seconds = time.perf_counter() - start
    _record(pid, action, seconds, **_steps(proc.stderr, spawned))
    return seconds


def _record(
    pid: int, action: str, seconds: float, startup_s: float | None, steps: dict[str, float]
) -> None:
    """Keep a controller run in HISTORY and log it."""
    run = {"action": action, "seconds": round(seconds, 4), "startup_s": startup_s, "steps": steps}
    HISTORY.append(run)
    log.info("checkpoint_controller", pid=pid, **run)


def _steps(trace: str, spawned: float) -> dict[str, Any]:
    """Where a controller's time went, from its trace: its start-up (interpreter, imports),
    and each driver call."""
    steps: dict[str, float] = {}
    startup: float | None = None
    for line in trace.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "started":
            startup = round(float(words[1]) - spawned, 4)
        elif len(words) == 3 and words[1] == "ok" and words[2].endswith("s"):
            steps[words[0]] = float(words[2][:-1])
    return {"startup_s": startup, "steps": steps}


class CheckpointController:
    """A controller process started ahead of time and kept for the runtime's life.

    Starting one takes seconds (an interpreter, imports, `cuInit`: 3.5 to 5.5 s measured on
    an H200 host, against 0.9 s for the checkpoint call itself), which would all land on
    the eviction and the resume path. This one is started when the runtime loads and
    answers one action per line: `serve PID` reads `suspend`, `resume` or `recover` on
    stdin and writes one JSON reply per action on stdout. It exits when stdin closes.
    """

    def __init__(self, pid: int, command: list[str] | None = None) -> None:
        self.pid = pid
        self.command = command or [sys.executable, "-m", __name__, "serve", str(pid)]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._ready = False

    def start(self) -> CheckpointController:
        """Spawn the process (returns at once; it gets ready in the background)."""
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    bufsize=0,
                )
                self._buffer, self._ready = b"", False
        return self

    def run(self, action: str, timeout_s: float) -> float:
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or proc.stdin is None:
                self._proc = None
                raise Unavailable(
                    "the checkpoint controller is not running", reason="NO_CONTROLLER"
                )
            try:
                if not self._ready:
                    if self._line(deadline) != "ready":
                        raise Unavailable("it did not start", reason="CHECKPOINT_FAILED")
                    self._ready = True
                proc.stdin.write(f"{action}\n".encode())
                reply = json.loads(self._line(deadline))
            except (OSError, ValueError, Unavailable) as exc:
                self._kill()
                reason = exc.reason if isinstance(exc, Unavailable) else "CHECKPOINT_FAILED"
                raise Unavailable(
                    f"the checkpoint controller ({action}) failed: {exc}",
                    reason=reason,
                    metadata={"action": action, "pid": self.pid},
                ) from exc
        if not reply.get("ok"):
            raise Unavailable(
                f"deep {action} of process {self.pid} failed: {reply.get('error')}",
                reason="CHECKPOINT_FAILED",
                metadata={"action": action, "pid": self.pid},
            )
        seconds = time.perf_counter() - start
        _record(self.pid, action, seconds, startup_s=0.0, steps=reply.get("steps", {}))
        return seconds

    def _line(self, deadline: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Unavailable("it did not answer in time", reason="CHECKPOINT_TIMEOUT")
            data = os.read(fd, 65536)
            if not data:
                raise Unavailable("it exited", reason="CHECKPOINT_FAILED")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the process (closing its stdin ends it). Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(pid: int) -> int:
    """The persistent controller's side: one action per stdin line, one JSON reply each."""
    try:
        _call("cuInit", 0)
    except Unavailable as err:
        print(json.dumps({"ok": False, "error": str(err)}), flush=True)
        return 1
    print("ready", flush=True)
    for line in sys.stdin:
        action = line.strip()
        _STEPS.clear()
        try:
            if action not in ACTIONS:
                raise Internal(f"unknown action {action!r}")
            ACTIONS[action](pid)
            reply: dict[str, object] = {"ok": True, "steps": dict(_STEPS)}
        except (Unavailable, Internal) as err:
            reply = {"ok": False, "error": str(err), "steps": dict(_STEPS)}
        print(json.dumps(reply), flush=True)
    return 0


def check_supported() -> None:
    """Raise FailedPrecondition when the driver has no process-checkpoint API."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise FailedPrecondition(
            "deep suspend needs cuda-bindings", reason="NO_CHECKPOINT"
        ) from exc
    if not hasattr(driver, "cuCheckpointProcessLock"):
        raise FailedPrecondition(
            "this cuda-bindings has no cuCheckpointProcess* API (CUDA 12.8+ needed)",
            reason="NO_CHECKPOINT",
        )


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve" and argv[1].isdigit():
        return serve(int(argv[1]))
    if len(argv) != 2 or argv[0] not in ACTIONS or not argv[1].isdigit():
        usage = "|".join(ACTIONS)
        print(f"usage: python -m torpor.worker.pager.checkpoint {usage} PID", file=sys.stderr)
        return 2
    print(f"started {time.time():.4f}", file=sys.stderr, flush=True)
    try:
        ACTIONS[argv[0]](int(argv[1]))
    except (Unavailable, Internal) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
