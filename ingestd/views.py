"""The analytics views (DESIGN §8): their current SQL, per dialect, in one home.

Names and columns are a contract (same on SQLite and PostgreSQL; columns may be added,
never renamed). Alembic migrations create the views, and each migration carries a frozen
copy of the SQL as of its revision (a migration must create what it created the day it
was written, whatever this module says later). A test proves that the views of a database
upgraded to head are exactly :func:`view_sql`'s: change a view here, and that test fails
until a new migration recreates it with the new text (copy the output of
``python -m ingestd.views sqlite|postgresql``).

Conventions shared by every view:
- Uplinks TTS marks ``simulated`` (Console/API "simulate uplink") are left out.
- "now" is ``CURRENT_TIMESTAMP``. SQLite stores times as ``YYYY-MM-DD HH:MM:SS.ffffff``
  text, which compares correctly with ``datetime('now', …)``'s ``YYYY-MM-DD HH:MM:SS``.
- Durations are seconds as floating point, rounded to the millisecond (``_seconds``).
- Ratios are between 0 and 1.
"""

from __future__ import annotations

import sys
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]

# Creation order; views do not depend on each other, so any order drops them.
VIEW_NAMES = (
    "device_last_seen",
    "uplink_loss",
    "uplink_loss_daily",
    "gateway_stats",
    "downlink_status",
    "stream_health",
    "uplink_fields",
)
F_CNT_MODULUS = 65536  # LoRaWAN 1.0 16-bit frame counters roll over here
UPLINK_FIELDS_DEPTH = 4  # levels of nested objects uplink_fields descends into


def _now_minus_24h(d: Dialect) -> str:
    if d == "sqlite":
        return "datetime('now', '-1 day')"
    return "CURRENT_TIMESTAMP - INTERVAL '24 hours'"


def _seconds(d: Dialect, start: str, end: str) -> str:
    """``end - start`` in seconds (double), rounded to ms; NULL if either is NULL."""
    if d == "sqlite":
        # julianday() is a double with ~50 µs resolution at today's dates: round to ms.
        return f"round((julianday({end}) - julianday({start})) * 86400.0, 3)"
    return (
        f"CAST(round(CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS numeric), 3)"
        " AS DOUBLE PRECISION)"
    )


def _now(d: Dialect) -> str:
    return "'now'" if d == "sqlite" else "CURRENT_TIMESTAMP"


def _day(d: Dialect, column: str) -> str:
    return f"date({column})" if d == "sqlite" else f"CAST({column} AT TIME ZONE 'UTC' AS date)"


_DEVICE = "application_id, device_id"
_SESSION = "application_id, device_id, session_key_id"

# Frame counters unwrapped per device session. In received_at order, a counter that drops
# by more than half the 16-bit space from a value that fits 16 bits is a roll-over
# (65535 -> 0): every later frame gets +65536 per roll-over so far (`seq`). Any other drop
# within a session (an ABP device that resets its counter without a new session key)
# starts a new `segment`, so it never counts as loss either. A rejoin is a new
# session_key_id: its own partition.
_WRAP = f"prev_f_cnt < {F_CNT_MODULUS} AND prev_f_cnt - f_cnt > {F_CNT_MODULUS // 2}"
_FRAMES = f"""
frame_steps AS (
    SELECT {_SESSION}, uplink_id, received_at, f_cnt,
           LAG(f_cnt) OVER (PARTITION BY {_SESSION}
                            ORDER BY received_at, f_cnt) AS prev_f_cnt
    FROM uplinks
    WHERE NOT simulated
),
frame_flags AS (
    SELECT {_SESSION}, uplink_id, received_at, f_cnt,
           CASE WHEN {_WRAP} THEN 1 ELSE 0 END AS wrap,
           CASE WHEN f_cnt < prev_f_cnt AND NOT ({_WRAP}) THEN 1 ELSE 0 END AS reset
    FROM frame_steps
),
frames AS (
    SELECT {_SESSION}, uplink_id, received_at, f_cnt, wrap,
           SUM(reset) OVER w AS segment,
           f_cnt + {F_CNT_MODULUS} * SUM(wrap) OVER w AS seq
    FROM frame_flags
    WINDOW w AS (PARTITION BY {_SESSION} ORDER BY received_at, f_cnt ROWS UNBOUNDED PRECEDING)
)"""


