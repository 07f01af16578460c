"""Analytics views (DESIGN §8) and uplinks.simulated

Adds ``uplinks.simulated`` (TTS's ``ApplicationUp.simulated``: Console/API "simulate
uplink"; existing rows are real uplinks, so false) and creates the views
``device_last_seen``, ``uplink_loss``, ``uplink_loss_daily``, ``gateway_stats``, ``downlink_status``, ``stream_health``, ``uplink_fields``.

The view SQL below is a frozen copy of ``ingestd.views`` as of this revision: a migration
must create what it created the day it was written, whatever the package says later. A
test proves that the views of a database at head equal ``ingestd.views``; a change there
needs a new migration that recreates the changed views.

A later migration that rebuilds a table these views read (SQLite batch "move and copy")
must drop the views first and create them again afterwards: SQLite refuses the final
``ALTER TABLE … RENAME`` while a view names a table that is momentarily missing.

Revision ID: 0009_analytics_views
Revises: 0008_message_identity
Create Date: 2026-11-28 12:00:00
"""

# ruff: noqa: E501  (the frozen view SQL keeps its own line breaks)
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_analytics_views"
down_revision: str | None = "0008_message_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# fmt: off
SQLITE_VIEWS = {
    "device_last_seen": """
WITH ranked AS (
    SELECT uplinks.*,
           ROW_NUMBER() OVER (PARTITION BY application_id, device_id
                              ORDER BY received_at DESC, f_cnt DESC) AS rn,
           SUM(CASE WHEN received_at >= datetime('now', '-1 day') THEN 1 ELSE 0 END)
               OVER (PARTITION BY application_id, device_id) AS uplinks_24h,
           COUNT(*) OVER (PARTITION BY application_id, device_id) AS uplinks_total
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
WHERE rn = 1
""",
    "uplink_loss": """
WITH frame_steps AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           LAG(f_cnt) OVER (PARTITION BY application_id, device_id, session_key_id
                            ORDER BY received_at, f_cnt) AS prev_f_cnt
    FROM uplinks
    WHERE NOT simulated
),
frame_flags AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           CASE WHEN prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768 THEN 1 ELSE 0 END AS wrap,
           CASE WHEN f_cnt < prev_f_cnt AND NOT (prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768) THEN 1 ELSE 0 END AS reset
    FROM frame_steps
),
frames AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt, wrap,
           SUM(reset) OVER w AS segment,
           f_cnt + 65536 * SUM(wrap) OVER w AS seq
    FROM frame_flags
    WINDOW w AS (PARTITION BY application_id, device_id, session_key_id ORDER BY received_at, f_cnt ROWS UNBOUNDED PRECEDING)
),
segments AS (
    SELECT application_id, device_id, session_key_id, segment,
           MIN(seq) AS lo, MAX(seq) AS hi, COUNT(DISTINCT seq) AS n, SUM(wrap) AS wraps,
           MIN(received_at) AS first_at, MAX(received_at) AS last_at,
           MAX(segment) OVER (PARTITION BY application_id, device_id, session_key_id) AS last_segment
    FROM frames
    GROUP BY application_id, device_id, session_key_id, segment
),
sessions AS (
    SELECT application_id, device_id, session_key_id,
           MIN(CASE WHEN segment = 0 THEN lo END) AS first_f_cnt,
           MAX(CASE WHEN segment = last_segment THEN hi END) AS last_f_cnt,
           CAST(SUM(n) AS BIGINT) AS received,
           CAST(SUM(hi - lo + 1) AS BIGINT) AS expected,
           CAST(SUM(wraps) AS BIGINT) AS rollovers,
           CAST(COUNT(*) - 1 AS BIGINT) AS resets,
           MIN(first_at) AS first_uplink_at, MAX(last_at) AS last_uplink_at
    FROM segments
    GROUP BY application_id, device_id, session_key_id
)
SELECT application_id, device_id, session_key_id, first_f_cnt, last_f_cnt, received, expected,
       expected - received AS lost,
       CAST(expected - received AS DOUBLE PRECISION) / expected AS loss_ratio,
       rollovers, resets, first_uplink_at, last_uplink_at
FROM sessions
""",
    "uplink_loss_daily": """
WITH frame_steps AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           LAG(f_cnt) OVER (PARTITION BY application_id, device_id, session_key_id
                            ORDER BY received_at, f_cnt) AS prev_f_cnt
    FROM uplinks
    WHERE NOT simulated
),
frame_flags AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           CASE WHEN prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768 THEN 1 ELSE 0 END AS wrap,
           CASE WHEN f_cnt < prev_f_cnt AND NOT (prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768) THEN 1 ELSE 0 END AS reset
    FROM frame_steps
),
frames AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt, wrap,
           SUM(reset) OVER w AS segment,
           f_cnt + 65536 * SUM(wrap) OVER w AS seq
    FROM frame_flags
    WINDOW w AS (PARTITION BY application_id, device_id, session_key_id ORDER BY received_at, f_cnt ROWS UNBOUNDED PRECEDING)
),
distinct_frames AS (
    SELECT application_id, device_id, session_key_id, segment, seq, MIN(received_at) AS received_at
    FROM frames
    GROUP BY application_id, device_id, session_key_id, segment, seq
),
holes AS (
    SELECT application_id, device_id, session_key_id, received_at,
           COALESCE(seq - LAG(seq) OVER (PARTITION BY application_id, device_id, session_key_id, segment
                                         ORDER BY seq) - 1, 0) AS lost_before
    FROM distinct_frames
)
SELECT application_id, device_id, date(received_at) AS day,
       CAST(COUNT(*) AS BIGINT) AS received,
       CAST(COUNT(*) + SUM(lost_before) AS BIGINT) AS expected,
       CAST(SUM(lost_before) AS BIGINT) AS lost,
       CAST(SUM(lost_before) AS DOUBLE PRECISION) / (COUNT(*) + SUM(lost_before)) AS loss_ratio,
       CAST(COUNT(DISTINCT session_key_id) AS BIGINT) AS sessions
FROM holes
GROUP BY application_id, device_id, date(received_at)
""",
    "gateway_stats": """
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
           CAST(SUM(CASE WHEN received_at >= datetime('now', '-1 day') THEN 1 ELSE 0 END) AS BIGINT)
               AS receptions_24h
    FROM rx
    GROUP BY gateway_id
)
SELECT agg.gateway_id, agg.gateway_eui, receptions, devices,
       rssi_min, rssi_avg, rssi_max, snr_min, snr_avg, snr_max,
       first_seen_at, last_seen_at, receptions_24h,
       located.latitude, located.longitude, located.altitude
FROM agg
LEFT JOIN located ON located.gateway_id = agg.gateway_id AND located.rn = 1
""",
    "downlink_status": """
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
       round((julianday(queued_at) - julianday(created_at)) * 86400.0, 3) AS queued_after_s,
       round((julianday(sent_at) - julianday(queued_at)) * 86400.0, 3) AS sent_after_s,
       round((julianday(acked_at) - julianday(sent_at)) * 86400.0, 3) AS acked_after_s
FROM outbox_rows
""",
    "stream_health": """
WITH streams AS (
    SELECT stream FROM stream_cursors
    UNION SELECT stream FROM stream_gaps
    UNION SELECT stream FROM rejected_events
),
g AS (
    SELECT stream,
           CAST(SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 0 ELSE 1 END) AS BIGINT) AS gaps_open,
           CAST(SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 1 ELSE 0 END) AS BIGINT) AS gaps_healed,
           SUM(COALESCE(round((julianday(gap_end) - julianday(gap_start)) * 86400.0, 3), 0)) AS gap_seconds,
           SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 0 ELSE COALESCE(round((julianday(gap_end) - julianday(gap_start)) * 86400.0, 3), 0) END) AS open_gap_seconds,
           CAST(SUM(recovered) AS BIGINT) AS recovered
    FROM stream_gaps
    GROUP BY stream
),
r AS (
    SELECT stream, CAST(COUNT(*) AS BIGINT) AS rejected_24h
    FROM rejected_events
    WHERE received_at >= datetime('now', '-1 day')
    GROUP BY stream
)
SELECT streams.stream,
       c.last_event_time AS cursor_at,
       round((julianday('now') - julianday(c.last_event_time)) * 86400.0, 3) AS lag_s,
       c.updated_at AS cursor_updated_at, c.last_error,
       COALESCE(g.gaps_open, 0) AS gaps_open, COALESCE(g.gaps_healed, 0) AS gaps_healed,
       COALESCE(g.gap_seconds, 0) AS gap_seconds,
       COALESCE(g.open_gap_seconds, 0) AS open_gap_seconds,
       COALESCE(g.recovered, 0) AS recovered,
       COALESCE(r.rejected_24h, 0) AS rejected_24h
FROM streams
LEFT JOIN stream_cursors c ON c.stream = streams.stream
LEFT JOIN g ON g.stream = streams.stream
LEFT JOIN r ON r.stream = streams.stream
""",
    "uplink_fields": """
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key AS key,
       CASE j1.type WHEN 'integer' THEN CAST(j1.value AS DOUBLE PRECISION)
                  WHEN 'real' THEN CAST(j1.value AS DOUBLE PRECISION)
                  WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END AS value_num,
       CASE WHEN j1.type = 'text' THEN j1.value END AS value_text
FROM uplinks u CROSS JOIN json_each(CASE WHEN json_type(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
WHERE NOT u.simulated AND j1.type IN ('integer', 'real', 'true', 'false', 'text')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key AS key,
       CASE j2.type WHEN 'integer' THEN CAST(j2.value AS DOUBLE PRECISION)
                  WHEN 'real' THEN CAST(j2.value AS DOUBLE PRECISION)
                  WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END AS value_num,
       CASE WHEN j2.type = 'text' THEN j2.value END AS value_text
FROM uplinks u CROSS JOIN json_each(CASE WHEN json_type(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN json_each(CASE WHEN j1.type = 'object' THEN j1.value END) j2
WHERE NOT u.simulated AND j2.type IN ('integer', 'real', 'true', 'false', 'text')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key || '.' || j3.key AS key,
       CASE j3.type WHEN 'integer' THEN CAST(j3.value AS DOUBLE PRECISION)
                  WHEN 'real' THEN CAST(j3.value AS DOUBLE PRECISION)
                  WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END AS value_num,
       CASE WHEN j3.type = 'text' THEN j3.value END AS value_text
FROM uplinks u CROSS JOIN json_each(CASE WHEN json_type(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN json_each(CASE WHEN j1.type = 'object' THEN j1.value END) j2
    CROSS JOIN json_each(CASE WHEN j2.type = 'object' THEN j2.value END) j3
WHERE NOT u.simulated AND j3.type IN ('integer', 'real', 'true', 'false', 'text')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key || '.' || j3.key || '.' || j4.key AS key,
       CASE j4.type WHEN 'integer' THEN CAST(j4.value AS DOUBLE PRECISION)
                  WHEN 'real' THEN CAST(j4.value AS DOUBLE PRECISION)
                  WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END AS value_num,
       CASE WHEN j4.type = 'text' THEN j4.value END AS value_text
FROM uplinks u CROSS JOIN json_each(CASE WHEN json_type(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN json_each(CASE WHEN j1.type = 'object' THEN j1.value END) j2
    CROSS JOIN json_each(CASE WHEN j2.type = 'object' THEN j2.value END) j3
    CROSS JOIN json_each(CASE WHEN j3.type = 'object' THEN j3.value END) j4
WHERE NOT u.simulated AND j4.type IN ('integer', 'real', 'true', 'false', 'text')
""",
}

