"""feedback_sources: feedback token names an operator purged or revoked, and when.

Revision ID: a9e3f27c4d15
Revises: c41d8e2f9a16
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "a9e3f27c4d15"
down_revision: str | None = "c41d8e2f9a16"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # A new table: nothing existing is rewritten. Purges made before it have no record (their labels are gone).
    op.create_table(
        "feedback_sources",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("purged_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    # Revocations are lost: the release rolled back to accepts every configured token again.
    op.drop_table("feedback_sources")
