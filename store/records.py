"""The frozen dataclasses the store hands across its boundary (never ORM rows)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from torpor.errors import InvalidArgument
from torpor.store.chunks import ChunkRef
from torpor.store.names import validate_model_name
from torpor.store.schema import BandwidthTier, DType, LoadFormat, SnapshotState

_INT32 = 2**31 - 1
_EVENT_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _bounded(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(
            f"{name} must be in [{low}, {high}], got {value!r}",
            reason="OUT_OF_RANGE",
            metadata={"field": name, "value": value, "low": low, "high": high},
        )


@dataclass(frozen=True, slots=True)
class ModelRegistration:
    """A model as registered through the API (`RegisterModel`); validated on creation."""

    name: str
    """Unique model name; see `torpor.store.names.validate_model_name`."""
    source_path: str
    """HF-format checkpoint directory; must lie under a configured model root."""
    dtype: DType
    """Weight dtype the runtime is built with."""
    max_batch: int
    """Concurrent sequences (KV slots), 1..4096."""
    max_seq_len: int
    """Longest sequence, prompt plus generated tokens, 1..2**24."""
    priority: int = 0
    """Added to the eviction score: a higher priority stays resident longer."""
    pinned: bool = False
    """A pinned model's runtime is never chosen as an eviction victim."""
    keep_alive_s: float = 0.0
    """Seconds after the last use during which the runtime is never a victim."""
    chat_template: str = ""
    """A chat template (Jinja source) that replaces the checkpoint's own; empty: none."""
    load_format: LoadFormat = LoadFormat.CHECKPOINT
    """Where the weights come from: the checkpoint's safetensors, or random (dummy)."""

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if not isinstance(self.dtype, DType):
            raise InvalidArgument(
                f"dtype must be one of {[d.value for d in DType]}, got {self.dtype!r}",
                reason="INVALID_DTYPE",
            )
        _bounded("max_batch", self.max_batch, 1, 4096)
        _bounded("max_seq_len", self.max_seq_len, 1, 2**24)
        _bounded("priority", self.priority, -_INT32, _INT32)
        _bounded("keep_alive_s", self.keep_alive_s, 0.0, 10.0 * 365 * 86400)


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A model in the catalog: its spec (with the resolved source path) and when it changed."""

    spec: ModelRegistration
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What the catalog knows of a snapshot, without its manifest and chunk list."""

    id: str
    model: str
    store_id: str
    """The chunk store (one per host) that holds the snapshot's bytes."""
    fingerprint: str
    """The environment it was taken in (GPU, driver, library versions); restores match it."""
    state: SnapshotState
    total_bytes: int
    """Sum of its chunk sizes, counting shared chunks fully."""
    created_at: datetime
    last_used_at: datetime
    pinned: bool


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    """A complete snapshot: its info, the pager's opaque manifest, and its chunks in order."""

    info: SnapshotInfo
    manifest: Mapping[str, Any]
    """Opaque to the store (the pager defines it); treat it as read-only."""
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True, slots=True)
class SnapshotDetails:
    """A snapshot's chunk count, the bytes only it references, and its manifest."""

    chunks: int
    unique_bytes: int
    manifest: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """A measured transfer rate: an exponentially weighted mean over `samples` samples."""

    host: str
    tier: BandwidthTier
    bytes_per_s: float
    samples: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Event:
    """One residency event of the audit trail; ids increase in insertion order."""

    id: int
    ts: datetime
    kind: str
    model: str | None = None
    runtime: str | None = None
    gpu: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def check_kind(kind: str) -> str:
        """Event kinds are short snake_case words chosen by the scheduler (`evicted`...)."""
        if not isinstance(kind, str) or _EVENT_KIND.fullmatch(kind) is None:
            raise InvalidArgument(
                f"invalid event kind {kind!r}: use 1-64 characters of a-z 0-9 _",
                reason="INVALID_EVENT_KIND",
            )
        return kind


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event not yet written: `ts` is when it happened (None: when it is written)."""

    kind: str
    model: str | None = None
    runtime: str | None = None
    gpu: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    ts: datetime | None = None


@dataclass(frozen=True, slots=True)
class GcReport:
    """What a garbage collection removed."""

    chunks_removed: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What a light scrub while running (`SnapshotStore.sweep`) removed and left."""

    dead_writers_removed: int
    temp_files_removed: int
    orphan_files_removed: int
    bytes_removed: int
    """Bytes of the temp and orphan files removed."""
    untracked_bytes: int
    """Bytes of temp and orphan files left (a live writer's, or too young); they count
    against the budget until a later sweep removes them."""


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What a scrub found and repaired (logged at start-up)."""

    dead_writers_removed: int
    """Snapshots left in `writing` by a dead writer, deleted."""
    temp_files_removed: int
    orphan_files_removed: int
    """Chunk files no catalog row references."""
    unreferenced_chunks_removed: int
    snapshots_marked_corrupt: tuple[str, ...]
    """Ids of complete snapshots with a missing or wrong-sized chunk file."""
    refcounts_repaired: int
    stray_files: tuple[Path, ...]
    """Files torpor never writes, found under chunks/: reported, left alone."""