def _device_last_seen(d: Dialect) -> str:
    return f"""
WITH ranked AS (
    SELECT uplinks.*,
           ROW_NUMBER() OVER (PARTITION BY {_DEVICE}
                              ORDER BY received_at DESC, f_cnt DESC) AS rn,
           SUM(CASE WHEN received_at >= {_now_minus_24h(d)} THEN 1 ELSE 0 END)
               OVER (PARTITION BY {_DEVICE}) AS uplinks_24h,
           COUNT(*) OVER (PARTITION BY {_DEVICE}) AS uplinks_total
    FROM uplinks
    WHERE NOT simulated
)
SELECT application_id, device_id, dev_eui,
       received_at AS last_uplink_at, uplink_id AS last_uplink_id,
       f_cnt AS last_f_cnt, f_port AS last_f_port, rssi AS last_rssi, snr AS last_snr,
       gateway_count AS last_gateway_count, spreading_factor AS last_spreading_factor,
       bandwidth AS last_bandwidth, frequency AS last_frequency,
       CAST(uplinks_24h AS BIGINT) AS uplinks_24h, CAST(uplinks_total AS BIGINT) AS uplinks_total
FROM ranked
WHERE rn = 1"""


def _uplink_loss(d: Dialect) -> str:
    return f"""
WITH {_FRAMES.strip()},
segments AS (
    SELECT {_SESSION}, segment,
           MIN(seq) AS lo, MAX(seq) AS hi, COUNT(DISTINCT seq) AS n, SUM(wrap) AS wraps,
           MIN(received_at) AS first_at, MAX(received_at) AS last_at,
           MAX(segment) OVER (PARTITION BY {_SESSION}) AS last_segment
    FROM frames
    GROUP BY {_SESSION}, segment
),
sessions AS (
    SELECT {_SESSION},
           MIN(CASE WHEN segment = 0 THEN lo END) AS first_f_cnt,
           MAX(CASE WHEN segment = last_segment THEN hi END) AS last_f_cnt,
           CAST(SUM(n) AS BIGINT) AS received,
           CAST(SUM(hi - lo + 1) AS BIGINT) AS expected,
           CAST(SUM(wraps) AS BIGINT) AS rollovers,
           CAST(COUNT(*) - 1 AS BIGINT) AS resets,
           MIN(first_at) AS first_uplink_at, MAX(last_at) AS last_uplink_at
    FROM segments
    GROUP BY {_SESSION}
)
SELECT {_SESSION}, first_f_cnt, last_f_cnt, received, expected,
       expected - received AS lost,
       CAST(expected - received AS DOUBLE PRECISION) / expected AS loss_ratio,
       rollovers, resets, first_uplink_at, last_uplink_at
FROM sessions"""


def _uplink_loss_daily(d: Dialect) -> str:
    # A frame's loss is the hole before it (in counter order, within its segment), booked
    # on the day the frame arrived: the days of a session add up to its uplink_loss row.
    return f"""
WITH {_FRAMES.strip()},
distinct_frames AS (
    SELECT {_SESSION}, segment, seq, MIN(received_at) AS received_at
    FROM frames
    GROUP BY {_SESSION}, segment, seq
),
holes AS (
    SELECT {_DEVICE}, session_key_id, received_at,
           COALESCE(seq - LAG(seq) OVER (PARTITION BY {_SESSION}, segment
                                         ORDER BY seq) - 1, 0) AS lost_before
    FROM distinct_frames
)
SELECT {_DEVICE}, {_day(d, "received_at")} AS day,
       CAST(COUNT(*) AS BIGINT) AS received,
       CAST(COUNT(*) + SUM(lost_before) AS BIGINT) AS expected,
       CAST(SUM(lost_before) AS BIGINT) AS lost,
       CAST(SUM(lost_before) AS DOUBLE PRECISION) / (COUNT(*) + SUM(lost_before)) AS loss_ratio,
       CAST(COUNT(DISTINCT session_key_id) AS BIGINT) AS sessions
FROM holes
GROUP BY {_DEVICE}, {_day(d, "received_at")}"""


