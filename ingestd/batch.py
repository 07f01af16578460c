"""Frames → normalized rows → batches: the per-event hot path, shared by streams and imports.

Per event the work is parse → normalize → append; all I/O happens per batch in
:meth:`ingestd.store.Store.commit_batch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import structlog

from ingestd.errors import MalformedEvent
from ingestd.framing import ErrorFrame, TtsErrorInfo, parse_frame
from ingestd.models import (
    CURSOR_FUTURE_TOLERANCE_S,
    CURSOR_IDS_MAX,
    Batch,
    Cursor,
    EventRow,
    Gap,
    Row,
    json_text,
    raw_text,
)
from ingestd.normalize import event_row, normalize, parse_time, valid_unique_id

log = structlog.get_logger()

STREAM_START = "events.stream.start"
RAW_KEEP_CHARS = 1_000_000  # a rejected frame larger than this is truncated in rejected_events
# After a stream start that found the cursor older than the entity TTL, this long without any
# replayed event means the server has no history left for the stream (see expect_replay_from).
EXPIRY_GRACE_S = 2.0
ERROR_KEEP_CHARS = 2000
# Frames that are not even events (not JSON, not a frame, no unique_id) are limited, so a
# flood of junk (a gzip bomb of newlines, a proxy's page) cannot become millions of rows:
# per connection, and per window on a long-lived connection, this many are stored; the rest
# are counted in one summary row per batch. Rejected *events* (a valid unique_id) are all
# stored, once per unique_id: they are real events that a fix can reprocess, e.g. after TTS
# changed a field's type, and a limit would lose them.
REJECT_ROWS_MAX = 100
REJECT_WINDOW_S = 60.0
REJECT_FULL_RAW_ROWS = 10  # junk frames kept up to RAW_KEEP_CHARS per window; later ones...
RAW_KEEP_CHARS_FLOOD = 4096  # ...keep this much, enough to see what the junk was
# This many junk frames on one connection, outnumbering its events: reject_flood is set.
REJECT_FLOOD_FRAMES = 100
REJECTED_IDS_MAX = 10_000  # unique_ids of rejected events remembered to store each once
# The cursor never moves to a time before this (resuming needs cursor - overlap).
CURSOR_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)


class BatchBuilder:
    """Accumulates one stream's events into a :class:`Batch` and tracks its cursor.

    The cursor never moves backwards: an out-of-order event older than the cursor is
    stored but leaves the cursor alone. Nor does it move past the wall clock plus
    :data:`CURSOR_FUTURE_TOLERANCE_S`: such an event is stored and counted in
    ``Batch.future_events`` (and logged once per batch). Events with the same ``unique_id``
    in one batch are kept once.

    Nothing a frame holds can make :meth:`add_frame` or :meth:`add_event` raise: input
    that cannot be used becomes a ``rejected_events`` row (see :data:`REJECT_ROWS_MAX` for
    the limit on junk) and the stream goes on. The reader calls :meth:`connection_started`
    on every connection and checks :attr:`reject_flood` after each frame.
    """

    def __init__(
        self,
        stream: str,
        cursor: Cursor,
        *,
        reject_rows_max: int | None = REJECT_ROWS_MAX,
        clock: Callable[[], float] = time.time,
        source: str = "stream",
    ) -> None:
        self.stream = stream
        self.source = source  # the derived rows' ``source``: stream or import
        self._last_time = cursor.last_time
        ids = cursor.unique_ids_at_last_time
        if len(ids) > CURSOR_IDS_MAX:
            ids = frozenset(islice(sorted(ids), CURSOR_IDS_MAX))
        self._ids_at_last = set(ids)
        self._cursor_moved = False
        self._clock = clock
        self._horizon = self._new_horizon()
        self._new_batch()
        self.stream_start_time: datetime | None = None  # of the last events.stream.start seen
        # Set on a resume: the first event must reach back to this cursor, else the
        # server's store lost what lay between (see expect_replay_from).
        self._replay_check: Cursor | None = None
        self._replay_earliest: datetime | None = None  # earliest event seen while checking
        # A check to arm at the stream start of the connection with this request id (its
        # frames were spooled behind older ones): (cursor, request id, entity TTL).
        self._replay_pending: tuple[Cursor, str | None, float] | None = None
        self._resume_from: Cursor | None = None  # judged against the entity TTL at stream start
        self._entity_ttl_s = 0.0
        self._expired_at: datetime | None = None  # the stream start that found it too old
        self._expired_seen = 0.0  # monotonic time of that stream start
        # Events at or before the last stream start (replayed history) since then, counted
        # until the consumer calls end_replay_count(): did the replay fill TTS's buffer?
        self._history_until: datetime | None = None
        self.replayed = 0
        # Set (to the entity TTL) while a spool left by a crash is drained: each spooled
        # stream start re-arms the replay check from the cursor at that point, which is where
        # that connection resumed, so a gap lost with the crash is found again.
        self.recovering: float | None = None
        # True when a stream-start frame gave a new stream its first cursor: save it at once.
        self.first_cursor_pending = False
        self.rejected_total = 0  # frames and events rejected so far (a frame was valid if not)
        # Rejects (see REJECT_ROWS_MAX): None means store every one (import).
        self._reject_rows_max = reject_rows_max
        self._rejected_ids: set[str] = set()
        self._crash_types: set[str] = set()  # unexpected exception types already logged
        self._events_total = 0  # valid events in the batches taken so far
        self.connection_started()

    def _new_batch(self) -> None:
        self._batch = Batch(stream=self.stream)
        self._seen: set[str] = set()
        self.names: dict[str, int] = {}  # events received in this batch, per name
        self._sparse_count = 0
        self._sparse_first: datetime | None = None
        self._sparse_last: datetime | None = None
        self._future_last: datetime | None = None
        self._unstored_sample: tuple[str, str] | None = None  # (raw, error) of one unstored

    def _new_horizon(self) -> datetime:
        return datetime.fromtimestamp(self._clock() + CURSOR_FUTURE_TOLERANCE_S, UTC)

    @property
    def cursor(self) -> Cursor:
        """The cursor covering everything added so far."""
        return Cursor(
            last_time=self._last_time, unique_ids_at_last_time=frozenset(self._ids_at_last)
        )

    def __len__(self) -> int:
        return len(self._batch)

    # -- adding input ------------------------------------------------------------------------

    def add_frame(self, payload: bytes) -> TtsErrorInfo | None:
        """Parse and add one frame; return the error if the frame is a TTS error."""
        try:
            frame = parse_frame(payload)
        except Exception as exc:  # whatever the frame is, the stream goes on
            self._reject_failure(payload, exc, None)
            return None
        if isinstance(frame, ErrorFrame):
            return frame.error
        self.add_event(frame.event, payload)
        return None

    def add_event(self, event: dict[str, Any], payload: bytes | None = None) -> None:
        """Normalize and add one event (hot path); unusable input becomes a reject."""
        try:
            if event.get("name") == STREAM_START:
                self._on_stream_start(event)
                return
            ev_row = event_row(event, stream=self.stream)
            rows = normalize(event, self.source)
            _write_json_out(ev_row, rows)
        except Exception as exc:  # one bad event must never stop the stream
            self._reject_failure(payload, exc, event)
            return
        uid = ev_row["unique_id"]
        name = ev_row["name"]
        self.names[name] = self.names.get(name, 0) + 1
        if uid in self._seen:
            self._batch.duplicates_in_batch += 1
            if self._replay_check is not None:  # a resume in this batch replayed it
                self._check_replay_reach(ev_row["time"], uid)
            return
        self._seen.add(uid)
        self._batch.items.append((ev_row, rows))
        t = ev_row["time"]
        if t > self._horizon and self._beyond_horizon(t):
            return  # stored, but it neither moves the cursor nor counts as replay evidence
        if self._history_until is not None and t <= self._history_until:
            self.replayed += 1
        if self._replay_check is not None:
            self._check_replay_reach(t, uid)
        if ev_row["data"] is None and ev_row["correlation_ids"] is None:
            self._note_sparse(t)
        if self._last_time is None:
            if t >= CURSOR_MIN_TIME:
                self._last_time = t
                self._ids_at_last = {uid}
                self._cursor_moved = True
        elif t > self._last_time:
            self._last_time = t
            self._ids_at_last = {uid}
            self._cursor_moved = True
        elif (
            t == self._last_time
            and uid not in self._ids_at_last
            and len(self._ids_at_last) < CURSOR_IDS_MAX
        ):
            self._ids_at_last.add(uid)
            self._cursor_moved = True

    def _beyond_horizon(self, t: datetime) -> bool:
        """True (and counted) when ``t`` is past the wall clock plus the tolerance."""
        self._horizon = self._new_horizon()  # the clock moved on since it was last read
        if t <= self._horizon:
            return False
        self._batch.future_events += 1
        if self._future_last is None or t > self._future_last:
            self._future_last = t
        return True

    def _on_stream_start(self, event: dict[str, Any]) -> None:
        try:
            start = parse_time(event["time"])
        except (KeyError, MalformedEvent) as exc:
            raise MalformedEvent(f"events.stream.start without a valid time: {exc}") from None
        self.stream_start_time = start
        self._history_until, self.replayed = start, 0
        pending = self._replay_pending
        if pending is not None and (pending[1] is None or _started_by(event, pending[1])):
            self._replay_pending = None
            self._arm_replay_check(pending[0], pending[2])
        if self.recovering is not None:
            self._arm_replay_check(self.cursor, self.recovering)
        self._judge_entity_ttl(start)
        if self._last_time is None and CURSOR_MIN_TIME <= start <= self._new_horizon():
            # A new stream's first connection: start the cursor at the server's "now", so a
            # crash before the first event still resumes from here and loses nothing.
            self._last_time = start
            self._ids_at_last = set()
            self._cursor_moved = True
            self.first_cursor_pending = True

    # -- connections and the replay check ----------------------------------------------------

    def connection_started(self) -> None:
        """A new connection: its reject limit and :attr:`reject_flood` start from zero."""
        self._conn_junk = 0  # junk frames on this connection
        self._conn_events_base = self._events_seen()
        self._window_junk = 0  # junk frames stored in this window
        self._window_started = self._clock()

    def _events_seen(self) -> int:
        return self._events_total + len(self._batch.items) + self._batch.duplicates_in_batch

    @property
    def reject_flood(self) -> bool:
        """True when this connection brings mostly junk: the reader should reconnect.

        Set once :data:`REJECT_FLOOD_FRAMES` frames that are not events arrived on this
        connection and they outnumber its valid events. Rejected events (valid ids) do not
        count: a reconnect would only replay them.
        """
        junk = self._conn_junk
        return junk >= REJECT_FLOOD_FRAMES and junk > self._events_seen() - self._conn_events_base

    def expect_replay_from(
        self,
        cursor: Cursor,
        *,
        entity_ttl_s: float = 0.0,
        request_id: str | None = None,
        deferred: bool = False,
    ) -> None:
        """After a resume from ``cursor``, check that the replay reaches back to it.

        The request asks for events after ``cursor - overlap``, so a store that still
        holds the cursor's own events replays one at or before the cursor. When no event up
        to the next batch boundary reaches back (all later than the cursor, none of its own),
        the store no longer had what lay between: that window is a gap. A cursor that came from a
        stream-start time (no event ids) gives no such evidence, and is not checked.

        With ``entity_ttl_s`` (TTS's ``entity-ttl``), the stream start is compared with the
        cursor: TTS forgets an entity's whole history that long after its last event, so a
        cursor older than that may have nothing left to reach back to, and nothing at all
        arrives. Then the check also runs for a cursor without ids, and when no replayed
        event has arrived :data:`EXPIRY_GRACE_S` after the stream start, the window from
        the cursor to the stream start is a ``history_expired`` gap (a quiet entity makes
        it conservative: backfill then finds nothing in it). A replay that reaches back
        proves the history intact: no gap.

        ``deferred``: arm the check only at the stream start of the connection with
        ``request_id`` (its frames come after older spooled ones, which must not count).
        """
        self._replay_pending = None
        if deferred:
            self._replay_pending = (cursor, request_id, entity_ttl_s)
            return
        self._arm_replay_check(cursor, entity_ttl_s)

    def _arm_replay_check(self, cursor: Cursor, entity_ttl_s: float) -> None:
        if self._replay_check is not None and self._replay_earliest is not None:
            self._settle_replay_check()  # the last connection ended before a batch boundary
        self._replay_check = cursor if cursor.last_time and cursor.unique_ids_at_last_time else None
        self._replay_earliest = None
        self._expired_at = None
        self._resume_from = cursor if cursor.last_time and entity_ttl_s > 0 else None
        self._entity_ttl_s = entity_ttl_s

    def _judge_entity_ttl(self, start: datetime) -> None:
        resume, self._resume_from = self._resume_from, None
        if resume is None or resume.last_time is None:
            return
        if (start - resume.last_time).total_seconds() > self._entity_ttl_s:
            self._replay_check = resume
            self._replay_earliest = None
            self._expired_at = start
            self._expired_seen = time.monotonic()

    def end_replay_count(self) -> None:
        """Stop counting replayed events (``replayed``) until the next stream start."""
        self._history_until = None

    def _check_replay_reach(self, t: datetime, uid: str) -> None:
        check = self._replay_check
        assert check is not None
        assert check.last_time is not None
        if t <= check.last_time or uid in check.unique_ids_at_last_time:
            self._replay_check = None  # the replay reached back: nothing was lost
            self._expired_at = None
        elif self._replay_earliest is None or t < self._replay_earliest:
            self._replay_earliest = t

    def _settle_replay_check(self) -> None:
        # Decided at the first batch boundary after the resume, not on the first event
        # alone: events may arrive out of order, so a later one can come first.
        check, self._replay_check = self._replay_check, None
        earliest, self._replay_earliest = self._replay_earliest, None
        expired, self._expired_at = self._expired_at, None
        if check is None:
            return
        if earliest is None:
            if expired is not None and time.monotonic() - self._expired_seen >= EXPIRY_GRACE_S:
                earliest = expired  # nothing replayed at all: the history is gone
            else:
                self._replay_check, self._expired_at = check, expired  # keep waiting
                return
        if expired is not None:
            reason = "history_expired"
            detail = (
                "the cursor was older than the entity TTL: the server no longer held "
                "the stream's history"
            )
        else:
            reason = "replay_truncated"
            detail = "the server's event store no longer held the events after the cursor"
        self.add_gap(
            Gap(
                stream=self.stream,
                gap_start=check.last_time,
                gap_end=earliest,
                reason=reason,
                detail=detail,
            )
        )

    def _note_sparse(self, t: datetime) -> None:
        # Replayed after the store's payload TTL: name, time and ids only, no data.
        self._sparse_count += 1
        if self._sparse_first is None or t < self._sparse_first:
            self._sparse_first = t
        if self._sparse_last is None or t > self._sparse_last:
            self._sparse_last = t

    # -- rejects -----------------------------------------------------------------------------

    def _reject_failure(self, payload: bytes | None, exc: Exception, event: Any) -> None:
        if isinstance(exc, MalformedEvent):
            error = str(exc)
        else:
            # A bug or a shape nothing checks for: the event is kept, the stream goes on,
            # and the first of each kind is logged with its traceback.
            kind = type(exc).__name__
            error = f"unexpected error reading the event ({kind}: {exc})"
            if kind not in self._crash_types:
                self._crash_types.add(kind)
                log.error("event_reject_unexpected_error", error_type=kind, exc_info=exc)
        self.reject(payload, error, event=event)

    def reject(self, payload: bytes | None, error: str, *, event: Any = None) -> None:
        """Keep input we cannot use in ``rejected_events``; the stream goes on.

        Never raises. A rejected event (one with a valid ``unique_id``) is stored once per
        id; other frames are limited to :data:`REJECT_ROWS_MAX` per connection and window,
        and counted beyond that.
        """
        self.rejected_total += 1
        uid = event.get("unique_id") if type(event) is dict else None
        limit = RAW_KEEP_CHARS
        if valid_unique_id(uid):
            if uid in self._rejected_ids:
                return  # the same event again (a replay): its row is already kept
            if len(self._rejected_ids) >= REJECTED_IDS_MAX:
                self._rejected_ids.clear()
            self._rejected_ids.add(uid)
        elif self._reject_rows_max is not None:
            self._conn_junk += 1
            if self._window_junk >= self._reject_rows_max:
                now = self._clock()
                if now - self._window_started < REJECT_WINDOW_S:
                    self._batch.rejects_not_stored += 1
                    if self._unstored_sample is None:
                        raw = _raw_of(payload, event, RAW_KEEP_CHARS_FLOOD)
                        self._unstored_sample = (raw, error)
                    return
                self._window_junk = 0
                self._window_started = now
            self._window_junk += 1
            if self._window_junk > REJECT_FULL_RAW_ROWS:
                limit = RAW_KEEP_CHARS_FLOOD
        self._batch.rejected.append(
            {
                "stream": self.stream,
                "raw": _raw_of(payload, event, limit),
                "error": error[:ERROR_KEEP_CHARS],
            }
        )

    def add_gap(self, gap: Gap) -> None:
        """Record a window of possible loss with the next commit."""
        self._batch.gaps.append(gap)

    def take(self) -> Batch:
        """The batch so far, with the cursor if it moved; starts a new batch."""
        if self._replay_check is not None:
            self._settle_replay_check()
        if self._sparse_count:
            self.add_gap(
                Gap(
                    stream=self.stream,
                    gap_start=self._sparse_first,
                    gap_end=self._sparse_last,
                    reason="sparse_replay",
                    detail=f"{self._sparse_count} events replayed without data "
                    "(older than the server store's payload TTL)",
                )
            )
        batch = self._batch
        if batch.rejects_not_stored:
            self._summarize_unstored(batch)
        if batch.future_events:
            log.warning(
                "event_time_in_future",
                events=batch.future_events,
                latest=self._future_last,
                tolerance_s=CURSOR_FUTURE_TOLERANCE_S,
                cursor=self._last_time,
            )
        if self._cursor_moved:
            batch.cursor = self.cursor
            self._cursor_moved = False
        self._events_total += len(batch.items) + batch.duplicates_in_batch
        self._new_batch()
        return batch

    def _summarize_unstored(self, batch: Batch) -> None:
        n = batch.rejects_not_stored
        raw, error = self._unstored_sample or ("", "")
        batch.rejected.append(
            {
                "stream": self.stream,
                "raw": raw,
                "error": (
                    f"{n} more frames that are not events were rejected and not stored (over "
                    f"{self._reject_rows_max} per connection and {REJECT_WINDOW_S:g} s); "
                    f"raw is one of them; its error: {error}"
                )[:ERROR_KEEP_CHARS],
            }
        )
        log.warning("rejects_not_stored", frames=n, limit=self._reject_rows_max)


def _write_json_out(ev_row: EventRow, rows: list[Row]) -> None:
    """The JSON columns of the hot tables as :class:`JsonText`, while the event is in cache.

    Then nothing refers to the event's decoded dicts any more and they are freed now, not
    with the batch 2,000 events later: the SQLite import ran 10-35 % faster in its CPU work,
    PostgreSQL's ~3 % (benchmarks/, 2026-12-02). ``downlink_events`` rows stay as decoded:
    the outbox reads them, and they are few.
    """
    try:
        ev_row["data"] = json_text(ev_row["data"])
        ev_row["correlation_ids"] = json_text(ev_row["correlation_ids"])
        if rows and rows[0].table == "uplinks":
            values = rows[0].values
            values["decoded_payload"] = json_text(values["decoded_payload"])  # type: ignore[typeddict-item]
    except RecursionError:  # orjson reads 1024 levels; past ~1000 nothing writes them out
        raise MalformedEvent(
            f"event {ev_row['unique_id']}: a JSON value is nested too deep to store"
        ) from None


def _raw_of(payload: bytes | None, event: Any, limit: int) -> str:
    """The rejected input as text, at most ``limit`` characters; never raises."""
    if payload is not None:
        return payload[: limit * 4].decode("utf-8", errors="replace")[:limit]
    return raw_text(event)[:limit]


def _started_by(event: dict[str, Any], request_id: str) -> bool:
    """True when the stream-start ``event`` began the request ``request_id`` (TTS_WIRE 1.3)."""
    ids = event.get("correlation_ids")
    suffix = ":" + request_id
    return isinstance(ids, list) and any(isinstance(c, str) and c.endswith(suffix) for c in ids)
