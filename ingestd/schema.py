"""The SQL schema: SQLAlchemy Core tables shared by SQLite and PostgreSQL.

Table and column names are a public contract (users write SQL against them); add
columns freely, never rename. Alembic's ``env.py`` imports :data:`metadata`, and a
migration test proves ``upgrade head`` equals it on both dialects.

Conventions:
- JSON is ``jsonb`` on PostgreSQL and JSON text on SQLite.
- Bytes are ``bytea`` / BLOB.
- Times are timezone-aware UTC in Python (:class:`UtcDateTime`); ``timestamptz`` on
  PostgreSQL, ISO-8601 text in UTC on SQLite.
- Derived rows (uplinks, receptions, joins) are keyed by the message's natural identity
  (:mod:`ingestd.identity`), the same from the event stream, the Storage Integration and
  imports, so every insert is idempotent with ``ON CONFLICT DO NOTHING`` and needs no
  generated id. Each such key includes the row's time column (``received_at``), as a
  time-partitioned PostgreSQL table requires of every unique key. ``source`` says where a
  row came from (``stream``, ``storage``, ``import``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

from ingestd.models import TX_PRIORITIES, Operation, OutboxStatus


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect (SQLite drops the zone otherwise)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: ingestd stores only aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a row written by a user's own SQL on SQLite
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


JsonType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("CURRENT_TIMESTAMP")

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("unique_id", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("time", UtcDateTime(), nullable=False),
    sa.Column("application_id", sa.String(64)),
    sa.Column("device_id", sa.String(64)),
    sa.Column("dev_eui", sa.String(16)),
    sa.Column("correlation_ids", JsonType),
    sa.Column("data", JsonType),
    sa.Column("ingested_at", UtcDateTime(), nullable=False, server_default=NOW),
    sa.Index(None, "stream", "time"),
)

uplinks = sa.Table(
    "uplinks",
    metadata,
    sa.Column("uplink_id", sa.String(32), primary_key=True),  # ingestd.identity.uplink_id
    # None for rows from the Storage Integration, which carry no event.
    sa.Column("event_unique_id", sa.String(64)),
    sa.Column("application_id", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("dev_eui", sa.String(16)),
    sa.Column("join_eui", sa.String(16)),
    sa.Column("dev_addr", sa.String(8)),
    sa.Column("session_key_id", sa.String(64)),
    sa.Column("f_port", sa.Integer, nullable=False),
    sa.Column("f_cnt", sa.BigInteger, nullable=False),
    sa.Column("frm_payload", sa.LargeBinary),
    sa.Column("decoded_payload", JsonType),
    sa.Column("confirmed", sa.Boolean, nullable=False),
    sa.Column("received_at", UtcDateTime(), primary_key=True),
    sa.Column("rssi", sa.Float),
    sa.Column("snr", sa.Float),
    sa.Column("gateway_count", sa.Integer, nullable=False),
    sa.Column("frequency", sa.BigInteger),
    sa.Column("modulation", sa.String(8)),  # lora | fsk | lrfhss
    sa.Column("spreading_factor", sa.Integer),
    sa.Column("bandwidth", sa.Integer),
    sa.Column("coding_rate", sa.String(16)),
    sa.Column("bit_rate", sa.Integer),  # FSK only
    sa.Column("consumed_airtime_s", sa.Float),
    sa.Column("packet_error_rate", sa.Float),
    sa.Column("source", sa.String(16), nullable=False, server_default="stream"),
    # TTS's ApplicationUp.simulated (Console/API "simulate uplink"): left out of the views.
    sa.Column("simulated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "event_unique_id", unique=True),
    sa.Index(None, "application_id", "device_id", "received_at"),
    sa.Index(None, "received_at"),
)

uplink_receptions = sa.Table(
    "uplink_receptions",
    metadata,
    sa.Column("uplink_id", sa.String(32), primary_key=True),
    sa.Column("received_at", UtcDateTime(), primary_key=True),  # the uplink's
    sa.Column("reception_index", sa.Integer, primary_key=True),  # position in rx_metadata
    sa.Column("gateway_id", sa.String(64)),
    sa.Column("gateway_eui", sa.String(16)),
    sa.Column("rssi", sa.Float),
    sa.Column("channel_rssi", sa.Float),
    sa.Column("snr", sa.Float),
    sa.Column("time", UtcDateTime()),
    sa.Column("channel_index", sa.Integer),
    sa.Column("latitude", sa.Float),
    sa.Column("longitude", sa.Float),
    sa.Column("altitude", sa.Float),
    sa.Column("source", sa.String(16), nullable=False, server_default="stream"),
    sa.ForeignKeyConstraint(
        ["uplink_id", "received_at"],
        ["uplinks.uplink_id", "uplinks.received_at"],
        ondelete="CASCADE",
    ),
    sa.Index(None, "gateway_id"),
)

joins = sa.Table(
    "joins",
    metadata,
    sa.Column("event_unique_id", sa.String(64)),  # None: not from an event
    sa.Column("application_id", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("dev_eui", sa.String(16)),
    sa.Column("join_eui", sa.String(16)),
    sa.Column("dev_addr", sa.String(8)),
    sa.Column("session_key_id", sa.String(64)),
    sa.Column("received_at", UtcDateTime(), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False, server_default="stream"),
    sa.Index(None, "event_unique_id", unique=True),
)

downlink_events = sa.Table(
    "downlink_events",
    metadata,
    sa.Column("event_unique_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("application_id", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("f_port", sa.Integer),
    sa.Column("f_cnt", sa.BigInteger),
    sa.Column("frm_payload", sa.LargeBinary),
    sa.Column("decoded_payload", JsonType),
    sa.Column("confirmed", sa.Boolean),
    sa.Column("priority", sa.String(16)),
    sa.Column("correlation_ids", JsonType),
    sa.Column("outbox_id", sa.BigInteger),
    sa.Column("error", JsonType),
    sa.Column("time", UtcDateTime(), nullable=False),
    sa.Column("source", sa.String(16), nullable=False, server_default="stream"),
    sa.Index(None, "outbox_id"),
    sa.Index(None, "application_id", "device_id", "time"),
)

stream_cursors = sa.Table(
    "stream_cursors",
    metadata,
    sa.Column("stream", sa.String(200), primary_key=True),
    sa.Column("last_event_time", UtcDateTime()),
    sa.Column("last_unique_ids", JsonType),
    sa.Column("updated_at", UtcDateTime(), nullable=False, server_default=NOW),
    # Operational state written by the daemon for `ingestd status`:
    sa.Column("connected_since", UtcDateTime()),
    sa.Column("last_error", sa.Text),
    sa.Column("last_error_at", UtcDateTime()),
)

stream_gaps = sa.Table(
    "stream_gaps",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("gap_start", UtcDateTime()),
    sa.Column("gap_end", UtcDateTime()),
    sa.Column("reason", sa.String(40), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("detected_at", UtcDateTime(), nullable=False, server_default=NOW),
    # Backfill from the Storage Integration (ingestd.backfill): when the last pass ended,
    # rows it added over all passes, why it could not run (None: it did), passes done.
    sa.Column("backfilled_at", UtcDateTime()),
    sa.Column("recovered", sa.Integer, nullable=False, server_default="0"),
    sa.Column("backfill_error", sa.Text),
    sa.Column("backfill_passes", sa.Integer, nullable=False, server_default="0"),
    sa.Index(None, "stream", "gap_start"),
)

rejected_events = sa.Table(
    "rejected_events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(200), nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("received_at", UtcDateTime(), nullable=False, server_default=NOW),
    # A hash of what was rejected (ingestd.store.reject_digest): the same frame replayed
    # after a reconnect is one row, not one per replay. NULL on rows from before 0010.
    sa.Column("digest", sa.String(32)),
    sa.Index(None, "stream", "digest", unique=True),
)

OUTBOX_STATUSES: tuple[str, ...] = tuple(OutboxStatus)
OUTBOX_OPERATIONS: tuple[str, ...] = tuple(Operation)
# Statuses of rows TTS has not accepted yet: they hold back later rows of the same device.
OUTBOX_ACTIVE_STATUSES: tuple[str, ...] = (OutboxStatus.PENDING, OutboxStatus.PUSHING)
# Statuses a row never leaves (except for a late ack): retention may delete such rows.
OUTBOX_FINAL_STATUSES: tuple[str, ...] = (
    OutboxStatus.ACKED,
    OutboxStatus.FAILED,
    OutboxStatus.INVALIDATED,
    OutboxStatus.DROPPED,
)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


downlink_outbox = sa.Table(
    "downlink_outbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("application_id", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("f_port", sa.Integer),
    sa.Column("frm_payload", sa.LargeBinary),
    sa.Column("decoded_payload", JsonType),
    sa.Column("confirmed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("priority", sa.String(16), nullable=False, server_default="NORMAL"),
    sa.Column("operation", sa.String(8), nullable=False, server_default="push"),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False, server_default=NOW),
    sa.Column("last_error", sa.Text),
    sa.Column("correlation_id", sa.String(100)),
    sa.Column("created_at", UtcDateTime(), nullable=False, server_default=NOW),
    sa.Column("updated_at", UtcDateTime(), nullable=False, server_default=NOW),
    sa.Column("claimed_at", UtcDateTime()),
    sa.Column("claimed_by", sa.String(100)),
    sa.Column("queued_at", UtcDateTime()),
    sa.Column("sent_at", UtcDateTime()),
    sa.Column("acked_at", UtcDateTime()),
    sa.Column("finished_at", UtcDateTime()),
    sa.Column("request_id", sa.String(64)),  # X-Request-ID of the push TTS accepted
    # An earlier push got no answer (timeout, crash): TTS is checked before pushing again.
    sa.Column("verify_before_push", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "status", "next_attempt_at"),
    sa.Index(None, "application_id", "device_id", "id"),
    # The claim's per-device order check only looks at rows not yet accepted by TTS; a
    # partial index keeps it cheap however many finished rows a device has.
    sa.Index(
        "ix_downlink_outbox_active_device",
        "application_id",
        "device_id",
        "id",
        postgresql_where=sa.text(_in_list("status", OUTBOX_ACTIVE_STATUSES)),
        sqlite_where=sa.text(_in_list("status", OUTBOX_ACTIVE_STATUSES)),
    ),
    # Claim candidates in claim order (most overdue first), whatever the table's history.
    sa.Index(
        "ix_downlink_outbox_pending_due",
        "next_attempt_at",
        "id",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    ),
    # Reject typos in hand-written INSERTs at once instead of failing the row later.
    sa.CheckConstraint(_in_list("status", OUTBOX_STATUSES), name="status"),
    sa.CheckConstraint(_in_list("operation", OUTBOX_OPERATIONS), name="operation"),
    sa.CheckConstraint(_in_list("priority", TX_PRIORITIES), name="priority"),
    # AUTOINCREMENT: SQLite would otherwise reuse the id of a deleted newest row, and a
    # reused id would inherit the old row's lifecycle events (matched by outbox id).
    # Alembic cannot reflect this flag: a batch rebuild of this table must pass
    # table_kwargs={"sqlite_autoincrement": True} (see 0003_outbox_constraints).
    sqlite_autoincrement=True,
)
