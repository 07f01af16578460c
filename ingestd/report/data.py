"""What ``ingestd report`` shows: the queries behind each chart, over a time window.

Each function returns plain rows (``Table``: column names and tuples), so the rendering
(``ingestd.report``) never sees SQL and a test can compare numbers directly. Figures come
from the analytics views where a view has them (``uplink_loss_daily``, ``downlink_status``,
``stream_health``) and from the tables, restricted to the window, where the view's figure
is over all time (hourly traffic, gateway coverage). Simulated uplinks are left out, like
in the views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ingestd.db import is_postgres
from ingestd.store import map_db_errors


@dataclass(frozen=True, slots=True)
class Table:
    """A query result as the report needs it: ``columns`` and ``rows`` (tuples)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportData:
    """Everything one report shows."""

    generated_at: datetime
    since: datetime
    application_id: str | None
    hourly: Table  # application_id, hour, uplinks, rssi_avg/min/max, snr_avg/min/max
    loss: Table  # application_id, device_id, received, expected, lost, loss_ratio
    gateways: Table  # gateway_id, receptions, devices, rssi_avg, snr_avg, lat/lon, last seen
    downlinks: Table  # status, rows, median seconds to queued/sent/acked
    gaps: Table  # stream, gap_start, gap_end, reason, seconds, state
    streams: Table  # the stream_health view
    totals: dict[str, int] = field(default_factory=dict)


def _hour(conn: Connection, column: str) -> str:
    if is_postgres(conn):
        return f"date_trunc('hour', {column} AT TIME ZONE 'UTC')"
    return f"strftime('%Y-%m-%d %H:00:00', {column})"


def _since_param(conn: Connection, since: datetime) -> Any:
    """A bound time for comparing with stored times (SQLite: its text format)."""
    if is_postgres(conn):
        return since
    return since.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _table(conn: Connection, sql: str, **params: Any) -> Table:
    result = conn.execute(sa.text(sql), params)
    return Table(tuple(result.keys()), [tuple(r) for r in result])


def _app_filter(application_id: str | None, column: str = "application_id") -> str:
    return "" if application_id is None else f" AND {column} = :app"


def load_report_data(
    engine: Engine, *, since: timedelta, application_id: str | None, now: datetime | None = None
) -> ReportData:
    """Run every report query in one read transaction (a consistent snapshot)."""
    generated_at = now or datetime.now(UTC)
    start = generated_at - since
    with map_db_errors(), engine.connect() as conn:
        p = {"since": _since_param(conn, start), "app": application_id}
        since_day: Any = start.date() if is_postgres(conn) else start.date().isoformat()
        app = _app_filter(application_id)
        hour = _hour(conn, "received_at")
        hourly = _table(
            conn,
            f"SELECT application_id, {hour} AS hour, COUNT(*) AS uplinks,"
            " AVG(rssi) AS rssi_avg, MIN(rssi) AS rssi_min, MAX(rssi) AS rssi_max,"
            " AVG(snr) AS snr_avg, MIN(snr) AS snr_min, MAX(snr) AS snr_max"
            " FROM uplinks WHERE NOT simulated AND received_at >= :since"
            + app
            + f" GROUP BY application_id, {hour} ORDER BY application_id, hour",
            **p,
        )
        loss = _table(
            conn,
            "SELECT application_id, device_id, CAST(SUM(received) AS BIGINT) AS received,"
            " CAST(SUM(expected) AS BIGINT) AS expected, CAST(SUM(lost) AS BIGINT) AS lost,"
            " CAST(SUM(lost) AS DOUBLE PRECISION) / SUM(expected) AS loss_ratio"
            " FROM uplink_loss_daily WHERE day >= :day"
            + app
            + " GROUP BY application_id, device_id"
            " ORDER BY loss_ratio DESC, application_id, device_id",
            day=since_day,
            app=application_id,
        )
        gateways = _table(
            conn,
            "SELECT r.gateway_id, COUNT(*) AS receptions,"
            " COUNT(DISTINCT u.application_id || '/' || u.device_id) AS devices,"
            " AVG(r.rssi) AS rssi_avg, AVG(r.snr) AS snr_avg,"
            " MAX(u.received_at) AS last_seen_at,"
            " MAX(g.latitude) AS latitude, MAX(g.longitude) AS longitude"
            " FROM uplink_receptions r"
            " JOIN uplinks u ON u.uplink_id = r.uplink_id AND u.received_at = r.received_at"
            " LEFT JOIN gateway_stats g ON g.gateway_id = r.gateway_id"
            " WHERE NOT u.simulated AND u.received_at >= :since"
            + _app_filter(application_id, "u.application_id")
            + " GROUP BY r.gateway_id ORDER BY receptions DESC, r.gateway_id",
            **p,
        )
        downlinks = _table(
            conn,
            "SELECT status, COUNT(*) AS downlinks, CAST(SUM(nacks) AS BIGINT) AS nacks,"
            " AVG(queued_after_s) AS queued_after_s_avg,"
            " AVG(sent_after_s) AS sent_after_s_avg, AVG(acked_after_s) AS acked_after_s_avg"
            " FROM downlink_status WHERE created_at >= :since"
            + app
            + " GROUP BY status ORDER BY downlinks DESC, status",
            **p,
        )
        gaps = _table(
            conn,
            "SELECT stream, gap_start, gap_end, reason,"
            " CASE WHEN backfill_passes > 0 AND backfill_error IS NULL"
            " THEN 'healed' ELSE 'open' END AS state, recovered, backfill_error"
            " FROM stream_gaps WHERE COALESCE(gap_end, detected_at) >= :since"
            " ORDER BY gap_start, stream",
            **p,
        )
        streams = _table(
            conn,
            "SELECT stream, cursor_at, lag_s, gaps_open, gaps_healed, gap_seconds,"
            " rejected_24h FROM stream_health ORDER BY stream",
        )
    hourly_uplinks = hourly.column("uplinks")
    totals = {
        "uplinks": int(sum(hourly_uplinks)),
        "applications": len(set(hourly.column("application_id"))),
        "devices": len(loss.rows),
        "gateways": len(gateways.rows),
        "downlinks": int(sum(downlinks.column("downlinks"))),
        "gaps_open": sum(1 for s in gaps.column("state") if s == "open"),
    }
    return ReportData(
        generated_at=generated_at,
        since=start,
        application_id=application_id,
        hourly=hourly,
        loss=loss,
        gateways=gateways,
        downlinks=downlinks,
        gaps=gaps,
        streams=streams,
        totals=totals,
    )