POSTGRESQL_VIEWS = {
    "device_last_seen": """
WITH ranked AS (
    SELECT uplinks.*,
           ROW_NUMBER() OVER (PARTITION BY application_id, device_id
                              ORDER BY received_at DESC, f_cnt DESC) AS rn,
           SUM(CASE WHEN received_at >= CURRENT_TIMESTAMP - INTERVAL '24 hours' THEN 1 ELSE 0 END)
               OVER (PARTITION BY application_id, device_id) AS uplinks_24h,
           COUNT(*) OVER (PARTITION BY application_id, device_id) AS uplinks_total
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
WHERE rn = 1
""",
    "uplink_loss": """
WITH frame_steps AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           LAG(f_cnt) OVER (PARTITION BY application_id, device_id, session_key_id
                            ORDER BY received_at, f_cnt) AS prev_f_cnt
    FROM uplinks
    WHERE NOT simulated
),
frame_flags AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           CASE WHEN prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768 THEN 1 ELSE 0 END AS wrap,
           CASE WHEN f_cnt < prev_f_cnt AND NOT (prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768) THEN 1 ELSE 0 END AS reset
    FROM frame_steps
),
frames AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt, wrap,
           SUM(reset) OVER w AS segment,
           f_cnt + 65536 * SUM(wrap) OVER w AS seq
    FROM frame_flags
    WINDOW w AS (PARTITION BY application_id, device_id, session_key_id ORDER BY received_at, f_cnt ROWS UNBOUNDED PRECEDING)
),
segments AS (
    SELECT application_id, device_id, session_key_id, segment,
           MIN(seq) AS lo, MAX(seq) AS hi, COUNT(DISTINCT seq) AS n, SUM(wrap) AS wraps,
           MIN(received_at) AS first_at, MAX(received_at) AS last_at,
           MAX(segment) OVER (PARTITION BY application_id, device_id, session_key_id) AS last_segment
    FROM frames
    GROUP BY application_id, device_id, session_key_id, segment
),
sessions AS (
    SELECT application_id, device_id, session_key_id,
           MIN(CASE WHEN segment = 0 THEN lo END) AS first_f_cnt,
           MAX(CASE WHEN segment = last_segment THEN hi END) AS last_f_cnt,
           CAST(SUM(n) AS BIGINT) AS received,
           CAST(SUM(hi - lo + 1) AS BIGINT) AS expected,
           CAST(SUM(wraps) AS BIGINT) AS rollovers,
           CAST(COUNT(*) - 1 AS BIGINT) AS resets,
           MIN(first_at) AS first_uplink_at, MAX(last_at) AS last_uplink_at
    FROM segments
    GROUP BY application_id, device_id, session_key_id
)
SELECT application_id, device_id, session_key_id, first_f_cnt, last_f_cnt, received, expected,
       expected - received AS lost,
       CAST(expected - received AS DOUBLE PRECISION) / expected AS loss_ratio,
       rollovers, resets, first_uplink_at, last_uplink_at
FROM sessions
""",
    "uplink_loss_daily": """
WITH frame_steps AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           LAG(f_cnt) OVER (PARTITION BY application_id, device_id, session_key_id
                            ORDER BY received_at, f_cnt) AS prev_f_cnt
    FROM uplinks
    WHERE NOT simulated
),
frame_flags AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt,
           CASE WHEN prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768 THEN 1 ELSE 0 END AS wrap,
           CASE WHEN f_cnt < prev_f_cnt AND NOT (prev_f_cnt < 65536 AND prev_f_cnt - f_cnt > 32768) THEN 1 ELSE 0 END AS reset
    FROM frame_steps
),
frames AS (
    SELECT application_id, device_id, session_key_id, uplink_id, received_at, f_cnt, wrap,
           SUM(reset) OVER w AS segment,
           f_cnt + 65536 * SUM(wrap) OVER w AS seq
    FROM frame_flags
    WINDOW w AS (PARTITION BY application_id, device_id, session_key_id ORDER BY received_at, f_cnt ROWS UNBOUNDED PRECEDING)
),
distinct_frames AS (
    SELECT application_id, device_id, session_key_id, segment, seq, MIN(received_at) AS received_at
    FROM frames
    GROUP BY application_id, device_id, session_key_id, segment, seq
),
holes AS (
    SELECT application_id, device_id, session_key_id, received_at,
           COALESCE(seq - LAG(seq) OVER (PARTITION BY application_id, device_id, session_key_id, segment
                                         ORDER BY seq) - 1, 0) AS lost_before
    FROM distinct_frames
)
SELECT application_id, device_id, CAST(received_at AT TIME ZONE 'UTC' AS date) AS day,
       CAST(COUNT(*) AS BIGINT) AS received,
       CAST(COUNT(*) + SUM(lost_before) AS BIGINT) AS expected,
       CAST(SUM(lost_before) AS BIGINT) AS lost,
       CAST(SUM(lost_before) AS DOUBLE PRECISION) / (COUNT(*) + SUM(lost_before)) AS loss_ratio,
       CAST(COUNT(DISTINCT session_key_id) AS BIGINT) AS sessions
FROM holes
GROUP BY application_id, device_id, CAST(received_at AT TIME ZONE 'UTC' AS date)
""",
    "gateway_stats": """
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
           CAST(SUM(CASE WHEN received_at >= CURRENT_TIMESTAMP - INTERVAL '24 hours' THEN 1 ELSE 0 END) AS BIGINT)
               AS receptions_24h
    FROM rx
    GROUP BY gateway_id
)
SELECT agg.gateway_id, agg.gateway_eui, receptions, devices,
       rssi_min, rssi_avg, rssi_max, snr_min, snr_avg, snr_max,
       first_seen_at, last_seen_at, receptions_24h,
       located.latitude, located.longitude, located.altitude
FROM agg
LEFT JOIN located ON located.gateway_id = agg.gateway_id AND located.rn = 1
""",
    "downlink_status": """
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
       CAST(round(CAST(EXTRACT(EPOCH FROM (queued_at - created_at)) AS numeric), 3) AS DOUBLE PRECISION) AS queued_after_s,
       CAST(round(CAST(EXTRACT(EPOCH FROM (sent_at - queued_at)) AS numeric), 3) AS DOUBLE PRECISION) AS sent_after_s,
       CAST(round(CAST(EXTRACT(EPOCH FROM (acked_at - sent_at)) AS numeric), 3) AS DOUBLE PRECISION) AS acked_after_s
FROM outbox_rows
""",
    "stream_health": """
WITH streams AS (
    SELECT stream FROM stream_cursors
    UNION SELECT stream FROM stream_gaps
    UNION SELECT stream FROM rejected_events
),
g AS (
    SELECT stream,
           CAST(SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 0 ELSE 1 END) AS BIGINT) AS gaps_open,
           CAST(SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 1 ELSE 0 END) AS BIGINT) AS gaps_healed,
           SUM(COALESCE(CAST(round(CAST(EXTRACT(EPOCH FROM (gap_end - gap_start)) AS numeric), 3) AS DOUBLE PRECISION), 0)) AS gap_seconds,
           SUM(CASE WHEN (backfill_passes > 0 AND backfill_error IS NULL) THEN 0 ELSE COALESCE(CAST(round(CAST(EXTRACT(EPOCH FROM (gap_end - gap_start)) AS numeric), 3) AS DOUBLE PRECISION), 0) END) AS open_gap_seconds,
           CAST(SUM(recovered) AS BIGINT) AS recovered
    FROM stream_gaps
    GROUP BY stream
),
r AS (
    SELECT stream, CAST(COUNT(*) AS BIGINT) AS rejected_24h
    FROM rejected_events
    WHERE received_at >= CURRENT_TIMESTAMP - INTERVAL '24 hours'
    GROUP BY stream
)
SELECT streams.stream,
       c.last_event_time AS cursor_at,
       CAST(round(CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - c.last_event_time)) AS numeric), 3) AS DOUBLE PRECISION) AS lag_s,
       c.updated_at AS cursor_updated_at, c.last_error,
       COALESCE(g.gaps_open, 0) AS gaps_open, COALESCE(g.gaps_healed, 0) AS gaps_healed,
       COALESCE(g.gap_seconds, 0) AS gap_seconds,
       COALESCE(g.open_gap_seconds, 0) AS open_gap_seconds,
       COALESCE(g.recovered, 0) AS recovered,
       COALESCE(r.rejected_24h, 0) AS rejected_24h
FROM streams
LEFT JOIN stream_cursors c ON c.stream = streams.stream
LEFT JOIN g ON g.stream = streams.stream
LEFT JOIN r ON r.stream = streams.stream
""",
    "uplink_fields": """
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key AS key,
       CASE jsonb_typeof(j1.value)
           WHEN 'number' THEN CAST(j1.value #>> '{}' AS DOUBLE PRECISION)
           WHEN 'boolean' THEN CASE WHEN j1.value = 'true'::jsonb
               THEN CAST(1 AS DOUBLE PRECISION) ELSE CAST(0 AS DOUBLE PRECISION) END
       END AS value_num,
       CASE WHEN jsonb_typeof(j1.value) = 'string' THEN j1.value #>> '{}' END AS value_text
FROM uplinks u CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
WHERE NOT u.simulated AND jsonb_typeof(j1.value) IN ('number', 'boolean', 'string')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key AS key,
       CASE jsonb_typeof(j2.value)
           WHEN 'number' THEN CAST(j2.value #>> '{}' AS DOUBLE PRECISION)
           WHEN 'boolean' THEN CASE WHEN j2.value = 'true'::jsonb
               THEN CAST(1 AS DOUBLE PRECISION) ELSE CAST(0 AS DOUBLE PRECISION) END
       END AS value_num,
       CASE WHEN jsonb_typeof(j2.value) = 'string' THEN j2.value #>> '{}' END AS value_text
FROM uplinks u CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j1.value) = 'object' THEN j1.value END) j2
WHERE NOT u.simulated AND jsonb_typeof(j2.value) IN ('number', 'boolean', 'string')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key || '.' || j3.key AS key,
       CASE jsonb_typeof(j3.value)
           WHEN 'number' THEN CAST(j3.value #>> '{}' AS DOUBLE PRECISION)
           WHEN 'boolean' THEN CASE WHEN j3.value = 'true'::jsonb
               THEN CAST(1 AS DOUBLE PRECISION) ELSE CAST(0 AS DOUBLE PRECISION) END
       END AS value_num,
       CASE WHEN jsonb_typeof(j3.value) = 'string' THEN j3.value #>> '{}' END AS value_text
FROM uplinks u CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j1.value) = 'object' THEN j1.value END) j2
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j2.value) = 'object' THEN j2.value END) j3
WHERE NOT u.simulated AND jsonb_typeof(j3.value) IN ('number', 'boolean', 'string')
UNION ALL
SELECT u.uplink_id, u.application_id, u.device_id, u.received_at, u.f_port,
       j1.key || '.' || j2.key || '.' || j3.key || '.' || j4.key AS key,
       CASE jsonb_typeof(j4.value)
           WHEN 'number' THEN CAST(j4.value #>> '{}' AS DOUBLE PRECISION)
           WHEN 'boolean' THEN CASE WHEN j4.value = 'true'::jsonb
               THEN CAST(1 AS DOUBLE PRECISION) ELSE CAST(0 AS DOUBLE PRECISION) END
       END AS value_num,
       CASE WHEN jsonb_typeof(j4.value) = 'string' THEN j4.value #>> '{}' END AS value_text
FROM uplinks u CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(u.decoded_payload) = 'object' THEN u.decoded_payload END) j1
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j1.value) = 'object' THEN j1.value END) j2
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j2.value) = 'object' THEN j2.value END) j3
    CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(j3.value) = 'object' THEN j3.value END) j4
WHERE NOT u.simulated AND jsonb_typeof(j4.value) IN ('number', 'boolean', 'string')
""",
}
# fmt: on


def _views() -> dict[str, str]:
    return POSTGRESQL_VIEWS if op.get_bind().dialect.name == "postgresql" else SQLITE_VIEWS


def upgrade() -> None:
    # A plain ALTER TABLE on both dialects, never a SQLite batch rebuild: dropping the old
    # uplinks table would cascade to uplink_receptions (foreign keys are on).
    op.add_column(
        "uplinks", sa.Column("simulated", sa.Boolean, nullable=False, server_default=sa.false())
    )
    for name, sql in _views().items():
        op.execute(f"CREATE VIEW {name} AS\n{sql.strip()}")


def downgrade() -> None:
    for name in reversed(list(_views())):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_column("uplinks", "simulated")  # SQLite >= 3.35: ALTER TABLE … DROP COLUMN
