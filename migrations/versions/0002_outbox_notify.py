"""PostgreSQL: NOTIFY ingestd_outbox after rows are inserted into downlink_outbox

A downlink worker LISTENs on ``ingestd_outbox`` and claims at once instead of waiting for
its next poll. The trigger is FOR EACH STATEMENT with an empty payload: the worker claims
by query and never needs the row id, and PostgreSQL folds identical notifications within
one transaction into one, so a bulk INSERT (or many INSERTs in one transaction) wakes the
workers once instead of once per row. SQLite has no NOTIFY; workers poll there.

Revision ID: 0002_outbox_notify
Revises: 0001_initial
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002_outbox_notify"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION ingestd_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ingestd_outbox', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER downlink_outbox_notify
        AFTER INSERT ON downlink_outbox
        FOR EACH STATEMENT EXECUTE FUNCTION ingestd_outbox_notify()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS downlink_outbox_notify ON downlink_outbox")
    op.execute("DROP FUNCTION IF EXISTS ingestd_outbox_notify()")
