"""Hangs and wedged models (issue 12): a real torpord on the CPU backend, with corrupt
chunks and workers killed in the middle of their transitions. Every request must end, and
the model must serve correct tokens afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from tests.daemon.conftest import (
    Torpord,
    TorporError,
    call,
    footprint_bytes,
    start_torpord,
)
from tests.helpers import assert_eventually
from torpor.errors import Unavailable
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

T = TypeVar("T")

PROMPT = [5, 17, 42, 99, 7]
TRANSITIONAL = (
    common_pb2.RUNTIME_STATE_LOADING,
    common_pb2.RUNTIME_STATE_SUSPENDING,
    common_pb2.RUNTIME_STATE_RESUMING,
)


def tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def generate(torpord: Torpord, model: str, timeout: float = 60) -> list[common_pb2.GenerateChunk]:
    """A greedy generate that fails (DEADLINE_EXCEEDED) instead of hanging the test."""
    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    )
    return call(torpord.scheduler.Generate, request, timeout=timeout)


def evict(torpord: Torpord, model: str, tier: int, timeout: float = 60) -> None:
    call(torpord.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier), timeout=timeout)


def chunk_files(where: Path) -> list[Path]:
    """The chunk files under a state dir's store (or any directory of the store)."""
    if (where / "snapshots").is_dir():
        where = where / "snapshots" / "chunks"
    return [p for p in where.rglob("*") if p.is_file()]


def flip_a_byte(path: Path) -> None:
    """Damage a chunk in place, as a failing disk would (the file keeps its size)."""
    os.chmod(path, 0o600)
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def events(torpord: Torpord, model: str) -> list[admin_pb2.Event]:
    request = admin_pb2.WatchEventsRequest(model=model, after_id=0, follow=False)
    return call(torpord.admin.WatchEvents, request)


# -- a corrupt chunk -------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", [False, True], ids=["suspended_disk", "snapshot"])
def test_a_corrupt_chunk_falls_back_to_the_checkpoint(torpord: Torpord, dropped: bool) -> None:
    """The restore from a damaged snapshot fails its hash check. The request that waits for
    it is served from the next source (here the checkpoint) with the same tokens, the event
    log says why, and the bad snapshot is never offered again."""
    first = tokens(generate(torpord, "alpha"))
    evict(torpord, "alpha", common_pb2.TIER_DISK)  # SUSPENDED_DISK: the worker stays
    if dropped:
        evict(torpord, "alpha", common_pb2.TIER_DROP)  # SNAPSHOT: a new worker restores it
    weights = max(chunk_files(torpord.state_dir), key=lambda p: p.stat().st_size)
    flip_a_byte(weights)

    again = generate(torpord, "alpha", timeout=120)  # hung forever before the fix

    assert tokens(again) == first
    assert again[-1].usage.restored_from == common_pb2.TIER_DISK  # where the request found it
    rt = torpord.runtime("alpha")
    assert rt.state == common_pb2.RUNTIME_STATE_RESIDENT
    corrupt = [
        e for e in events(torpord, "alpha") if e.kind == admin_pb2.EVENT_KIND_SNAPSHOT_CORRUPT
    ]
    assert len(corrupt) == 1 and corrupt[0].attributes["chunk"] == weights.name
    if not dropped:
        return
    # The next eviction to disk writes a good snapshot (the bad chunk was quarantined, not
    # shared by the new one), and it restores.
    evict(torpord, "alpha", common_pb2.TIER_DISK)
    evict(torpord, "alpha", common_pb2.TIER_DROP)
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_SNAPSHOT
    assert tokens(generate(torpord, "alpha")) == first
    assert len(chunk_files(torpord.state_dir / "snapshots" / "quarantine")) == 1


# -- a worker killed mid-transition ----------------------------------------------------------


def worker_pid(torpord: Torpord, model: str) -> int:
    """The pid of the model's worker, as ListResidency shows it (0: none)."""
    return torpord.runtime(model).worker_pid


def state(torpord: Torpord, model: str) -> int:
    return torpord.runtime(model).state


def kill_mid_transition(torpord: Torpord, model: str, start: Callable[[], T], into: int) -> T:
    """Freeze the model's worker, `start` a transition in the background, wait until the
    runtime is `into` (the worker is now inside its call and cannot answer), kill -9 the
    worker, and return what `start` returned: it must end, not hang."""
    pid = worker_pid(torpord, model)
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(start)
            assert_eventually(lambda: state(torpord, model), lambda s: s == into, timeout=30)
            os.kill(pid, signal.SIGKILL)
            return running.result(timeout=60)  # TimeoutError: the transition wedged
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def settled(torpord: Torpord, model: str) -> int:
    """The runtime's state once no transition runs on it (it must come to rest)."""
    return assert_eventually(
        lambda: state(torpord, model), lambda s: s not in TRANSITIONAL, timeout=60
    )


