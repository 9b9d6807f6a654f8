"""Baseline: the four tables of the last release before migrations.

Revision ID: fd3ab7b49a99
Revises:
Create Date: 2026-11-27

Also how such a database is adopted (:func:`adopt`, called by ``app.migrations.upgrade`` before it stamps
this revision): releases before migrations created the tables with ``create_all`` and added
``webhook_alerts.job_id`` by hand, and the earliest had only ``predictions`` and ``drift_checks``.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision: str = "fd3ab7b49a99"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _predictions() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_length", sa.Integer(), nullable=False),
        sa.Column("sentiment", sa.String(8), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("p_positive", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("labelled_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_predictions_version_time", "predictions", ["model_version", "created_at"])
    op.create_index("ix_predictions_time", "predictions", ["created_at"])
    op.create_index("ix_predictions_labelled_at", "predictions", ["labelled_at"])


def _drift_checks() -> None:
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("checked_at", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("drift", sa.Boolean(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("window_size", sa.Integer(), nullable=False),
        sa.Column("confidence_mean", sa.Float(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drift_checks_time", "drift_checks", ["checked_at"])


def _retrain_jobs() -> None:
    op.create_table(
        "retrain_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("candidate_version", sa.String(64), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_retrain_jobs_started", "retrain_jobs", ["started_at"])


def _webhook_alerts() -> None:
    op.create_table(
        "webhook_alerts",
        sa.Column("identity", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("identity"),
    )


TABLES: dict[str, Callable[[], None]] = {
    "predictions": _predictions,
    "drift_checks": _drift_checks,
    "retrain_jobs": _retrain_jobs,
    "webhook_alerts": _webhook_alerts,
}


def upgrade() -> None:
    for create in TABLES.values():
        create()


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)


def adopt() -> list[str]:
    """Add what a database created before migrations lacks of this revision (its rows stay); return what
    was added. The one column added by hand then was ``webhook_alerts.job_id`` (the retrain a firing
    started); indexes came with their tables."""
    inspector = sa.inspect(op.get_bind())
    added = []
    for table, create in TABLES.items():
        if not inspector.has_table(table):
            create()
            added.append(f"table {table}")
    if "job_id" not in {c["name"] for c in inspector.get_columns("webhook_alerts")}:
        op.add_column("webhook_alerts", sa.Column("job_id", sa.String(32), nullable=True))
        added.append("column webhook_alerts.job_id")
    return added
