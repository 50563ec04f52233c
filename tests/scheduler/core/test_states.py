"""The state enum, the transition table, byte accounting, and the core's import boundary."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from torpor.errors import Internal
from torpor.scheduler.core import TRANSITIONS, Residency, RuntimeState, Tier, check_transition
from torpor.scheduler.core.accounting import transition_usage, usage
from torpor.v1 import admin_pb2, common_pb2

from .harness import GiB, footprint

S = RuntimeState


def test_enum_values_are_the_proto_numbers() -> None:
    for state in RuntimeState:
        assert common_pb2.RuntimeState.Value(f"RUNTIME_STATE_{state.name}") == state.value
    for tier in Tier:
        assert common_pb2.Tier.Value(f"TIER_{tier.name}") == tier.value
    assert admin_pb2.EvictMode.Value("EVICT_MODE_ABORT") == 2


def test_table_has_every_state_and_only_states() -> None:
    assert set(TRANSITIONS) == set(RuntimeState)
    for targets in TRANSITIONS.values():
        assert targets <= set(RuntimeState)


@pytest.mark.parametrize(
    ("frm", "to"),
    [
        (S.COLD, S.RESIDENT),  # a load always goes through LOADING
        (S.RESIDENT, S.SUSPENDED_HOST),  # and a suspend through SUSPENDING
        (S.SUSPENDED_DEEP, S.RESIDENT),
        (S.FAILED, S.RESIDENT),
        (S.LOADING, S.SUSPENDING),
        (S.SNAPSHOT, S.SUSPENDED_DISK),
    ],
)
def test_illegal_transition_raises_internal(frm: RuntimeState, to: RuntimeState) -> None:
    with pytest.raises(Internal) as info:
        check_transition("rt-1", frm, to)
    assert info.value.reason == "ILLEGAL_TRANSITION"
    assert info.value.metadata == {"runtime": "rt-1", "from": frm.name, "to": to.name}


def test_every_state_can_reach_resident_and_leave_it() -> None:
    def reachable(start: RuntimeState) -> set[RuntimeState]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for state in RuntimeState:
        assert S.RESIDENT in reachable(state), state
    assert {S.SUSPENDED_HOST, S.SUSPENDED_DEEP, S.SUSPENDED_DISK, S.SNAPSHOT} <= reachable(
        S.RESIDENT
    )


@pytest.mark.parametrize(
    "bad",
    [
        dict(state=S.LOADING, gpu=0),  # a transitional state is not a residency
        dict(state=S.RESIDENT),  # a worker needs a GPU
        dict(state=S.COLD, gpu=0),  # no worker, no GPU
        dict(state=S.SUSPENDED_HOST, gpu=0),  # host tier without the host copy
        dict(state=S.SUSPENDED_DISK, gpu=0),  # disk tier without a snapshot
        dict(state=S.COLD, snapshot=True),  # that is SNAPSHOT
    ],
)
def test_impossible_residency_raises(bad: dict) -> None:
    with pytest.raises(Internal):
        Residency(**bad)


def test_bytes_by_state() -> None:
    fp = footprint(10)
    ctx, residue = fp.context, fp.residue
    cases = {
        Residency(S.RESIDENT, 0, host_copy=False): (fp.resident, 0, 0, 1),
        Residency(S.RESIDENT, 0, host_copy=True, snapshot=True): (
            fp.resident,
            fp.weights,
            fp.weights,
            1,
        ),
        Residency(S.SUSPENDED_HOST, 0, host_copy=True): (ctx + residue, fp.weights, 0, 1),
        Residency(S.SUSPENDED_DEEP, 0, host_copy=True): (0, fp.weights + ctx, 0, 1),
        Residency(S.SUSPENDED_DISK, 0, snapshot=True): (ctx, 0, fp.weights, 1),
        Residency(S.SNAPSHOT, snapshot=True): (0, 0, fp.weights, 0),
        Residency(S.COLD): (0, 0, 0, 0),
        Residency(S.FAILED, snapshot=True): (0, 0, fp.weights, 0),
    }
    for res, expected in cases.items():
        u = usage(res, fp)
        assert (u.gpu_bytes, u.host, u.disk, u.workers) == expected, res


def test_a_transition_holds_the_peak_of_both_ends() -> None:
    fp = footprint(10)
    resident = Residency(S.RESIDENT, 1, host_copy=False)
    disk = Residency(S.SUSPENDED_DISK, 1, snapshot=True)
    u = transition_usage(resident, disk, fp)
    assert (u.gpu, u.gpu_bytes, u.host, u.disk) == (1, fp.resident, 0, fp.weights)
    load = transition_usage(Residency(S.COLD), Residency(S.RESIDENT, 0, host_copy=True), fp)
    assert (load.gpu, load.gpu_bytes, load.host, load.workers) == (0, fp.resident, fp.weights, 1)
    assert fp.resident == int(12 * GiB) + fp.residue


STAGES = [  # (from, to, what it stages): docs/POLICY.md "Staging buffers"
    (Residency(S.SNAPSHOT, snapshot=True), Residency(S.RESIDENT, 0, snapshot=True), "read"),
    (Residency(S.COLD), Residency(S.RESIDENT, 0, host_copy=True), None),
    (
        Residency(S.SUSPENDED_DISK, 0, snapshot=True),
        Residency(S.RESIDENT, 0, snapshot=True),
        "read",
    ),
    (
        Residency(S.SUSPENDED_DISK, 0, snapshot=True),
        Residency(S.SUSPENDED_HOST, 0, host_copy=True, snapshot=True),
        None,  # read straight into the new host copy
    ),
    (
        Residency(S.RESIDENT, 0, host_copy=False),
        Residency(S.SUSPENDED_DISK, 0, snapshot=True),
        "write",  # it writes the snapshot from the device
    ),
    (
        Residency(S.RESIDENT, 0, host_copy=True),
        Residency(S.SUSPENDED_DISK, 0, snapshot=True),
        None,  # it writes the snapshot from its host copy
    ),
    (
        Residency(S.RESIDENT, 0, host_copy=True, snapshot=True),
        Residency(S.SUSPENDED_DISK, 0, snapshot=True),
        None,  # the snapshot is written already
    ),
    (
        Residency(S.SUSPENDED_HOST, 0, host_copy=True),
        Residency(S.RESIDENT, 0, host_copy=True),
        None,
    ),
    (Residency(S.RESIDENT, 0, host_copy=True), Residency(S.COLD), None),
]


@pytest.mark.parametrize(("frm", "to", "kind"), STAGES)
def test_a_move_that_stages_holds_the_staging_buffers_in_host_ram(
    frm: Residency, to: Residency, kind: str | None
) -> None:
    plain = footprint(10)
    fp = replace(plain, staging=256 * 1024**2, write_staging=64 * 1024**2)
    with_staging = transition_usage(frm, to, fp)
    without = transition_usage(frm, to, plain)
    extra = {"read": fp.staging, "write": fp.write_staging, None: 0}[kind]
    assert with_staging.host - without.host == extra
    assert (with_staging.gpu_bytes, with_staging.disk) == (without.gpu_bytes, without.disk)


def test_a_deep_suspended_runtime_holds_its_stager_and_a_resident_one_does_not() -> None:
    fp = replace(footprint(10), staging=224 * 1024**2)
    deep = Residency(S.SUSPENDED_DEEP, 0, host_copy=True)
    resident = Residency(S.RESIDENT, 0, host_copy=True)
    assert usage(deep, fp).host == fp.weights + fp.context + fp.staging
    assert usage(resident, fp).host == fp.weights
    assert transition_usage(deep, resident, fp).host == usage(deep, fp).host


def test_core_imports_no_protobuf_grpc_or_torch() -> None:
    code = (
        "import sys, torpor.scheduler.core\n"
        "bad = [m for m in ('google.protobuf', 'grpc', 'torch', 'torpor.v1') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
