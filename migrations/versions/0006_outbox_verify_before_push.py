"""downlink_outbox.verify_before_push: an earlier push got no answer; check TTS first

Set when a push timed out or its worker died before recording the answer; the worker
then looks for the row in TTS's device queue and the stored lifecycle events before it
pushes again (TTS has no idempotency key). A clear answer from TTS clears it.

Revision ID: 0006_outbox_verify_before_push
Revises: 0005_outbox_request_id
Create Date: 2026-11-27 10:04:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_outbox_verify_before_push"
down_revision: str | None = "0005_outbox_request_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "downlink_outbox",
        sa.Column("verify_before_push", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    # A SQLite rebuild must keep AUTOINCREMENT (Alembic cannot reflect it, see 0003).
    with op.batch_alter_table(
        "downlink_outbox", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.drop_column("verify_before_push")
