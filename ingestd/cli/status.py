"""``ingestd status [--json]``: each stream and the outbox at a glance, read from the database.

The SQL here is read-only reporting (counts and latest rows for an operator, never a
write, never on the ingest path), so it lives beside its only user rather than in
``store.py``; outbox figures come from :mod:`ingestd.outbox.sql`. Choices a reader of the
numbers should know:

- ``events_last_hour`` counts a stream's events whose *event* ``time`` is within the last
  hour, a range scan on the ``(stream, time)`` index. A backfill of old events (an import)
  therefore does not count, however recently it was stored. ``uplinks_last_hour`` is the
  same window joined to ``uplinks``.
- ``events_total`` is an exact ``count(*)`` over the stream's index range: fine for an
  operator's command, slow (seconds) on a stream of hundreds of millions of rows.
- ``lag_s`` is now minus the cursor (the newest stored event time). On a quiet application
  it grows although nothing is missing.
- Gaps are never closed, only recorded, so ``gaps_last_24h`` counts those *detected* in the
  last 24 hours, ``gaps_total`` all of them, and ``latest_gap`` is the newest detected.
- ``connected_since`` and ``last_error`` are what the daemon last recorded; after a
  ``kill -9`` they can be stale.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ingestd import migrate, schema, spool
from ingestd.config import Settings
from ingestd.db import create_engine
from ingestd.outbox import sql as outbox
from ingestd.secrets import redact, register_secrets

LAST_HOUR = timedelta(hours=1)
RECENT_GAPS = timedelta(hours=24)
DB_CONNECT_TIMEOUT_S = 10

# -- helpers shared with ``ingestd check`` ----------------------------------------------------


def open_engine(url: str) -> Engine:
    """An engine for a one-shot command: PostgreSQL gives up connecting after a while."""
    if sa.make_url(url).get_backend_name() == "postgresql":
        return create_engine(url, connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S})
    return create_engine(url)


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file ``url`` names if it does not exist (connecting would create it)."""
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return None
    database = sa_url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database)
    return None if path.exists() else path


