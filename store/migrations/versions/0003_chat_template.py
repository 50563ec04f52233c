"""A registered model's chat template (issue 14): the override of RegisterModelRequest.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("chat_template", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("chat_template")
