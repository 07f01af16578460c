"""One stream's consumer: connect, read frames into batches, commit, reconnect forever.

Per event the work is parse → normalize → append (in :class:`BatchBuilder`); commits run
in a worker thread, one at a time and in order, so the cursor in the database only ever
moves forward. A batch is committed when it reaches ``batch_max_events`` or
``batch_max_delay_s`` after the last commit, whichever comes first; while one batch
commits, the next is being read (a pipeline of depth one, which is also backpressure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
import structlog

from ingestd import metrics
from ingestd.aio import cancel_and_wait, sleep_or_stop, wait_any
from ingestd.config import DatabaseSettings, StreamSettings
from ingestd.errors import (
    AuthRejected,
    PermanentError,
    RateLimited,
    RequestRejected,
    StoreUnavailable,
    StreamDisconnected,
    StreamError,
    TransientError,
    TtsError,
)
from ingestd.ingest import BatchBuilder
from ingestd.leader import StreamLeadership
from ingestd.models import Batch, Gap
from ingestd.retry import Backoff
from ingestd.store import Store
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
# Connections that end so, with nothing past the cursor, were no progress for /healthz; the
# network's own ends (idle timeout, a close, a transport error) are a quiet stream's life.
NO_PROGRESS = frozenset({"no_frame", "bad_response", "stream_error", "error", "unexpected"})


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
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._stopping = False
        self._halt = asyncio.Event()  # set when following stops (shutdown or leadership lost)
        self._overlap_s = settings.overlap_s
        self.connected_event = asyncio.Event()  # set on every successful (re)connect

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
        cursor = await asyncio.to_thread(self._store.load_cursor, name)
        self._builder = BatchBuilder(name, cursor)
        log.info("stream_starting", cursor=cursor.last_time)
        ticker = asyncio.create_task(self._flush_on_timer(halt), name=f"flush:{name}")
        try:
            await self._connect_forever(halt)
        finally:
            self._stopping = True
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            # Commit the batch in flight with its cursor even if we are being cancelled.
            await asyncio.shield(self._flush())
            self._set_disconnected(None)
            await asyncio.shield(self._save_state(None, None))  # status: not connected
            log.info("stream_stopped", cursor=self._builder.cursor.last_time)

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
            opened_at = self._builder_or_fail().cursor.last_time
            was_open = False
            frame_at_open = self.state.last_frame_at
            if self.state.retrying_since is None:  # the retry clock starts with the attempt
                self.state.retrying_since = datetime.now(UTC)
            try:
                async with self._stream.open(
                    self._builder_or_fail().cursor, overlap_s=self._overlap_s, stop=stop
                ) as conn:
                    attempt = 0
                    was_open = True
                    self._on_connected(conn)
                    reader = asyncio.create_task(self._read(conn))
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
        now_at = self._builder_or_fail().cursor.last_time
        if opened_at is None or (now_at is not None and now_at > opened_at):
            self._overlap_s = self.settings.overlap_s  # progress: back to the full overlap
            return True
        self._overlap_s = max(self._overlap_s / OVERLAP_SHRINK, MIN_OVERLAP_S)
        return False

    def _delay_for(self, exc: Exception, attempt: int) -> tuple[float, str]:
        s = self.settings
        if isinstance(exc, RateLimited):
            log.warning("stream_rate_limited", retry_after_s=exc.retry_after_s)
            return exc.retry_after_s, "rate_limited"
        auth = isinstance(exc, AuthRejected) or (
            isinstance(exc, StreamError) and exc.status_code in AUTH_ERROR_CODES
        )
        if auth or isinstance(exc, RequestRejected):
            # One clear line naming the stream and the TTS error (a bad key, missing rights,
            # or a request TTS refuses such as an unknown event name); then wait long, not
            # a hot loop.
            assert isinstance(exc, TtsError)
            log.error(
                "stream_auth_rejected" if auth else "stream_request_rejected",
                stream=s.name,
                error_name=exc.error_name,
                error=str(exc),
                retry_in_s=s.auth_retry_s,
            )
            self.state.permanent_error = True
            return s.auth_retry_s, "auth" if auth else "rejected"
        delay = self._backoff.delay_s(attempt)
        if isinstance(exc, StreamDisconnected):
            reason = exc.reason
        elif isinstance(exc, StreamError):
            reason = "stream_error"
        elif isinstance(exc, TransientError):
            reason = "server_error"
        elif isinstance(exc, PermanentError):
            reason = "error"
        else:
            reason = "unexpected"
            log.exception("stream_unexpected_error")
        level = log.info if reason in ("server_closed", "idle_timeout") else log.warning
        level(
            "stream_disconnected", reason=reason, error=_describe(exc), retry_in_s=round(delay, 2)
        )
        return delay, reason

    def _on_connected(self, conn: OpenStream) -> None:
        builder = self._builder_or_fail()
        now = datetime.now(UTC)
        self.state.connected = True
        self.state.connected_since = now
        self.state.retrying_since = None
        self.state.permanent_error = False
        metrics.STREAM_CONNECTED.labels(self.settings.name).set(1)
        for warning in conn.warnings:
            if warning not in self._warned:  # log each X-Warning once per stream
                self._warned.add(warning)
                log.warning("tts_warning", warning=warning)
        cursor = builder.cursor
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
            builder.expect_replay_from(cursor)
        log.info(
            "stream_connected",
            after=conn.after,
            request_id=conn.request_id,
            store_disabled=conn.store_disabled,
        )
        self.connected_event.set()
        self._spawn(self._save_state(now, None))

    def _set_disconnected(self, error: str | None) -> None:
        was = self.state.connected
        self.state.connected = False
        if self.state.retrying_since is None:
            self.state.retrying_since = datetime.now(UTC)
        if error is not None:
            self.state.last_error = error
        metrics.STREAM_CONNECTED.labels(self.settings.name).set(0)
        if (was or error) and not self._stopping:
            self._spawn(self._save_state(None, error))

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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)

    # -- reading and committing --------------------------------------------------------------

    async def _read(self, conn: OpenStream) -> None:
        builder = self._builder_or_fail()
        max_events = self._max_events
        async for payload in conn.frames:
            rejected = builder.rejected_total
            error = builder.add_frame(payload)
            if error is not None:
                raise StreamError(
                    f"the server ended the stream with an error: {error.describe()}",
                    status_code=error.code,
                    error_name=error.name,
                    tts_message=error.message,
                )
            if builder.rejected_total == rejected:
                self.state.last_frame_at = datetime.now(UTC)
            if builder.first_cursor_pending:
                builder.first_cursor_pending = False
                await self._start_flush()  # a new stream's first cursor, saved at once
            if len(builder) >= max_events:
                await self._start_flush()

    async def _start_flush(self) -> None:
        """Start committing the current batch; wait for the previous commit first."""
        if self._flush_task is not None and not self._flush_task.done():
            # shield: cancelling the reader must never cancel a commit half-way.
            await asyncio.shield(self._flush_task)
        self._flush_task = asyncio.create_task(self._flush())

    async def _flush_on_timer(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(self._max_delay_s, stop):
            await self._start_flush()

    async def _flush(self) -> None:
        builder = self._builder
        if builder is None:
            return
        async with self._flush_lock:
            names = builder.names
            batch = builder.take()
            if batch.empty:
                return
            await self._commit(batch, names)

    async def _commit(self, batch: Batch, names: dict[str, int]) -> None:
        name = self.settings.name
        attempt = 0
        self.state.uncommitted_since = datetime.now(UTC)
        while True:
            started = asyncio.get_running_loop().time()
            try:
                result = await asyncio.to_thread(self._store.commit_batch, batch)
                break
            except StoreUnavailable as exc:
                attempt += 1
                if self._stopping and attempt >= SHUTDOWN_COMMIT_ATTEMPTS:
                    # Not lost for good: the cursor did not move, so a restart replays it.
                    log.error("batch_not_committed", error=str(exc), events=len(batch))
                    return
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

    def _builder_or_fail(self) -> BatchBuilder:
        if self._builder is None:
            raise RuntimeError("StreamConsumer.run() has not started")
        return self._builder


_background: set[asyncio.Task[None]] = set()  # strong refs until done (asyncio docs)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
