"""downlink_outbox: partial index on pending rows in claim order (next_attempt_at, id)

A claim walks pending rows, most overdue first, and stops after a few device heads. This
index gives PostgreSQL that order directly, however many finished rows the table holds
and even before the table has statistics (SQLite gets the same order from the
(status, next_attempt_at) index, whose equal keys come in rowid order).

Revision ID: 0007_outbox_pending_due_index
Revises: 0006_outbox_verify_before_push
Create Date: 2026-11-27 10:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_outbox_pending_due_index"
down_revision: str | None = "0006_outbox_verify_before_push"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = "status = 'pending'"


def upgrade() -> None:
    op.create_index(
        "ix_downlink_outbox_pending_due",
        "downlink_outbox",
        ["next_attempt_at", "id"],
        postgresql_where=sa.text(PENDING),
        sqlite_where=sa.text(PENDING),
    )


def downgrade() -> None:
    op.drop_index("ix_downlink_outbox_pending_due", table_name="downlink_outbox")
