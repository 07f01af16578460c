"""All downlink-outbox SQL: claims, outcome marks, stale-claim release, event-driven status.

Synchronous functions over an ``Engine`` (the async worker calls them through
``asyncio.to_thread``), plus :func:`apply_downlink_events`, which runs inside the ingest
batch's transaction (``Store(engine, downlink_hook=apply_downlink_events)``).

Claiming keeps each device's rows in insertion order: a row is claimable only when it is
``pending``, due, and no earlier row (smaller id) of the same application and device is
still ``pending`` or ``pushing``. So two workers never reorder a device's rows, and a row
waiting in backoff holds back the device's later rows (a later downlink must not overtake
an earlier one that TTS has not accepted yet; other devices are not held back). Rows that
ended ``failed``/``dropped``/… no longer hold anything back. Across devices, the most
overdue row goes first.

Statuses only move forward: ``pending < pushing < queued < sent < acked``. ``failed``,
``invalidated`` and ``dropped`` are final, except that an ``ack`` event wins over every
status: the device acknowledged the downlink, whatever was concluded before (e.g. a push
that timed out until the worker gave up, but that TTS had accepted). A ``receive`` event
moves nothing: TTS publishes it before it checks the device, session and NS queue.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ingestd import schema
from ingestd.db import is_postgres
from ingestd.outbox.ids import OUTBOX_CID_PREFIX, is_push_rpc, outbox_id_from
from ingestd.secrets import redact
from ingestd.store import map_db_errors

_T = schema.downlink_outbox
_ACTIVE = schema.OUTBOX_ACTIVE_STATUSES
_FINAL = ("acked", "failed", "invalidated", "dropped")
ERROR_MAX_CHARS = 2000


@dataclass(frozen=True, kw_only=True, slots=True)
class OutboxItem:
    """One ``downlink_outbox`` row as read back by a claim or a release."""

    id: int
    application_id: str
    device_id: str
    f_port: int | None
    frm_payload: bytes | None
    decoded_payload: Any
    confirmed: bool
    priority: str
    operation: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    correlation_id: str | None
    created_at: datetime
    updated_at: datetime
    claimed_at: datetime | None
    claimed_by: str | None
    queued_at: datetime | None
    sent_at: datetime | None
    acked_at: datetime | None
    finished_at: datetime | None
    request_id: str | None
    verify_before_push: bool
    # Why the row as stored cannot be read (a value of the wrong type written by hand:
    # text in an integer or blob column, a decoded_payload that is not JSON, …); the
    # worker fails such a row by id with this reason instead of failing every claim.
    problem: str | None = None


_ITEM_FIELDS = tuple(f.name for f in fields(OutboxItem) if f.name != "problem")


def _item(row: sa.Row[Any]) -> OutboxItem:
    """An item from a row of :func:`_returned` columns; unreadable values become ``problem``.

    SQLite stores whatever a hand-written INSERT gives it (its columns only have type
    affinity), so its values arrive raw and are checked here, column by column: one bad
    row must not fail the claim of the good ones. PostgreSQL's types hold, except that a
    ``jsonb`` number (``1e999``) can be beyond what JSON decoders read, so its
    ``decoded_payload`` arrives as text too.
    """
    m = row._mapping
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in _ITEM_FIELDS:
        value, problem = _READERS.get(name, _as_is)(name, m[name])
        values[name] = value
        if problem is not None:
            problems.append(problem)
    return OutboxItem(**values, problem="; ".join(problems) or None)


_Read = tuple[Any, str | None]


def _as_is(_name: str, value: Any) -> _Read:
    return value, None


def _read_int(name: str, value: Any) -> _Read:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value, None
    return None, f"{name} {_shown(value)} is not an integer"


def _read_bool(name: str, value: Any) -> _Read:
    if value in (0, 1) and not isinstance(value, float):
        return bool(value), None
    # Unreadable verify_before_push reads as True: when in doubt, ask TTS before pushing.
    return name == "verify_before_push", f"{name} {_shown(value)} is not a boolean (0 or 1)"


def _read_bytes(name: str, value: Any) -> _Read:
    if value is None or isinstance(value, bytes):
        return value, None
    kind = "text" if isinstance(value, str) else type(value).__name__
    return None, (
        f"{name} is {kind}, not bytes (write a blob: X'0102' in SQL or a bytes parameter)"
    )


def _read_json(name: str, value: Any) -> _Read:
    if value is None:
        return None, None
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value), None
        except orjson.JSONDecodeError as exc:
            return None, f"{name} is not valid JSON ({exc})"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value, None  # a bare SQL number: valid JSON, refused later as no object
    return None, f"{name} is {type(value).__name__}, not JSON text"


def _read_time(name: str, value: Any) -> _Read:
    if value is None or isinstance(value, datetime):
        return value, None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC), None
            return parsed.astimezone(UTC), None
    return None, f"{name} {_shown(value)} is not a time (ISO 8601, UTC)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _readers() -> dict[str, Any]:
    readers: dict[str, Any] = {}
    for column in _T.c:
        if isinstance(column.type, schema.UtcDateTime):
            readers[column.name] = _read_time
        elif isinstance(column.type, sa.Boolean):
            readers[column.name] = _read_bool
        elif isinstance(column.type, sa.LargeBinary):
            readers[column.name] = _read_bytes
        elif isinstance(column.type, sa.JSON):
            readers[column.name] = _read_json
        elif isinstance(column.type, sa.Integer):
            readers[column.name] = _read_int
    return readers


_READERS = _readers()


@functools.cache
def _returned(postgres: bool) -> tuple[sa.ColumnElement[Any], ...]:
    """The columns an item is read from: raw values, checked by :func:`_item`."""
    if postgres:
        return tuple(
            sa.cast(c, sa.Text).label(c.name) if c.name == "decoded_payload" else c for c in _T.c
        )
    return tuple(sa.type_coerce(c, sa.types.NullType()).label(c.name) for c in _T.c)


def _literal_in(column: sa.ColumnElement[Any], values: Iterable[str]) -> sa.ColumnElement[bool]:
    # Literal values, not bound parameters: only then can SQLite and PostgreSQL match the
    # condition to the partial index ix_downlink_outbox_active_device.
    return column.in_([sa.literal_column(f"'{v}'") for v in values])


def _clip(error: str) -> str:
    """``error`` as ``last_error`` stores it: secrets masked (TTS may echo a key), clipped."""
    error = redact(error)
    return error if len(error) <= ERROR_MAX_CHARS else error[: ERROR_MAX_CHARS - 3] + "..."


# -- claims ---------------------------------------------------------------------------------


def claim_due(
    engine: Engine,
    *,
    worker_id: str,
    limit: int,
    now: datetime,
    record: Sequence[Mark] = (),
) -> list[OutboxItem]:
    """Record the outcomes ``record``, then claim up to ``limit`` due rows for ``worker_id``,
    at most one per device, most overdue first; one transaction.

    Recording first lets a device whose row was just recorded give its next row to this
    same claim. A claim sets ``pushing``, ``claimed_at``/``claimed_by``, ``attempts + 1``
    and the correlation id ``ingestd:outbox:<id>``. PostgreSQL locks candidates with ``FOR
    UPDATE SKIP LOCKED`` (concurrent claimers take different rows instead of waiting);
    SQLite runs one ``UPDATE … RETURNING`` under ``BEGIN IMMEDIATE``, which serialises
    claimers.

    A row whose stored values cannot be read is claimed like any other, with ``problem``
    set, so that the worker fails it by id; it never fails the claim of the other rows.
    """
    params = {"b_worker": worker_id, "b_limit": limit, "b_now": now}
    with map_db_errors(), engine.begin() as conn:
        write_marks(conn, record)
        if limit <= 0:
            return []
        postgres = is_postgres(conn)
        if postgres:
            conn.exec_driver_sql(PG_CLAIM_PLAN)
        rows = conn.execute(_claim_statement(postgres), params).all()
    return sorted((_item(r) for r in rows), key=lambda i: i.id)


# The claim must walk ix_downlink_outbox_pending_due in claim order and stop after `limit`
# device heads. Without statistics (a bulk INSERT of 1M rows, before autovacuum's ANALYZE)
# PostgreSQL estimated ~150 candidates and chose a bitmap scan plus a sort, evaluating the
# per-device head check for every pending row first: 8 s per claim instead of 1 ms.
# Switched off for the claim's own transaction, a sort is not an option, and the only plan
# left that yields (next_attempt_at, id) order is that index (SET LOCAL ends with COMMIT).
PG_CLAIM_PLAN = (
    "SET LOCAL enable_sort = off; SET LOCAL enable_incremental_sort = off; "
    "SET LOCAL enable_bitmapscan = off"
)


@functools.cache
def _claim_statement(postgres: bool) -> sa.Update:
    # Built once: building the aliases costs more than running the claim.
    cand = _T.alias("cand")
    earlier = _T.alias("earlier")
    now = sa.bindparam("b_now", type_=schema.UtcDateTime())
    # The device's head: its oldest row TTS has not accepted yet. A correlated scalar
    # subquery (not NOT EXISTS) so that PostgreSQL always runs it as an index lookup per
    # candidate: without statistics (a fresh table) it planned NOT EXISTS as an O(n²) join.
    device_head = (
        sa.select(sa.func.min(earlier.c.id))
        .where(
            earlier.c.application_id == cand.c.application_id,
            earlier.c.device_id == cand.c.device_id,
            _literal_in(earlier.c.status, _ACTIVE),
        )
        .scalar_subquery()
    )
    candidates = (
        sa.select(cand.c.id)
        .where(cand.c.status == sa.literal_column("'pending'"))
        .where(cand.c.next_attempt_at <= now)
        .where(cand.c.id == device_head)
        # Most overdue first; walks ix_downlink_outbox_pending_due (PostgreSQL) or the
        # (status, next_attempt_at) index (SQLite: equal keys come in rowid order) and
        # stops after `limit` heads, so a claim costs the same with any backlog.
        .order_by(cand.c.next_attempt_at, cand.c.id)
        .limit(sa.bindparam("b_limit", type_=sa.Integer()))
    )
    values = {
        "status": "pushing",
        "claimed_at": now,
        "claimed_by": sa.bindparam("b_worker", type_=sa.String()),
        "attempts": _T.c.attempts + 1,
        "correlation_id": sa.literal(OUTBOX_CID_PREFIX) + sa.cast(_T.c.id, sa.String),
        "updated_at": now,
    }
    if postgres:
        # A CTE runs once; FOR UPDATE SKIP LOCKED inside it makes concurrent claimers skip
        # each other's candidates (procrastinate's fetch_job).
        cte = candidates.with_for_update(skip_locked=True, of=cand).cte("claimable")
        stmt = sa.update(_T).where(_T.c.id == cte.c.id)
    else:
        stmt = sa.update(_T).where(_T.c.id.in_(candidates.scalar_subquery()))
    return stmt.values(values).returning(*_returned(postgres))


def release_stale_claims(
    engine: Engine, *, older_than: datetime, now: datetime, claimed_by: str | None = None
) -> list[OutboxItem]:
    """Return rows stuck in ``pushing`` (claimed before ``older_than``) to ``pending``.

    Such a row belongs to a worker that crashed or hung, possibly after TTS accepted the
    push, so it gets ``verify_before_push``: before any new push the worker looks for it in
    TTS's device queue and the stored lifecycle events. Releasing never pushes twice.
    """
    cond = [_T.c.status == "pushing", _T.c.claimed_at < older_than]
    if claimed_by is not None:
        cond.append(_T.c.claimed_by == claimed_by)
    stmt = (
        sa.update(_T)
        .where(*cond)
        .values(
            status="pending",
            next_attempt_at=now,
            claimed_at=None,
            claimed_by=None,
            last_error=sa.literal("claim expired; TTS is checked before any re-push"),
            verify_before_push=True,
            updated_at=now,
        )
    )
    with map_db_errors(), engine.begin() as conn:
        rows = conn.execute(stmt.returning(*_returned(is_postgres(conn)))).all()
    return sorted((_item(r) for r in rows), key=lambda i: i.id)


# -- outcomes of a push ---------------------------------------------------------------------

MarkKind = Literal["queued", "retry", "failed", "released"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Mark:
    """One claimed row's outcome, as :func:`write_marks` records it.

    - ``queued``: TTS accepted the push: ``pushing``/``pending`` → ``queued`` with
      ``request_id`` (later statuses stay).
    - ``retry``: a transient failure: back to ``pending`` until ``next_attempt_at``, with
      ``error``. ``outcome_unknown`` (no answer from TTS: timeout, connection lost after
      sending) sets ``verify_before_push``; a clear refusal clears it. Only a row still
      ``pushing`` moves (an event may have moved it forward meanwhile).
    - ``failed``: a permanent failure (or retries exhausted): ``failed`` with ``error``.
    - ``released``: the claim given back untouched (no push was attempted: the row's
      stream is not connected yet, its application is rate limited, or the worker is
      stopping), so the attempt is not counted; ``pending`` until ``next_attempt_at``.
      ``error`` (if given) goes to ``last_error`` to say why it waits.

    ``now`` is when the outcome was known (``updated_at``, ``queued_at``, ``finished_at``).
    Every mark but ``queued`` drops the row's claim (a queued row keeps who pushed it).
    """

    kind: MarkKind
    outbox_id: int
    now: datetime
    request_id: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    outcome_unknown: bool = False

    def params(self) -> dict[str, Any]:
        return {
            "b_id": self.outbox_id,
            "b_now": self.now,
            "b_request_id": self.request_id,
            "b_error": None if self.error is None else _clip(self.error),
            "b_next": self.next_attempt_at,
            "b_unknown": self.outcome_unknown,
        }


def write_marks(conn: Connection, marks: Iterable[Mark]) -> int:
    """Record ``marks`` in the caller's transaction: one statement (an executemany) per
    kind. Returns how many rows moved (a mark whose row moved on meanwhile moves none)."""
    by_kind: dict[MarkKind, list[dict[str, Any]]] = {}
    for mark in marks:
        by_kind.setdefault(mark.kind, []).append(mark.params())
    moved = 0
    for kind, params in by_kind.items():
        result = conn.execute(_mark_statement(kind), params[0] if len(params) == 1 else params)
        moved += result.rowcount
    return moved


def record(engine: Engine, marks: Sequence[Mark]) -> int:
    """:func:`write_marks` in a transaction of its own."""
    with map_db_errors(), engine.begin() as conn:
        return write_marks(conn, marks)


@functools.cache
def _mark_statement(kind: MarkKind) -> sa.Update:
    # Literal IN lists, since an executemany cannot expand them.
    now = sa.bindparam("b_now", type_=schema.UtcDateTime())
    error = sa.bindparam("b_error", type_=sa.Text())
    next_attempt_at = sa.bindparam("b_next", type_=schema.UtcDateTime())
    unclaimed = {"claimed_at": None, "claimed_by": None, "updated_at": now}
    stmt = sa.update(_T).where(_T.c.id == sa.bindparam("b_id", type_=sa.BigInteger()))
    if kind == "queued":
        return stmt.values(
            status=sa.case((_literal_in(_T.c.status, _ACTIVE), "queued"), else_=_T.c.status),
            # A `sent` event committed before this answer was recorded (they race) proves
            # TTS had accepted it by then: queued_at never lies after sent_at.
            queued_at=sa.func.coalesce(
                _T.c.queued_at, sa.case((_T.c.sent_at < now, _T.c.sent_at), else_=now)
            ),
            request_id=sa.bindparam("b_request_id", type_=sa.String()),
            verify_before_push=False,
            updated_at=now,
        )
    if kind == "retry":
        return stmt.where(_literal_in(_T.c.status, ("pushing",))).values(
            status="pending",
            last_error=error,
            next_attempt_at=next_attempt_at,
            verify_before_push=sa.bindparam("b_unknown", type_=sa.Boolean()),
            **unclaimed,
        )
    if kind == "failed":
        return stmt.where(_literal_in(_T.c.status, _ACTIVE)).values(
            status="failed",
            last_error=error,
            finished_at=now,
            verify_before_push=False,
            **unclaimed,
        )
    return stmt.where(_literal_in(_T.c.status, ("pushing",))).values(  # released
        status="pending",
        attempts=sa.case((_T.c.attempts > 0, _T.c.attempts - 1), else_=0),
        next_attempt_at=next_attempt_at,
        last_error=sa.func.coalesce(error, _T.c.last_error),
        **unclaimed,
    )


def mark_queued(engine: Engine, outbox_id: int, *, request_id: str, now: datetime) -> None:
    """Record a ``queued`` :class:`Mark` on its own."""
    record(engine, [Mark(kind="queued", outbox_id=outbox_id, now=now, request_id=request_id)])


def mark_retry(
    engine: Engine,
    outbox_id: int,
    *,
    error: str,
    next_attempt_at: datetime,
    now: datetime,
    outcome_unknown: bool = False,
) -> bool:
    """Record a ``retry`` :class:`Mark` on its own; True if the row moved."""
    mark = Mark(
        kind="retry",
        outbox_id=outbox_id,
        now=now,
        error=error,
        next_attempt_at=next_attempt_at,
        outcome_unknown=outcome_unknown,
    )
    return record(engine, [mark]) > 0


def mark_failed(engine: Engine, outbox_id: int, *, error: str, now: datetime) -> bool:
    """Record a ``failed`` :class:`Mark` on its own; True if the row moved."""
    return record(engine, [Mark(kind="failed", outbox_id=outbox_id, now=now, error=error)]) > 0


def release_claim(
    engine: Engine,
    outbox_id: int,
    *,
    next_attempt_at: datetime,
    now: datetime,
    note: str | None = None,
) -> bool:
    """Record a ``released`` :class:`Mark` on its own; True if the row moved."""
    mark = Mark(
        kind="released", outbox_id=outbox_id, now=now, error=note, next_attempt_at=next_attempt_at
    )
    return record(engine, [mark]) > 0


# Kinds that TTS publishes only for an item it accepted into the device's queue.
_ACCEPTED_KINDS = ("forward", "sent", "ack", "nack", "failed", "queue_invalidated")
# An accepted item leaves the device queue when the NS schedules it; its `sent` event
# follows after the gateway's TxAck (seconds). Until a receive is this old, a row that is
# neither queued nor sent may still be in that window (also absorbs ingest lag and skew).
RECEIVE_SETTLE_S = 30.0


def accepted_per_events(engine: Engine, outbox_id: int, *, now: datetime) -> bool | None:
    """Do the stored lifecycle events show that TTS accepted a push of this row?

    True if an event that only an accepted item gets carries its id (``forward``, ``sent``,
    ``ack``, …). A ``receive`` proves nothing by itself: the AS publishes it before it
    checks the device, the session and the NS (LS ``downlinkQueueOp``), so refused pushes
    have one too. But a receive younger than :data:`RECEIVE_SETTLE_S` means the item may
    be between the queue and its ``sent`` event: None, ask again later. Else False.
    """
    e = schema.downlink_events
    stmt = sa.select(e.c.kind, e.c.time).where(e.c.outbox_id == outbox_id)
    with map_db_errors(), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if any(r.kind in _ACCEPTED_KINDS for r in rows):
        return True
    settle = timedelta(seconds=RECEIVE_SETTLE_S)
    if any(r.kind == "receive" and now - r.time < settle for r in rows):
        return None
    return False


# -- lifecycle events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Transition:
    target: str
    sources: tuple[str, ...]  # statuses the row may move from
    time_column: str | None  # set (if still empty) from the event time, whatever the status
    sets_error: bool = False


_EARLY = ("pending", "pushing", "queued")
# Applied in this order, so several events for one row in one batch end in the latest
# status with every timestamp filled. An ack wins over all, so it goes last.
# `receive` moves nothing: the AS publishes it before checking the device, session and NS
# queue, so a refused push has one too; the HTTP answer (or `forward`) says `queued`.
_TRANSITIONS: dict[str, _Transition] = {
    "forward": _Transition("queued", _ACTIVE, "queued_at"),
    # A nack means it was transmitted; TTS re-queues a confirmed downlink for another
    # attempt (confirmed_retry), so the row stays `sent` and waits for ack/failed/drop.
    "sent": _Transition("sent", _EARLY, "sent_at"),
    "nack": _Transition("sent", _EARLY, "sent_at"),
    # The NS may fail a later confirmed retry of a downlink already sent, hence from `sent`.
    "failed": _Transition("failed", (*_EARLY, "sent"), None, sets_error=True),
    "queue_invalidated": _Transition("invalidated", (*_EARLY, "sent"), None),
    # Only an accepted item can be dropped later (e.g. max_retries_reached after nacks). A
    # drop of a push request is that request's refusal: its HTTP answer decided (and the
    # worker may have retried since), so such drops move nothing (see _is_push_refusal).
    "drop": _Transition("dropped", ("queued", "sent"), None, sets_error=True),
    "ack": _Transition(
        "acked", tuple(s for s in schema.OUTBOX_STATUSES if s != "acked"), "acked_at"
    ),
}


def apply_downlink_events(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Move outbox rows forward from new ``downlink_events`` rows (a ``store.DownlinkHook``).

    Runs in the ingest batch's transaction, so a status moves in the same commit as the
    event row that moved it. One executemany UPDATE per event kind. Events without an
    outbox id are ignored; replays are harmless (statuses never move backwards and
    timestamps are only filled when empty).
    """
    now = datetime.now(UTC)
    params: dict[str, dict[int, dict[str, Any]]] = {kind: {} for kind in _TRANSITIONS}
    for row in rows:
        kind = row.get("kind")
        if kind not in params or (kind == "drop" and _is_push_refusal(row)):
            continue
        for outbox_id in _outbox_ids(row):
            time = row["time"]
            seen = params[kind].get(outbox_id)
            if seen is None or time < seen["b_time"]:
                params[kind][outbox_id] = {
                    "b_id": outbox_id,
                    "b_time": time,
                    "b_now": now,
                    "b_error": _clip(f"{kind}: {_describe_error(row.get('error'))}"),
                }
    for kind, by_id in params.items():
        if by_id:
            conn.execute(_transition_stmt(_TRANSITIONS[kind]), list(by_id.values()))


