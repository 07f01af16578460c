"""Known traffic for the analytics tests: every case a view must get right, in one fill.

- dev-a, session S1: f_cnt 10, 11, 11 (a confirmed retry), 13, 14: 12 is lost.
- dev-a rejoins, session S2: f_cnt 0, 1, 2 (2 within the last 24 h): a reset, no loss.
- dev-a, a simulated uplink (f_cnt 500, newest): left out of every view.
- dev-b, session S3: 65533, 65534, 0, 1, 3: a 16-bit roll-over; 65535 and 2 are lost.
- dev-c: only a simulated uplink: no row anywhere.
- gw-1 hears every real uplink (location moves once), gw-2 hears dev-b and the simulated one.
- outbox 1: pushed, forwarded, sent, nacked, sent again, acked. 2: failed. 3: pending.
- stream s1: a healed gap (1 h), an open gap (10 min), a gap whose backfill failed (5 min),
  2 rejected events today and 1 two days ago; stream s2: 1 rejected event only.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingestd import schema
from ingestd.identity import uplink_id

NOW = datetime.now(UTC).replace(microsecond=0)
D0 = NOW.replace(hour=0, minute=0, second=0) - timedelta(days=3)  # midnight, 3 days ago:
# D1 (and all its traffic) then lies over 24 h before NOW at any time of day.
D1 = D0 + timedelta(days=1)
T_DL = D1 + timedelta(hours=8)  # the downlinks' creation time

GW1_OLD = (52.1, 4.3, 10.0)
GW1_NEW = (52.2, 4.4, 12.0)


def at(base: datetime, *, h: int = 0, m: int = 0, s: int = 0) -> datetime:
    return base + timedelta(hours=h, minutes=m, seconds=s)


# (device, session, f_cnt, received_at, simulated)
UPLINKS: list[tuple[str, str, int, datetime, bool]] = [
    ("dev-a", "S1", 10, at(D0, h=10), False),
    ("dev-a", "S1", 11, at(D0, h=10, m=1), False),
    ("dev-a", "S1", 11, at(D0, h=10, m=1, s=5), False),
    ("dev-a", "S1", 13, at(D0, h=10, m=3), False),
    ("dev-a", "S1", 14, at(D0, h=10, m=4), False),
    ("dev-a", "S2", 0, at(D1, h=10), False),
    ("dev-a", "S2", 1, at(D1, h=10, m=1), False),
    ("dev-a", "S2", 2, NOW - timedelta(hours=1), False),
    ("dev-a", "S2", 500, NOW - timedelta(minutes=30), True),
    ("dev-b", "S3", 65533, at(D1, h=12), False),
    ("dev-b", "S3", 65534, at(D1, h=12, m=1), False),
    ("dev-b", "S3", 0, at(D1, h=12, m=3), False),
    ("dev-b", "S3", 1, at(D1, h=12, m=4), False),
    ("dev-b", "S3", 3, at(D1, h=12, m=6), False),
    ("dev-c", "S4", 7, NOW - timedelta(minutes=20), True),
]
NEWEST_A = NOW - timedelta(hours=1)
PAYLOAD_A = {
    "temp": 21.5,
    "ok": True,
    "label": "x",
    "nested": {"hum": 40, "deep": {"a": {"b": 1}}},
    "arr": [1, 2],
    "nothing": None,
    "l1": {"l2": {"l3": {"l4": {"l5": 5}}}},  # deeper than UPLINK_FIELDS_DEPTH
}


def fill(engine: Engine) -> None:
    """Insert the traffic above (derived tables directly, as ingest would have)."""
    up, rx = [], []
    for device, session, f_cnt, t, simulated in UPLINKS:
        uid = uplink_id("app", device, t, f_cnt)
        newest_a = device == "dev-a" and t == NEWEST_A
        rssi, snr = (-80.0, 8.0) if device == "dev-a" else (-90.0, 2.0)
        up.append(
            {
                "uplink_id": uid,
                "event_unique_id": f"ev-{len(up):03d}",
                "application_id": "app",
                "device_id": device,
                "session_key_id": session,
                "f_port": 1 if device == "dev-a" else 2,
                "f_cnt": f_cnt,
                "confirmed": False,
                "received_at": t,
                "rssi": rssi,
                "snr": snr,
                "gateway_count": 1 if device == "dev-a" else 2,
                "spreading_factor": 7 if device == "dev-a" else 9,
                "bandwidth": 125000,
                "frequency": 868100000,
                "simulated": simulated,
                "decoded_payload": PAYLOAD_A
                if newest_a
                else ({"temp": 99} if simulated else {"n": f_cnt}),
            }
        )
        if simulated:
            if device == "dev-a":
                rx.append(_rx(uid, t, 0, "gw-2", -1.0, 20.0, None))
            continue
        if device == "dev-a":
            rx.append(_rx(uid, t, 0, "gw-1", -80.0, 8.0, GW1_NEW if newest_a else GW1_OLD))
        else:
            rx.append(_rx(uid, t, 0, "gw-1", -100.0, 0.0, GW1_OLD))
            rx.append(_rx(uid, t, 1, "gw-2", -110.0, -5.0, None))
    outbox = [
        {
            "id": 1,
            "application_id": "app",
            "device_id": "dev-a",
            "f_port": 1,
            "frm_payload": b"\x01",
            "confirmed": True,
            "status": "acked",
            "attempts": 1,
            "created_at": T_DL,
            "updated_at": at(T_DL, s=20),
            "queued_at": at(T_DL, s=1),
            "sent_at": at(T_DL, s=3),
            "acked_at": at(T_DL, s=20),
            "finished_at": at(T_DL, s=20),
        },
        {
            "id": 2,
            "application_id": "app",
            "device_id": "dev-b",
            "f_port": 1,
            "frm_payload": b"\x02",
            "status": "failed",
            "attempts": 8,
            "created_at": at(T_DL, m=1),
            "updated_at": at(T_DL, m=5),
            "last_error": "f_port_invalid",
            "finished_at": at(T_DL, m=5),
        },
        {
            "id": 3,
            "application_id": "app",
            "device_id": "dev-b",
            "f_port": 1,
            "frm_payload": b"\x03",
            "status": "pending",
            "created_at": at(T_DL, m=2),
            "updated_at": at(T_DL, m=2),
        },
    ]
    down = [
        (kind, at(T_DL, s=sec))
        for kind, sec in (
            ("receive", 0),
            ("forward", 2),
            ("sent", 3),
            ("nack", 10),
            ("sent", 11),
            ("ack", 20),
        )
    ]
    gaps = [
        {
            "stream": "s1",
            # On D1, not D0: a report of the last 3 days covers it at any time of day.
            "gap_start": at(D1, h=4),
            "gap_end": at(D1, h=5),
            "reason": "reconnect",
            "detected_at": at(D1, h=5),
            "backfilled_at": at(D1, h=6),
            "backfill_passes": 1,
            "recovered": 5,
        },
        {
            "stream": "s1",
            "gap_start": at(D1, h=1),
            "gap_end": at(D1, h=1, m=10),
            "reason": "reconnect",
            "detected_at": at(D1, h=1, m=10),
        },
        {
            "stream": "s1",
            "gap_start": at(D1, h=2),
            "gap_end": at(D1, h=2, m=5),
            "reason": "sparse_replay",
            "detected_at": at(D1, h=2, m=5),
            "backfilled_at": at(D1, h=3),
            "backfill_passes": 1,
            "backfill_error": "storage integration answered 404",
        },
    ]
    rejected = [
        ("s1", NOW - timedelta(hours=1)),
        ("s1", NOW - timedelta(hours=2)),
        # Two days ago, before test_prune's cutoff (D1 09:00) at any time of day.
        ("s1", at(D1, h=2)),
        ("s2", NOW - timedelta(hours=3)),
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(schema.uplinks), up)
        conn.execute(sa.insert(schema.uplink_receptions), rx)
        for row in outbox:  # rows with different keys: one statement each
            conn.execute(sa.insert(schema.downlink_outbox), row)
        conn.execute(
            sa.insert(schema.downlink_events),
            [
                {
                    "event_unique_id": f"dl-{i}",
                    "kind": kind,
                    "application_id": "app",
                    "device_id": "dev-a",
                    "outbox_id": 1,
                    "time": t,
                }
                for i, (kind, t) in enumerate(down)
            ],
        )
        conn.execute(
            sa.insert(schema.stream_cursors),
            [
                {"stream": "s1", "last_event_time": NOW - timedelta(seconds=10), "updated_at": NOW},
            ],
        )
        for row in gaps:
            conn.execute(sa.insert(schema.stream_gaps), row)
        conn.execute(
            sa.insert(schema.rejected_events),
            [{"stream": s, "raw": "{", "error": "not JSON", "received_at": t} for s, t in rejected],
        )
        if conn.dialect.name == "postgresql":  # explicit ids: move the sequence past them
            conn.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('downlink_outbox', 'id'), 3)"
            )


def _rx(
    uid: str,
    t: datetime,
    index: int,
    gateway: str,
    rssi: float,
    snr: float,
    where: tuple[float, float, float] | None,
) -> dict[str, Any]:
    lat, lon, alt = where or (None, None, None)
    return {
        "uplink_id": uid,
        "received_at": t,
        "reception_index": index,
        "gateway_id": gateway,
        "rssi": rssi,
        "snr": snr,
        "latitude": lat,
        "longitude": lon,
        "altitude": alt,
    }


def as_time(value: Any) -> datetime | None:
    """A time from a view (SQLite: text; PostgreSQL: timestamptz) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_day(value: Any) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value
