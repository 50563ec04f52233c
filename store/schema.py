"""The catalog schema: SQLAlchemy 2.x typed ORM models and the enums stored in them.

These classes stay inside `torpor.store`; other components see the frozen dataclasses of
`torpor.store.records`. Any change here needs an Alembic migration in
store/migrations/versions/; tests/store/test_migrations.py fails when the two disagree.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so that migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class DType(enum.Enum):
    """Weight dtype of a registered model, from widest to narrowest."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FP8 = "fp8"

    @property
    def itemsize(self) -> int:
        """Bytes per weight element."""
        return {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}[self.value]


class LoadFormat(enum.Enum):
    """Where a registered model's weights come from."""

    CHECKPOINT = "checkpoint"  # the checkpoint's safetensors
    DUMMY = "dummy"  # random, from a seed derived from the model's name, shaped by config.json


class SnapshotState(enum.Enum):
    """Lifecycle of a snapshot, in order: WRITING, then COMPLETE; CORRUPT when a check fails.

    Only COMPLETE snapshots are visible to readers. WRITING ones belong to a live writer
    or are debris of a crash (scrub deletes those); CORRUPT ones are kept for the operator
    to see and are the first to be evicted.
    """

    WRITING = "writing"
    COMPLETE = "complete"
    CORRUPT = "corrupt"


class BandwidthTier(enum.Enum):
    """A measured transfer path; restore-cost estimates divide bytes by its bandwidth."""

    HOST_TO_GPU = "host_to_gpu"
    GPU_TO_HOST = "gpu_to_host"
    DISK_READ = "disk_read"
    DISK_WRITE = "disk_write"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the catalog stores UTC-aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(cls: type[enum.Enum], length: int) -> Enum:
    """Store an enum by its value, as a plain string column (no native type to migrate)."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


JSONDoc = JSON().with_variant(JSONB(), "postgresql")
"""A JSON document column (JSONB on PostgreSQL)."""

BigId = BigInteger().with_variant(Integer(), "sqlite")
"""An auto-incrementing 64-bit id (SQLite only auto-increments INTEGER PRIMARY KEY)."""


class Base(DeclarativeBase):
    """Declarative base of the catalog tables."""

    metadata = MetaData(naming_convention=NAMING)


class ModelRow(Base):
    """A registered model: the ModelRegistration of the API plus bookkeeping times."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    source_path: Mapped[str] = mapped_column(Text)
    dtype: Mapped[DType] = mapped_column(_enum(DType, 16))
    max_batch: Mapped[int] = mapped_column(Integer)
    max_seq_len: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    keep_alive_s: Mapped[float] = mapped_column(Float, default=0.0)
    chat_template: Mapped[str] = mapped_column(Text, default="", server_default="")
    load_format: Mapped[LoadFormat] = mapped_column(
        _enum(LoadFormat, 16), default=LoadFormat.CHECKPOINT, server_default="checkpoint"
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SnapshotRow(Base):
    """A snapshot of one model's runtime in one chunk store (`store_id`)."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128), ForeignKey("models.name"))
    fingerprint: Mapped[str] = mapped_column(String(512))
    state: Mapped[SnapshotState] = mapped_column(_enum(SnapshotState, 16))
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bytes of new chunks this writer may still add under its capacity reservation.
    reserved_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)


class ChunkRow(Base):
    """A chunk file in one chunk store; `refcount` counts snapshot_chunks rows naming it."""

    __tablename__ = "chunks"

    store_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    refcount: Mapped[int] = mapped_column(Integer, default=0)


class SnapshotChunkRow(Base):
    """Membership: the `ordinal`-th chunk of a snapshot (ordinals follow the writer's order)."""

    __tablename__ = "snapshot_chunks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["store_id", "hash"],
            ["chunks.store_id", "chunks.hash"],
            name="fk_snapshot_chunks_chunk",
        ),
        Index("ix_snapshot_chunks_chunk", "store_id", "hash"),
    )

    snapshot_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True)
    store_id: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(32))


class BandwidthRow(Base):
    """An exponentially weighted mean of measured transfer rates on one host and tier."""

    __tablename__ = "bandwidths"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    tier: Mapped[BandwidthTier] = mapped_column(_enum(BandwidthTier, 32), primary_key=True)
    bytes_per_s: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EventRow(Base):
    """One residency event of the audit trail behind `WatchEvents`."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    runtime: Mapped[str | None] = mapped_column(String(128), nullable=True)
    gpu: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)


# Added by migration 0002 (indexes for the eviction and event-stream queries).
Index("ix_snapshots_lru", SnapshotRow.store_id, SnapshotRow.state, SnapshotRow.last_used_at)
Index("ix_snapshots_model", SnapshotRow.model_name, SnapshotRow.state)
Index("ix_events_ts", EventRow.ts)