def _is_push_refusal(row: Mapping[str, Any]) -> bool:
    """A drop published while TTS handled a push/replace request (it carries its rpc id)."""
    return any(is_push_rpc(c) for c in row.get("correlation_ids") or ())


def _outbox_ids(row: Mapping[str, Any]) -> list[int]:
    ids: list[int] = []
    if isinstance(row.get("outbox_id"), int):
        ids.append(row["outbox_id"])
    if row.get("kind") == "queue_invalidated":
        # One event lists every invalidated item; normalize keeps only the first id in
        # outbox_id but all items' correlation ids.
        for cid in row.get("correlation_ids") or ():
            found = outbox_id_from([cid])
            if found is not None and found not in ids:
                ids.append(found)
    return ids


def _transition_stmt(tr: _Transition) -> sa.Update:
    moves = _literal_in(_T.c.status, tr.sources)  # executemany cannot expand IN lists
    b_time = sa.bindparam("b_time", type_=schema.UtcDateTime())
    # SET expressions all read the row as it was before this UPDATE, so `moves` is
    # evaluated once against the old status for every column.
    values: dict[str, Any] = {
        "status": sa.case((moves, tr.target), else_=_T.c.status),
        "updated_at": sa.bindparam("b_now", type_=schema.UtcDateTime()),
    }
    if tr.time_column is not None:
        col = _T.c[tr.time_column]
        values[tr.time_column] = sa.func.coalesce(col, b_time)
    if tr.target in _FINAL:
        values["finished_at"] = sa.case(
            (moves, sa.func.coalesce(_T.c.finished_at, b_time)), else_=_T.c.finished_at
        )
    if tr.sets_error:
        values["last_error"] = sa.case((moves, sa.bindparam("b_error")), else_=_T.c.last_error)
    return sa.update(_T).where(_T.c.id == sa.bindparam("b_id")).values(values)


