"""The faults suite's machinery: drive one model into a phase, kill -9 a worker or torpord at
a random moment inside it, and check what is left.

A phase is entered by one client call (`action`); the kill lands `delay` seconds after the
call starts, `delay` drawn uniformly from the phase's window (its duration as last measured
on this machine, so that most kills land while the call is still in flight; each trial
records whether it did).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call, start_torpord
from tests.helpers import assert_eventually
from tests.reliability import leftovers, scale
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

PROMPT = [3, 17, 42, 99, 7, 250]
"""The prompt of every correctness check (greedy, so the tokens are a fixed function of it)."""
CHECK_TOKENS = 8
GENERATE_TOKENS = 96
"""Length of the long generation the `generate` phase kills into."""
CALL_DEADLINE_S = 20.0
"""Deadline of every call a trial makes; a call that runs into it counts as a hang."""
SETTLE_S = 20.0
"""Bound on the wait for a model to leave LOADING/SUSPENDING/RESUMING after a kill."""

TRANSITIONAL = {
    common_pb2.RUNTIME_STATE_LOADING,
    common_pb2.RUNTIME_STATE_SUSPENDING,
    common_pb2.RUNTIME_STATE_RESUMING,
}
WITH_WORKER = {
    common_pb2.RUNTIME_STATE_RESIDENT,
    common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
    common_pb2.RUNTIME_STATE_SUSPENDED_DEEP,
    common_pb2.RUNTIME_STATE_SUSPENDED_DISK,
}

PHASES = (
    "load",
    "generate",
    "suspend_host",
    "suspend_disk",
    "resume_host",
    "resume_disk",
    "snapshot_write",
    "registration",
)
VICTIMS = ("worker", "torpord")
GPU_PHASES = ("suspend_deep", "resume_deep", "keeper_fill")
"""Phases only the CUDA backend has: the deep level, and the keeper taking its host copy in
the background after a load (the `keeper_fill` kill lands after the load's call returned)."""

# First guess of each phase's duration on the CPU backend with the tests' 8 MiB models;
# replaced by the measured duration whenever a call completes before its kill.
INITIAL_WINDOW_S = {
    "load": 3.0,
    "generate": 1.0,
    "suspend_host": 0.03,
    "suspend_disk": 0.2,
    "resume_host": 0.03,
    "resume_disk": 0.06,
    "snapshot_write": 0.4,
    "registration": 0.03,
    "suspend_deep": 1.0,
    "resume_deep": 0.6,
    "keeper_fill": 5.0,
}


@dataclass
class Outcome:
    """How one client call ended."""

    code: grpc.StatusCode | None = None  # None: it succeeded
    detail: str = ""
    elapsed: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def run_call(fn: Callable[[], object]) -> tuple[threading.Thread, Outcome]:
    """Start `fn` (one gRPC call, with a deadline) on a thread; its Outcome fills in when it
    ends."""
    outcome = Outcome()

    def body() -> None:
        start = time.monotonic()
        try:
            result = fn()
            if hasattr(result, "__next__"):
                list(result)  # type: ignore[call-overload]
        except grpc.RpcError as exc:
            outcome.code, outcome.detail = exc.code(), exc.details() or ""
        except Exception as exc:  # a bug of the test, reported as such
            outcome.code, outcome.detail = grpc.StatusCode.UNKNOWN, f"test: {exc!r}"
        finally:
            outcome.elapsed = time.monotonic() - start
            outcome.done.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


@dataclass
class Trial:
    """The record of one kill: what, when, and how the call in flight ended."""

    phase: str
    victim: str
    delay: float
    in_flight: bool  # the call had not returned when the kill landed
    code: str
    elapsed: float


class FaultHarness:
    """One torpord on its own state dir, the models registered, and the trial steps."""

    def __init__(
        self,
        state_dir: Path,
        model_root: Path,
        memory: int,
        models: tuple[str, ...],
        backend: str = "cpu",
    ):
        self.state_dir, self.model_root, self.memory, self.models = (
            state_dir,
            model_root,
            memory,
            models,
        )
        self.backend = backend
        self.windows = dict(INITIAL_WINDOW_S)
        self.registered = 0
        self.killed = 0  # the worker pid the last trial killed
        self.daemon = self._start()
        for name in models:
            self.daemon.register(name, model_root / name)

    # -- reading state -------------------------------------------------------------------
    def runtimes(self) -> list[admin_pb2.RuntimeInfo]:
        return list(self.daemon.residency().runtimes)

    def runtime(self, model: str) -> admin_pb2.RuntimeInfo:
        return self.daemon.runtime(model)

    def worker_pid(self, model: str) -> int:
        return self.runtime(model).worker_pid

    # -- moving a model (no faults) --------------------------------------------------------
    def evict(self, model: str, tier: int) -> list[admin_pb2.EvictResponse]:
        request = admin_pb2.EvictRequest(model=model, to_tier=tier)
        return call(self.daemon.admin.Evict, request, timeout=CALL_DEADLINE_S)

    def prefetch_gpu(self, model: str) -> scheduler_pb2.PrefetchResponse:
        request = scheduler_pb2.PrefetchRequest(model=model, tier=common_pb2.TIER_GPU, wait=True)
        return call(self.daemon.scheduler.Prefetch, request, timeout=CALL_DEADLINE_S)

    def tokens(self, model: str) -> list[int]:
        chunks = self.daemon.generate(model, PROMPT, max_tokens=CHECK_TOKENS)
        return [t for c in chunks for t in c.token_ids]

    def drop_worker(self, model: str, cold: bool) -> None:
        """No worker for `model`: a snapshot remains, or (`cold`) not even that."""
        if self.runtime(model).state in WITH_WORKER:
            self.evict(model, common_pb2.TIER_DROP)
        if cold:
            listed = call(
                self.daemon.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest(model=model)
            )
            for snap in listed.snapshots:
                request = admin_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
                call(self.daemon.admin.DeleteSnapshot, request)

    # -- one trial ---------------------------------------------------------------------------
    def prepare(self, phase: str, model: str, bystander: str, cold: bool) -> None:
        """Bring `model` to where `phase` starts."""
        if phase in ("load", "keeper_fill"):
            self.drop_worker(model, cold)
            return
        # On the GPU by a request, not a Prefetch: a prefetch may not evict a resident model
        # (RESOURCE_EXHAUSTED when the device's two places are taken).
        if phase == "registration":
            self.tokens(bystander)  # the worker a worker-kill trial kills
            return
        self.tokens(model)
        if phase == "resume_host":
            self.evict(model, common_pb2.TIER_HOST)
        elif phase == "resume_disk":
            self.evict(model, common_pb2.TIER_DISK)
        elif phase == "resume_deep":
            self.evict(model, common_pb2.TIER_DEEP)

    def action(self, phase: str, model: str) -> Callable[[], object]:
        """The one call that runs `phase`, with the trial deadline."""
        d = self.daemon
        if phase in ("load", "generate", "keeper_fill"):
            tokens = GENERATE_TOKENS if phase == "generate" else CHECK_TOKENS
            request = scheduler_pb2.GenerateRequest(
                model=model,
                prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParams(
                    max_tokens=tokens, temperature=0, ignore_eos=True
                ),
            )
            return lambda: d.scheduler.Generate(request, timeout=CALL_DEADLINE_S)
        if phase in ("suspend_host", "suspend_disk", "snapshot_write", "suspend_deep"):
            tier = {
                "suspend_host": common_pb2.TIER_HOST,
                "suspend_deep": common_pb2.TIER_DEEP,
                "suspend_disk": common_pb2.TIER_DISK,
                "snapshot_write": common_pb2.TIER_DROP,
            }[phase]
            evict = admin_pb2.EvictRequest(model=model, to_tier=tier)
            return lambda: d.admin.Evict(evict, timeout=CALL_DEADLINE_S)
        if phase in ("resume_host", "resume_disk", "resume_deep"):
            prefetch = scheduler_pb2.PrefetchRequest(
                model=model, tier=common_pb2.TIER_GPU, wait=True
            )
            return lambda: d.scheduler.Prefetch(prefetch, timeout=CALL_DEADLINE_S)
        assert phase == "registration"
        self.registered += 1
        spec = common_pb2.ModelSpec(
            name=f"reg-{self.registered}",
            source=str(self.model_root / model),
            dtype=common_pb2.DTYPE_FLOAT32,
            max_batch=4,
            max_seq_len=MAX_SEQ_LEN,
        )
        register = scheduler_pb2.RegisterModelRequest(spec=spec)
        return lambda: d.scheduler.RegisterModel(register, timeout=CALL_DEADLINE_S)

    def kill(self, victim: str, phase: str, model: str, bystander: str, outcome: Outcome) -> bool:
        """kill -9 the victim now; True if the call was still in flight when it landed."""
        if victim == "torpord":
            in_flight = not outcome.done.is_set()
            os.kill(self.daemon.proc.pid, signal.SIGKILL)
            return in_flight
        target = bystander if phase == "registration" else model
        pid = self._await_worker(target, outcome)
        in_flight = not outcome.done.is_set()
        if pid:
            self.killed = pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return in_flight and pid != 0

    def _await_worker(self, model: str, outcome: Outcome) -> int:
        """The model's worker pid; during a load it may not exist yet, so look until the call
        ends (then there may be none to kill: 0)."""
        while True:
            pid = self.worker_pid(model)
            if pid or outcome.done.is_set():
                return pid
            time.sleep(0.005)

    def restart(self) -> None:
        """After torpord was killed: a new torpord on the same state dir."""
        self.daemon.channel.close()
        self.daemon.proc.wait(timeout=30)
        self.daemon = self._start()

    def _start(self) -> Torpord:
        return start_torpord(self.state_dir, self.model_root, self.memory, backend=self.backend)

    # -- the checks after a trial ------------------------------------------------------------
    def assert_settled(self) -> None:
        """No runtime is left LOADING, SUSPENDING or RESUMING, and torpord has noticed every
        killed worker (no runtime reports the killed pid, or a dead one: a killed process can
        still look alive in /proc while it exits), after a bounded wait. (A request sent
        before torpord noticed can still be routed to the dead worker: UNAVAILABLE, retryable.)"""

        def unsettled(r: admin_pb2.RuntimeInfo) -> bool:
            if r.state in TRANSITIONAL or (r.worker_pid and r.worker_pid == self.killed):
                return True
            return bool(r.worker_pid) and not leftovers.alive(r.worker_pid)

        assert_eventually(
            self.runtimes,
            lambda rs: not [r for r in rs if unsettled(r)],
            timeout=SETTLE_S,
        )

    def assert_no_stray_process(self) -> None:
        """Every live worker of this state dir is one that torpord reports."""

        def strays() -> list[int]:
            known = {r.worker_pid for r in self.runtimes()}
            return [w.pid for w in leftovers.workers_of(self.state_dir) if w.pid not in known]

        assert_eventually(strays, lambda s: s == [], timeout=15)

    def assert_no_stray_files(self) -> None:
        """No chunk temp file, chunk file without a catalog row, or worker socket that no
        live worker serves, while torpord runs (after a bounded wait)."""

        def debris() -> list[Path]:
            live = leftovers.workers_of(self.state_dir)
            return (
                leftovers.temp_files(self.state_dir)
                + leftovers.orphan_chunks(self.state_dir)
                + leftovers.stray_sockets(self.state_dir, live)
            )

        assert_eventually(debris, lambda d: d == [], timeout=15)

    def abandon(self) -> None:
        """After a failed check: kill torpord and every worker of the state dir, so that a
        failing trial leaves no process for the next test."""
        self.daemon.channel.close()
        if self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
            self.daemon.proc.wait(timeout=30)
        keepers = leftovers.workers_of(self.state_dir, leftovers.KEEPER_MODULE)
        for worker in leftovers.workers_of(self.state_dir) + keepers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def stop_and_assert_clean(self) -> None:
        """Stop torpord: it exits 0 and leaves no worker or keeper process and no worker
        socket."""
        assert self.daemon.stop() == 0
        assert_eventually(
            lambda: (
                leftovers.workers_of(self.state_dir)
                + leftovers.workers_of(self.state_dir, leftovers.KEEPER_MODULE)
            ),
            lambda w: w == [],
            timeout=15,
        )
        assert leftovers.stray_sockets(self.state_dir, []) == []
        assert leftovers.temp_files(self.state_dir) == []


def run_trial(
    h: FaultHarness,
    phase: str,
    victim: str,
    model: str,
    bystander: str,
    reference: dict[str, list[int]],
    delay: float,
    cold: bool,
) -> Trial:
    """One kill in one phase, then every check; returns the record."""
    h.prepare(phase, model, bystander, cold)
    thread, outcome = run_call(h.action(phase, model))
    if phase == "keeper_fill":  # the fill runs after the load's call has returned
        outcome.done.wait(CALL_DEADLINE_S)
        time.sleep(delay)  # the injected fault's timing, not a wait for a state
    else:
        outcome.done.wait(delay)
    in_flight = h.kill(victim, phase, model, bystander, outcome)
    # Every request ends, and before its deadline: running into it means it hung.
    thread.join(CALL_DEADLINE_S + 15)
    assert not thread.is_alive(), f"{phase}/{victim}: the call never ended"
    assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"{phase}/{victim}: the call hung until its deadline ({outcome.detail})"
    )
    # ... and in success or a designed error (UNAVAILABLE for a dead worker or torpord), never
    # an INTERNAL or UNKNOWN that hides what happened.
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        f"{phase}/{victim}: the call ended {outcome.code}: {outcome.detail}"
    )
    if not in_flight and outcome.code is None and phase != "keeper_fill":
        # The call finished before the kill: its duration is a truer window.
        h.windows[phase] = max(outcome.elapsed, 0.005)
    if victim == "torpord":
        h.restart()
    h.assert_settled()
    h.assert_no_stray_process()
    assert h.tokens(model) == reference[model], f"{phase}/{victim}: wrong tokens after the kill"
    if phase == "registration":
        _check_registered(h, model, reference)
    h.assert_no_stray_files()
    code = outcome.code.name if outcome.code else "OK"
    return Trial(phase, victim, round(delay, 4), in_flight, code, round(outcome.elapsed, 3))


