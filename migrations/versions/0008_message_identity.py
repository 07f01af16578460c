"""Message identity: derived rows keyed by the message, not the event; source; backfill ledger

Until 0007, ``uplinks``/``joins`` were keyed by the event's ``unique_id`` and
``uplink_receptions.uplink_id`` pointed at it. Rows healed from the Storage Integration carry
no event, so the derived tables are now keyed by the message's natural identity
(``ingestd.identity``), which includes the row's ``received_at`` (a partitioned PostgreSQL
table needs its time column in every unique key):

- ``uplinks``: primary key (``uplink_id``, ``received_at``), ``uplink_id`` a hash of
  (application_id, device_id, received_at, f_cnt); ``event_unique_id`` becomes nullable and
  unique.
- ``uplink_receptions``: gains the uplink's ``received_at``; primary key (``uplink_id``,
  ``received_at``, ``reception_index``); foreign key to the uplink's new key.
- ``joins``: primary key (``application_id``, ``device_id``, ``received_at``);
  ``event_unique_id`` nullable and unique.
- ``source`` (``stream`` | ``storage`` | ``import``) on every derived table; existing rows
  say ``stream``.
- ``stream_gaps`` gains the backfill ledger: ``backfilled_at``, ``recovered``,
  ``backfill_error``, ``backfill_passes``.

Existing rows are converted in place, in batches. Two existing rows with one identity are
the same message stored twice under two event ids (an AS that processed one uplink twice):
the one with the smallest event id is kept, the other (and its receptions) removed; the
raw ``events`` rows stay. Nothing else is lost or duplicated; a test fills a 0007 database
and checks.

Downgrade restores the 0007 keys; rows without an event id (from the Storage Integration)
cannot be keyed by one and are deleted by it.

Revision ID: 0008_message_identity
Revises: 0007_outbox_pending_due_index
Create Date: 2026-11-28 09:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008_message_identity"
down_revision: str | None = "0007_outbox_pending_due_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000
SOURCE = sa.String(16)


class _Time(sa.TypeDecorator[datetime]):
    """Reads a stored time as aware UTC on both dialects (SQLite keeps naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _uplink_id(application_id: str, device_id: str, received_at: datetime, f_cnt: int) -> str:
    # Frozen copy of ingestd.identity.uplink_id as of this revision: a migration must give
    # the same ids whatever later versions of the package do.
    key = f"{application_id}\x1f{device_id}\x1f{received_at.astimezone(UTC).isoformat()}\x1f{f_cnt}"
    return blake2b(key.encode(), digest_size=16).hexdigest()


def _source_column() -> sa.Column[Any]:
    return sa.Column("source", SOURCE, nullable=False, server_default="stream")


def upgrade() -> None:
    conn = op.get_bind()
    # 1. Detach the receptions from the old uplink key first: on SQLite a table rebuild
    #    drops the parent, and a live ON DELETE CASCADE would empty the children.
    with op.batch_alter_table("uplink_receptions", recreate="always") as b:
        b.drop_constraint("fk_uplink_receptions_uplink_id_uplinks", type_="foreignkey")
        b.add_column(sa.Column("received_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(_source_column())
    op.add_column("uplinks", sa.Column("uplink_id", sa.String(32), nullable=True))
    op.add_column("uplinks", _source_column())

    # 2. Compute the new ids; drop second copies of one message.
    up = sa.table(
        "uplinks",
        sa.column("event_unique_id", sa.String),
        sa.column("application_id", sa.String),
        sa.column("device_id", sa.String),
        sa.column("received_at", _Time()),
        sa.column("f_cnt", sa.BigInteger),
        sa.column("uplink_id", sa.String),
    )
    rx = sa.table(
        "uplink_receptions",
        sa.column("uplink_id", sa.String),
        sa.column("received_at", _Time()),
    )
    # Keyset pages: bounded memory on a table of any size.
    set_id = (
        sa.update(up)
        .where(up.c.event_unique_id == sa.bindparam("eid"))
        .values(uplink_id=sa.bindparam("new_id"))
    )
    last = ""
    while True:
        page = conn.execute(
            sa.select(
                up.c.event_unique_id,
                up.c.application_id,
                up.c.device_id,
                up.c.received_at,
                up.c.f_cnt,
            )
            .where(up.c.event_unique_id > last)
            .order_by(up.c.event_unique_id)
            .limit(BATCH)
        ).all()
        if not page:
            break
        conn.execute(
            set_id,
            [
                {
                    "eid": r.event_unique_id,
                    "new_id": _uplink_id(r.application_id, r.device_id, r.received_at, r.f_cnt),
                }
                for r in page
            ],
        )
        last = page[-1].event_unique_id
    # One message stored under two event ids: keep the first id, drop the other copies.
    doubled = (
        conn.execute(sa.select(up.c.uplink_id).group_by(up.c.uplink_id).having(sa.func.count() > 1))
        .scalars()
        .all()
    )
    for new_id in doubled:
        eids = (
            conn.execute(
                sa.select(up.c.event_unique_id)
                .where(up.c.uplink_id == new_id)
                .order_by(up.c.event_unique_id)
            )
            .scalars()
            .all()
        )
        conn.execute(sa.delete(rx).where(rx.c.uplink_id.in_(eids[1:])))
        conn.execute(sa.delete(up).where(up.c.event_unique_id.in_(eids[1:])))
    # Receptions follow their uplink: both right-hand sides read the old uplink_id.
    parent = sa.select(up.c.uplink_id).where(up.c.event_unique_id == rx.c.uplink_id)
    parent_time = sa.select(up.c.received_at).where(up.c.event_unique_id == rx.c.uplink_id)
    conn.execute(
        sa.update(rx).values(
            uplink_id=parent.scalar_subquery(), received_at=parent_time.scalar_subquery()
        )
    )
    # A reception without its uplink could not exist under the old foreign key.
    conn.execute(sa.delete(rx).where(rx.c.received_at.is_(None)))

    # 3. The new keys.
    with op.batch_alter_table("uplinks", recreate="always") as b:
        b.drop_constraint("pk_uplinks", type_="primary")
        b.alter_column("uplink_id", existing_type=sa.String(32), nullable=False)
        b.alter_column("event_unique_id", existing_type=sa.String(64), nullable=True)
        b.create_primary_key("pk_uplinks", ["uplink_id", "received_at"])
        b.create_index("ix_uplinks_event_unique_id", ["event_unique_id"], unique=True)
    with op.batch_alter_table("uplink_receptions", recreate="always") as b:
        b.drop_constraint("pk_uplink_receptions", type_="primary")
        b.alter_column("uplink_id", existing_type=sa.String(64), type_=sa.String(32))
        b.alter_column("received_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        b.create_primary_key(
            "pk_uplink_receptions", ["uplink_id", "received_at", "reception_index"]
        )
        b.create_foreign_key(
            "fk_uplink_receptions_uplink_id_uplinks",
            "uplinks",
            ["uplink_id", "received_at"],
            ["uplink_id", "received_at"],
            ondelete="CASCADE",
        )

    # 4. joins: keyed by (application_id, device_id, received_at).
    jn = sa.table(
        "joins",
        sa.column("event_unique_id", sa.String),
        sa.column("application_id", sa.String),
        sa.column("device_id", sa.String),
        sa.column("received_at", _Time()),
    )
    keep = (
        sa.select(sa.func.min(jn.c.event_unique_id))
        .group_by(jn.c.application_id, jn.c.device_id, jn.c.received_at)
        .subquery()
    )
    conn.execute(sa.delete(jn).where(jn.c.event_unique_id.not_in(sa.select(keep.c[0]))))
    with op.batch_alter_table("joins", recreate="always") as b:
        b.drop_index("ix_joins_application_id_device_id_received_at")
        b.drop_constraint("pk_joins", type_="primary")
        b.alter_column("event_unique_id", existing_type=sa.String(64), nullable=True)
        b.add_column(_source_column())
        b.create_primary_key("pk_joins", ["application_id", "device_id", "received_at"])
        b.create_index("ix_joins_event_unique_id", ["event_unique_id"], unique=True)

    op.add_column("downlink_events", _source_column())

    # 5. The backfill ledger on each gap.
    with op.batch_alter_table("stream_gaps") as b:
        b.add_column(sa.Column("backfilled_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("recovered", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("backfill_error", sa.Text(), nullable=True))
        b.add_column(sa.Column("backfill_passes", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("stream_gaps") as b:
        for name in ("backfill_passes", "backfill_error", "recovered", "backfilled_at"):
            b.drop_column(name)
    with op.batch_alter_table("downlink_events") as b:
        b.drop_column("source")

    jn = sa.table("joins", sa.column("event_unique_id", sa.String))
    conn.execute(sa.delete(jn).where(jn.c.event_unique_id.is_(None)))
    with op.batch_alter_table("joins", recreate="always") as b:
        b.drop_index("ix_joins_event_unique_id")
        b.drop_constraint("pk_joins", type_="primary")
        b.drop_column("source")
        b.alter_column("event_unique_id", existing_type=sa.String(64), nullable=False)
        b.create_primary_key("pk_joins", ["event_unique_id"])
        b.create_index(
            "ix_joins_application_id_device_id_received_at",
            ["application_id", "device_id", "received_at"],
        )

    with op.batch_alter_table("uplink_receptions", recreate="always") as b:
        b.drop_constraint("fk_uplink_receptions_uplink_id_uplinks", type_="foreignkey")
    up = sa.table(
        "uplinks",
        sa.column("event_unique_id", sa.String),
        sa.column("uplink_id", sa.String),
        sa.column("received_at", sa.DateTime),
    )
    rx = sa.table(
        "uplink_receptions",
        sa.column("uplink_id", sa.String),
        sa.column("received_at", sa.DateTime),
    )
    keyed = sa.select(up.c.uplink_id).where(up.c.event_unique_id.is_not(None))
    conn.execute(sa.delete(rx).where(rx.c.uplink_id.not_in(keyed)))
    conn.execute(sa.delete(up).where(up.c.event_unique_id.is_(None)))
    old = sa.select(up.c.event_unique_id).where(
        up.c.uplink_id == rx.c.uplink_id, up.c.received_at == rx.c.received_at
    )
    conn.execute(sa.update(rx).values(uplink_id=old.scalar_subquery()))
    with op.batch_alter_table("uplinks", recreate="always") as b:
        b.drop_index("ix_uplinks_event_unique_id")
        b.drop_constraint("pk_uplinks", type_="primary")
        b.drop_column("uplink_id")
        b.drop_column("source")
        b.alter_column("event_unique_id", existing_type=sa.String(64), nullable=False)
        b.create_primary_key("pk_uplinks", ["event_unique_id"])
    with op.batch_alter_table("uplink_receptions", recreate="always") as b:
        b.drop_constraint("pk_uplink_receptions", type_="primary")
        b.drop_column("source")
        b.drop_column("received_at")
        b.alter_column("uplink_id", existing_type=sa.String(32), type_=sa.String(64))
        b.create_primary_key("pk_uplink_receptions", ["uplink_id", "reception_index"])
        b.create_foreign_key(
            "fk_uplink_receptions_uplink_id_uplinks",
            "uplinks",
            ["uplink_id"],
            ["event_unique_id"],
            ondelete="CASCADE",
        )