def _describe_error(error: Any) -> str:
    """``namespace:name: message`` of an ``ErrorDetails`` (TTS error name first)."""
    if not isinstance(error, Mapping):
        return "no error details"
    namespace, name = error.get("namespace"), error.get("name")
    label = f"{namespace}:{name}" if namespace and name else str(name or "unknown error")
    message = error.get("message_format")
    if isinstance(message, str):
        attributes = error.get("attributes")
        if isinstance(attributes, Mapping):
            for key, value in attributes.items():
                message = message.replace("{" + str(key) + "}", str(value))
        return f"{label}: {message}"
    return label


# -- status ---------------------------------------------------------------------------------


def outbox_counts(engine: Engine) -> dict[str, int]:
    """Rows per status (every known status present, zero included), for status and metrics."""
    stmt = sa.select(_T.c.status, sa.func.count()).group_by(_T.c.status)
    counts = dict.fromkeys(schema.OUTBOX_STATUSES, 0)
    with map_db_errors(), engine.connect() as conn:
        for status, n in conn.execute(stmt):
            counts[status] = n
    return counts


def oldest_pending_age_s(engine: Engine, now: datetime) -> float:
    """Age in seconds of the oldest row TTS has not accepted yet (0.0 when there is none)."""
    stmt = sa.select(sa.func.min(_T.c.created_at)).where(_T.c.status.in_(_ACTIVE))
    with map_db_errors(), engine.connect() as conn:
        oldest: datetime | None = conn.execute(stmt).scalar()
    if oldest is None:
        return 0.0
    return max((now - oldest).total_seconds(), 0.0)