def _check_registered(h: FaultHarness, source: str, reference: dict[str, list[int]]) -> None:
    """A registration cut by the kill either happened or did not: if the name is there it
    serves the source's tokens; then it is unregistered to keep the device for the rest."""
    name = f"reg-{h.registered}"
    models = call(h.daemon.scheduler.ListModels, scheduler_pb2.ListModelsRequest()).models
    if name not in {m.spec.name for m in models}:
        return
    assert h.tokens(name) == reference[source], f"{name} serves the wrong tokens"
    h.evict(name, common_pb2.TIER_DROP)
    request = scheduler_pb2.UnregisterModelRequest(name=name, delete_snapshots=True)
    call(h.daemon.scheduler.UnregisterModel, request)


def run_phase(
    harness: FaultHarness,
    phase: str,
    victim: str,
    rng: random.Random,
    reference_tokens: dict[str, list[int]] | None = None,
) -> None:
    """`scale.trials_per_phase()` kills of `victim` in `phase`, each at a random moment, then
    torpord stopped and checked clean. Without `reference_tokens`, the reference is the
    harness's own daemon's tokens before any kill (CUDA float32 need not give the CPU
    engine's greedy tokens bit for bit). The trials are reported whatever happens."""
    trials: list[Trial] = []
    try:
        reference = reference_tokens or {m: harness.tokens(m) for m in harness.models}
        for _ in range(scale.trials_per_phase()):
            model, bystander = rng.sample(harness.models, 2)
            delay = rng.uniform(0, harness.windows[phase])
            cold = rng.random() < 0.5
            trials.append(
                run_trial(harness, phase, victim, model, bystander, reference, delay, cold)
            )
        harness.stop_and_assert_clean()
    except BaseException:
        harness.abandon()
        raise
    finally:
        report_trials(trials)


def report_trials(trials: list[Trial]) -> None:
    """Print the trials; with TORPOR_RELIABILITY_REPORT=FILE also append them (JSON lines)
    for docs/RELIABILITY.md's figures."""
    for t in trials:
        print(f"[faults] {t}")
    path = os.environ.get("TORPOR_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as out:
            for t in trials:
                out.write(json.dumps({"suite": "faults", **asdict(t)}) + "\n")
