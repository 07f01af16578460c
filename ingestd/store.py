"""All ingest-side SQL: batches of rows and the cursor that covers them, in one transaction.

One code path serves SQLite and PostgreSQL; the dialect differences live in
:class:`_BulkInsert` (placeholders, per-column value conversion), :func:`_upsert_cursor`
and :func:`_insert_ignore`. Inserts are one statement per table per batch: executemany on
SQLite, ``COPY`` into a temporary staging table then ``INSERT … SELECT`` on PostgreSQL
(never a giant multi-VALUES statement, see PERF_NOTES), and every insert is
``ON CONFLICT DO NOTHING``: idempotency lives in the database, keyed by the event's
``unique_id``. The in-batch and pre-select de-duplication only saves work.

No batch is ever dropped. A batch the database refuses for any reason but an outage
(:func:`is_outage`, raised as :class:`StoreUnavailable` for the caller to retry) is
written again event by event, each in a savepoint; an event it still refuses goes to
``rejected_events`` with its row as JSON, and a reject row it refuses is written again with
its text reduced to escaped ASCII. What cannot be stored as received is made storable
where that is cheap, on PostgreSQL only (SQLite stores all of it):

- U+0000, which PostgreSQL text and ``jsonb`` cannot hold, is written as U+FFFD (the
  replacement character) in text columns and in JSON strings and keys: visible, and the
  rest of the value intact. Event ids with U+0000 never get here (normalize rejects them).
- Integers beyond a column's range are not clamped: normalize rejects fields whose
  protocol range they leave (``f_cnt``, ``f_port``) and writes None where the protocol
  allows what the column cannot hold (``frequency`` past int64); the event as received
  stays in ``events.data``. Anything else out of range is refused here, per event.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
import structlog

# COPY text is formatted off the connection's thread with psycopg's own formatter (C).
from psycopg._copy_base import TextFormatter
from psycopg.adapt import Transformer
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ingestd import schema
from ingestd.errors import StoreUnavailable
from ingestd.models import (
    CURSOR_FUTURE_TOLERANCE_S,
    CURSOR_IDS_MAX,
    Batch,
    CommitResult,
    Cursor,
    EventRow,
    Gap,
    JsonText,
    Row,
    json_text,
    raw_text,
)
from ingestd.secrets import redact

log = structlog.get_logger()

# Called inside the batch's transaction with the new downlink_events rows, so that an
# outbox row's status moves in the same commit as the event that moved it.
DownlinkHook = Callable[[Connection, list[Mapping[str, Any]]], None]

_TABLES: dict[str, sa.Table] = {t.name: t for t in schema.metadata.sorted_tables}
# Parents before children (uplinks before uplink_receptions).
_DERIVED_ORDER = ("uplinks", "uplink_receptions", "joins", "downlink_events")
# After a PostgreSQL COPY met a stored row, that table's next batches are staged (the cost
# of a failed COPY is then paid once per this many batches, not on every batch).
STAGED_AFTER_CONFLICT = 100
_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE unique_violation
# Which of a batch's event ids are stored already (the ids as one parameter).
_PRESELECT = {
    "postgresql": "SELECT unique_id FROM events WHERE unique_id = ANY(%s)",
    "sqlite": "SELECT unique_id FROM events WHERE unique_id IN (SELECT value FROM json_each(?))",
}
# Text columns normalize has already checked for U+0000 (the event's id and name; the
# stream is configuration): on PostgreSQL the others are cleaned per value (pg_text).
_CHECKED_TEXT = frozenset({"unique_id", "event_unique_id", "uplink_id", "name", "stream"})


RAW_FALLBACK_CHARS = 100_000  # raw kept by a reject row rewritten as escaped ASCII
_REPLACEMENT = "\ufffd"  # stands in for U+0000 on PostgreSQL


@dataclass(slots=True)
class PreparedRows:
    """A batch's rows, converted for the driver (:meth:`Store.prepare`)."""

    events: int
    by_name: dict[str, int]  # events per name
    tables: list[tuple[str, int, Any]]  # (table, rows, driver payload), in insert order
    downlink_events: list[Mapping[str, Any]]  # for the outbox hook


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable, locked or out of resources.

    Such a batch is retried whole by the caller; any other error is the database refusing
    what the batch holds, and is isolated per event.
    """
    if isinstance(exc, StoreUnavailable | sa.exc.OperationalError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


@contextlib.contextmanager
def map_db_errors() -> Iterator[None]:
    """Translate driver-level connectivity failures into :class:`StoreUnavailable`."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if is_outage(exc):
            raise StoreUnavailable(f"database unavailable: {type(exc.orig).__name__}") from exc
        raise


