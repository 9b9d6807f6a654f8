"""drift_checks: the window's estimated accuracy and a flagged check's explanation; model_events: the audit trail.

Revision ID: c41d8e2f9a16
Revises: 7d2e4a91c5b8
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "c41d8e2f9a16"
down_revision: str | None = "7d2e4a91c5b8"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, no default: adding them rewrites nothing; checks recorded before have no estimate.
    with op.batch_alter_table("drift_checks") as batch:
        batch.add_column(sa.Column("estimated_accuracy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("estimated_accuracy_low", sa.Float(), nullable=True))
        batch.add_column(sa.Column("estimated_accuracy_high", sa.Float(), nullable=True))
        batch.add_column(sa.Column("explanation", sa.Text(), nullable=True))
    op.create_table(
        "model_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("occurred_at", sa.Float(), nullable=False),
        sa.Column("event", sa.String(24), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
    )
    op.create_index("ix_model_events_version_time", "model_events", ["model_version", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_model_events_version_time", table_name="model_events")
    op.drop_table("model_events")
    with op.batch_alter_table("drift_checks") as batch:
        batch.drop_column("explanation")
        batch.drop_column("estimated_accuracy_high")
        batch.drop_column("estimated_accuracy_low")
        batch.drop_column("estimated_accuracy")