def _gateway_stats(d: Dialect) -> str:
    return f"""
WITH rx AS (
    SELECT r.gateway_id, r.gateway_eui, r.rssi, r.snr, r.latitude, r.longitude, r.altitude,
           u.received_at, u.application_id || '/' || u.device_id AS device
    FROM uplink_receptions r
    JOIN uplinks u ON u.uplink_id = r.uplink_id AND u.received_at = r.received_at
    WHERE NOT u.simulated
),
located AS (
    SELECT gateway_id, latitude, longitude, altitude,
           ROW_NUMBER() OVER (PARTITION BY gateway_id ORDER BY received_at DESC) AS rn
    FROM rx
    WHERE latitude IS NOT NULL AND longitude IS NOT NULL
),
agg AS (
    SELECT gateway_id, MAX(gateway_eui) AS gateway_eui,
           CAST(COUNT(*) AS BIGINT) AS receptions,
           CAST(COUNT(DISTINCT device) AS BIGINT) AS devices,
           MIN(rssi) AS rssi_min, AVG(rssi) AS rssi_avg, MAX(rssi) AS rssi_max,
           MIN(snr) AS snr_min, AVG(snr) AS snr_avg, MAX(snr) AS snr_max,
           MIN(received_at) AS first_seen_at, MAX(received_at) AS last_seen_at,
           CAST(SUM(CASE WHEN received_at >= {_now_minus_24h(d)} THEN 1 ELSE 0 END) AS BIGINT)
               AS receptions_24h
    FROM rx
    GROUP BY gateway_id
)
SELECT agg.gateway_id, agg.gateway_eui, receptions, devices,
       rssi_min, rssi_avg, rssi_max, snr_min, snr_avg, snr_max,
       first_seen_at, last_seen_at, receptions_24h,
       located.latitude, located.longitude, located.altitude
FROM agg
LEFT JOIN located ON located.gateway_id = agg.gateway_id AND located.rn = 1"""


def _downlink_status(d: Dialect) -> str:
    # queued = TTS accepted the push: the earlier of the push's HTTP answer (the outbox's
    # queued_at, written by the worker) and the first `forward` event. The outbox's own
    # time columns also stand in once retention pruned the events.
    return f"""
WITH ev AS (
    SELECT outbox_id,
           MIN(CASE WHEN kind = 'forward' THEN time END) AS forward_at,
           MIN(CASE WHEN kind = 'sent' THEN time END) AS sent_at,
           MIN(CASE WHEN kind = 'ack' THEN time END) AS acked_at,
           CAST(SUM(CASE WHEN kind = 'nack' THEN 1 ELSE 0 END) AS BIGINT) AS nacks,
           CAST(COUNT(*) AS BIGINT) AS events,
           MAX(time) AS last_event_at
    FROM downlink_events
    WHERE outbox_id IS NOT NULL
    GROUP BY outbox_id
),
outbox_rows AS (
    SELECT o.id AS outbox_id, o.application_id, o.device_id, o.status, o.operation,
           o.attempts, o.created_at,
           CASE WHEN ev.forward_at IS NULL THEN o.queued_at
                WHEN o.queued_at IS NULL OR ev.forward_at < o.queued_at THEN ev.forward_at
                ELSE o.queued_at END AS queued_at,
           COALESCE(ev.sent_at, o.sent_at) AS sent_at,
           COALESCE(ev.acked_at, o.acked_at) AS acked_at,
           o.finished_at, o.last_error,
           COALESCE(ev.nacks, 0) AS nacks, COALESCE(ev.events, 0) AS events, ev.last_event_at
    FROM downlink_outbox o
    LEFT JOIN ev ON ev.outbox_id = o.id
)
SELECT outbox_id, application_id, device_id, status, operation, attempts, created_at,
       queued_at, sent_at, acked_at, finished_at, last_error, nacks, events, last_event_at,
       {_seconds(d, "created_at", "queued_at")} AS queued_after_s,
       {_seconds(d, "queued_at", "sent_at")} AS sent_after_s,
       {_seconds(d, "sent_at", "acked_at")} AS acked_after_s
FROM outbox_rows"""


def _stream_health(d: Dialect) -> str:
    healed = "(backfill_passes > 0 AND backfill_error IS NULL)"  # = ingestd.backfill
    duration = f"COALESCE({_seconds(d, 'gap_start', 'gap_end')}, 0)"
    return f"""
WITH streams AS (
    SELECT stream FROM stream_cursors
    UNION SELECT stream FROM stream_gaps
    UNION SELECT stream FROM rejected_events
),
g AS (
    SELECT stream,
           CAST(SUM(CASE WHEN {healed} THEN 0 ELSE 1 END) AS BIGINT) AS gaps_open,
           CAST(SUM(CASE WHEN {healed} THEN 1 ELSE 0 END) AS BIGINT) AS gaps_healed,
           SUM({duration}) AS gap_seconds,
           SUM(CASE WHEN {healed} THEN 0 ELSE {duration} END) AS open_gap_seconds,
           CAST(SUM(recovered) AS BIGINT) AS recovered
    FROM stream_gaps
    GROUP BY stream
),
r AS (
    SELECT stream, CAST(COUNT(*) AS BIGINT) AS rejected_24h
    FROM rejected_events
    WHERE received_at >= {_now_minus_24h(d)}
    GROUP BY stream
)
SELECT streams.stream,
       c.last_event_time AS cursor_at,
       {_seconds(d, "c.last_event_time", _now(d))} AS lag_s,
       c.updated_at AS cursor_updated_at, c.last_error,
       COALESCE(g.gaps_open, 0) AS gaps_open, COALESCE(g.gaps_healed, 0) AS gaps_healed,
       COALESCE(g.gap_seconds, 0) AS gap_seconds,
       COALESCE(g.open_gap_seconds, 0) AS open_gap_seconds,
       COALESCE(g.recovered, 0) AS recovered,
       COALESCE(r.rejected_24h, 0) AS rejected_24h
FROM streams
LEFT JOIN stream_cursors c ON c.stream = streams.stream
LEFT JOIN g ON g.stream = streams.stream
LEFT JOIN r ON r.stream = streams.stream"""