def _insert_ignore(conn: Connection, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def _copy(conn: Connection, sql: str, data: bytes) -> None:
    """``COPY … FROM STDIN`` of ``data`` (PostgreSQL), errors raised as SQLAlchemy's."""
    driver: Any = conn.connection.driver_connection
    try:  # COPY is the driver's own API: SQLAlchemy neither sees nor wraps it
        with driver.cursor() as cur, cur.copy(sql) as cp:
            cp.write(data)
    except conn.dialect.loaded_dbapi.Error as exc:  # as exec_driver_sql would raise it
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc


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
        self.table = table.name
        self.dialect = dialect
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" if dialect == "sqlite" else "%s" for _ in columns)
        # executemany: the SQLite path of insert().
        self.sql = f'INSERT INTO "{table.name}" ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING'
        # PostgreSQL: COPY straight into the table, in a savepoint (2-3x executemany). COPY
        # cannot skip a conflict, so a batch holding a row stored already (a concurrent
        # writer of an overlapping stream, one uplink under two event ids) is written again
        # by COPY into a temporary staging table, then one INSERT … SELECT … ON CONFLICT DO
        # NOTHING; the table's next STAGED_AFTER_CONFLICT batches go that way at once.
        self.copy_sql = f'COPY "{table.name}" ({names}) FROM STDIN'
        self.staged_batches = 0
        stage = f"ingestd_stage_{table.name}"
        self.stage_sql = (
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" (LIKE "{table.name}")'
            " ON COMMIT DELETE ROWS",
            f'COPY "{stage}" ({names}) FROM STDIN',
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{stage}"'
            " ON CONFLICT DO NOTHING",
            f'TRUNCATE "{stage}"',  # a savepoint's pass (_write_isolated) reuses it at once
        )
        self._to_tuple = _tuple_function(table, dialect, copy=False)
        pg = dialect == "postgresql"
        self._to_copy_tuple = _tuple_function(table, dialect, copy=True) if pg else self._to_tuple

    def rows(self, values: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The driver parameters for ``values``."""
        return list(map(self._to_tuple, values))

    def payload(self, values: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]] | bytes:
        """What the write sends for ``values``: the executemany parameters on SQLite, the
        ``COPY`` text on PostgreSQL (formatted here, so that the writer only sends it)."""
        if self.dialect != "postgresql":
            return self.rows(values)
        formatter = TextFormatter(Transformer())
        out = bytearray()
        write_row = formatter.write_row
        for row in map(self._to_copy_tuple, values):
            out += write_row(row)
        out += formatter.end()
        return bytes(out)

    def insert(self, conn: Connection, payload: Any, count: int) -> int:
        """Insert :meth:`payload`'s ``count`` rows, skipping those stored already; returns
        how many were inserted."""
        if self.dialect != "postgresql":
            return int(conn.exec_driver_sql(self.sql, payload).rowcount)
        if self.staged_batches == 0:
            try:
                with conn.begin_nested():
                    _copy(conn, self.copy_sql, payload)
                return count
            except sa.exc.IntegrityError as exc:
                if getattr(exc.orig, "sqlstate", None) != _UNIQUE_VIOLATION:
                    raise
                self.staged_batches = STAGED_AFTER_CONFLICT  # a row is there: skip it, below
        self.staged_batches -= 1
        create, copy, insert, truncate = self.stage_sql
        conn.exec_driver_sql(create)
        _copy(conn, copy, payload)
        inserted: int = conn.exec_driver_sql(insert).rowcount
        conn.exec_driver_sql(truncate)
        return inserted


def _tuple_function(
    table: sa.Table, dialect: str, *, copy: bool
) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A generated function turning one row dict into the driver's tuple, like dataclasses
    generate ``__init__``: no per-column loop or generator on the hot path. ``copy``: for
    PostgreSQL ``COPY`` text (bytea as hex text), else for driver parameters."""
    namespace: dict[str, Any] = {}
    parts = []
    for i, col in enumerate(table.columns):
        conv = None if col.name in _CHECKED_TEXT else _converter(col.type, dialect)
        if copy and isinstance(col.type, sa.LargeBinary):
            conv = _pg_bytea_text
        if copy and isinstance(col.type, schema.UtcDateTime):
            conv = _time_text_converter(_PG_TIME_TEXT)
        if conv is None:
            parts.append(f"get({col.name!r})")
        else:
            namespace[f"_c{i}"] = conv
            parts.append(f"_c{i}(get({col.name!r}))")
    source = f"def to_tuple(row):\n    get = row.get\n    return ({', '.join(parts)},)\n"
    exec(source, namespace)
    return namespace["to_tuple"]  # type: ignore[no-any-return]


def _converter(type_: Any, dialect: str) -> Callable[[Any], Any] | None:
    if isinstance(type_, schema.UtcDateTime):
        return _time_text_converter(_SQLITE_TIME_TEXT) if dialect == "sqlite" else None
    if isinstance(type_, sa.JSON):
        return _json_text if dialect == "sqlite" else _pg_json_text
    if isinstance(type_, sa.String) and dialect == "postgresql":  # Text is a String
        return pg_text
    return None


def _pg_bytea_text(value: bytes | None) -> str | None:
    # bytea in PostgreSQL's hex input format. The COPY text is formatted without a
    # connection, and psycopg escapes bytes without one in the pre-9.0 escape format.
    return None if value is None else "\\x" + value.hex()


def pg_text(value: Any) -> Any:
    """``value`` with U+0000 replaced, if it is a string holding one (PostgreSQL text)."""
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", _REPLACEMENT)
    return value


def _pg_json_text(value: Any) -> str | None:
    # jsonb refuses the escape \u0000 in strings. orjson writes U+0000 only as that escape,
    # so its absence proves the value clean (a backslash before "u0000" is a false alarm
    # that costs one walk and changes nothing).
    text = _json_text(value)
    if text is not None and "\\u0000" in text:
        clean = _without_nul(orjson.loads(text) if type(value) is JsonText else value)
        return _json_text(clean)
    return text


def _without_nul(value: Any) -> Any:
    if type(value) is str:
        return value.replace("\x00", _REPLACEMENT)
    if type(value) is dict:
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if type(value) is list:
        return [_without_nul(v) for v in value]
    return value


# A time as text: on SQLite exactly what SQLAlchemy's DateTime writes (naive UTC, always with
# microseconds), so stored times sort and read alike; in PostgreSQL's COPY text, with its
# offset. %-formatting the fields costs under half of ``datetime.isoformat`` (1.0 vs 2.4 µs
# here) and of psycopg formatting a datetime for COPY (3 µs); with 4-7 times per uplink,
# import's parse-and-prepare path ran ~5 % faster (benchmarks/, 2026-12-02).
_SQLITE_TIME_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
_PG_TIME_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d+00"


def _time_text_converter(form: str) -> Callable[[datetime | None], str | None]:
    """A converter of aware datetimes to ``form`` in UTC, remembering its last value: a
    batch's ``ingested_at`` is one object, and each reception row repeats its uplink's
    ``received_at``."""
    # One (value, text) pair, replaced whole: threads of several streams may share it.
    last: list[tuple[datetime | None, str | None]] = [(None, None)]

    def convert(value: datetime | None) -> str | None:
        seen, text = last[0]
        if value is seen:
            return text
        if value is None:
            return None
        utc = value if value.tzinfo is UTC else value.astimezone(UTC)
        text = form % (
            utc.year,
            utc.month,
            utc.day,
            utc.hour,
            utc.minute,
            utc.second,
            utc.microsecond,
        )
        last[0] = (value, text)
        return text

    return convert


def _json_text(value: Any) -> str | None:
    """A JSON column's text: :class:`JsonText` as it is (a plain copy), else written now."""
    if type(value) is not JsonText:
        value = json_text(value)
        if value is None:
            return None
    return str.__str__(value)


def _upsert(conn: Connection, table: sa.Table, values: dict[str, Any]) -> Any:
    """``INSERT … ON CONFLICT (primary key) DO UPDATE`` of the given columns."""
    ins = (
        postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)
    ).values(values)
    keys = [c.name for c in table.primary_key.columns]
    update = {k: ins.excluded[k] for k in values if k not in keys}
    return ins.on_conflict_do_update(index_elements=keys, set_=update)


def _upsert_cursor(conn: Connection, stream: str, cursor: Cursor, now: datetime) -> None:
    # Bounded, and only ids every dialect can store: a dropped id costs duplicate work on
    # the next replay at worst (CURSOR_IDS_MAX).
    ids = [i for i in sorted(cursor.unique_ids_at_last_time) if "\x00" not in i]
    values = {
        "stream": stream,
        "last_event_time": cursor.last_time,
        "last_unique_ids": ids[:CURSOR_IDS_MAX],
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
        self._text: Callable[[Any], Any] = pg_text if dialect == "postgresql" else _same
        self._preselect = _PRESELECT[dialect]

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
        horizon = datetime.now(UTC) + timedelta(seconds=CURSOR_FUTURE_TOLERANCE_S)
        if row.last_event_time > horizon:
            return self._cursor_before(stream, horizon, row.last_event_time)
        return Cursor(
            last_time=row.last_event_time,
            unique_ids_at_last_time=frozenset(row.last_unique_ids or ()),
        )

    def _cursor_before(self, stream: str, horizon: datetime, saved: datetime) -> Cursor:
        """A cursor saved in the future (an older ingestd took a far-future event time):
        resume from the newest stored event up to the horizon instead, which asks the server
        again for everything after it."""
        t = schema.events.c
        with map_db_errors(), self.engine.connect() as conn:
            last = conn.execute(
                sa.select(sa.func.max(t.time)).where(t.stream == stream, t.time <= horizon)
            ).scalar_one_or_none()
            ids: list[str] = []
            if last is not None:
                ids = list(
                    conn.execute(
                        sa.select(t.unique_id)
                        .where(t.stream == stream, t.time == last)
                        .order_by(t.unique_id)
                        .limit(CURSOR_IDS_MAX)
                    ).scalars()
                )
        log.warning("cursor_in_future_ignored", stream=stream, saved=saved, resume_from=last)
        return Cursor(last_time=last, unique_ids_at_last_time=frozenset(ids))

    def stream_connected(self, stream: str) -> bool:
        """True when the stream's leader (maybe another process) reports it connected."""
        t = schema.stream_cursors
        with map_db_errors(), self.engine.connect() as conn:
            since = conn.execute(
                sa.select(t.c.connected_since).where(t.c.stream == stream)
            ).scalar_one_or_none()
        return since is not None

    # -- writes ------------------------------------------------------------------------------

    def prepare(self, batch: Batch) -> PreparedRows | None:
        """``batch``'s rows converted for the driver, ready for :meth:`commit_batch`.

        CPU work only: call it on the thread that builds batches, so that the commit thread
        only sends and waits (with the GIL released) while the next batch is parsed. None
        when a value cannot be converted: :meth:`commit_batch` then finds it event by event.
        """
        try:
            return self._prepare(batch.items)
        except Exception:  # e.g. an object where the driver takes text (a hostile event)
            return None

    def commit_batch(self, batch: Batch, prepared: PreparedRows | None = None) -> CommitResult:
        """Store ``batch`` and its cursor atomically; a refused batch is retried per event.

        ``prepared`` (:meth:`prepare` of this batch) saves converting its rows here; it is
        not used when some events turn out stored already (they are skipped).

        Raises :class:`StoreUnavailable` on an outage (nothing written; retry the batch).
        Any other exception means even the per-event pass could not write it (e.g. the
        stream's cursor row itself was refused): nothing is written and the cursor has not
        moved, so retrying later is safe; the batch must not be dropped.
        """
        with map_db_errors():
            try:
                with self.engine.begin() as conn:
                    return self._write(conn, batch, prepared)
            except Exception as exc:
                if is_outage(exc):
                    raise
                log.warning(
                    "batch_refused_retrying_per_event",
                    stream=batch.stream,
                    events=len(batch.items),
                    error=_describe(exc),
                )
            with self.engine.begin() as conn:
                return self._write_isolated(conn, batch)

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

    def _write(self, conn: Connection, batch: Batch, prepared: PreparedRows | None) -> CommitResult:
        result = CommitResult(duplicates=batch.duplicates_in_batch)
        items = self._drop_existing(conn, batch.items)
        result.duplicates += len(batch.items) - len(items)
        if prepared is not None and len(items) == len(batch.items):
            self._insert_rows(conn, prepared, result)
        else:
            self._insert_items(conn, items, result)
        if batch.rejected:
            rows = [self._clean(r) for r in batch.rejected]
            result.rejected = len(conn.execute(_insert_rejects(conn), rows).all())
        self._finish(conn, batch, result)
        return result

    def _write_isolated(self, conn: Connection, batch: Batch) -> CommitResult:
        """Each event in its own savepoint; what the database refuses becomes a reject."""
        result = CommitResult(duplicates=batch.duplicates_in_batch)
        rejected = list(batch.rejected)
        for item in batch.items:
            part = CommitResult()
            try:
                with conn.begin_nested():
                    kept = self._drop_existing(conn, [item])
                    part.duplicates = 1 - len(kept)
                    self._insert_items(conn, kept, part)
            except Exception as exc:
                if is_outage(exc):
                    raise
                rejected.append(
                    {
                        "stream": batch.stream,
                        "raw": raw_text(item[0]),
                        "error": f"database refused the event: {_describe(exc)}"[:2000],
                        # Its raw text holds ingested_at, which differs on every replay.
                        "digest": reject_digest(str(item[0]["unique_id"]), "refused"),
                    }
                )
                continue
            result.add(part)
        result.rejected = self._insert_rejected(conn, rejected)
        self._finish(conn, batch, result)
        return result

    def _insert_rejected(self, conn: Connection, rejected: list[dict[str, Any]]) -> int:
        """All of ``rejected``, each row reduced to escaped ASCII if it is refused as is.

        A reject already stored (the same frame replayed after a reconnect) is skipped;
        returns how many rows were inserted.
        """
        if not rejected:
            return 0
        rows = [self._clean(r) for r in rejected]
        insert = _insert_rejects(conn)
        try:
            with conn.begin_nested():
                return len(conn.execute(insert, rows).all())
        except Exception as exc:
            if is_outage(exc):
                raise
        inserted = 0
        for row in rows:
            try:
                with conn.begin_nested():
                    inserted += len(conn.execute(insert, [row]).all())
            except Exception as exc:
                if is_outage(exc):
                    raise
                log.warning("reject_row_refused_rewriting", error=_describe(exc))
                inserted += len(conn.execute(insert, [_ascii_reject(row, exc)]).all())
        return inserted

    def _clean(self, reject: dict[str, Any]) -> dict[str, Any]:
        text = self._text
        raw, error = text(reject["raw"]), text(reject["error"])
        return {
            "stream": reject["stream"],
            "raw": raw,
            "error": error,
            "digest": reject.get("digest") or reject_digest(raw, error),
        }

    def _finish(self, conn: Connection, batch: Batch, result: CommitResult) -> None:
        if batch.gaps:
            self._insert_gaps(conn, batch.gaps)
            result.gaps = len(batch.gaps)
        if batch.cursor is not None and batch.cursor.last_time is not None:
            _upsert_cursor(conn, batch.stream, batch.cursor, datetime.now(UTC))

    def _drop_existing(
        self, conn: Connection, items: list[tuple[EventRow, list[Row]]]
    ) -> list[tuple[EventRow, list[Row]]]:
        """Skip events already stored (replays after a reconnect): one indexed query.

        The ids travel as one parameter (a PostgreSQL array, a JSON array SQLite unpacks
        with ``json_each``): a statement of 2,000 bound ids cost more to build than to run.
        """
        if not items:
            return items
        ids = [ev["unique_id"] for ev, _ in items]
        param = ids if conn.dialect.name == "postgresql" else orjson.dumps(ids).decode()
        existing = {row[0] for row in conn.exec_driver_sql(self._preselect, (param,))}
        if not existing:
            return items
        return [item for item in items if item[0]["unique_id"] not in existing]

    def _prepare(self, items: Sequence[tuple[EventRow, list[Row]]]) -> PreparedRows:
        per_table: dict[str, list[Mapping[str, Any]]] = {name: [] for name in _DERIVED_ORDER}
        by_name: dict[str, int] = {}
        now = datetime.now(UTC)
        events_rows = []
        for ev, rows in items:
            ev["ingested_at"] = now
            events_rows.append(ev)
            by_name[ev["name"]] = by_name.get(ev["name"], 0) + 1
            for table, values in rows:
                per_table[table].append(values)
        tables = [("events", events_rows)] + [(n, per_table[n]) for n in _DERIVED_ORDER]
        return PreparedRows(
            events=len(events_rows),
            by_name=by_name,
            tables=[(n, len(rows), self._bulk[n].payload(rows)) for n, rows in tables if rows],
            downlink_events=per_table["downlink_events"],
        )

    def _insert_items(
        self,
        conn: Connection,
        items: Sequence[tuple[EventRow, list[Row]]],
        result: CommitResult,
    ) -> None:
        if items:
            self._insert_rows(conn, self._prepare(items), result)

    def _insert_rows(self, conn: Connection, prepared: PreparedRows, result: CommitResult) -> None:
        by_name = result.stored_by_name
        for name, count in prepared.by_name.items():
            by_name[name] = by_name.get(name, 0) + count
        for table, count, payload in prepared.tables:
            inserted = self._bulk[table].insert(conn, payload, count)
            if table == "events":
                # Exact on both drivers; a concurrent writer's rows count as duplicates.
                result.duplicates += count - inserted
                result.events += inserted
            else:
                result.rows[table] = result.rows.get(table, 0) + count
        if self._downlink_hook is not None and prepared.downlink_events:
            self._downlink_hook(conn, prepared.downlink_events)

    def _insert_gaps(self, conn: Connection, gaps: Sequence[Gap]) -> None:
        conn.execute(
            sa.insert(schema.stream_gaps),
            [
                {
                    "stream": g.stream,
                    "gap_start": g.gap_start,
                    "gap_end": g.gap_end,
                    "reason": g.reason,
                    "detail": self._text(g.detail),
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


def _insert_rejects(conn: Connection) -> Any:
    """Insert rejects, skipping one already stored (``rejected_events.digest``, per stream).

    RETURNING counts the rows inserted on both dialects (executemany's rowcount does not).
    """
    return _insert_ignore(conn, schema.rejected_events).returning(schema.rejected_events.c.id)


def _same(value: Any) -> Any:
    return value


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # a DBAPIError's driver exception says it best
    inner = orig if isinstance(orig, BaseException) else exc
    return f"{type(inner).__name__}: {inner}"


def _escaped(value: Any, max_chars: int) -> str:
    text = value if type(value) is str else repr(value)
    return text[:max_chars].encode("ascii", "backslashreplace").decode("ascii")[:max_chars]


def _ascii_reject(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """A reject row any text column takes: printable ASCII, U+0000 and the like escaped."""
    return {
        "stream": _escaped(row["stream"], 200),
        "raw": _escaped(row["raw"], RAW_FALLBACK_CHARS),
        "error": _escaped(f"{row['error']} (row rewritten as ASCII: {_describe(exc)})", 2000),
        "digest": row.get("digest"),
    }
