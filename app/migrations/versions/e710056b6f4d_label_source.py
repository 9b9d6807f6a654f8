"""predictions.label_source: which feedback credential recorded a prediction's label.

Revision ID: e710056b6f4d
Revises: fd3ab7b49a99
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "e710056b6f4d"
down_revision: str | None = "fd3ab7b49a99"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, on SQLite or PostgreSQL; labels recorded before
    # it have no source.
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("label_source", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("label_source")
