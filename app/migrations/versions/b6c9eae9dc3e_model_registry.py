"""model_versions and model_pointer: the model registry in the database (``SENTIMENT_MODEL_STORE_URL=s3://...``).

Revision ID: b6c9eae9dc3e
Revises: e710056b6f4d
Create Date: 2026-11-28

Two new tables (:mod:`app.ml.registry_db`) and the pointer's one row (nothing promoted yet). A store in a
folder never reads them.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision: str = "b6c9eae9dc3e"
down_revision: str | None = "e710056b6f4d"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    pointer = op.create_table(
        "model_pointer",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("history", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["version"], ["model_versions.version"]),
        sa.PrimaryKeyConstraint("id"),
    )
    # The row every promotion locks (SELECT ... FOR UPDATE) before it reads the pointer.
    op.bulk_insert(pointer, [{"id": 1, "version": None, "history": "[]", "updated_at": time.time()}])


def downgrade() -> None:
    op.drop_table("model_pointer")
    op.drop_table("model_versions")
