"""Outbox rows that a hand-written INSERT got wrong, per dialect (shared by outbox tests)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingestd import schema
from ingestd.db import is_postgres

# (column, SQL literal, what the reason says). SQLite keeps any value in any column (type
# affinity only); PostgreSQL's types refuse most of these, but jsonb keeps numbers that no
# JSON decoder reads back as a finite double.
_UNREADABLE_SQLITE = [
    ("decoded_payload", "'not json'", "decoded_payload is not valid JSON"),
    ("frm_payload", "'hello'", "frm_payload is text, not bytes"),
    ("f_port", "'abc'", "f_port 'abc' is not an integer"),
    ("confirmed", "'yes'", "confirmed 'yes' is not a boolean"),
    ("next_attempt_at", "'1st of May'", "next_attempt_at '1st of May' is not a time"),
]
_UNREADABLE_PG = [
    ("decoded_payload", "'{\"n\": 1e999}'::jsonb", "decoded_payload is not valid JSON"),
]


def unreadable_values(engine: Engine) -> list[tuple[str, str, str]]:
    return _UNREADABLE_PG if is_postgres(engine) else _UNREADABLE_SQLITE


def insert_unreadable(
    engine: Engine, column: str, literal: str, *, app: str, device_id: str
) -> int:
    """A row with ``column`` set to ``literal`` by plain SQL, as a user's INSERT would."""
    row = {"application_id": app, "device_id": device_id, "f_port": 1, "frm_payload": b"\x01"}
    with engine.begin() as conn:
        outbox_id: int = conn.execute(
            sa.insert(schema.downlink_outbox).values(row).returning(schema.downlink_outbox.c.id)
        ).scalar_one()
    extra = ", frm_payload = NULL" if column == "decoded_payload" else ""
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE downlink_outbox SET {column} = {literal}{extra} WHERE id = :id"),
            {"id": outbox_id},
        )
    return outbox_id