def db_error_text(exc: BaseException) -> str:
    """The driver's own first line, without SQLAlchemy's SQL echo and background link."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {first[0]}" if first else type(orig).__name__


# -- collecting -------------------------------------------------------------------------------


def collect_status(engine: Engine, settings: Settings, *, now: datetime) -> dict[str, Any]:
    """The whole report as one JSON-ready document (stable keys; times as ISO-8601)."""
    revision, _ = migrate.schema_problem(engine)
    with engine.connect() as conn:
        cursors = {r.stream: r for r in conn.execute(sa.select(schema.stream_cursors))}
        configured = {s.name: s for s in settings.streams}
        names = list(configured) + sorted(set(cursors) - set(configured))
        streams = [
            _stream_status(conn, name, cursors.get(name), configured.get(name), now=now)
            for name in names
        ]
    root = settings.spool.root(settings.database.url)
    for s in streams:  # frames received while the database stalled, not yet stored
        stats = spool.inspect(spool.stream_dir(root, s["name"]))
        s["spool"] = _spool_status(stats, now)
    counts = outbox.outbox_counts(engine)
    waiting = sum(counts[s] for s in schema.OUTBOX_ACTIVE_STATUSES)
    oldest = outbox.oldest_pending_age_s(engine, now) if waiting else None
    return {
        "generated_at": _iso(now),
        "database": {
            "url": settings.database.safe_url,
            "dialect": engine.dialect.name,
            "schema_revision": revision,
        },
        "streams": streams,
        "outbox": {
            "by_status": counts,
            "total": sum(counts.values()),
            "oldest_pending_age_s": None if oldest is None else round(oldest, 3),
        },
    }


def _stream_status(
    conn: Connection, name: str, cursor: Any, configured: Any, *, now: datetime
) -> dict[str, Any]:
    ev, up, gaps, rej = schema.events, schema.uplinks, schema.stream_gaps, schema.rejected_events
    hour_ago = now - LAST_HOUR
    day_ago = now - RECENT_GAPS
    count = sa.func.count()
    recent = sa.select(count).where(ev.c.stream == name, ev.c.time > hour_ago)
    uplinks = (
        sa.select(count)
        .select_from(up.join(ev, ev.c.unique_id == up.c.event_unique_id))
        .where(ev.c.stream == name, ev.c.time > hour_ago)
    )
    gap_cols = (gaps.c.gap_start, gaps.c.gap_end, gaps.c.reason, gaps.c.detail, gaps.c.detected_at)
    latest_gap = conn.execute(
        sa.select(*gap_cols)
        .where(gaps.c.stream == name)
        .order_by(gaps.c.detected_at.desc(), gaps.c.id.desc())
        .limit(1)
    ).first()
    cursor_time = cursor.last_event_time if cursor is not None else None
    return {
        "name": name,
        "configured": configured is not None,
        "application_id": configured.application_id if configured is not None else None,
        "device_ids": list(configured.device_ids) if configured is not None else None,
        "cursor_time": _iso(cursor_time),
        "lag_s": None if cursor_time is None else round((now - cursor_time).total_seconds(), 3),
        "cursor_updated_at": _iso(cursor.updated_at if cursor is not None else None),
        "connected_since": _iso(cursor.connected_since if cursor is not None else None),
        "last_error": cursor.last_error if cursor is not None else None,
        "last_error_at": _iso(cursor.last_error_at if cursor is not None else None),
        "events_last_hour": conn.execute(recent).scalar_one(),
        "uplinks_last_hour": conn.execute(uplinks).scalar_one(),
        "events_total": conn.execute(sa.select(count).where(ev.c.stream == name)).scalar_one(),
        "gaps_last_24h": conn.execute(
            sa.select(count).where(gaps.c.stream == name, gaps.c.detected_at > day_ago)
        ).scalar_one(),
        "gaps_total": conn.execute(sa.select(count).where(gaps.c.stream == name)).scalar_one(),
        # Healed: backfilled from the Storage Integration with no error since (ingestd.backfill).
        "gaps_healed": conn.execute(
            sa.select(count).where(
                gaps.c.stream == name, gaps.c.backfill_passes > 0, gaps.c.backfill_error.is_(None)
            )
        ).scalar_one(),
        "gaps_recovered_rows": conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(gaps.c.recovered), 0)).where(
                gaps.c.stream == name
            )
        ).scalar_one(),
        "latest_gap": None
        if latest_gap is None
        else {
            "gap_start": _iso(latest_gap.gap_start),
            "gap_end": _iso(latest_gap.gap_end),
            "reason": latest_gap.reason,
            "detail": latest_gap.detail,
            "detected_at": _iso(latest_gap.detected_at),
        },
        "rejected_last_24h": conn.execute(
            sa.select(count).where(rej.c.stream == name, rej.c.received_at > day_ago)
        ).scalar_one(),
    }


def _spool_status(stats: spool.SpoolStats | None, now: datetime) -> dict[str, Any]:
    oldest = stats.oldest_appended_at if stats is not None else None
    return {
        "frames": stats.frames if stats is not None else 0,
        "bytes": stats.bytes if stats is not None else 0,
        "oldest_age_s": None if oldest is None else round(max(now.timestamp() - oldest, 0), 3),
    }


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


# -- printing ---------------------------------------------------------------------------------


def print_status(settings: Settings, *, as_json: bool) -> int:
    """Print the report (a table, or one JSON document); 1 when the database cannot answer."""
    register_secrets(settings.secret_values())  # output goes through redact
    url = settings.database.safe_url
    missing = missing_sqlite_file(settings.database.url)
    if missing is not None:
        _fail(f"{url}: the file {missing} does not exist: run `ingestd migrate`")
        return 1
    engine = open_engine(settings.database.url)
    try:
        _, problem = migrate.schema_problem(engine)
        if problem is not None:
            _fail(f"{url}: schema {problem}")
            return 1
        report = collect_status(engine, settings, now=datetime.now(UTC))
    except sa.exc.SQLAlchemyError as exc:
        _fail(f"{url}: {db_error_text(exc)}")
        return 1
    finally:
        engine.dispose()
    text = json.dumps(report, indent=2) if as_json else "\n".join(render(report))
    print(redact(text))
    return 0


def _fail(message: str) -> None:
    print(f"ingestd: status: {redact(message)}", file=sys.stderr)


def render(report: dict[str, Any]) -> list[str]:
    """The human view of a :func:`collect_status` document: a compact aligned table."""
    now = datetime.fromisoformat(report["generated_at"])
    db = report["database"]
    lines = [f"database  {db['url']} (schema {db['schema_revision']}), as of {_clock(now)}", ""]
    headers = [
        "STREAM",
        "APPLICATION",
        "CURSOR",
        "LAG",
        "STATE",
        "EVENTS/1H",
        "UPLINKS/1H",
        "EVENTS",
        "GAPS/24H",
    ]
    rows = []
    details = []
    for s in report["streams"]:
        state = "-"
        if s["connected_since"]:
            state = f"connected {_ago(now, s['connected_since'])}"
        elif s["last_error_at"] and (
            not s["cursor_updated_at"] or s["last_error_at"] >= s["cursor_updated_at"]
        ):
            state = f"error {_ago(now, s['last_error_at'])} ago"
        elif s["cursor_updated_at"]:
            # Progress after the last error, and not connected now: the daemon stopped.
            state = f"stopped {_ago(now, s['cursor_updated_at'])} ago"
        rows.append(
            [
                s["name"],
                s["application_id"] or "(not configured)",
                _clock(s["cursor_time"]),
                _duration(s["lag_s"]),
                state,
                f"{s['events_last_hour']:,}",
                f"{s['uplinks_last_hour']:,}",
                f"{s['events_total']:,}",
                f"{s['gaps_last_24h']:,}",
            ]
        )
        if s["last_error"]:
            when = _clock(s["last_error_at"])
            details.append(f"  {s['name']}: last error at {when}: {s['last_error']}")
        gap = s["latest_gap"]
        if gap:
            details.append(
                f"  {s['name']}: latest of {s['gaps_total']} gaps: {_clock(gap['gap_start'])} -> "
                f"{_clock(gap['gap_end'])} {gap['reason']} (detected {_clock(gap['detected_at'])})"
            )
        held = s.get("spool") or {}
        if held.get("frames"):
            details.append(
                f"  {s['name']}: {held['frames']:,} frames ({held['bytes']:,} bytes) spooled, "
                f"not yet stored; oldest {_duration(held['oldest_age_s'])}"
            )
        if s["gaps_total"]:
            open_gaps = s["gaps_total"] - s["gaps_healed"]
            details.append(
                f"  {s['name']}: gaps {s['gaps_healed']:,} healed, {open_gaps:,} open "
                f"({s['gaps_recovered_rows']:,} rows recovered from the Storage Integration)"
            )
        if s["rejected_last_24h"]:
            details.append(
                f"  {s['name']}: {s['rejected_last_24h']:,} events rejected in 24 h "
                "(see rejected_events)"
            )
    if rows:
        lines += _table(headers, rows, numeric={3, 5, 6, 7, 8})
    else:
        lines.append("no streams configured or recorded")
    lines += details
    box = report["outbox"]
    counts = "  ".join(f"{k} {v:,}" for k, v in box["by_status"].items())
    oldest = box["oldest_pending_age_s"]
    tail = f"; oldest pending {_duration(oldest)}" if oldest is not None else ""
    lines += ["", f"outbox    {counts}{tail}"]
    return lines


def _table(headers: list[str], rows: list[list[str]], *, numeric: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _clock(t: str | datetime | None) -> str:
    if t is None:
        return "-"
    value = datetime.fromisoformat(t) if isinstance(t, str) else t
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(now: datetime, t: str) -> str:
    return _duration((now - datetime.fromisoformat(t)).total_seconds())


def _duration(seconds: float | None) -> str:
    """``42s``, ``4m12s``, ``2h03m``, ``3d04h``: compact and sortable by eye."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
