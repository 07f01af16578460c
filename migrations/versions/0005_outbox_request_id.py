"""downlink_outbox.request_id: the X-Request-ID of the push TTS accepted

TTS puts it into the correlation id ``rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:<id>``
of the ``as.down.data.receive`` event and into its own logs, so support can follow a row.

Revision ID: 0005_outbox_request_id
Revises: 0004_outbox_active_index
Create Date: 2026-11-27 10:03:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_outbox_request_id"
down_revision: str | None = "0004_outbox_active_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("downlink_outbox", sa.Column("request_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # A SQLite rebuild must keep AUTOINCREMENT (Alembic cannot reflect it, see 0003).
    with op.batch_alter_table(
        "downlink_outbox", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.drop_column("request_id")
