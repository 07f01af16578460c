"""rejected_events.digest: a poison frame replayed after a reconnect is stored once

Each reject carries a hash of its raw text and error (``ingestd.store.reject_digest``;
for an event the database refused, of its ``unique_id``), unique per stream, and is
inserted ``ON CONFLICT DO NOTHING``: TTS replays a poison event on every resume, which
added a row each time. Rows from before this revision keep a NULL digest (NULLs never
conflict), so existing duplicates stay as they are.

Revision ID: 0010_rejected_events_digest
Revises: 0009_analytics_views
Create Date: 2026-12-01 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_rejected_events_digest"
down_revision: str | None = "0009_analytics_views"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_rejected_events_stream_digest"


def upgrade() -> None:
    op.add_column("rejected_events", sa.Column("digest", sa.String(32), nullable=True))
    op.create_index(INDEX, "rejected_events", ["stream", "digest"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="rejected_events")
    # Plain ALTER TABLE (SQLite >= 3.35): a batch copy of the table would break the analytics
    # views (0009) that read rejected_events.
    op.execute("ALTER TABLE rejected_events DROP COLUMN digest")
