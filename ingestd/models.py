"""Values passed between the pipeline's stages.

Raw Things Stack JSON stays a plain ``dict`` (decoded by orjson; TTS_WIRE §2 has its keys)
until a batch takes it in, which writes the hot tables' JSON columns out as :class:`JsonText`.
Internal values are small frozen dataclasses or NamedTuples, closed sets StrEnums, and the
rows written to the hot tables TypedDicts: plain dicts at run time (built as dict literals,
no class to construct), checked by mypy against their table's columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, TypedDict

import orjson

# Closed sets as StrEnums: each member is its own string, so rows, SQL parameters and
# comparisons with plain strings work unchanged, and the declaration is the one home.


class Priority(StrEnum):
    """TTS's TxSchedulePriority (TTS_WIRE 5.2), in enum-number order, lowest first."""

    LOWEST = "LOWEST"
    LOW = "LOW"
    BELOW_NORMAL = "BELOW_NORMAL"
    NORMAL = "NORMAL"
    ABOVE_NORMAL = "ABOVE_NORMAL"
    HIGH = "HIGH"
    HIGHEST = "HIGHEST"


class OutboxStatus(StrEnum):
    """``downlink_outbox.status``; statuses only move forward (see :mod:`ingestd.outbox.sql`)."""

    PENDING = "pending"
    PUSHING = "pushing"
    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    FAILED = "failed"
    INVALIDATED = "invalidated"
    DROPPED = "dropped"


class Operation(StrEnum):
    """``downlink_outbox.operation``: TTS's ``down/push`` or ``down/replace``."""

    PUSH = "push"
    REPLACE = "replace"


class DownlinkKind(StrEnum):
    """``downlink_events.kind``: which ``as.down.data.*`` lifecycle event a row records."""

    RECEIVE = "receive"
    FORWARD = "forward"
    SENT = "sent"
    ACK = "ack"
    NACK = "nack"
    FAILED = "failed"
    QUEUE_INVALIDATED = "queue_invalidated"
    DROP = "drop"


TX_PRIORITIES: tuple[str, ...] = tuple(Priority)


class JsonText(str):
    """A JSON column's value already written out as compact JSON text: stored as it is.

    :class:`~ingestd.batch.BatchBuilder` writes the per-event JSON columns out this way as
    it adds an event, so that a batch holds text and each event's tree of decoded dicts is
    freed at once, while it is still in the CPU's cache, not thousands of events later with
    its batch. A distinct type, since a plain string is a JSON value of its own.
    """

    __slots__ = ()


