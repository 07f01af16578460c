"""One stream's consumer: connect, read frames into batches, commit, reconnect forever.

Per event the work is parse → normalize → append (in :class:`BatchBuilder`); commits run
in a worker thread, one at a time and in order, so the cursor in the database only ever
moves forward. A batch is committed when it reaches ``batch_max_events`` or
``batch_max_delay_s`` after the last commit, whichever comes first; while one batch
commits, the next is being read (a pipeline of depth one).

When a batch is full while the previous commit still runs (a locked table, a busy SQLite
file, an outage), the reader does not wait: TTS would drop what it cannot send. It appends
the frames to the stream's durable spool (:mod:`ingestd.spool`) and keeps reading, after
first spooling the frames of the two batches not yet stored, so the spool continues
exactly where the committed cursor ends. A drainer feeds the spooled frames through the
same builder, in order, and commits them; once it has caught up, the reader goes back to
the direct path. Every frame after the first spooled one goes through the spool until
then, so events commit in arrival order. A spool left by a crash is drained before the
stream connects, so the resume starts after the spooled events. When the spool is full
the stream is closed; once the database has taken everything spooled, a ``spool_full`` gap
from the spool's end is recorded and the stream resumes from there.

A connection that ends while the drainer is behind reconnects at once, without waiting for
the database: it resumes after the newest event spooled (kept in memory as frames are
spooled), and its frames keep going to the spool until the drainer has caught up.

TTS's per-stream buffer holds ``clamp(tail, 8, 1024)`` events, as many as a replay may
bring; a replay that fills it makes TTS drop the live events published while it drains,
and nothing on the wire says so. So when the replayed events of a connection (event time
at or before its stream start) reach that size, the consumer reconnects once they are
read, from the new cursor with a short overlap: the store replays what the buffer dropped
(or, when it holds too little, the resume records a ``replay_truncated`` gap).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import sqlalchemy as sa
import structlog

from ingestd import metrics, tts
from ingestd.aio import cancel_and_wait, sleep_or_stop, wait_any
from ingestd.batch import BatchBuilder
from ingestd.config import DatabaseSettings, StreamSettings
from ingestd.errors import (
    AuthRejected,
    PermanentError,
    RateLimited,
    RequestRejected,
    SpoolUnavailable,
    StoreUnavailable,
    StreamDisconnected,
    StreamError,
    TransientError,
    TtsError,
)
from ingestd.framing import ErrorFrame, parse_frame
from ingestd.leader import StreamLeadership
from ingestd.models import Batch, Cursor, Gap
from ingestd.normalize import parse_time
from ingestd.retry import Backoff
from ingestd.spool import MAX_BYTES_DEFAULT, Position, Spool, stream_dir
from ingestd.store import PreparedRows, Store
from ingestd.stream import EventStream, OpenStream

log = structlog.get_logger()

STORE_RETRY = Backoff(base_s=0.5, factor=2.0, max_s=30.0)
# After a connection that brought nothing past the cursor, the next one asks for a quarter
# of the overlap (down to this floor): a replay window holding more events than the
# connection survives would otherwise be asked for again and again.
MIN_OVERLAP_S = 0.001
LEADER_RETRY_S = 1.0  # a standby tries to take over (and reads the leader's state) this often
LEADER_CHECK_S = 5.0  # the leader checks its lock's session this often
OVERLAP_SHRINK = 4.0
SHUTDOWN_COMMIT_ATTEMPTS = 3
AUTH_ERROR_CODES = {7, 16}  # PermissionDenied, Unauthenticated: an error frame about the key
# A spool is a backlog, and its events are late already: drained in batches this many times
# batch_max_events, so that each commit's fixed cost and the gap between two commits (the
# next batch's conversion, the spool ack, the task hand-offs) are paid less often.
DRAIN_BATCH_FACTOR = 4
# Batches taken and not yet committed: the one committing and one behind it, whose rows
# are converted on the loop's thread meanwhile (the commit thread only sends and waits).
IN_FLIGHT = 2
SETTLE_POLL_S = 0.05  # after a full spool: how often to look whether everything is committed
RESULT_FRAME = b'{"result":'  # how every TTS event frame begins; anything else is parsed
# Connections that end so, with nothing past the cursor, were no progress for /healthz; the
# network's own ends (idle timeout, a close, a transport error) are a quiet stream's life.
NO_PROGRESS = frozenset({"no_frame", "bad_response", "stream_error", "error", "unexpected"})
# TTS's per-stream buffer: clamp(tail, 8, 1024) events (TTS_WIRE 1.6).
BUFFER_MIN, BUFFER_MAX = 8, 1024
# A replay within this share of the buffer size filled it, or nearly (rejected frames and
# out-of-order delivery make the count short): reconnect to have the store replay the drops.
REFILL_SLACK = 1 / 8
# The overlap of that reconnect: the cursor's ids cover its own time, and what the buffer
# dropped is all later than the replayed history, so a short one keeps the next replay small.
REFILL_OVERLAP_S = 0.05
QUIET_ENDS = frozenset({"server_closed", "idle_timeout", "replay_refill"})  # logged at info
MAX_CURSOR_IDS = 1000  # ids at one time kept for the spool's resume cursor (a bound, item 9)
FUTURE_SLACK_S = 300.0  # a spooled event later than now + this does not move the resume
HTTP_1_1 = "HTTP/1.1"  # long-lived HTTP/1.1 streams get stuck behind proxies (lorawan-stack#6653)


@dataclass(slots=True)
class _Taken:
    """A batch taken from the builder for its commit.

    ``raw`` holds its frames that are not in the spool, to be spooled if the commit stalls;
    ``spool_pos`` is how far into the spool its frames reach (acknowledged once stored).
    """

    raw: list[bytes] = field(default_factory=list)
    spool_pos: Position | None = None
    task: asyncio.Task[None] | None = None  # its commit


@dataclass(kw_only=True)
class StreamState:
    """What the service, ``/healthz`` and the downlink worker need to know about a stream."""

    name: str
    application_id: str
    device_ids: tuple[str, ...]
    connected: bool = False
    connected_since: datetime | None = None
    retrying_since: datetime | None = None
    last_error: str | None = None
    permanent_error: bool = False
    standby: bool = False  # another process leads this stream (PostgreSQL)
    leader_connected: bool = False  # while standby: the leader reports it is connected
    # Progress, for /healthz (ingestd.metrics.stream_health says how each clock is judged):
    following_since: datetime | None = None  # this process began following (a leader term)
    last_frame_at: datetime | None = None  # the last valid frame: an event or a stream start
    last_commit_at: datetime | None = None  # the last batch made durable (database or spool)
    uncommitted_since: datetime | None = None  # the batch being made durable was taken then
    # Traffic rights TTS says the key lacks (ingestd.rights_watch): connected, yet empty.
    rights_missing: tuple[str, ...] = ()

    @property
    def receiving(self) -> bool:
        """True when this stream's events reach the database, from here or from its leader."""
        return self.connected or (self.standby and self.leader_connected)

    def covers(self, application_id: str, device_id: str) -> bool:
        """True when this stream receives ``device_id``'s downlink lifecycle events."""
        return self.application_id == application_id and (
            not self.device_ids or device_id in self.device_ids
        )


