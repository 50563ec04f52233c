"""Byte accounting: what a runtime holds on its GPU, in pinned host RAM, on disk, and whether
it holds a worker slot, by state.

| state | GPU bytes | host bytes | disk bytes |
| --- | --- | --- | --- |
| RESIDENT | footprint (all parts) | weights if it keeps its host copy | snapshot |
| SUSPENDED_HOST | context + residue | weights | snapshot |
| SUSPENDED_DEEP | 0 | weights + context (the checkpointed context) + staging | snapshot |
| SUSPENDED_DISK | context | 0 | snapshot |
| SNAPSHOT, COLD, FAILED | 0 | 0 | snapshot |

A snapshot counts `Footprint.disk`: the bytes the chunk store holds for it once it is recorded
(`TransitionCompleted.snapshot_bytes`, or the registration of a model that has one), an upper
estimate before. The store's other bytes (snapshots no runtime restores from, leftovers of
failed writes) are `SchedulerState.disk_outside`, measured by the daemon
(`DiskOutsideMeasured`): the disk ledger is their sum, and the chunk bytes on disk never
exceed it.

A runtime in a transition holds the larger of its two ends, part by part, until the
transition completes: the daemon may start every action of a plan at once and still never
exceed a budget. One transition holds more than either end: a load straight to
SUSPENDED_HOST (Prefetch(HOST) from COLD or SNAPSHOT). The worker builds the engine on the GPU,
because its graphs are captured there, and then suspends it to host inside the same call. So
until the load ends, the runtime holds its full resident footprint on the GPU as well as the
host copy. A resume from SUSPENDED_DISK to SUSPENDED_HOST reads the snapshot straight into the
host copy and maps no arena, so it holds only the peak of its two ends.

Staging (`Footprint.staging`, the worker's staging buffers, pinned on CUDA) is host bytes
too. A transition that stages holds them on top of the peak of its ends: a load from a
snapshot and a resume from SUSPENDED_DISK to RESIDENT its read ring (`staging`; a resume to
SUSPENDED_HOST reads each chunk straight into the new host copy, no ring), and a move that
writes a snapshot from the device, without a host copy, one buffer (`write_staging`: 0 on
the CPU backend, where the weights are host memory already). The deep resume's stager is
made before a deep suspend unlocks the host copy and released when the deep resume ends, so
SUSPENDED_DEEP holds it (and every transition to or from it, as a peak).

An exchange swap (docs/POLICY.md "Exchange swap") is two ops that hold their memory together:
the outgoing runtime's weights leave the GPU into the host pages the incoming one's leave, so
the pair holds the larger of its two ends *as a pair* (`exchange_joint`), plus one handle of
host slack and both sides' staging buffers, not the sum of each side's own peak. Each op
carries the joint usage; the incoming side holds its end, the outgoing side the rest
(`exchange_share`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torpor.errors import Internal
from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.world import Footprint

S = RuntimeState


@dataclass(frozen=True, slots=True)
class Usage:
    """What one runtime holds; `gpu` is the device that `gpu_bytes` are on."""

    gpu: int | None = None
    gpu_bytes: int = 0
    host: int = 0
    disk: int = 0
    workers: int = 0

    def peak(self, other: Usage) -> Usage:
        """Part-by-part maximum: what a transition between the two holds."""
        if self.gpu is not None and other.gpu is not None and self.gpu != other.gpu:
            raise Internal(f"a transition cannot span GPUs {self.gpu} and {other.gpu}")
        return Usage(
            gpu=self.gpu if self.gpu is not None else other.gpu,
            gpu_bytes=max(self.gpu_bytes, other.gpu_bytes),
            host=max(self.host, other.host),
            disk=max(self.disk, other.disk),
            workers=max(self.workers, other.workers),
        )

    def plus(self, other: Usage) -> Usage:
        """Part-by-part sum: what two runtimes hold together (an exchange's pair)."""
        return Usage(
            gpu=self.gpu if self.gpu is not None else other.gpu,
            gpu_bytes=self.gpu_bytes + other.gpu_bytes,
            host=self.host + other.host,
            disk=self.disk + other.disk,
            workers=self.workers + other.workers,
        )


def gpu_bytes(res: Residency, fp: Footprint) -> int:
    """GPU bytes a runtime holds in the stable residency `res`."""
    match res.state:
        case S.RESIDENT:
            return fp.resident
        case S.SUSPENDED_HOST:
            return fp.context + fp.residue
        case S.SUSPENDED_DISK:
            return fp.context
        case _:
            return 0


def host_bytes(res: Residency, fp: Footprint) -> int:
    """Pinned host bytes: the weights' retained copy, plus the context of a deep suspend."""
    copy = fp.weights if res.host_copy else 0
    return copy + (fp.context + fp.staging if res.state is S.SUSPENDED_DEEP else 0)


def disk_bytes(res: Residency, fp: Footprint) -> int:
    """Chunk-store bytes of its snapshot (the weights and small files; the KV cache is never
    saved)."""
    return fp.disk if res.snapshot else 0


def usage(res: Residency, fp: Footprint) -> Usage:
    """Everything a runtime in the stable residency `res` holds."""
    return Usage(
        gpu=res.gpu,
        gpu_bytes=gpu_bytes(res, fp),
        host=host_bytes(res, fp),
        disk=disk_bytes(res, fp),
        workers=1 if res.state.has_worker else 0,
    )


def reads_snapshot(frm: Residency, to: Residency) -> bool:
    """Whether the move from `frm` to `to` reads a snapshot through the worker's staging ring:
    a load from a snapshot, or a resume from SUSPENDED_DISK to RESIDENT (a resume to
    SUSPENDED_HOST reads each chunk straight into the new host copy; module docstring)."""
    if not to.state.has_worker or (frm.state is S.SUSPENDED_DISK and to.state is S.SUSPENDED_HOST):
        return False
    return frm.state is S.SUSPENDED_DISK or (not frm.state.has_worker and frm.snapshot)


def staging(frm: Residency, to: Residency, fp: Footprint) -> int:
    """Staging bytes the move from `frm` to `to` holds on top of its ends: the read ring of a
    snapshot read (`fp.staging`), or a snapshot write's buffer (`fp.write_staging`) when the
    weights leave the device (no host copy to write from)."""
    if reads_snapshot(frm, to):
        return fp.staging
    writes = frm.state.has_worker and to.snapshot and not frm.snapshot
    return fp.write_staging if writes and not frm.host_copy else 0


def transition_usage(frm: Residency, to: Residency, fp: Footprint) -> Usage:
    """What a runtime holds while it moves from `frm` to `to`: the larger of both ends, or
    for a load to SUSPENDED_HOST, the resident runtime it passes through, plus the staging
    buffers of a move that stages (module docstring)."""
    held = usage(frm, fp).peak(usage(to, fp))
    if not frm.state.has_worker and to.state is S.SUSPENDED_HOST:
        built = Residency(S.RESIDENT, to.gpu, host_copy=True, snapshot=to.snapshot)
        held = held.peak(usage(built, fp))
    extra = staging(frm, to, fp)
    return replace(held, host=held.host + extra) if extra else held


def exchange_joint(
    out: tuple[Residency, Residency, Footprint],
    into: tuple[Residency, Residency, Footprint],
    slack: int,
) -> Usage:
    """What an exchange's two runtimes hold together while it runs: each part the larger of
    the pair's start and end, plus `slack` host bytes (the room the exchange turns over in)
    and both sides' staging buffers. `out` and `into` are (from, to, footprint)."""
    (of, ot, ofp), (inf, it, ifp) = out, into
    start = usage(of, ofp).plus(usage(inf, ifp))
    end = usage(ot, ofp).plus(usage(it, ifp))
    held = start.peak(end)
    return replace(held, host=held.host + slack + ofp.exchange_staging + ifp.exchange_staging)


def exchange_share(joint: Usage, other: Usage, outgoing: bool) -> Usage:
    """One side's share of an exchange's `joint` usage. The incoming side holds `other`
    (its own end); the outgoing side, or a side whose partner's op has ended, holds the
    joint usage less `other` (what the other side holds)."""
    if not outgoing:
        return replace(other, gpu=joint.gpu)
    return Usage(
        joint.gpu,
        max(0, joint.gpu_bytes - other.gpu_bytes),
        max(0, joint.host - other.host),
        max(0, joint.disk - other.disk),
        max(0, joint.workers - other.workers),
    )


def host_need(frm: Residency, to: Residency, fp: Footprint) -> int:
    """Host bytes the move from `frm` to `to` needs beyond what `frm` holds: the room that
    admission must find (or page host-RAM runtimes down for) before it starts."""
    return transition_usage(frm, to, fp).host - host_bytes(frm, fp)
