"""Retention: delete rows older than a cutoff from the event tables, in bounded batches.

``ingestd prune --older-than 90d`` and the daemon's daily ``retention`` task (when
``[retention] max_age`` is set) both call :func:`prune`. Each batch is one short
transaction that deletes at most ``batch_rows`` rows picked by physical row id (SQLite
``rowid``, PostgreSQL ``(tableoid, ctid)`` so a partitioned table works too), so the
daemon's ingest transactions interleave with it: no long lock, nothing new is touched
(every predicate is ``time < cutoff``).

What is kept whatever its age: ``stream_cursors`` (never touched), gaps that are not healed
(a hole nobody filled stays on record), and outbox rows that have not reached a final
status (``pending``, ``pushing``, ``queued``, ``sent``). ``uplink_receptions`` go before
their ``uplinks`` (the foreign key would cascade anyway; deleting them first counts them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from ingestd import schema
from ingestd.aio import sleep_or_stop
from ingestd.db import is_postgres
from ingestd.errors import IngestdError
from ingestd.store import map_db_errors

log = structlog.get_logger()

PRUNE_BATCH_ROWS = 5000
PRUNE_PAUSE_S = 0.01  # between batches: lets a waiting ingest commit take the SQLite lock


@dataclass(frozen=True, slots=True)
class _Target:
    table: str
    condition: Callable[[datetime], sa.ColumnElement[bool]]


def _older(table: sa.Table, column: str) -> Callable[[datetime], sa.ColumnElement[bool]]:
    return lambda cutoff: table.c[column] < cutoff


def _gap_prunable(cutoff: datetime) -> sa.ColumnElement[bool]:
    """A healed gap (a backfill pass done, no error since) whose window ended before the cutoff."""
    g = schema.stream_gaps
    return sa.and_(
        sa.func.coalesce(g.c.gap_end, g.c.detected_at) < cutoff,
        g.c.backfill_passes > 0,
        g.c.backfill_error.is_(None),
    )


def _outbox_prunable(cutoff: datetime) -> sa.ColumnElement[bool]:
    """An outbox row in a final status that finished before the cutoff."""
    o = schema.downlink_outbox
    return sa.and_(
        o.c.status.in_(schema.OUTBOX_FINAL_STATUSES),
        sa.func.coalesce(o.c.finished_at, o.c.updated_at) < cutoff,
    )


# In deletion order: children before parents.
TARGETS: tuple[_Target, ...] = (
    _Target("uplink_receptions", _older(schema.uplink_receptions, "received_at")),
    _Target("uplinks", _older(schema.uplinks, "received_at")),
    _Target("joins", _older(schema.joins, "received_at")),
    _Target("downlink_events", _older(schema.downlink_events, "time")),
    _Target("events", _older(schema.events, "time")),
    _Target("rejected_events", _older(schema.rejected_events, "received_at")),
    _Target("stream_gaps", _gap_prunable),
    _Target("downlink_outbox", _outbox_prunable),
)
TABLES = tuple(t.table for t in TARGETS)


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneResult:
    """Rows deleted (or, for a dry run, that would be) per table, in deletion order."""

    cutoff: datetime
    deleted: dict[str, int]
    dry_run: bool
    elapsed_s: float

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def prune(
    engine: Engine,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
    batch_rows: int = PRUNE_BATCH_ROWS,
    should_stop: Callable[[], bool] | None = None,
) -> PruneResult:
    """Delete every prunable row older than ``now - older_than``; see the module docstring.

    ``should_stop`` is polled between batches (the daemon's stop event), so a stop never
    waits for a whole table.
    """
    started = time.perf_counter()
    cutoff = (now or datetime.now(UTC)) - older_than
    deleted: dict[str, int] = {}
    for target in TARGETS:
        table = schema.metadata.tables[target.table]
        condition = target.condition(cutoff)
        if dry_run:
            with map_db_errors(), engine.connect() as conn:
                count = sa.select(sa.func.count()).select_from(table).where(condition)
                deleted[target.table] = conn.execute(count).scalar_one()
            continue
        deleted[target.table] = _delete_in_batches(
            engine, table, condition, batch_rows=batch_rows, should_stop=should_stop
        )
        if deleted[target.table]:
            log.info("prune_table_done", table=target.table, deleted=deleted[target.table])
    result = PruneResult(
        cutoff=cutoff, deleted=deleted, dry_run=dry_run, elapsed_s=time.perf_counter() - started
    )
    log.info(
        "prune_finished",
        cutoff=cutoff.isoformat(),
        dry_run=dry_run,
        deleted=result.total,
        elapsed_s=round(result.elapsed_s, 3),
    )
    return result


def _delete_in_batches(
    engine: Engine,
    table: sa.Table,
    condition: sa.ColumnElement[bool],
    *,
    batch_rows: int,
    should_stop: Callable[[], bool] | None,
) -> int:
    total = 0
    while True:
        with map_db_errors(), engine.begin() as conn:
            n = conn.execute(_batch_delete(conn, table, condition, batch_rows)).rowcount
        total += n
        if n < batch_rows or (should_stop is not None and should_stop()):
            return total
        time.sleep(PRUNE_PAUSE_S)


def _batch_delete(
    conn: Connection, table: sa.Table, condition: sa.ColumnElement[bool], limit: int
) -> sa.Delete:
    """``DELETE … WHERE <row id> IN (SELECT <row id> … WHERE condition LIMIT n)``.

    Neither dialect has ``DELETE … LIMIT`` by default, and the tables have different keys;
    the physical row id works for all of them.
    """
    names = ("tableoid", "ctid") if is_postgres(conn) else ("rowid",)
    ids = sa.tuple_(*(sa.literal_column(n) for n in names))
    chosen: Any = (
        sa.select(*(sa.literal_column(n) for n in names))
        .select_from(table)
        .where(condition)
        .limit(limit)
    )
    return sa.delete(table).where(ids.in_(chosen))


async def retention_loop(
    engine: Engine, *, max_age: timedelta, interval_s: float, stop: asyncio.Event
) -> None:
    """The daemon's ``retention`` task: prune at start, then every ``interval_s``.

    A failed pass (database down) is logged and retried at the next interval; it never
    stops the daemon.
    """
    while not stop.is_set():
        try:
            await asyncio.to_thread(prune, engine, older_than=max_age, should_stop=stop.is_set)
        except (IngestdError, sa.exc.SQLAlchemyError) as exc:
            log.warning("prune_failed", error=str(exc) or type(exc).__name__)
        if await sleep_or_stop(interval_s, stop):
            return
