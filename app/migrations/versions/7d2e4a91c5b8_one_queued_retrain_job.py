"""retrain_jobs: at most one job queued for a retrain worker (a partial unique index), for SENTIMENT_RETRAIN_MODE=queue.

Revision ID: 7d2e4a91c5b8
Revises: 3c9b1f0d7a42
Create Date: 2026-12-09
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from alembic import op

revision: str = "7d2e4a91c5b8"
down_revision: str | None = "3c9b1f0d7a42"
branch_labels: str | None = None
depends_on: str | None = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.create_index(
        "uq_retrain_jobs_queued",
        "retrain_jobs",
        ["status"],
        unique=True,
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )


def downgrade() -> None:
    # The previous release runs no queue: a job still waiting would never run, so it ends as failed.
    bind = op.get_bind()
    bind.execute(
        sa.text("DELETE FROM webhook_alerts WHERE job_id IN (SELECT id FROM retrain_jobs WHERE status = 'queued')")
    )
    bind.execute(
        sa.text(
            "UPDATE retrain_jobs SET status = 'failed', outcome = 'failed', finished_at = :now, details = :details"
            " WHERE status = 'queued'"
        ),
        {"now": time.time(), "details": json.dumps({"error": "the retrain queue was removed by a downgrade"})},
    )
    op.drop_index("uq_retrain_jobs_queued", table_name="retrain_jobs")
