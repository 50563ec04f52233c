"""The JSON shapes of the CLI's output: torpor.v1 messages as plain, JSON-safe dicts.

Conventions (the same for every command):
- keys are snake_case; byte counts are integers in keys ending in `_bytes`;
- enums are their value names, lowercase and without the enum's prefix
  (`RUNTIME_STATE_SUSPENDED_HOST` is "suspended_host", `TIER_GPU` "gpu"); unspecified is null;
- absolute times are ISO-8601 strings in UTC ("2026-11-28T10:00:00.250000+00:00"), unset null;
- durations are float seconds in keys ending in `_s`, unset null;
- an absent GPU index is null.

The human renderings in render.py read these dicts too, so what a table shows is what
`--json` gives.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from torpor.v1 import admin_pb2, common_pb2

Json = dict[str, Any]

_ENUM_PREFIXES = {
    "Tier": "TIER_",
    "RuntimeState": "RUNTIME_STATE_",
    "Dtype": "DTYPE_",
    "FinishReason": "FINISH_REASON_",
    "Backend": "BACKEND_",
    "SnapshotState": "SNAPSHOT_STATE_",
    "EventKind": "EVENT_KIND_",
    "EvictMode": "EVICT_MODE_",
    "LoadPhase": "LOAD_PHASE_",
    "LoadFormat": "LOAD_FORMAT_",
    "ExchangeSide": "EXCHANGE_SIDE_",
}
"""Every torpor.v1 enum (tests/cli/test_client_enum_names.py checks that none is missing)."""


def enum_name(enum: Any, value: int) -> str | None:
    """A proto enum value as a lowercase name without its prefix; None when unspecified.
    A value this client does not know (a newer daemon) reads "unknown_<n>"."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return f"unknown_{value}"
    name = name.removeprefix(_ENUM_PREFIXES[enum.DESCRIPTOR.name])
    return None if name == "UNSPECIFIED" else name.lower()


def enum_value(enum: Any, name: str) -> str:
    """The inverse of `enum_name`: "host" of Tier is "TIER_HOST", the value's full name
    (which protobuf takes for the value); ValueError when the enum has no such value."""
    full = _ENUM_PREFIXES[enum.DESCRIPTOR.name] + name.strip().upper()
    enum.Value(full)  # ValueError if there is none
    return full


def timestamp(msg: Message, field: str) -> str | None:
    """An optional Timestamp field as ISO-8601 UTC, or None when unset."""
    if not msg.HasField(field):
        return None
    value: timestamp_pb2.Timestamp = getattr(msg, field)
    return value.ToDatetime(tzinfo=UTC).isoformat()


def seconds(msg: Message, field: str) -> float | None:
    """An optional Duration field as float seconds, or None when unset."""
    if not msg.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(msg, field)
    return value.seconds + value.nanos / 1e9


def optional_int(msg: Message, field: str) -> int | None:
    """An `optional` scalar field, or None when absent."""
    return int(getattr(msg, field)) if msg.HasField(field) else None


def parse_time(text: str | None) -> datetime | None:
    """The inverse of `timestamp`, for the human renderings."""
    return datetime.fromisoformat(text) if text else None


def gpu(g: admin_pb2.GpuInfo) -> Json:
    return {
        "index": g.index,
        "name": g.name,
        "total_bytes": g.total_bytes,
        "used_bytes": g.used_bytes,
        "free_bytes": g.free_bytes,
    }


def runtime(r: admin_pb2.RuntimeInfo) -> Json:
    return {
        "model": r.model,
        "state": enum_name(common_pb2.RuntimeState, r.state),
        "tier": enum_name(common_pb2.Tier, r.tier),
        "gpu": optional_int(r, "gpu"),
        "gpu_bytes": r.gpu_bytes,
        "host_bytes": r.host_bytes,
        "disk_bytes": r.disk_bytes,
        "last_used": timestamp(r, "last_used"),
        "leases": r.leases,
        "pinned": r.pinned,
        "keep_alive_until": timestamp(r, "keep_alive_until"),
        "restore_estimate_s": seconds(r, "restore_estimate"),
        "worker_pid": r.worker_pid,
        "host_copy": r.host_copy,
        "exchange_with": r.exchange_with or None,
    }


def residency(resp: admin_pb2.ListResidencyResponse) -> Json:
    """`torpor ps --json`: exactly {"gpus": [...], "runtimes": [...]}."""
    return {"gpus": [gpu(g) for g in resp.gpus], "runtimes": [runtime(r) for r in resp.runtimes]}


