"""predictions: ix_predictions_labelled_at covers the labelled rows only (a partial index).

Every query of labelled rows tests ``labelled_at IS NOT NULL`` (:data:`app.storage.database.LABELLED`) and reads
this index; the NULL entry a full index adds for each unlabelled prediction is one no query reads.

Revision ID: 5e8b3d1f6a20
Revises: a9e3f27c4d15
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "5e8b3d1f6a20"
down_revision: str | None = "a9e3f27c4d15"
branch_labels: str | None = None
depends_on: str | None = None

LABELLED = sa.text("labelled_at IS NOT NULL")


def upgrade() -> None:
    # The queries now know a label by its time: a label without one (never written by the service; a hand edit)
    # takes its prediction's time rather than vanish from training data and accuracy.
    op.execute("UPDATE predictions SET labelled_at = created_at WHERE label IS NOT NULL AND labelled_at IS NULL")
    op.drop_index("ix_predictions_labelled_at", table_name="predictions")
    op.create_index(
        "ix_predictions_labelled_at", "predictions", ["labelled_at"], sqlite_where=LABELLED, postgresql_where=LABELLED
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_labelled_at", table_name="predictions")
    op.create_index("ix_predictions_labelled_at", "predictions", ["labelled_at"])