def quietly(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn`, its typed error returned instead of raised (the transition may fail: fine)."""

    def run() -> object:
        try:
            return fn()
        except TorporError as err:
            return err

    return run


COPIES = 6
"""Models (copies of alpha) whose workers are killed at once: each kill races grpc's view of
the closed socket against the supervisor closing the channel, and main wedged in about 1
trial in 5 of this kind (4 in 10 in the issue's runs), so six make one round fail on main
nearly always."""


@pytest.fixture
def crowded(tmp_path: Path, model_root: Path) -> Iterator[Torpord]:
    """torpord with COPIES models that all fit on its device at once."""
    memory = int((COPIES + 0.5) * footprint_bytes(model_root))
    daemon = start_torpord(tmp_path / "state", model_root, memory=memory)
    for i in range(COPIES):
        daemon.register(f"alpha-{i}", model_root / "alpha")
    yield daemon
    assert daemon.stop() == 0


def states(torpord: Torpord) -> dict[str, int]:
    return {r.model: r.state for r in torpord.residency().runtimes}


def test_workers_killed_while_suspending_to_disk_never_wedge_their_models(
    crowded: Torpord,
) -> None:
    """Issue 12: kill -9 during a suspend to disk hung about 4 runs in 10 (`ps`: suspending,
    PID -). Every eviction must end, every runtime come to rest, and the models serve again."""
    names = [f"alpha-{i}" for i in range(COPIES)]
    with ThreadPoolExecutor(COPIES) as pool:
        first = list(pool.map(lambda m: tokens(generate(crowded, m, timeout=120)), names))
    pids = [worker_pid(crowded, m) for m in names]
    assert all(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(COPIES) as pool:
            evictions = [
                pool.submit(quietly(lambda m=m: evict(crowded, m, common_pb2.TIER_DISK)))
                for m in names
            ]
            suspending = common_pb2.RUNTIME_STATE_SUSPENDING
            assert_eventually(
                lambda: states(crowded),
                lambda now: all(now[m] == suspending for m in names),
                timeout=60,
            )
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for eviction in evictions:
                eviction.result(timeout=90)  # TimeoutError: a transition wedged
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    rest = assert_eventually(
        lambda: states(crowded),
        lambda now: not any(now[m] in TRANSITIONAL for m in names),
        timeout=30,
    )
    assert {rest[m] for m in names} == {common_pb2.RUNTIME_STATE_FAILED}
    assert tokens(generate(crowded, names[0], timeout=120)) == first[0]


def test_a_worker_killed_while_resuming_from_disk_never_wedges_its_model(
    torpord: Torpord,
) -> None:
    """The request that waited for the resume is served (by a new worker), not left queued."""
    first = tokens(generate(torpord, "alpha"))
    evict(torpord, "alpha", common_pb2.TIER_DISK)
    waiting = lambda: generate(torpord, "alpha", timeout=60)  # noqa: E731
    served = kill_mid_transition(torpord, "alpha", waiting, common_pb2.RUNTIME_STATE_RESUMING)
    assert tokens(served) == first
    assert settled(torpord, "alpha") == common_pb2.RUNTIME_STATE_RESIDENT


def test_a_worker_killed_while_suspending_to_host_never_wedges_its_model(
    torpord: Torpord,
) -> None:
    first = tokens(generate(torpord, "alpha"))
    evicting = quietly(lambda: evict(torpord, "alpha", common_pb2.TIER_HOST))
    kill_mid_transition(torpord, "alpha", evicting, common_pb2.RUNTIME_STATE_SUSPENDING)
    assert settled(torpord, "alpha") == common_pb2.RUNTIME_STATE_FAILED
    assert tokens(generate(torpord, "alpha")) == first


# -- a worker that hangs ------------------------------------------------------------------


@pytest.fixture
def impatient(tmp_path: Path, model_root: Path) -> Iterator[Torpord]:
    """torpord that gives a worker 2 s to answer during a transition."""
    daemon = start_torpord(
        tmp_path / "state",
        model_root,
        memory=int(2.5 * footprint_bytes(model_root)),
        TORPOR_WORKER_TRANSITION_TIMEOUT_S="2",
        TORPOR_WORKER_STOP_TIMEOUT_S="1",
    )
    daemon.register("alpha", model_root / "alpha")
    yield daemon
    assert daemon.stop() == 0


def test_a_hung_worker_is_killed_and_its_transition_fails(impatient: Torpord) -> None:
    """A worker that stops answering mid-suspend (here SIGSTOP: the process is alive but
    does nothing) is killed after worker.transition_timeout_s; the eviction ends, and the
    model serves again from a new worker."""
    first = tokens(generate(impatient, "alpha"))
    pid = worker_pid(impatient, "alpha")
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(Unavailable, match="its worker failed"):
            evict(impatient, "alpha", common_pb2.TIER_HOST, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert settled(impatient, "alpha") == common_pb2.RUNTIME_STATE_FAILED
    assert_eventually(lambda: pid_alive(pid), lambda alive: not alive, timeout=10)
    assert tokens(generate(impatient, "alpha")) == first


def pid_alive(pid: int) -> bool:
    """Whether `pid` is still a process that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