def budgets(resp: admin_pb2.ListResidencyResponse) -> Json:
    """The host-RAM and disk budgets of ListResidency (each null when not sent)."""
    return {
        tier: {"total_bytes": b.total_bytes, "used_bytes": b.used_bytes, "free_bytes": b.free_bytes}
        if resp.HasField(tier)
        else None
        for tier, b in (("host", resp.host), ("disk", resp.disk))
    }


def model(m: common_pb2.Model) -> Json:
    s = m.spec
    return {
        "name": s.name,
        "source": s.source,
        "dtype": enum_name(common_pb2.Dtype, s.dtype),
        "max_batch": s.max_batch,
        "max_seq_len": s.max_seq_len,
        "priority": s.priority,
        "pinned": s.pinned,
        "keep_alive_s": s.keep_alive_s,
        "state": enum_name(common_pb2.RuntimeState, m.state),
        "footprint_bytes": m.footprint_bytes,
        "snapshot_id": m.snapshot_id or None,
        "has_chat_template": m.has_chat_template,
        "load_format": enum_name(common_pb2.LoadFormat, s.load_format) or "checkpoint",
        "registered_at": timestamp(m, "registered_at"),
    }


def victim(v: common_pb2.Victim) -> Json:
    return {
        "model": v.model,
        "runtime_id": v.runtime_id,
        "gpu": v.gpu,
        "to_tier": enum_name(common_pb2.Tier, v.to_tier),
        "bytes_freed": v.bytes_freed,
        "score": v.score,
        "exchange": v.exchange,
    }


def plan(name: str, e: admin_pb2.ExplainResponse) -> Json:
    """`torpor explain --json`."""
    return {
        "model": name,
        "admit": e.admit,
        "reason": e.reason,
        "reason_code": e.reason_code,
        "gpu": optional_int(e, "gpu"),
        "victims": [victim(v) for v in e.victims],
        "estimate_s": seconds(e, "estimate"),
        "source_tier": enum_name(common_pb2.Tier, e.source_tier),
        "required_bytes": e.required_bytes,
    }


def event(e: admin_pb2.Event) -> Json:
    return {
        "id": e.id,
        "time": timestamp(e, "time"),
        "kind": enum_name(admin_pb2.EventKind, e.kind),
        "model": e.model or None,
        "runtime_id": e.runtime_id or None,
        "gpu": optional_int(e, "gpu"),
        "detail": e.detail,
        "attributes": dict(sorted(e.attributes.items())),
    }


def snapshot(s: admin_pb2.SnapshotInfo) -> Json:
    return {
        "snapshot_id": s.snapshot_id,
        "model": s.model,
        "state": enum_name(admin_pb2.SnapshotState, s.state),
        "bytes": s.bytes,
        "unique_bytes": s.unique_bytes,
        "chunks": s.chunks,
        "created_at": timestamp(s, "created_at"),
        "last_used": timestamp(s, "last_used"),
        "manifest_hash": s.manifest_hash,
        "fingerprint": s.fingerprint,
    }


def status(s: admin_pb2.GetStatusResponse, health: str) -> Json:
    """`torpor status --json`: GetStatus plus the health service's answer."""
    return {
        "health": health,
        "version": s.version,
        "backend": enum_name(admin_pb2.Backend, s.backend),
        "hostname": s.hostname,
        "started_at": timestamp(s, "started_at"),
        "uptime_s": seconds(s, "uptime"),
        "models": s.models,
        "workers": s.workers,
        "gpus": [gpu(g) for g in s.gpus],
    }


def ready(r: Any) -> Json:
    """The READY event of Acquire (`AcquireEvent.Ready`)."""
    return {
        "lease_id": r.lease_id,
        "expires_at": timestamp(r, "expires_at"),
        "gpu": r.gpu,
        "worker_endpoint": r.worker_endpoint,
        "runtime_id": r.runtime_id,
    }


def evicted(runtime_id: str, d: Any) -> Json:
    """One runtime's `EvictResponse.Done`."""
    return {
        "runtime_id": runtime_id,
        "state": enum_name(common_pb2.RuntimeState, d.state),
        "gpu_bytes_freed": d.gpu_bytes_freed,
        "aborted_requests": d.aborted_requests,
        "elapsed_s": seconds(d, "elapsed"),
    }
