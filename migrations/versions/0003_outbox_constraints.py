"""downlink_outbox: CHECK status/operation/priority values; AUTOINCREMENT ids on SQLite

Both need a table rebuild on SQLite, so they share this one revision. The CHECKs turn a
typo in a hand-written INSERT (``priority = 'normal'``) into an immediate error. On
SQLite, AUTOINCREMENT stops the reuse of a deleted newest row's id: a reused id would
match the old row's lifecycle events (``downlink_events.outbox_id``). PostgreSQL's
sequence never reuses ids, so only the CHECKs apply there.

Revision ID: 0003_outbox_constraints
Revises: 0002_outbox_notify
Create Date: 2026-11-27 10:01:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_outbox_constraints"
down_revision: str | None = "0002_outbox_notify"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("pending", "pushing", "queued", "sent", "acked", "failed", "invalidated", "dropped")
OPERATIONS = ("push", "replace")
PRIORITIES = ("LOWEST", "LOW", "BELOW_NORMAL", "NORMAL", "ABOVE_NORMAL", "HIGH", "HIGHEST")


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


CHECKS = {
    "ck_downlink_outbox_status": _in_list("status", STATUSES),
    "ck_downlink_outbox_operation": _in_list("operation", OPERATIONS),
    "ck_downlink_outbox_priority": _in_list("priority", PRIORITIES),
}


def upgrade() -> None:
    with op.batch_alter_table(
        "downlink_outbox", recreate="auto", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        for name, condition in CHECKS.items():
            batch_op.create_check_constraint(op.f(name), condition)


def downgrade() -> None:
    # On SQLite the rebuild keeps AUTOINCREMENT (harmless; 0001 never relied on reuse).
    with op.batch_alter_table(
        "downlink_outbox", recreate="auto", table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        for name in CHECKS:
            batch_op.drop_constraint(op.f(name), type_="check")
