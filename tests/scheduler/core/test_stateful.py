"""Random event sequences against the policy core (hypothesis stateful testing).

A fake daemon (`Harness`) executes plans: it completes, fails or kills transitions when a
rule says so, with a fake clock. After every step:
- no budget is exceeded (GPU, host RAM, disk, worker slots), transitions counted at their
  peak, by an accounting written here independently of the core's;
- no leased or pinned runtime was chosen as a victim or moved off the GPU;
- every transition is in the table, and starts from the state the runtime was last seen in;
- every request is answered at most once.
At the end the event stream quiesces (clients release, transitions complete, time advances
only to each plan's `wake_at`): every request must then be answered, with a proper code.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from torpor.errors import Code, FailedPrecondition, Internal, NotFound, ResourceExhausted
from torpor.scheduler.core import (
    TRANSITIONS,
    AcquireRequested,
    ClientGone,
    DrainRequested,
    Drop,
    EndLease,
    EvictFinished,
    EvictMode,
    EvictRequested,
    GpuSpec,
    Grant,
    LeaseReleased,
    ModelRegistered,
    ModelSpec,
    ModelUnregistered,
    PinChanged,
    Plan,
    PolicyConfig,
    PrefetchDone,
    PrefetchRequested,
    Reject,
    RenewRequested,
    RequestFinished,
    RequestStarted,
    RuntimeState,
    SchedulerState,
    SnapshotDeleted,
    Suspend,
    Tick,
    Tier,
    TransitionRolledBack,
    WorkerDied,
    initial_state,
    snapshot_in_use,
)

from .harness import ExchangeSide, GiB, Harness, exchange_sides, footprint

STAGING = 256 * 1024**2  # the worker's staging buffers of every model

S = RuntimeState
ANSWER_CODES = {
    Code.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED,
    Code.FAILED_PRECONDITION,
    Code.UNAVAILABLE,
    Code.CANCELLED,
    Code.ABORTED,
    Code.NOT_FOUND,
}
PICK = st.integers(0, 1 << 16)
ACQUIRE = dict(
    ms=st.lists(PICK, min_size=1, max_size=3),
    client=st.sampled_from("xyz"),
    priority=st.sampled_from([-5, 0, 5]),
    deadline=st.none() | st.none() | st.floats(0.5, 60.0),
)


WORKER = (S.RESIDENT, S.SUSPENDED_HOST, S.SUSPENDED_DEEP, S.SUSPENDED_DISK)


def oracle_usage(state: SchedulerState) -> tuple[Counter, int, int, int]:
    """GPU bytes per GPU, host bytes, disk bytes and workers, from the state table of
    docs/POLICY.md (written again here so that the core's own accounting is checked)."""
    gpus: Counter = Counter()
    host = disk = workers = 0

    def parts(res, fp) -> tuple[int, int, int, int]:
        gpu = {
            S.RESIDENT: fp.weights + fp.kv + fp.graph_pool + fp.context + fp.residue,
            S.SUSPENDED_HOST: fp.context + fp.residue,
            S.SUSPENDED_DISK: fp.context,
        }.get(res.state, 0)
        h = (fp.weights if res.host_copy else 0) + (
            fp.context + fp.staging if res.state is S.SUSPENDED_DEEP else 0
        )
        return gpu, h, fp.weights if res.snapshot else 0, int(res.state in WORKER)

    def staged(frm, to, fp) -> int:
        """A disk read into a worker (a load from a snapshot, a resume from disk) holds the
        read ring; a snapshot write without a host copy, one buffer (docs/POLICY.md
        "Staging buffers")."""
        to_host = frm.state is S.SUSPENDED_DISK and to.state is S.SUSPENDED_HOST
        reads = (
            to.state in WORKER
            and not to_host
            and (frm.state is S.SUSPENDED_DISK or (frm.state not in WORKER and frm.snapshot))
        )
        writes = frm.state in WORKER and to.snapshot and not frm.snapshot and not frm.host_copy
        return fp.staging if reads else fp.write_staging if writes else 0

    def peak_of(rt) -> tuple[int | None, list[int]]:
        fp = state.models[rt.model].spec.footprint
        ends = [rt.at] + ([rt.op.to] if rt.op else [])
        priced = [parts(res, fp) for res in ends]
        gpu = next((res.gpu for res in ends if res.gpu is not None), None)
        peak = [max(p[i] for p in priced) for i in range(4)]
        if rt.op is not None:
            peak[1] += staged(rt.at, rt.op.to, fp)
        return gpu, peak

    def pair_joint(a, b) -> list[int]:
        """An exchange: the larger of the pair's start and end, part by part, plus the
        slack and both sides' exchange staging rings (docs/POLICY.md "Exchange swap")."""
        fa = state.models[a.model].spec.footprint
        fb = state.models[b.model].spec.footprint
        start = [x + y for x, y in zip(parts(a.at, fa), parts(b.at, fb), strict=True)]
        end = [x + y for x, y in zip(parts(a.op.to, fa), parts(b.op.to, fb), strict=True)]
        joint = [max(x, y) for x, y in zip(start, end, strict=True)]
        joint[1] += state.config.exchange_slack_bytes + fa.exchange_staging + fb.exchange_staging
        return joint

    counted: set[str] = set()
    for rt in state.runtimes.values():
        if rt.id in counted:
            continue
        op = rt.op
        partner = state.runtimes.get(op.partner) if op is not None and op.partner else None
        if op is not None and op.partner is not None:
            if partner is not None and partner.op is not None and partner.op.partner == rt.id:
                joint = pair_joint(rt, partner) if op.outgoing else pair_joint(partner, rt)
                counted |= {rt.id, partner.id}
            else:  # its partner's op ended: what the pair held, less what the partner holds
                assert op.joint is not None
                whole = [op.joint.gpu_bytes, op.joint.host, op.joint.disk, op.joint.workers]
                other = (
                    parts(partner.at, state.models[partner.model].spec.footprint)
                    if partner is not None
                    else (0, 0, 0, 0)
                )
                joint = [max(0, j - o) for j, o in zip(whole, other, strict=True)]
                counted.add(rt.id)
            gpu = rt.at.gpu if rt.at.gpu is not None else op.to.gpu
            if gpu is not None:
                gpus[gpu] += joint[0]
            host, disk, workers = host + joint[1], disk + joint[2], workers + joint[3]
            continue
        gpu, peak = peak_of(rt)
        if gpu is not None:
            gpus[gpu] += peak[0]
        host, disk, workers = host + peak[1], disk + peak[2], workers + peak[3]
    return gpus, host, disk, workers


class CoreMachine(RuleBasedStateMachine):
    """Clients and a fake executor: acquire, release, renew, go away, generate, let time
    pass; transitions complete, fail, or their workers die."""

    h: Harness

    @initialize(
        gpus=st.lists(st.sampled_from([24, 40]), min_size=1, max_size=2),
        host=st.sampled_from([0, 8, 12, 24, 40]),
        disk=st.sampled_from([0, 20, 80]),
        weights=st.lists(st.sampled_from([2, 6, 10, 14, 18, 20, 30]), min_size=2, max_size=5),
        pinned=st.lists(st.booleans(), min_size=5, max_size=5),
        snapshots=st.lists(st.booleans(), min_size=5, max_size=5),
        keep_alive=st.sampled_from([0.0, 10.0]),
        min_residency=st.sampled_from([0.0, 5.0]),
        cap=st.sampled_from([1, 4]),
        max_workers=st.sampled_from([2, 8]),
        queue_bound=st.sampled_from([1, 4, 16]),
    )
    def setup(self, gpus, host, disk, weights, pinned, snapshots, keep_alive, min_residency,
              cap, max_workers, queue_bound) -> None:  # fmt: skip
        config = PolicyConfig(
            queue_bound=queue_bound,
            keep_alive_s=keep_alive,
            min_residency_s=min_residency,
            starvation_cap=cap,
            starvation_wait_s=20.0,
            lease_ttl_s=30.0,
            max_workers=max_workers,
            max_load_failures=2,
        )
        specs = tuple(GpuSpec(i, g * GiB) for i, g in enumerate(gpus))
        state = initial_state(specs, host_budget=host * GiB, disk_budget=disk * GiB, config=config)
        self.h = Harness(state, check=self._check_plan)
        self.models = [f"m{i}" for i in range(len(weights))]
        self.answers: Counter = Counter()
        self.requests: set[str] = set()
        self.inflight: Counter = Counter()
        self.seen: dict[str, RuntimeState] = {}
        self.n = 0
        stored = 0
        self.specs: dict[str, ModelSpec] = {}
        for i, (name, w) in enumerate(zip(self.models, weights, strict=False)):
            snap = snapshots[i] and stored + w <= disk  # a snapshot in the store fits its budget
            stored += w if snap else 0
            pin = pinned[i] and i == 0  # at most one pinned model, so others can still run
            fp = replace(
                footprint(w),
                staging=STAGING,
                write_staging=STAGING // 4,
                exchange_staging=STAGING // 2,
            )
            self.specs[name] = ModelSpec(name, fp, pinned=pin)
            self._send(ModelRegistered(self.specs[name], snap))

    # Sending and checking ---------------------------------------------------------------

    def _send(self, event, dt: float = 0.0) -> Plan:
        return self.h.send(event, dt)

    def _check_plan(self, before: SchedulerState, plan: Plan) -> None:
        # Leases that ended in this step (released, expired, revoked) no longer protect.
        ended = {a.lease_id for a in plan.actions if isinstance(a, EndLease)}
        for action in plan.actions:
            if isinstance(action, Grant | Reject | PrefetchDone | EvictFinished):
                key = action.request_id
                if isinstance(action, EvictFinished):
                    key = f"{action.request_id}/{action.runtime_id}"
                self.answers[key] += 1
                assert self.answers[key] == 1, f"answered twice: {key}"
            if isinstance(action, Reject):
                assert action.error.code in ANSWER_CODES, action.error
            if isinstance(action, Suspend | Drop) and action.runtime_id in before.runtimes:
                rt = before.runtimes[action.runtime_id]
                if rt.state is S.RESIDENT:
                    held = {x.id for x in before.leases.values() if x.runtime_id == rt.id}
                    assert held <= ended, f"leased runtime moved off the GPU: {action}"
                    assert not self._pinned(before, rt.model), f"pinned moved: {action}"
        for decision in plan.decisions:
            for victim in decision.victims:
                assert not self._pinned(before, victim.model), victim
                held = {x.id for x in before.leases.values() if x.runtime_id == victim.runtime_id}
                assert held <= ended, victim
        for t in plan.transitions:
            assert t.to in TRANSITIONS[t.frm], t
            assert self.seen.get(t.runtime_id, t.frm) is t.frm, (t, self.seen.get(t.runtime_id))
            self.seen[t.runtime_id] = t.to

    def _pinned(self, before: SchedulerState, model: str) -> bool:
        """Pinned before and after the step (a step that unpins may then evict it, and
        unregistering a model drops its runtime, pinned or not)."""
        after = self.h.state.models.get(model)
        if after is None or after.unregistering:
            return False
        return before.models[model].spec.pinned and after.spec.pinned

    def _pick(self, items, i: int):
        items = sorted(items)
        return items[i % len(items)]

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    # Clients ---------------------------------------------------------------------------

    # Hypothesis picks among rules evenly: the common events get more than one rule.
    @rule(**ACQUIRE)
    def acquire(self, ms, client, priority, deadline) -> None:
        for m in ms:  # a burst
            rid = self._id("r")
            self.requests.add(rid)
            when = None if deadline is None else self.h.now + deadline
            model = self._pick(self.models, m)
            self._send(AcquireRequested(rid, model, client, priority, when))

    @rule(**ACQUIRE)
    def acquire_more(self, ms, client, priority, deadline) -> None:
        self.acquire(ms, client, priority, deadline)

    @precondition(lambda self: self.h.state.leases)
    @rule(i=PICK)
    def release(self, i) -> None:
        self._send(LeaseReleased(self._pick(self.h.state.leases, i)))

    @precondition(lambda self: self.h.state.leases)
    @rule(i=PICK)
    def release_more(self, i) -> None:
        self.release(i)

    @precondition(lambda self: self.h.state.leases)
    @rule(i=PICK)
    def renew(self, i) -> None:
        self._send(RenewRequested(self._pick(self.h.state.leases, i)))

    @rule(client=st.sampled_from("xyz"))
    def client_gone(self, client) -> None:
        self._send(ClientGone(client))

    @precondition(lambda self: self.h.state.leases)
    @rule(i=PICK)
    def start_request(self, i) -> None:
        lease = self.h.state.leases[self._pick(self.h.state.leases, i)]
        self.inflight[lease.model] += 1
        self._send(RequestStarted(lease.model))

    @precondition(lambda self: +self.inflight)
    @rule(i=PICK)
    def finish_request(self, i) -> None:
        model = self._pick(+self.inflight, i)
        self.inflight[model] -= 1
        self._send(RequestFinished(model))

    @rule(dt=st.sampled_from([0.5, 3.0, 12.0, 40.0]))
    def tick(self, dt) -> None:
        self._send(Tick(), dt)

    # The executor ----------------------------------------------------------------------

    @precondition(lambda self: self.h.moves)
    @rule(i=PICK)
    def complete_move(self, i) -> None:
        self.h.complete(self.h.moves[self._pick(self.h.moves, i)])

    @precondition(lambda self: self.h.moves)
    @rule(i=PICK)
    def complete_more(self, i) -> None:
        self.complete_move(i)

    @precondition(lambda self: self.h.moves)
    @rule(i=PICK)
    def fail_move(self, i) -> None:
        self.h.fail(self.h.moves[self._pick(self.h.moves, i)])

    @precondition(lambda self: any(isinstance(m, Suspend) for m in self.h.moves.values()))
    @rule(i=PICK)
    def roll_back_suspend(self, i) -> None:
        """A suspend whose snapshot found no room: back where it started (issue 12)."""
        suspends = {k: m for k, m in self.h.moves.items() if isinstance(m, Suspend)}
        move = self.h.moves.pop(self._pick(suspends, i))
        full = ResourceExhausted("no room", reason="STORE_FULL")
        self._send(TransitionRolledBack(move.runtime_id, move.seq, full))

    @precondition(lambda self: any(isinstance(m, ExchangeSide) for m in self.h.moves.values()))
    @rule(i=PICK)
    def roll_back_exchange(self, i) -> None:
        """An exchange whose side failed, run back the other way: both where they were."""
        sides = {k: m for k, m in self.h.moves.items() if isinstance(m, ExchangeSide)}
        picked = sides[self._pick(sides, i)]
        failed = Internal("a side failed", reason="EXCHANGE_PEER_FAILED")
        for side in exchange_sides(picked.action):
            if self.h.moves.pop((side.runtime_id, side.seq), None) is not None:
                self._send(TransitionRolledBack(side.runtime_id, side.seq, failed))

    @precondition(lambda self: any(rt.state.has_worker for rt in self.h.state.runtimes.values()))
    @rule(i=PICK)
    def kill_worker(self, i) -> None:
        alive = [r for r, rt in self.h.state.runtimes.items() if rt.state.has_worker]
        rt = self.h.state.runtimes[self._pick(alive, i)]
        self._send(WorkerDied(rt.id, rt.incarnation, "test"))

    # Invariants ------------------------------------------------------------------------

    @invariant()
    def budgets_hold(self) -> None:
        state = self.h.state
        gpus, host, disk, workers = oracle_usage(state)
        for g in state.gpus:
            assert gpus[g.index] <= g.capacity, f"gpu {g.index}: {gpus[g.index]} > {g.capacity}"
        assert host <= state.host_budget, (host, state.host_budget)
        assert disk <= state.disk_budget, (disk, state.disk_budget)
        assert workers <= state.config.max_workers, workers

    # The end: everything quiesces ------------------------------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        h = self.h
        for _ in range(400):
            for model, n in list(self.inflight.items()):
                for _ in range(n):
                    self._send(RequestFinished(model))
            self.inflight.clear()
            for lease in list(h.state.leases):
                self._send(LeaseReleased(lease))
            if h.moves:
                h.complete(next(iter(h.moves.values())))
                continue
            pending = h.state.queues or any(
                rt.evict or rt.prefetch for rt in h.state.runtimes.values()
            )
            if not pending:
                break
            wake = h.plans[-1].wake_at
            assert wake is not None, f"stuck with nothing to wait for: {h.state.queues}"
            self._send(Tick(), wake - h.now)
        assert not h.state.queues, h.state.queues
        unanswered = [r for r in self.requests if self.answers[r] == 0]
        assert not unanswered, unanswered


class OperatorMachine(CoreMachine):
    """CoreMachine, plus operators and prefetches: pins, evictions, drains, snapshot
    deletions."""

    # Operators -------------------------------------------------------------------------

    @rule(m=PICK, pinned=st.booleans())
    def pin(self, m, pinned) -> None:
        model = self._pick(self.models, m)
        with contextlib.suppress(NotFound):  # unregistered, or being unregistered
            self._send(PinChanged(model, pinned))

    @rule(m=PICK)
    def unregister(self, m) -> None:
        model = self._pick(self.models, m)
        if model not in self.h.state.models:
            self._send(ModelRegistered(self.specs[model]))  # back, without a snapshot
            return
        with contextlib.suppress(FailedPrecondition, NotFound):  # leased; or unregistering
            self._send(ModelUnregistered(model))

    @rule(m=PICK, tier=st.sampled_from([Tier.HOST, Tier.DEEP, Tier.DISK, Tier.DROP]),
          mode=st.sampled_from(list(EvictMode)), timeout=st.none() | st.just(5.0))  # fmt: skip
    def evict(self, m, tier, mode, timeout) -> None:
        rid = self._id("e")
        self._send(EvictRequested(rid, self._pick(self.models, m), tier, mode, timeout))

    @rule(g=PICK, undrain=st.booleans(), tier=st.sampled_from([Tier.HOST, Tier.DROP]))
    def drain(self, g, undrain, tier) -> None:
        gpu = self._pick([x.index for x in self.h.state.gpus], g)
        self._send(DrainRequested(self._id("d"), gpu, tier, undrain=undrain))

    @rule(m=PICK, tier=st.sampled_from([Tier.GPU, Tier.HOST]))
    def prefetch(self, m, tier) -> None:
        rid = self._id("p")
        self.requests.add(rid)
        self._send(PrefetchRequested(rid, self._pick(self.models, m), tier))

    @rule(m=PICK)
    def delete_snapshot(self, m) -> None:
        model = self._pick(self.models, m)
        if model in self.h.state.models and not snapshot_in_use(self.h.state, model):
            with contextlib.suppress(NotFound):  # unregistering
                self._send(SnapshotDeleted(model))


# About 5 s each on one core; TORPOR_STATEFUL_EXAMPLES=5000 searches harder (minutes).
EXAMPLES = int(os.environ.get("TORPOR_STATEFUL_EXAMPLES", "200"))


class ExchangeMachine(CoreMachine):
    """The same machine on a host whose RAM holds one copy of the largest model (plus the
    slack), and a GPU that holds one or two of them: runtimes coming back from host RAM
    trade places with resident ones (exchange swaps) all the time."""

    @initialize(
        weights=st.lists(st.sampled_from([10, 14, 18, 20]), min_size=2, max_size=3),
        disk=st.sampled_from([0, 80]),
        snapshots=st.lists(st.booleans(), min_size=5, max_size=5),
        cap=st.sampled_from([1, 4]),
    )
    def setup(self, weights, disk, snapshots, cap) -> None:  # type: ignore[override]
        host = max(weights) + 2  # one copy, the exchange's slack and two staging rings
        CoreMachine.setup(
            self, [40], host, disk, weights, [False] * 5, snapshots, 0.0, 0.0, cap, 8, 4
        )


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CoreMachine.TestCase.settings = SETTINGS
OperatorMachine.TestCase.settings = SETTINGS
TestCore = CoreMachine.TestCase
TestWithOperators = OperatorMachine.TestCase
ExchangeMachine.TestCase.settings = SETTINGS
TestWithExchanges = ExchangeMachine.TestCase