def json_text(value: Any) -> JsonText | None:
    """``value`` (decoded JSON, or None) as :class:`JsonText`."""
    if value is None:
        return None
    try:
        return JsonText(orjson.dumps(value).decode())
    except TypeError:  # nested deeper than orjson writes (254 levels; it reads 1024)
        return JsonText(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def raw_text(value: Any) -> str:
    """``value`` (an event, a row) as JSON for ``rejected_events.raw``; never raises.

    :class:`JsonText` is written as the JSON it holds. What no JSON writer can write (an
    integer past 64 bits, nesting past Python's recursion limit) keeps, for an object,
    what identifies an event.
    """
    try:
        return orjson.dumps(value, default=_raw_default, option=_RAW_OPTIONS).decode()
    except Exception:  # e.g. nested too deep for orjson, or an integer past 64 bits
        pass
    try:
        return json.dumps(value, default=str)
    except Exception:  # deeper than Python recurses
        pass
    if type(value) is dict:
        return json.dumps(
            {k: str(value.get(k)) for k in ("unique_id", "name", "time")}
            | {"raw": "the event is nested too deep to write out"}
        )
    return f"<unrepresentable {type(value).__name__}>"


_RAW_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS


def _raw_default(value: Any) -> Any:
    return orjson.Fragment(str.__str__(value)) if type(value) is JsonText else str(value)


# The rows that flow through the pipeline, one TypedDict per table, keyed exactly by the
# columns in ingestd.schema (tests/unit/test_models.py holds the two in step). Values from
# TTS JSON are typed as the column stores them; JSON columns hold any JSON value.


class _EventColumns(TypedDict):
    unique_id: str
    stream: str
    name: str
    time: datetime
    application_id: str | None
    device_id: str | None
    dev_eui: str | None
    correlation_ids: list[Any] | JsonText | None
    data: dict[str, Any] | JsonText | None


class EventRow(_EventColumns, total=False):
    """An ``events`` row (:func:`ingestd.normalize.event_row`).

    ``ingested_at`` is set by the store as it writes the batch (not ``NotRequired``: under
    ``from __future__ import annotations`` Python 3.11's TypedDict would not see it).
    """

    ingested_at: datetime


class UplinkRow(TypedDict):
    """An ``uplinks`` row: one per uplink message, its best signal over the gateways."""

    uplink_id: str
    event_unique_id: str | None  # None for a message read from the Storage Integration
    application_id: str
    device_id: str
    dev_eui: str | None
    join_eui: str | None
    dev_addr: str | None
    session_key_id: str | None
    f_port: int
    f_cnt: int
    frm_payload: bytes | None
    decoded_payload: Any
    confirmed: bool
    received_at: datetime
    rssi: float | None
    snr: float | None
    gateway_count: int
    frequency: int | None
    modulation: str | None
    spreading_factor: int | None
    bandwidth: int | None
    coding_rate: str | None
    bit_rate: int | None
    consumed_airtime_s: float | None
    packet_error_rate: float | None
    source: str
    simulated: bool


class UplinkReceptionRow(TypedDict):
    """An ``uplink_receptions`` row: one per gateway that heard an uplink."""

    uplink_id: str
    received_at: datetime
    reception_index: int
    gateway_id: str | None
    gateway_eui: str | None
    rssi: float | None
    channel_rssi: float | None
    snr: float | None
    time: datetime | None
    channel_index: int | None
    latitude: float | None
    longitude: float | None
    altitude: float | None
    source: str


class JoinRow(TypedDict):
    """A ``joins`` row: one per join-accept."""

    event_unique_id: str | None
    application_id: str
    device_id: str
    dev_eui: str | None
    join_eui: str | None
    dev_addr: str | None
    session_key_id: str | None
    received_at: datetime
    source: str


class DownlinkEventRow(TypedDict):
    """A ``downlink_events`` row: one per ``as.down.data.*`` lifecycle event."""

    event_unique_id: str
    kind: str
    application_id: str
    device_id: str
    f_port: int | None
    f_cnt: int | None
    frm_payload: bytes | None
    decoded_payload: Any
    confirmed: bool | None
    priority: str | None
    correlation_ids: list[Any] | None
    outbox_id: int | None
    error: Any
    time: datetime
    source: str


DerivedRow = UplinkRow | UplinkReceptionRow | JoinRow | DownlinkEventRow


class Row(NamedTuple):
    """One row for one table, derived from an event by :func:`ingestd.normalize.normalize`."""

    table: str
    values: DerivedRow


CURSOR_FUTURE_TOLERANCE_S = 300.0
"""A cursor never moves past the wall clock plus this: an event stamped later is stored,
but resuming after it would skip everything up to that time (e.g. ``9999-12-31``)."""

CURSOR_IDS_MAX = 1000
"""At most this many ids are kept for the cursor's time. They only help recognise the
cursor's own events in a replay, which the ``unique_id`` constraint rejects anyway, so a
cursor that dropped some costs duplicate work at worst, never an event."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Cursor:
    """Where a stream stands: the newest event time seen, and the ids seen at that time.

    Reconnects ask for ``after = last_time - overlap``; the ids let the store and the gap
    detector recognise the cursor's own events when they are replayed. At most
    :data:`CURSOR_IDS_MAX` ids are kept (events sharing one timestamp are otherwise
    unbounded).
    """

    last_time: datetime | None = None
    unique_ids_at_last_time: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, kw_only=True, slots=True)
class Gap:
    """A window in which events may have been lost."""

    stream: str
    gap_start: datetime | None
    gap_end: datetime | None
    reason: str
    detail: str | None = None


@dataclass(kw_only=True, slots=True)
class Batch:
    """Events normalized since the last commit, with the cursor that covers them.

    ``items`` keeps each event's own rows together so that a batch the database refuses
    can be retried event by event (the bad one goes to ``rejected_events``).
    """

    stream: str
    items: list[tuple[EventRow, list[Row]]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    cursor: Cursor | None = None  # None: leave the stored cursor as it is
    duplicates_in_batch: int = 0
    future_events: int = 0  # stored, but stamped too far ahead to move the cursor
    rejects_not_stored: int = 0  # over the reject limit: counted in a summary row only

    def __len__(self) -> int:
        return len(self.items) + len(self.rejected)

    @property
    def empty(self) -> bool:
        return not (self.items or self.rejected or self.gaps) and self.cursor is None


@dataclass(kw_only=True, slots=True)
class CommitResult:
    """What one commit stored, for logs, metrics and ``ingestd import``'s summary."""

    events: int = 0
    duplicates: int = 0
    rejected: int = 0
    gaps: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # derived rows offered, per table
    stored_by_name: dict[str, int] = field(default_factory=dict)  # new events, per name

    def add(self, other: CommitResult) -> None:
        self.events += other.events
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.gaps += other.gaps
        for table, n in other.rows.items():
            self.rows[table] = self.rows.get(table, 0) + n
        for name, n in other.stored_by_name.items():
            self.stored_by_name[name] = self.stored_by_name.get(name, 0) + n
