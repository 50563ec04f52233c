"""Indexes for the eviction (LRU), per-model snapshot, chunk-reference and event queries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_snapshot_chunks_chunk", "snapshot_chunks", ["store_id", "hash"])
    op.create_index("ix_snapshots_lru", "snapshots", ["store_id", "state", "last_used_at"])
    op.create_index("ix_snapshots_model", "snapshots", ["model_name", "state"])
    op.create_index("ix_events_ts", "events", ["ts"])


def downgrade() -> None:
    op.drop_index("ix_events_ts", table_name="events")
    op.drop_index("ix_snapshots_model", table_name="snapshots")
    op.drop_index("ix_snapshots_lru", table_name="snapshots")
    op.drop_index("ix_snapshot_chunks_chunk", table_name="snapshot_chunks")
