"""`Sim`: the two ledgers a scheduling pass plans against.

- *projected*: every runtime at the target of its running op, plus the targets this pass has
  chosen (victims, placements). Planning keeps it within every budget, so that everything
  planned can eventually run.
- *now*: what is held at this instant, each running op at the peak of its two ends. An op
  starts only if *now* stays within every budget, so the daemon may run all of a plan's
  actions at once.

Placement tries alternatives on `fork()`s and keeps the one it chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torpor.scheduler.core.accounting import Usage, transition_usage, usage
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import Residency


@dataclass(slots=True)
class _Ledger:
    gpu: dict[int, int] = field(default_factory=dict)
    host: int = 0
    disk: int = 0
    workers: int = 0

    def copy(self) -> _Ledger:
        return _Ledger(dict(self.gpu), self.host, self.disk, self.workers)

    def add(self, u: Usage, sign: int = 1) -> None:
        if u.gpu is not None:
            self.gpu[u.gpu] = self.gpu.get(u.gpu, 0) + sign * u.gpu_bytes
        self.host += sign * u.host
        self.disk += sign * u.disk
        self.workers += sign * u.workers


@dataclass(frozen=True, slots=True)
class _Caps:
    gpu: dict[int, int]
    host: int
    disk: int
    workers: int


def _allows(ledger: _Ledger, caps: _Caps, remove: Usage, add: Usage) -> bool:
    """Would replacing `remove` with `add` keep every budget? A part that does not grow is
    always allowed, so that a ledger already over (a re-measured footprint) can still shrink."""
    trial = ledger.copy()
    trial.add(remove, -1)
    trial.add(add)
    pairs = [(trial.host, ledger.host, caps.host), (trial.disk, ledger.disk, caps.disk)]
    pairs.append((trial.workers, ledger.workers, caps.workers))
    for g in {g for g in (remove.gpu, add.gpu) if g is not None}:
        pairs.append((trial.gpu.get(g, 0), ledger.gpu.get(g, 0), caps.gpu.get(g, 0)))
    return all(new <= cap or new <= old for new, old, cap in pairs)


class Sim:
    """Projected and current byte ledgers of one pass (see the module docstring)."""

    def __init__(self, d: Draft) -> None:
        self.d = d
        self.caps = _Caps(
            gpu={g.index: g.capacity for g in d.gpus},
            host=d.host_budget,
            disk=d.disk_budget,
            workers=d.config.max_workers,
        )
        self.proj: dict[str, Residency] = {}
        self.touched: set[str] = set()
        # Bytes on disk that no runtime accounts for fill part of the disk budget.
        self.projected = _Ledger(disk=d.disk_outside)
        self.current = _Ledger(disk=d.disk_outside)
        for rt in d.runtimes.values():
            self.proj[rt.id] = rt.target()
            self.projected.add(usage(rt.target(), d.fp(rt.model)))
            self.current.add(d.held(rt))

    def fork(self) -> Sim:
        """An independent copy to try an alternative on."""
        other = object.__new__(Sim)
        other.d = self.d
        other.caps = self.caps
        other.proj = dict(self.proj)
        other.touched = set(self.touched)
        other.projected = self.projected.copy()
        other.current = self.current.copy()
        return other

    def _usage(self, rid: str) -> Callable[[Residency], Usage]:
        fp = self.d.fp(self.d.runtimes[rid].model)
        return lambda res: usage(res, fp)

    def adopt(self, other: Sim) -> None:
        """Take over the ledgers of a fork (the alternative that was chosen)."""
        self.proj, self.touched = other.proj, other.touched
        self.projected, self.current = other.projected, other.current

    # Projected -------------------------------------------------------------------------

    def fits(self, rid: str, to: Residency) -> bool:
        """Can runtime `rid` be planned at `to` within every budget, the move there included
        (a move holds the peak of its ends and its staging buffers: accounting.py)? A plan
        whose end fits but whose move never could would wait forever."""
        frm, fp = self.proj[rid], self.d.fp(self.d.runtimes[rid].model)
        return _allows(self.projected, self.caps, usage(frm, fp), transition_usage(frm, to, fp))

    def move(self, rid: str, to: Residency) -> None:
        """Plan runtime `rid` at `to`."""
        price = self._usage(rid)
        self.projected.add(price(self.proj[rid]), -1)
        self.projected.add(price(to))
        self.proj[rid] = to
        self.touched.add(rid)

    def fits_exchange(self, joint: Usage, ends: tuple[Usage, Usage]) -> bool:
        """With both runtimes of an exchange already planned at their ends (`move`), does
        the exchange itself fit: the projection with their ends replaced by `joint`?"""
        return _allows(self.projected, self.caps, ends[0].plus(ends[1]), joint)

    def can_start_exchange(self, out: str, into: str, joint: Usage) -> bool:
        """Can the exchange of two idle runtimes start now, holding `joint` together?"""
        a, b = self.d.runtimes[out], self.d.runtimes[into]
        if a.op is not None or b.op is not None:
            return False
        now = usage(a.at, self.d.fp(a.model)).plus(usage(b.at, self.d.fp(b.model)))
        return _allows(self.current, self.caps, now, joint)

    def start_exchange(self, out: str, into: str, joint: Usage) -> None:
        """Record that an exchange started (call before the Draft changes)."""
        a, b = self.d.runtimes[out], self.d.runtimes[into]
        self.current.add(usage(a.at, self.d.fp(a.model)), -1)
        self.current.add(usage(b.at, self.d.fp(b.model)), -1)
        self.current.add(joint)

    def hold_host(self, nbytes: int) -> None:
        """Count `nbytes` of host RAM as taken in the projection (negative: give them back):
        room a planned move needs while the moves that make room for it are chosen."""
        self.projected.host += nbytes

    def free_gpu(self, gpu: int) -> int:
        """Projected free bytes of a GPU."""
        return self.caps.gpu[gpu] - self.projected.gpu.get(gpu, 0)

    def free_host(self) -> int:
        """Projected free bytes of the host budget."""
        return self.caps.host - self.projected.host

    def free_workers(self) -> int:
        """Projected free worker slots."""
        return self.caps.workers - self.projected.workers

    # Now -------------------------------------------------------------------------------

    def can_start(self, rid: str, to: Residency) -> bool:
        """Can an op from the runtime's stable residency to `to` start now?"""
        rt = self.d.runtimes[rid]
        if rt.op is not None:
            return False
        fp = self.d.fp(rt.model)
        return _allows(self.current, self.caps, usage(rt.at, fp), transition_usage(rt.at, to, fp))

    def start(self, rid: str, to: Residency) -> None:
        """Record that an op towards `to` started (call before the Draft changes)."""
        rt = self.d.runtimes[rid]
        fp = self.d.fp(rt.model)
        self.current.add(usage(rt.at, fp), -1)
        self.current.add(transition_usage(rt.at, to, fp))
