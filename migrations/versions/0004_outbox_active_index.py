"""downlink_outbox: partial index on not-yet-accepted rows per device

The claim keeps each device's rows in insertion order by checking that no earlier row of
the device is still pending or pushing. Indexing only those rows keeps that check cheap
however many finished rows a device accumulates (both dialects support partial indexes).

Revision ID: 0004_outbox_active_index
Revises: 0003_outbox_constraints
Create Date: 2026-11-27 10:02:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_outbox_active_index"
down_revision: str | None = "0003_outbox_constraints"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "status IN ('pending', 'pushing')"


def upgrade() -> None:
    op.create_index(
        "ix_downlink_outbox_active_device",
        "downlink_outbox",
        ["application_id", "device_id", "id"],
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_downlink_outbox_active_device", table_name="downlink_outbox")