def _uplink_fields(d: Dialect) -> str:
    # One branch per nesting level (not a recursive CTE): a filter on the uplinks columns
    # (device, received_at) is pushed into every branch and uses the uplinks indexes,
    # where a recursive CTE would expand the whole table first. Arrays are not descended.
    if d == "sqlite":
        each = "json_each"

        def obj(x: str) -> str:
            return f"CASE WHEN {x}.type = 'object' THEN {x}.value END"

        top = "CASE WHEN json_type(u.decoded_payload) = 'object' THEN u.decoded_payload END"
        num = (
            "CASE {j}.type WHEN 'integer' THEN CAST({j}.value AS DOUBLE PRECISION)\n"
            "                  WHEN 'real' THEN CAST({j}.value AS DOUBLE PRECISION)\n"
            "                  WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END"
        )
        text = "CASE WHEN {j}.type = 'text' THEN {j}.value END"
        leaf = "{j}.type IN ('integer', 'real', 'true', 'false', 'text')"
        join = " CROSS JOIN "
    else:
        each = "jsonb_each"

        def obj(x: str) -> str:
            return f"CASE WHEN jsonb_typeof({x}.value) = 'object' THEN {x}.value END"

        top = "CASE WHEN jsonb_typeof(u.decoded_payload) = 'object' THEN u.decoded_payload END"
        num = (
            "CASE jsonb_typeof({j}.value)\n"
            "           WHEN 'number' THEN CAST({j}.value #>> '{{}}' AS DOUBLE PRECISION)\n"
            "           WHEN 'boolean' THEN CASE WHEN {j}.value = 'true'::jsonb\n"
            "               THEN CAST(1 AS DOUBLE PRECISION) ELSE CAST(0 AS DOUBLE PRECISION) END\n"
            "       END"
        )
        text = "CASE WHEN jsonb_typeof({j}.value) = 'string' THEN {j}.value #>> '{{}}' END"
        leaf = "jsonb_typeof({j}.value) IN ('number', 'boolean', 'string')"
        join = " CROSS JOIN LATERAL "
    branches = []
    for depth in range(1, UPLINK_FIELDS_DEPTH + 1):
        sources = [f"{each}({top}) j1"]
        sources += [f"{each}({obj(f'j{i - 1}')}) j{i}" for i in range(2, depth + 1)]
        j = f"j{depth}"
        key = " || '.' || ".join(f"j{i}.key" for i in range(1, depth + 1))
        branches.append(
            f"SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,\n"
            f"       {key} AS key,\n"
            f"       {num.format(j=j)} AS value_num,\n"
            f"       {text.format(j=j)} AS value_text\n"
            f"FROM uplinks u{join}{(chr(10) + '    ' + join.strip() + ' ').join(sources)}\n"
            f"WHERE NOT u.simulated AND {leaf.format(j=j)}"
        )
    return "\n" + "\nUNION ALL\n".join(branches)


_BUILDERS = {
    "device_last_seen": _device_last_seen,
    "uplink_loss": _uplink_loss,
    "uplink_loss_daily": _uplink_loss_daily,
    "gateway_stats": _gateway_stats,
    "downlink_status": _downlink_status,
    "stream_health": _stream_health,
    "uplink_fields": _uplink_fields,
}


def view_sql(dialect: str) -> dict[str, str]:
    """``{view name: SELECT …}`` for ``dialect`` (``sqlite`` or ``postgresql``)."""
    if dialect not in ("sqlite", "postgresql"):
        raise ValueError(f"no analytics views for dialect {dialect!r}")
    d: Dialect = "sqlite" if dialect == "sqlite" else "postgresql"
    return {name: _BUILDERS[name](d).strip() for name in VIEW_NAMES}


if __name__ == "__main__":  # print the SQL, e.g. to freeze it into a new migration
    for name, sql in view_sql(sys.argv[1] if len(sys.argv) > 1 else "sqlite").items():
        print(f"-- {name}\nCREATE VIEW {name} AS\n{sql};\n")
