"""retrain_jobs: at most one job running (a partial unique index), so the database picks the one retrain.

Revision ID: 3c9b1f0d7a42
Revises: b6c9eae9dc3e
Create Date: 2026-12-02
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from alembic import op

revision: str = "3c9b1f0d7a42"
down_revision: str | None = "b6c9eae9dc3e"
branch_labels: str | None = None
depends_on: str | None = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    # Older releases could leave several jobs 'running' (each one a dead process, but the newest, which may
    # still run): mark the older ones failed, as the launcher would have, so the index can be built.
    op.get_bind().execute(
        sa.text(
            "UPDATE retrain_jobs SET status = 'failed', outcome = 'failed', finished_at = :now, details = :details"
            " WHERE status = 'running' AND id NOT IN"
            " (SELECT id FROM retrain_jobs WHERE status = 'running' ORDER BY started_at DESC LIMIT 1)"
        ),
        {"now": time.time(), "details": json.dumps({"error": "the retrain process ended without reporting (killed?)"})},
    )
    op.create_index(
        "uq_retrain_jobs_running",
        "retrain_jobs",
        ["status"],
        unique=True,
        sqlite_where=RUNNING,
        postgresql_where=RUNNING,
    )


def downgrade() -> None:
    op.drop_index("uq_retrain_jobs_running", table_name="retrain_jobs")
