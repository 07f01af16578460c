"""All ingest-side SQL: batches of rows and the cursor that covers them, in one transaction.

One code path serves SQLite and PostgreSQL; the dialect differences live in
:func:`_insert_ignore` and :func:`_upsert_cursor`. Inserts are executemany per table
(never a giant multi-VALUES statement, see PERF_NOTES), and every insert is
``ON CONFLICT DO NOTHING``: idempotency lives in the database, keyed by the event's
``unique_id``. The in-batch and pre-select de-duplication only saves work.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ingestd import schema
from ingestd.errors import StoreUnavailable
from ingestd.logs import redact
from ingestd.models import Batch, CommitResult, Cursor, Gap, Row

log = structlog.get_logger()

# Called inside the batch's transaction with the new downlink_events rows, so that an
# outbox row's status moves in the same commit as the event that moved it.
DownlinkHook = Callable[[Connection, list[dict[str, Any]]], None]

_TABLES: dict[str, sa.Table] = {t.name: t for t in schema.metadata.sorted_tables}
# Parents before children (uplinks before uplink_receptions).
_DERIVED_ORDER = ("uplinks", "uplink_receptions", "joins", "downlink_events")
_PRESELECT_CHUNK = 500  # ids per "which of these exist already" query


@contextlib.contextmanager
def map_db_errors() -> Iterator[None]:
    """Translate driver-level connectivity failures into :class:`StoreUnavailable`."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        if getattr(exc, "connection_invalidated", False) or isinstance(
            exc, sa.exc.OperationalError
        ):
            raise StoreUnavailable(f"database unavailable: {type(exc.orig).__name__}") from exc
        raise


