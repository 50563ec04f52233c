"""The client commands that move runtimes and wait for it: acquire, evict and prefetch.
Progress goes to progress.py's view (stderr, terminals only); data to stdout."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Annotated, Any

import typer
from google.protobuf import duration_pb2

from torpor.errors import Cancelled, NotFound
from torpor.scheduler.client import render, shapes
from torpor.scheduler.client.commands import JsonOption, ModelArg
from torpor.scheduler.client.connection import Connection, Stream
from torpor.scheduler.client.lease import LeaseKeeper, release
from torpor.scheduler.client.progress import ProgressView, for_output
from torpor.scheduler.client.session import emit, session, wants_json
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2


class EvictTier(enum.StrEnum):
    host = "host"
    deep = "deep"
    disk = "disk"
    drop = "drop"


class PrefetchTier(enum.StrEnum):
    gpu = "gpu"
    host = "host"


def tier_value(name: str) -> str:
    """`host` as "TIER_HOST"."""
    return shapes.enum_value(common_pb2.Tier, name)


def duration(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(s * 1e9))
    return d


def acquire(
    ctx: typer.Context,
    name: ModelArg,
    ttl: Annotated[
        float | None,
        typer.Option(min=1, max=3600, help="Lease lifetime in seconds (default: the daemon's)."),
    ] = None,
    priority: Annotated[int, typer.Option(help="-100..100, added to the model's.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Hold a model on a GPU with a lease until Ctrl-C.

    Shows the way there (queued, evicting, loading or restoring), prints the READY lease,
    renews it before it expires and releases it on Ctrl-C or SIGTERM (exit 0).
    """
    as_json = wants_json(ctx, as_json)
    request = scheduler_pb2.AcquireRequest(model=name, priority=priority)
    if ttl is not None:
        request.lease_ttl.CopyFrom(duration(ttl))
    with session(ctx) as conn:
        stream = conn.stream(conn.scheduler.Acquire, request)
        messages = iter(stream)
        ready = None
        try:
            ready = _until_ready(messages, for_output(as_json), name)
            stream.settle()  # the lease is held in silence for as long as the user likes
            _hold(conn, stream, messages, ready, lambda: _announce_ready(name, ready, as_json))
        except KeyboardInterrupt:
            if ready is None:
                raise  # exit 130; closing the channel cancels the acquire, and with it the lease
            _release(conn, stream, ready.lease_id)


def _until_ready(messages: Iterator[Any], view: ProgressView, name: str) -> Any:
    """Show the way to the GPU; the READY event once it comes."""
    try:
        return _show_until_ready(messages, view, name)
    finally:
        view.close()


def _show_until_ready(messages: Iterator[Any], view: ProgressView, name: str) -> Any:
    for event in messages:
        kind = event.WhichOneof("event")
        if kind == "ready":
            return event.ready
        if kind == "queued":
            q = event.queued
            view.waiting("queued", f"{name}: queued, {q.position} ahead ({q.queue_depth} in queue)")
        elif kind == "evicting":
            for v in map(shapes.victim, event.evicting.victims):
                view.note(
                    f"evicting {v['model']} from gpu {v['gpu']} to {v['to_tier']}, "
                    f"freeing {render.size(v['bytes_freed'])}"
                )
        elif kind in ("loading", "restoring"):
            p = getattr(event, kind)
            tier = shapes.enum_name(common_pb2.Tier, p.tier)
            view.transfer(kind, f"{kind} {name} from {tier}", p.bytes_done, p.bytes_total)
    raise NotFound(f"the daemon ended the acquire of {name} before it was ready")


def _announce_ready(name: str, ready: Any, as_json: bool) -> None:
    doc = {"model": name, **shapes.ready(ready)}
    if as_json:
        render.print_json_line(doc)
        return
    render.show(
        f"{name} is ready on gpu {doc['gpu']}: lease {doc['lease_id']} "
        f"(expires {render.clock(doc['expires_at'])}, renewed until you stop)"
    )
    render.show(f"worker {doc['worker_endpoint'] or '-'}, runtime {doc['runtime_id'] or '-'}")
    render.show("holding the lease; Ctrl-C releases it")
    sys.stdout.flush()