class StreamConsumer:
    """Follows one configured stream into the database until ``stop`` is set."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        store: Store,
        client: httpx.AsyncClient,
        batching: DatabaseSettings,
        spool_root: Path | None = None,
        spool_max_bytes: int = MAX_BYTES_DEFAULT,
    ) -> None:
        self.settings = settings
        self.state = StreamState(
            name=settings.name,
            application_id=settings.application_id,
            device_ids=settings.device_ids,
        )
        self._store = store
        self._stream = EventStream(settings, client)
        self._max_events = batching.batch_max_events
        self._max_delay_s = batching.batch_max_delay_s
        self._backoff = Backoff(base_s=settings.reconnect_min_s, max_s=settings.reconnect_max_s)
        self._builder: BatchBuilder | None = None
        # Batches taken for their commits, oldest first (at most IN_FLIGHT): each converts its
        # rows at once, then commits when the one before it has. Only _start_flush adds one.
        self._in_flight: list[_Taken] = []
        self._warnings = tts.WarningLog()  # each X-Warning once per stream
        self._warned_http1 = False
        self._stopping = False
        self._halt = asyncio.Event()  # set when following stops (shutdown or leadership lost)
        self._overlap_s = settings.overlap_s
        self._refill = False  # the next connection resumes after a replay that filled the buffer
        tail = settings.tail
        self._buffer_size = min(max(tail, BUFFER_MIN), BUFFER_MAX)
        # Replayed events that show the buffer was full; a tail of 0 asks for no replay.
        self._refill_at = self._buffer_size - int(self._buffer_size * REFILL_SLACK) if tail else 0
        self.connected_event = asyncio.Event()  # set on every successful (re)connect
        # The spool (None: disabled). Opened when first needed, or at start if it holds frames.
        self._spool_dir = None if spool_root is None else stream_dir(spool_root, settings.name)
        self._spool_max_bytes = spool_max_bytes
        self._spool: Spool | None = None
        self._spooling = False  # True: every frame read goes to the spool
        self._spool_buffer: list[bytes] = []  # read while spooling, not yet appended
        self._spool_lock = asyncio.Lock()  # appends in arrival order
        self._appending: asyncio.Future[tuple[list[Position], Cursor | None]] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._spool_full = False  # the stream was closed: the spool took no more
        # The newest event in the spool while the drainer is behind (the resume point);
        # None: unknown (a spool left by a crash), so a reconnect waits for the drainer.
        self._spool_cursor: Cursor | None = None
        self._raw: list[bytes] = []  # frames in the builder's batch that are not in the spool
        self._batch_spool_pos: Position | None = None  # how far into the spool that batch reaches
        self._failed: BaseException | None = None  # a batch that could not be stored
        self._failure = asyncio.Event()
        self._hold = False  # a batch was given up at shutdown: no later one may commit
        self._state_pending: tuple[datetime | None, str | None] | None = None
        self._state_saver: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``; then commit what was read, with its cursor.

        On PostgreSQL the stream is followed only while this process holds its leadership
        lock (:mod:`ingestd.leader`); otherwise it stands by and tries again.
        """
        name = self.settings.name
        with structlog.contextvars.bound_contextvars(
            stream=name, application_id=self.settings.application_id
        ):
            leadership = StreamLeadership(self._store.engine, name)
            try:
                while await self._become_leader(leadership, stop):
                    halt = asyncio.Event()  # stop, or leadership lost
                    watcher = asyncio.create_task(self._watch_leadership(leadership, stop, halt))
                    try:
                        await self._follow(halt)
                    finally:
                        await cancel_and_wait([watcher])
                    if stop.is_set():
                        break
            finally:
                await asyncio.shield(asyncio.to_thread(leadership.release))

    async def _follow(self, halt: asyncio.Event) -> None:
        name = self.settings.name
        self._stopping = False
        self._halt = halt
        self._hold = False
        cursor = await asyncio.to_thread(self._store.load_cursor, name)
        self._builder = BatchBuilder(name, cursor)
        self._raw, self._batch_spool_pos = [], None
        self._spool_cursor = None
        if self._spool_dir is not None and self._spool_dir.is_dir():
            await self._open_spool()  # a spool left by the last run: drain it first
        spooled = self._spool.frames if self._spool is not None else 0
        log.info("stream_starting", cursor=cursor.last_time, spooled_frames=spooled)
        ticker = asyncio.create_task(self._flush_on_timer(halt), name=f"flush:{name}")
        main = asyncio.create_task(self._drain_then_connect(halt), name=f"read:{name}")
        try:
            await wait_any(main, self._failure.wait())
            if self._failed is not None:
                raise self._failed  # the stream task fails loudly: task_failed
            main.result()
        finally:
            self._stopping = True
            await cancel_and_wait([ticker, main, *([self._drainer] if self._drainer else [])])
            await asyncio.shield(self._stop_spooling())
            # Commit the batch in flight with its cursor even if we are being cancelled.
            await asyncio.shield(self._flush_now())
            await asyncio.shield(self._close_spool())
            self._set_disconnected(None)
            self._state_pending = None  # this is the last word
            await asyncio.shield(self._save_state(None, None))  # status: not connected
            log.info("stream_stopped", cursor=self._builder.cursor.last_time)

    async def _drain_then_connect(self, halt: asyncio.Event) -> None:
        if self._spool is not None and not self._spool.empty:
            log.info("spool_draining", frames=self._spool.frames, bytes=self._spool.bytes)
            self._spooling = True
            # The gaps its connections found died with the process: find them again.
            self._builder_or_fail().recovering = self.settings.entity_ttl_s
            self._start_drainer()
        await self._connect_forever(halt)

    async def _become_leader(self, leadership: StreamLeadership, stop: asyncio.Event) -> bool:
        """Wait until this process leads the stream; False when stopping first."""
        announced = False
        while not stop.is_set():
            try:
                if await asyncio.to_thread(leadership.try_acquire):
                    if leadership.needed:
                        log.info("stream_leader")
                    self.state.standby = False
                    self.state.leader_connected = False
                    return True
            except sa.exc.DBAPIError as exc:
                log.warning("stream_leadership_unknown", error=type(exc.orig).__name__)
            if not announced:
                log.info("stream_standby", retry_in_s=LEADER_RETRY_S)
                announced = True
            self.state.standby = True
            try:  # the leader's connection state, for the downlink gate of this process
                name = self.settings.name
                self.state.leader_connected = await asyncio.to_thread(
                    self._store.stream_connected, name
                )
            except StoreUnavailable:
                self.state.leader_connected = False
            await sleep_or_stop(LEADER_RETRY_S, stop)
        return False

    async def _watch_leadership(
        self, leadership: StreamLeadership, stop: asyncio.Event, halt: asyncio.Event
    ) -> None:
        """Set ``halt`` on stop, or when the lock's database session is gone."""
        try:
            while not await sleep_or_stop(LEADER_CHECK_S if leadership.needed else 3600, stop):
                if not await asyncio.to_thread(leadership.still_held):
                    log.warning("stream_leadership_lost")
                    return
        finally:
            halt.set()

    async def _connect_forever(self, stop: asyncio.Event) -> None:
        attempt = 0
        self.state.following_since = datetime.now(UTC)
        while not stop.is_set():
            if not await self._settle_spool(stop):
                return
            resume = self._resume_cursor()
            opened_at = resume.last_time
            overlap_s = self._overlap_s
            if self._refill:
                self._refill = False
                overlap_s = min(overlap_s, REFILL_OVERLAP_S)
            was_open = False
            frame_at_open = self.state.last_frame_at
            if self.state.retrying_since is None:  # the retry clock starts with the attempt
                self.state.retrying_since = datetime.now(UTC)
            try:
                async with self._stream.open(resume, overlap_s=overlap_s, stop=stop) as conn:
                    attempt = 0
                    was_open = True
                    self._on_connected(conn)
                    reader = asyncio.create_task(self._read(conn, opened_at))
                    await wait_any(reader, stop.wait())
                    if stop.is_set():
                        return  # wait_any cancelled the reader between two frames
                    reader.result()  # re-raise the reader's error, if any
                    raise StreamDisconnected("the server ended the stream", reason="server_closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop's top: classify, log, back off
                if stop.is_set():
                    return  # e.g. a connect cut short by the stop
                attempt += 1
                delay, reason = self._delay_for(exc, attempt)
                if reason == "replay_refill":  # progress, not a failure: resume at once
                    attempt, delay = 0, 0.0
                if was_open and not self._adapt_overlap(opened_at) and reason in NO_PROGRESS:
                    # Its stream start (and any replayed duplicates) was no progress: a
                    # stream wedged on one event must not look alive on /healthz.
                    self.state.last_frame_at = frame_at_open
                metrics.RECONNECTS.labels(self.settings.name, reason).inc()
                self._set_disconnected(_describe(exc))
                if await sleep_or_stop(delay, stop):
                    return

    def _adapt_overlap(self, opened_at: datetime | None) -> bool:
        """Adapt the next overlap to the connection that ended; True if it made progress."""
        now_at = self._resume_cursor().last_time
        if opened_at is None or (now_at is not None and now_at > opened_at):
            self._overlap_s = self.settings.overlap_s  # progress: back to the full overlap
            return True
        self._overlap_s = max(self._overlap_s / OVERLAP_SHRINK, MIN_OVERLAP_S)
        return False

    def _delay_for(self, exc: Exception, attempt: int) -> tuple[float, str]:
        s = self.settings
        kind, reason = classify_disconnect(exc)
        if kind == "rate_limited":
            assert isinstance(exc, RateLimited)
            log.warning("stream_rate_limited", retry_after_s=exc.retry_after_s)
            return exc.retry_after_s, reason
        if kind == "refused":
            # One clear line naming the stream and the TTS error (a bad key, missing rights,
            # or a request TTS refuses such as an unknown event name); then wait long, not
            # a hot loop.
            assert isinstance(exc, TtsError)
            log.error(
                "stream_auth_rejected" if reason == "auth" else "stream_request_rejected",
                stream=s.name,
                error_name=exc.error_name,
                error=str(exc),
                retry_in_s=s.auth_retry_s,
            )
            self.state.permanent_error = True
            return s.auth_retry_s, reason
        delay = self._backoff.delay_s(attempt)
        if reason == "unexpected":
            log.exception("stream_unexpected_error")
        level = log.info if reason in QUIET_ENDS else log.warning
        level(
            "stream_disconnected", reason=reason, error=_describe(exc), retry_in_s=round(delay, 2)
        )
        return delay, reason

    def _on_connected(self, conn: OpenStream) -> None:
        builder = self._builder_or_fail()
        builder.connection_started()  # reject limits and the flood check are per connection
        now = datetime.now(UTC)
        self.state.connected = True
        self.state.connected_since = now
        self.state.retrying_since = None
        self.state.permanent_error = False
        metrics.STREAM_CONNECTED.labels(self.settings.name).set(1)
        self._warnings.log(conn.warnings)
        cursor = self._resume_cursor()
        if conn.store_disabled:
            if cursor.last_time is not None:
                builder.add_gap(
                    Gap(
                        stream=self.settings.name,
                        gap_start=cursor.last_time,
                        gap_end=now,
                        reason="store_disabled",
                        detail="TTS has no event store: nothing before the connection is replayed",
                    )
                )
        else:
            builder.expect_replay_from(
                cursor,
                entity_ttl_s=self.settings.entity_ttl_s,
                request_id=conn.request_id,
                deferred=self._spooling,  # spooled frames come first: arm at its stream start
            )
        log.info(
            "stream_connected",
            after=conn.after,
            request_id=conn.request_id,
            store_disabled=conn.store_disabled,
            http_version=conn.http_version,
        )
        if conn.http_version == HTTP_1_1 and not self._warned_http1:  # once per stream
            self._warned_http1 = True
            log.warning(
                "stream_http1",
                http_version=conn.http_version,
                detail="long-lived HTTP/1.1 streams can stall behind proxies (lorawan-stack#6653):"
                " use https (TTS offers h2), or tts.http2_prior_knowledge for h2c on http://",
            )
        self.connected_event.set()
        self._queue_state(now, None)

    def _set_disconnected(self, error: str | None) -> None:
        was = self.state.connected
        self.state.connected = False
        if self.state.retrying_since is None:
            self.state.retrying_since = datetime.now(UTC)
        if error is not None:
            self.state.last_error = error
        metrics.STREAM_CONNECTED.labels(self.settings.name).set(0)
        if (was or error) and not self._stopping:
            self._queue_state(None, error)

    def _queue_state(self, connected_since: datetime | None, error: str | None) -> None:
        """Save the connection state in the background, one write at a time per stream.

        States queued while a write waits (a locked SQLite database) are merged into the
        next: a write per reconnect would each hold a worker thread until the database's
        busy timeout, and the spool, which rides out exactly such a stall, needs them.
        """
        pending = self._state_pending
        if pending is not None and error is None:
            error = pending[1]  # set_stream_state keeps the last error when given none
        self._state_pending = (connected_since, error)
        if self._state_saver is None or self._state_saver.done():
            self._state_saver = asyncio.ensure_future(self._save_queued_states())
            _background.add(self._state_saver)
            self._state_saver.add_done_callback(_background.discard)

    async def _save_queued_states(self) -> None:
        while self._state_pending is not None:
            (connected_since, error), self._state_pending = self._state_pending, None
            await self._save_state(connected_since, error)

    async def _save_state(self, connected_since: datetime | None, error: str | None) -> None:
        try:
            await asyncio.to_thread(
                self._store.set_stream_state,
                self.settings.name,
                connected_since=connected_since,
                last_error=error,
            )
        except StoreUnavailable as exc:
            log.warning("stream_state_not_saved", error=str(exc))

    # -- reading and committing --------------------------------------------------------------

    async def _read(self, conn: OpenStream, opened_at: datetime | None) -> None:
        builder = self._builder_or_fail()
        max_events = self._max_events
        # After the stream start and as many frames as TTS's buffer holds, judge the replay.
        refill_frame = self._buffer_size + 1 if self._refill_at else 0
        n = 0
        async for payload in conn.frames:
            n += 1
            if self._spooling:
                await self._spool_frame(payload)
                if payload.startswith(RESULT_FRAME):  # judged by the drainer; cheap here
                    self.state.last_frame_at = datetime.now(UTC)
                continue
            if len(builder) >= max_events:  # full, and IN_FLIGHT batches wait already
                if self._flushes_full() and await self._start_spooling(payload):
                    continue
                await self._start_flush()  # without a spool: wait for them, as TTS drops
            rejected = builder.rejected_total
            error = builder.add_frame(payload)
            self._raw.append(payload)
            if error is not None:
                raise _stream_error(error)
            if builder.reject_flood:
                raise StreamDisconnected(
                    "too many rejected frames on this connection", reason="reject_flood"
                )
            if builder.rejected_total == rejected:
                self.state.last_frame_at = datetime.now(UTC)
            if builder.first_cursor_pending:
                builder.first_cursor_pending = False
                await self._start_flush()  # a new stream's first cursor, saved at once
            elif len(builder) >= max_events and not self._flushes_full():
                await self._start_flush()
            if n == refill_frame:
                self._judge_replay(opened_at)

    def _judge_replay(self, opened_at: datetime | None) -> None:
        """Once the buffer's worth of frames is read: did the replay fill TTS's buffer?

        Then the live events published while it drained were dropped: reconnect from the
        new cursor (only after progress, so a replay of duplicates cannot loop).
        """
        builder = self._builder_or_fail()
        replayed = builder.replayed
        builder.end_replay_count()
        if self._spooling or replayed < self._refill_at:
            return  # spooled frames are judged by nobody: a later resume replays them
        now_at = self._resume_cursor().last_time
        if now_at is None or (opened_at is not None and now_at <= opened_at):
            return
        self._refill = True
        log.info("stream_replay_filled_buffer", replayed=replayed, buffer=self._buffer_size)
        raise StreamDisconnected(
            f"the replay ({replayed} events) filled the server's buffer of "
            f"{self._buffer_size}: resuming to replay what it dropped",
            reason="replay_refill",
        )

    def _resume_cursor(self) -> Cursor:
        """Where a connection resumes: after everything read, stored or still spooled."""
        cursor = self._builder_or_fail().cursor
        spooled = self._spool_cursor
        if spooled is None or not self._spooling:
            return cursor
        return _later(cursor, spooled)

    def _commit_running(self) -> bool:
        return bool(self._in_flight)

    def _flushes_full(self) -> bool:
        return len(self._in_flight) >= IN_FLIGHT

    async def _start_flush(self) -> None:
        """Take the current batch and start its commit, behind those in flight.

        Waits while IN_FLIGHT batches are. The batch leaves the builder here, in the
        caller's step, not when its task first runs: until then the reader or drainer would
        still see it full, and wait for (or spool around) a commit that has not begun.
        """
        while len(self._in_flight) >= IN_FLIGHT:
            # wait(), not await: cancelling the reader must never cancel a commit half-way.
            oldest = self._in_flight[0].task
            assert oldest is not None  # set as it is appended
            await asyncio.wait([oldest])
        if self._failed is not None or self._hold:
            return  # its cursor would pass a batch that was not stored
        builder = self._builder_or_fail()
        names = builder.names
        batch = builder.take()
        taken = _Taken(raw=self._raw, spool_pos=self._batch_spool_pos)
        self._raw, self._batch_spool_pos = [], None
        ahead = self._in_flight[-1].task if self._in_flight else None
        taken.task = asyncio.create_task(self._flush(batch, names, taken, ahead))
        taken.task.add_done_callback(_read_result)
        self._in_flight.append(taken)

    async def _flushed(self) -> None:
        """Wait for every commit in flight."""
        tasks = [t.task for t in self._in_flight if t.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _flush_now(self) -> None:
        """Commit what the builder holds and wait for it (at a stop)."""
        if self._builder is None:
            return
        await self._start_flush()
        await self._flushed()

    async def _flush_on_timer(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(self._max_delay_s, stop):
            if self._spooling:
                # The drainer commits full batches until it has caught up (then this timer
                # takes over again); a timed flush in between would commit the part it has
                # read so far, and a commit costs ~2x per event at a quarter of the size.
                continue
            await self._start_flush()

    async def _flush(
        self,
        batch: Batch,
        names: dict[str, int],
        taken: _Taken,
        ahead: asyncio.Task[None] | None,
    ) -> None:
        """Commit ``batch`` once the batch ``ahead`` of it is committed, then ack its spool."""
        try:
            # Converted now, on the loop's thread, while the commit thread sends the batch
            # ahead: a commit thread doing Python work would hold the GIL the parser needs.
            prepared = None if batch.empty else self._store.prepare(batch)
            if ahead is not None:
                await asyncio.wait([ahead])
            if self._failed is not None or self._hold:
                return  # the batch ahead was not stored: this one's cursor would pass it
            if not batch.empty:
                try:
                    stored = await self._commit(batch, names, prepared)
                except Exception as exc:  # not an outage: the batch cannot be stored
                    self._fail(exc, batch)
                    return
                if not stored:
                    self._hold = True
                    return
            await self._ack(taken.spool_pos)
        finally:
            self._in_flight.remove(taken)

    def _fail(self, exc: Exception, batch: Batch) -> None:
        """Stop the stream loudly; the cursor stays before ``batch`` (spooled frames stay)."""
        log.error(
            "batch_not_stored",
            error=_describe(exc),
            events=len(batch),
            cursor=self._builder_or_fail().cursor.last_time,
            exc_info=exc,
        )
        self._failed = exc
        self._failure.set()

    async def _commit(
        self, batch: Batch, names: dict[str, int], prepared: PreparedRows | None
    ) -> bool:
        """Commit ``batch``, retrying outages; False when given up on at shutdown."""
        name = self.settings.name
        attempt = 0
        self.state.uncommitted_since = datetime.now(UTC)
        while True:
            started = asyncio.get_running_loop().time()
            try:
                result = await asyncio.to_thread(self._store.commit_batch, batch, prepared)
                break
            except StoreUnavailable as exc:
                attempt += 1
                if self._stopping and attempt >= SHUTDOWN_COMMIT_ATTEMPTS:
                    # Not lost for good: the cursor did not move, so a restart replays it.
                    log.error("batch_not_committed", error=str(exc), events=len(batch))
                    return False
                delay = STORE_RETRY.delay_s(attempt)
                log.warning("store_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await sleep_or_stop(delay, self._halt)  # a shutdown must not wait 30 s
        elapsed = asyncio.get_running_loop().time() - started
        self.state.last_commit_at = datetime.now(UTC)
        self.state.uncommitted_since = None
        metrics.record_commit(name, batch, result, received=names, elapsed_s=elapsed)
        for gap in batch.gaps:
            log.warning(
                "stream_gap",
                reason=gap.reason,
                gap_start=gap.gap_start,
                gap_end=gap.gap_end,
                detail=gap.detail,
            )
        cursor = batch.cursor
        log.info(
            "batch_committed",
            events=result.events,
            duplicates=result.duplicates,
            rejected=result.rejected,
            gaps=result.gaps,
            rows=result.rows,
            cursor=cursor.last_time if cursor else None,
            commit_ms=round(elapsed * 1000, 1),
        )
        return True

    # -- the spool ---------------------------------------------------------------------------

    async def _open_spool(self) -> Spool | None:
        """The stream's spool, opened (and its torn tail cut) on first use; None if unusable."""
        if self._spool is not None or self._spool_dir is None:
            return self._spool
        spool = Spool(self._spool_dir, max_bytes=self._spool_max_bytes)
        try:
            await asyncio.to_thread(spool.open)
        except (SpoolUnavailable, OSError) as exc:
            log.error("spool_unavailable", error=str(exc), dir=str(self._spool_dir))
            return None
        if spool.corrupt:  # records before the tail failed their check: possibly lost
            self._builder_or_fail().add_gap(
                Gap(
                    stream=self.settings.name,
                    gap_start=self._builder_or_fail().cursor.last_time,
                    gap_end=datetime.now(UTC),
                    reason="spool_corrupt",
                    detail=f"{spool.dropped_bytes} bytes of the local spool failed their check",
                )
            )
        self._spool = spool
        metrics.track_spool(self.settings.name, spool)
        return spool

    async def _start_spooling(self, payload: bytes) -> bool:
        """Switch to the spool; False when there is none (spooling is disabled).

        The frames of the batch being committed and of the one waiting in the builder go
        first: after a crash the spool must continue exactly where the stored cursor ends.
        """
        if self._spool_dir is None:
            return False
        self._spooling = True
        spool = await self._open_spool()
        parts = [t.raw for t in self._in_flight] + [self._raw]  # oldest first
        frames = [f for raw in parts for f in raw] + [payload]
        try:
            if spool is None:
                raise SpoolUnavailable("the spool could not be opened", reason="io")
            async with self._spool_lock:
                ends = await self._append(spool, frames)
        except SpoolUnavailable as exc:
            self._spooling = False
            raise self._spool_refused(exc) from exc
        # Commits may have finished (or begun) meanwhile: find who holds each list now.
        end = 0
        for raw in parts:
            end += len(raw)
            if not raw:
                continue
            if raw is self._raw:
                self._raw, self._batch_spool_pos = [], ends[end - 1]
            for taken in self._in_flight:
                if raw is taken.raw:
                    taken.raw, taken.spool_pos = [], ends[end - 1]
        if len(frames) > 1:
            spool.set_read_position(ends[-2])
        log.warning(
            "spool_started",
            reason="commit_running",
            frames=len(frames),
            spool_frames=spool.frames,
        )
        self._start_drainer()
        return True

    async def _spool_frame(self, payload: bytes) -> None:
        if not payload.startswith(RESULT_FRAME):
            try:
                frame = parse_frame(payload)
            except Exception:  # not ours to judge here: the drainer rejects it
                frame = None
            if isinstance(frame, ErrorFrame):
                await self._append_buffer()
                raise _stream_error(frame.error)
        self._spool_buffer.append(payload)
        if len(self._spool_buffer) >= self._max_events:
            await self._append_buffer()

    async def _append_buffer(self) -> None:
        """Append the frames read while spooling (one write and one fsync per batch)."""
        async with self._spool_lock:
            frames, self._spool_buffer = self._spool_buffer, []
            if not frames or self._spool is None:
                return
            try:
                await self._append(self._spool, frames)
            except SpoolUnavailable as exc:
                raise self._spool_refused(exc) from exc

    async def _append(self, spool: Spool, frames: list[bytes]) -> list[Position]:
        # shield: a cancelled reader must not leave an append half-way; the stop waits for it.
        self._appending = asyncio.ensure_future(asyncio.to_thread(_append_noting, spool, frames))
        ends, newest = await asyncio.shield(self._appending)
        if newest is not None:
            self._spool_cursor = _later(self._spool_cursor, newest)
        # Durable in the spool is progress for /healthz, like a commit.
        self.state.last_commit_at = datetime.now(UTC)
        self.state.uncommitted_since = None
        return ends

    def _spool_refused(self, exc: SpoolUnavailable) -> StreamDisconnected:
        """Close the stream: what TTS sends now would be dropped. The gap follows later."""
        self._spool_full = True
        spool = self._spool
        log.error(
            "spool_full" if exc.reason == "full" else "spool_write_failed",
            error=str(exc),
            spool_frames=spool.frames if spool is not None else 0,
            spool_bytes=spool.bytes if spool is not None else 0,
        )
        return StreamDisconnected(str(exc), reason="spool_full")

    def _start_drainer(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            return
        self._drainer = asyncio.create_task(self._drain(), name=f"drain:{self.settings.name}")
        self._drainer.add_done_callback(self._drainer_done)

    def _drainer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._failed is None:
            log.error("spool_drain_failed", error=_describe(exc), exc_info=exc)
            self._failed = exc
            self._failure.set()

    async def _drain(self) -> None:
        """Feed spooled frames through the builder in order; back to direct when caught up."""
        spool = self._spool
        assert spool is not None
        builder = self._builder_or_fail()
        max_events = self._max_events
        batch_events = max_events * DRAIN_BATCH_FACTOR
        while True:
            records = await asyncio.to_thread(spool.read, max_events)
            if not records:
                if self._spool_lock.locked() or (
                    self._appending is not None and not self._appending.done()
                ):
                    async with self._spool_lock:  # an append is under way: read it next
                        pass
                    continue
                # Caught up. The frames the reader holds come next: into the builder as if
                # read directly, in this same step, so no frame can slip in between.
                frames, self._spool_buffer = self._spool_buffer, []
                self._spooling = False
                self._spool_cursor = None  # the builder's cursor covers the spool now
                builder.recovering = None
                for payload in frames:
                    builder.add_frame(payload)
                    self._raw.append(payload)
                log.info("spool_caught_up", spool_frames=spool.frames)
                return
            for payload, pos in records:
                if len(builder) >= batch_events:
                    await self._start_flush()
                error = builder.add_frame(payload)
                self._batch_spool_pos = pos
                if error is not None:
                    log.warning("spooled_error_frame_skipped", error=error.describe())

    async def _ack(self, pos: Position | None) -> None:
        spool = self._spool
        if pos is None or spool is None:
            return
        try:
            await asyncio.to_thread(spool.ack, pos)
        except OSError as exc:  # a longer replay after a restart, nothing lost
            log.warning("spool_ack_failed", error=str(exc))

    async def _settle_spool(self, stop: asyncio.Event) -> bool:
        """Before (re)connecting: the resume must start after everything spooled.

        Wait for the drainer to catch up (its cursor is the resume point). After a full
        spool, wait until the database has taken it all, then record the window in which the
        stream was closed as a gap from the spool's end. False when stopping.
        """
        drainer = self._drainer
        draining = drainer is not None and not drainer.done() and not self._spool_full
        if draining and await self._resume_while_draining():
            return not stop.is_set()
        if drainer is not None and not drainer.done():
            await wait_any(asyncio.shield(drainer), stop.wait())
        if not self._spool_full:
            return not stop.is_set()
        builder = self._builder_or_fail()
        while not stop.is_set():
            spooled = self._spool is not None and not self._spool.empty
            if not (spooled or self._commit_running() or len(builder) or self._spooling):
                break
            await sleep_or_stop(SETTLE_POLL_S, stop)
        if stop.is_set():
            return False
        self._spool_full = False
        builder.add_gap(
            Gap(
                stream=self.settings.name,
                gap_start=builder.cursor.last_time,
                gap_end=datetime.now(UTC),
                reason="spool_full",
                detail="the local spool was full (or could not be written): the stream was "
                "closed until the database had taken it; only what the server's store "
                "replays of this window is stored",
            )
        )
        await self._start_flush()
        return True

    async def _resume_while_draining(self) -> bool:
        """True when the stream may reconnect before the drainer has caught up.

        It may when the newest spooled event is known: the frames read but not yet
        appended are appended first, so the resume starts after everything read, and the
        new connection's frames go on into the spool behind them.
        """
        if not self._spooling or self._spool_cursor is None:
            return False  # a spool left by a crash: its newest event is not known
        try:
            await self._append_buffer()
        except StreamDisconnected:
            return False  # the spool is full: wait, then record the gap
        if not self._spooling:  # caught up meanwhile: the builder's cursor covers it all
            return True
        log.info(
            "stream_resuming_while_draining",
            spool_frames=self._spool.frames if self._spool is not None else 0,
            after=self._spool_cursor.last_time,
        )
        return True

    async def _stop_spooling(self) -> None:
        """At a stop: make the frames read while spooling durable; the next start drains."""
        if self._appending is not None:
            await asyncio.gather(self._appending, return_exceptions=True)
        if self._spool_buffer:
            with contextlib.suppress(StreamDisconnected):  # logged; the resume replays them
                await self._append_buffer()
        self._spooling = False

    async def _close_spool(self) -> None:
        await self._flushed()
        spool, self._spool = self._spool, None
        if spool is None:
            return
        if not spool.empty:
            log.info("spool_kept", frames=spool.frames, bytes=spool.bytes, dir=str(spool.directory))
        metrics.track_spool(self.settings.name, None)
        await asyncio.to_thread(spool.close)

    def _builder_or_fail(self) -> BatchBuilder:
        if self._builder is None:
            raise RuntimeError("StreamConsumer.run() has not started")
        return self._builder


_background: set[asyncio.Task[None]] = set()  # strong refs until done (asyncio docs)


def _read_result(task: asyncio.Task[None]) -> None:
    """Retrieve a flush's outcome: none may end as "Task exception was never retrieved"."""
    if not task.cancelled() and task.exception() is not None:
        log.error("flush_failed", error=_describe(task.exception() or Exception()))


def _append_noting(spool: Spool, frames: list[bytes]) -> tuple[list[Position], Cursor | None]:
    """Append ``frames`` (in a worker thread); also a resume cursor for them.

    The cursor is that of the last frame holding an event (a stream start, a malformed
    frame or one dated past ``FUTURE_SLACK_S`` does not count), not of the newest event:
    parsing every frame once more would cost a third of the drainer's own parse, and
    resuming from an older event only replays a few that are stored once anyway.
    """
    ends = spool.append(frames)
    horizon = datetime.now(UTC).timestamp() + FUTURE_SLACK_S
    for payload in reversed(frames):
        try:
            event = orjson.loads(payload)["result"]
            if event.get("name") == "events.stream.start":
                continue
            t = parse_time(event["time"])
            uid = event["unique_id"]
        except Exception:  # the drainer judges (and rejects) it
            continue
        if isinstance(uid, str) and t.timestamp() <= horizon:
            return ends, Cursor(last_time=t, unique_ids_at_last_time=frozenset({uid}))
    return ends, None


def _later(a: Cursor | None, b: Cursor) -> Cursor:
    """The later of two cursors; at one time, both times' ids."""
    if a is None or a.last_time is None or (b.last_time is not None and b.last_time > a.last_time):
        return b
    if b.last_time == a.last_time and len(a.unique_ids_at_last_time) < MAX_CURSOR_IDS:
        ids = a.unique_ids_at_last_time | b.unique_ids_at_last_time
        return Cursor(last_time=a.last_time, unique_ids_at_last_time=ids)
    return a


def _stream_error(error: Any) -> StreamError:
    return StreamError(
        f"the server ended the stream with an error: {error.describe()}",
        status_code=error.code,
        error_name=error.name,
        tts_message=error.message,
    )


DisconnectKind = Literal["rate_limited", "refused", "backoff"]


def classify_disconnect(exc: BaseException) -> tuple[DisconnectKind, str]:
    """How a connection's end is retried, and the ``reason`` label it is counted under.

    ``rate_limited``: wait what TTS said (``X-Rate-Limit-Retry``); ``refused``: the key,
    its rights or the request itself was refused (``auth`` / ``rejected``): wait
    ``auth_retry_s``; ``backoff``: capped exponential backoff, labelled by what ended it.
    Pure, so every case is table-tested (tests/unit/test_reconnect.py).
    """
    if isinstance(exc, RateLimited):
        return "rate_limited", "rate_limited"
    if isinstance(exc, AuthRejected) or (
        isinstance(exc, StreamError) and exc.status_code in AUTH_ERROR_CODES
    ):
        return "refused", "auth"
    if isinstance(exc, RequestRejected):
        return "refused", "rejected"
    if isinstance(exc, StreamDisconnected):
        return "backoff", exc.reason
    if isinstance(exc, StreamError):
        return "backoff", "stream_error"
    if isinstance(exc, TransientError):
        return "backoff", "server_error"
    if isinstance(exc, PermanentError):
        return "backoff", "error"
    return "backoff", "unexpected"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