def _insert_ignore(conn: Connection, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


class _BulkInsert:
    """``INSERT … ON CONFLICT DO NOTHING`` for one table, executed at driver level.

    SQLAlchemy's per-row parameter processing costs more than the insert itself on this
    path (PERF_NOTES: driver executemany is 1.45x SQLAlchemy Core on SQLite, 1.4x on
    PostgreSQL), so the hot tables are written with a statement compiled once and rows
    converted by one small function per column: times to what the dialect stores, JSON
    to text with orjson, everything else as is.
    """

    def __init__(self, table: sa.Table, dialect: str) -> None:
        columns = [c.name for c in table.columns]
        marker = "?" if dialect == "sqlite" else "%s"
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(marker for _ in columns)
        self.sql = f'INSERT INTO "{table.name}" ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING'
        # One generated function per table turns a row dict into the driver's tuple, like
        # dataclasses generate __init__: no per-column loop or generator on the hot path.
        namespace: dict[str, Any] = {}
        parts = []
        for i, col in enumerate(table.columns):
            conv = _converter(col.type, dialect)
            if conv is None:
                parts.append(f"get({col.name!r})")
            else:
                namespace[f"_c{i}"] = conv
                parts.append(f"_c{i}(get({col.name!r}))")
        source = f"def to_tuple(row):\n    get = row.get\n    return ({', '.join(parts)},)\n"
        exec(source, namespace)
        self._to_tuple: Callable[[dict[str, Any]], tuple[Any, ...]] = namespace["to_tuple"]

    def rows(self, values: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The driver parameters for ``values``."""
        return list(map(self._to_tuple, values))


def _converter(type_: Any, dialect: str) -> Callable[[Any], Any] | None:
    if isinstance(type_, schema.UtcDateTime):
        return _sqlite_time if dialect == "sqlite" else None
    if isinstance(type_, sa.JSON):
        return _json_text
    return None


def _sqlite_time(value: datetime | None) -> str | None:
    # The exact text SQLAlchemy's SQLite DateTime writes, so stored times sort and read alike.
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _upsert(conn: Connection, table: sa.Table, values: dict[str, Any]) -> Any:
    """``INSERT … ON CONFLICT (primary key) DO UPDATE`` of the given columns."""
    ins = (
        postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)
    ).values(values)
    keys = [c.name for c in table.primary_key.columns]
    update = {k: ins.excluded[k] for k in values if k not in keys}
    return ins.on_conflict_do_update(index_elements=keys, set_=update)


def _upsert_cursor(conn: Connection, stream: str, cursor: Cursor, now: datetime) -> None:
    values = {
        "stream": stream,
        "last_event_time": cursor.last_time,
        "last_unique_ids": sorted(cursor.unique_ids_at_last_time),
        "updated_at": now,
    }
    conn.execute(_upsert(conn, schema.stream_cursors, values))


class Store:
    """Writes batches and reads cursors. Synchronous: the async pipeline calls it in a thread."""

    def __init__(self, engine: Engine, *, downlink_hook: DownlinkHook | None = None) -> None:
        self.engine = engine
        self._downlink_hook = downlink_hook
        dialect = engine.dialect.name
        self._bulk = {
            name: _BulkInsert(_TABLES[name], dialect) for name in ("events", *_DERIVED_ORDER)
        }

    # -- reads -------------------------------------------------------------------------------

    def load_cursor(self, stream: str) -> Cursor:
        """The stream's saved cursor, or an empty one for a new stream."""
        t = schema.stream_cursors
        with map_db_errors(), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.c.last_event_time, t.c.last_unique_ids).where(t.c.stream == stream)
            ).first()
        if row is None or row.last_event_time is None:
            return Cursor()
        return Cursor(
            last_time=row.last_event_time,
            unique_ids_at_last_time=frozenset(row.last_unique_ids or ()),
        )

    def stream_connected(self, stream: str) -> bool:
        """True when the stream's leader (maybe another process) reports it connected."""
        t = schema.stream_cursors
        with map_db_errors(), self.engine.connect() as conn:
            since = conn.execute(
                sa.select(t.c.connected_since).where(t.c.stream == stream)
            ).scalar_one_or_none()
        return since is not None

    # -- writes ------------------------------------------------------------------------------

    def commit_batch(self, batch: Batch) -> CommitResult:
        """Store ``batch`` and its cursor atomically; a refused batch is retried per event."""
        with map_db_errors():
            try:
                with self.engine.begin() as conn:
                    return self._write(conn, batch, isolate=False)
            except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.StatementError) as exc:
                if isinstance(exc, sa.exc.OperationalError):
                    raise
                log.warning(
                    "batch_refused_retrying_per_event", stream=batch.stream, error=str(exc.orig)
                )
            with self.engine.begin() as conn:
                return self._write(conn, batch, isolate=True)

    def record_gap(self, gap: Gap) -> None:
        """Write one gap outside any batch (e.g. detected before the first event)."""
        with map_db_errors(), self.engine.begin() as conn:
            self._insert_gaps(conn, [gap])

    def set_stream_state(
        self, stream: str, *, connected_since: datetime | None, last_error: str | None = None
    ) -> None:
        """Record connection state and the last error for ``ingestd status``."""
        now = datetime.now(UTC)
        values: dict[str, Any] = {"connected_since": connected_since, "updated_at": now}
        if last_error is not None:  # a TTS error may echo the key: mask configured secrets
            values |= {"last_error": redact(last_error)[:2000], "last_error_at": now}
        with map_db_errors(), self.engine.begin() as conn:
            # An upsert, not UPDATE-then-INSERT: the stream's first cursor is written
            # concurrently, and an INSERT that lost that race would drop this state.
            conn.execute(_upsert(conn, schema.stream_cursors, {"stream": stream, **values}))

    # -- internals ---------------------------------------------------------------------------

    def _write(self, conn: Connection, batch: Batch, *, isolate: bool) -> CommitResult:
        result = CommitResult(duplicates=batch.duplicates_in_batch)
        items = self._drop_existing(conn, batch.items)
        result.duplicates += len(batch.items) - len(items)
        rejected = list(batch.rejected)
        if isolate:
            items = self._keep_insertable(conn, items, rejected, batch.stream)
        self._insert_items(conn, items, result)
        result.rejected = self._insert_rejected(conn, rejected)
        if batch.gaps:
            self._insert_gaps(conn, batch.gaps)
            result.gaps = len(batch.gaps)
        if batch.cursor is not None and batch.cursor.last_time is not None:
            _upsert_cursor(conn, batch.stream, batch.cursor, datetime.now(UTC))
        return result

    def _drop_existing(
        self, conn: Connection, items: list[tuple[dict[str, Any], list[Row]]]
    ) -> list[tuple[dict[str, Any], list[Row]]]:
        """Skip events already stored (replays after a reconnect): one indexed query per chunk."""
        if not items:
            return items
        ids = [ev["unique_id"] for ev, _ in items]
        uid = schema.events.c.unique_id
        existing: set[str] = set()
        for i in range(0, len(ids), _PRESELECT_CHUNK):
            chunk = ids[i : i + _PRESELECT_CHUNK]
            existing.update(conn.execute(sa.select(uid).where(uid.in_(chunk))).scalars())
        if not existing:
            return items
        return [item for item in items if item[0]["unique_id"] not in existing]

    def _insert_items(
        self,
        conn: Connection,
        items: Sequence[tuple[dict[str, Any], list[Row]]],
        result: CommitResult,
    ) -> None:
        if not items:
            return
        per_table: dict[str, list[dict[str, Any]]] = {name: [] for name in _DERIVED_ORDER}
        by_name = result.stored_by_name
        now = datetime.now(UTC)
        events_rows = []
        for ev, rows in items:
            ev["ingested_at"] = now
            events_rows.append(ev)
            by_name[ev["name"]] = by_name.get(ev["name"], 0) + 1
            for table, values in rows:
                per_table[table].append(values)
        inserted = self._execute_bulk(conn, "events", events_rows)
        # rowcount is exact for executemany on both drivers; a concurrent writer's rows
        # count as duplicates here.
        if inserted is not None and inserted >= 0:
            result.duplicates += len(events_rows) - inserted
            result.events += inserted
        else:
            result.events += len(events_rows)
        for name in _DERIVED_ORDER:
            table_rows = per_table[name]
            if table_rows:
                self._execute_bulk(conn, name, table_rows)
                result.rows[name] = result.rows.get(name, 0) + len(table_rows)
        if self._downlink_hook is not None and per_table["downlink_events"]:
            self._downlink_hook(conn, per_table["downlink_events"])

    def _execute_bulk(self, conn: Connection, table: str, rows: list[dict[str, Any]]) -> int:
        bulk = self._bulk[table]
        return conn.exec_driver_sql(bulk.sql, bulk.rows(rows)).rowcount

    def _keep_insertable(
        self,
        conn: Connection,
        items: list[tuple[dict[str, Any], list[Row]]],
        rejected: list[dict[str, Any]],
        stream: str,
    ) -> list[tuple[dict[str, Any], list[Row]]]:
        """Try each event in a savepoint; move the ones the database refuses to ``rejected``."""
        good: list[tuple[dict[str, Any], list[Row]]] = []
        probe = CommitResult()
        for item in items:
            try:
                with conn.begin_nested() as sp:
                    self._insert_items(conn, [item], probe)
                    sp.rollback()  # only probing; the good ones are inserted together below
                good.append(item)
            except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.StatementError) as exc:
                if isinstance(exc, sa.exc.OperationalError):
                    raise
                rejected.append(
                    {
                        "stream": stream,
                        "raw": _raw_text(item[0]),
                        "error": f"database refused the event: {exc.orig or exc}"[:2000],
                        # Its raw text holds ingested_at, which differs on every replay.
                        "digest": reject_digest(str(item[0]["unique_id"]), "refused"),
                    }
                )
        return good

    @staticmethod
    def _insert_rejected(conn: Connection, rejected: list[dict[str, Any]]) -> int:
        """Insert rejects once each: one already stored (a replay of it) is skipped."""
        if not rejected:
            return 0
        for row in rejected:
            if not row.get("digest"):
                row["digest"] = reject_digest(row["raw"], row["error"])
        # RETURNING counts the rows inserted on both dialects (executemany's rowcount does not).
        stmt = _insert_ignore(conn, schema.rejected_events).returning(schema.rejected_events.c.id)
        return len(conn.execute(stmt, rejected).all())

    @staticmethod
    def _insert_gaps(conn: Connection, gaps: Sequence[Gap]) -> None:
        conn.execute(
            sa.insert(schema.stream_gaps),
            [
                {
                    "stream": g.stream,
                    "gap_start": g.gap_start,
                    "gap_end": g.gap_end,
                    "reason": g.reason,
                    "detail": g.detail,
                }
                for g in gaps
            ],
        )


def reject_digest(raw: str, error: str) -> str:
    """The ``rejected_events.digest`` of a reject: what was refused, and why."""
    h = hashlib.blake2b(digest_size=16)
    h.update(raw.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(error.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _raw_text(event_row: dict[str, Any]) -> str:
    return orjson.dumps(event_row, default=str).decode()