def _hold(
    conn: Connection,
    stream: Stream[Any],
    messages: Iterator[Any],
    ready: Any,
    announce: Callable[[], None],
) -> None:
    """Hold the lease, renewing it, until interrupted (KeyboardInterrupt propagates) or until
    the daemon ends it: released elsewhere or expired (NotFound), revoked (Aborted), or not
    renewable (the renewal's error)."""
    expires = ready.expires_at.ToDatetime(tzinfo=UTC)
    keeper = LeaseKeeper(conn, ready.lease_id, expires, on_lost=lambda err: stream.cancel())
    try:
        with keeper:
            announce()
            for _ in messages:  # nothing more is expected; the stream ends with the lease
                pass
    except Cancelled:
        if keeper.error is not None:
            raise keeper.error from None
        raise
    raise NotFound(
        f"lease {ready.lease_id} ended: it was released by someone else or expired",
        reason="LEASE_ENDED",
        metadata={"lease_id": ready.lease_id},
    )


def _release(conn: Connection, stream: Stream[Any], lease_id: str) -> None:
    """Give the lease back, then end the Acquire call (which would release it too)."""
    err = release(conn, lease_id)
    stream.cancel()
    note = f" (the daemon said: {err.message})" if err else ""
    print(f"released lease {lease_id}{note}", file=sys.stderr, flush=True)


def evict(
    ctx: typer.Context,
    name: ModelArg,
    to: Annotated[EvictTier, typer.Option("--to", help="Tier to move it down to.")],
    abort: Annotated[
        bool, typer.Option("--abort", help="Abort in-flight requests instead of draining.")
    ] = False,
    runtime: Annotated[
        str | None, typer.Option(help="Only this runtime id (default: all of the model's).")
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds DRAIN waits for in-flight work (default: the daemon's)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Move a model's runtimes down to host RAM, deep suspend, disk, or drop them."""
    as_json = wants_json(ctx, as_json)
    request = admin_pb2.EvictRequest(
        model=name,
        runtime_id=runtime or "",
        to_tier=tier_value(to.value),
        mode=admin_pb2.EVICT_MODE_ABORT if abort else admin_pb2.EVICT_MODE_DRAIN,
    )
    if drain_timeout is not None:
        request.drain_timeout.CopyFrom(duration(drain_timeout))
    with session(ctx) as conn:
        view = for_output(as_json)
        try:
            done = _follow_eviction(conn.stream(conn.admin.Evict, request), view, name)
        finally:
            view.close()
    emit(ctx, as_json, {"model": name, "runtimes": done}, _print_evicted)


def _follow_eviction(stream: Stream[Any], view: ProgressView, name: str) -> list[shapes.Json]:
    done: list[shapes.Json] = []
    for msg in stream:
        rid, kind = msg.runtime_id, msg.WhichOneof("event")
        if kind == "draining":
            view.waiting(f"drain {rid}", f"{name} ({rid}): draining {msg.draining} in flight")
        elif kind == "progress":
            tier = shapes.enum_name(common_pb2.Tier, msg.progress.tier)
            p = msg.progress
            view.transfer(rid, f"evicting {name} ({rid}) to {tier}", p.bytes_done, p.bytes_total)
        elif kind == "done":
            done.append(shapes.evicted(rid, msg.done))
    return done


def _print_evicted(doc: shapes.Json) -> None:
    for d in doc["runtimes"]:
        render.show(render.evicted_line(doc["model"], d))
    if not doc["runtimes"]:
        render.show(f"{doc['model']}: no runtime to evict")


def prefetch(
    ctx: typer.Context,
    name: ModelArg,
    to: Annotated[PrefetchTier, typer.Option("--to", help="Tier to pull it up to.")] = (
        PrefetchTier.gpu
    ),
    wait: Annotated[
        bool, typer.Option(help="Return once it is there, not once the move is scheduled.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Pull a model's runtime up to the GPU or host RAM ahead of need."""
    as_json = wants_json(ctx, as_json)
    request = scheduler_pb2.PrefetchRequest(model=name, tier=tier_value(to.value), wait=wait)
    with session(ctx) as conn:
        view = for_output(as_json)
        view.waiting("prefetch", f"prefetching {name} to {to.value}")
        try:
            reply = conn.unary(conn.scheduler.Prefetch, request, waits=wait)
        finally:
            view.close()
    doc = {
        "model": name,
        "state": shapes.enum_name(common_pb2.RuntimeState, reply.state),
        "tier": shapes.enum_name(common_pb2.Tier, reply.tier),
    }
    emit(ctx, as_json, doc, _print_prefetched)


def _print_prefetched(doc: shapes.Json) -> None:
    render.show(f"{doc['model']}: {doc['state']}, weights in {doc['tier']}")
