"""The downlink worker: claims due outbox rows, pushes them to TTS, records each outcome.

Several workers and processes may share a database: claims never overlap and a device's
rows go out one at a time in order (see :mod:`ingestd.outbox.sql`). Each worker runs
``concurrency`` slots, each pushing one row after another: validate → stream gate → verify
(only if an earlier push got no answer) → push → outcome. A slot that finishes a row takes
the next one claimed ahead at once, so no push waits for the database; one transaction at
a time records the finished rows' outcomes and claims the next rows, a batch of
:data:`CLAIM_BATCH_MIN` or more while the backlog lasts (few transactions, many rows
each: issue 12), only what the slots lack when due device heads are few (rows held
ahead are heads that other workers cannot take). When nothing is
due, the worker waits for its poll timer or, on PostgreSQL, a ``NOTIFY ingestd_outbox``
from the insert trigger (a LISTEN connection of its own; the poll stays as the fallback).

Never twice: push is not idempotent in TTS (TTS_WIRE 5.3). A row whose earlier push got no
answer (timeout, 5xx, a worker that died between push and mark) has ``verify_before_push``:
it is looked up in the stored lifecycle events and in the device's queue (``GET …/down``)
by its correlation id first, pushed again only when both say no, and waits while TTS
cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import httpx
import psycopg
import structlog
from sqlalchemy.engine import Engine
from structlog.contextvars import bound_contextvars

from ingestd import metrics, tts
from ingestd.aio import sleep_or_stop
from ingestd.config import DownlinkSettings
from ingestd.db import is_postgres
from ingestd.outbox import sql as outbox
from ingestd.outbox.ids import request_id
from ingestd.outbox.rules import (
    Outcome,
    classify_response,
    list_request,
    push_request,
    queue_has,
    transport_outcome,
    validate,
)
from ingestd.retry import Backoff
from ingestd.secrets import Secret

log = structlog.get_logger()

NOTIFY_CHANNEL = "ingestd_outbox"
STREAM_WAIT_RECHECK_MAX_S = 2.0  # a row held back by the stream gate: look again after a poll
VERIFY_RECHECK_S = 10.0  # a row whose earlier push may still turn up in events waits this long
QUEUE_FULL_MIN_RETRY_S = 30.0  # downlink_queue_capacity: the device's queue drains slowly
LISTEN_RETRY_MAX_S = 30.0
LOOP_ERROR_RETRY_MAX_S = 30.0
# Rows claimed per transaction when busy, at least: each transaction's fixed cost (and its
# thread's GIL hand-offs) is shared by this many pushes (issue 12: 8 -> 64 rows took
# SQLite from 0.59x to 0.70x a raw httpx loop, before the slots).
CLAIM_BATCH_MIN = 64

_R = TypeVar("_R")
StreamReady = Callable[[str, str], bool]


class DownlinkConfig(Protocol):
    """What the worker reads from :class:`ingestd.config.Settings`."""

    @property
    def downlinks(self) -> DownlinkSettings: ...

    def credentials_for(self, application_id: str) -> tuple[str, Secret | None]: ...


class DownlinkWorker:
    """Drains ``downlink_outbox`` into TTS ``down/push`` / ``down/replace``.

    ``stream_ready(application_id, device_id)`` says whether an event stream that receives
    the device's lifecycle events is connected; pushes wait for it (``require_stream``) so
    no ``sent``/``ack`` is missed. ``None`` disables the gate. ``concurrency`` is the number
    of rows claimed and pushed at once (always for different devices); ``worker_id`` names
    the claims, and a restart with the same id frees its own claims sooner.
    """

    def __init__(
        self,
        engine: Engine,
        settings: DownlinkConfig,
        *,
        client: httpx.AsyncClient | None = None,
        stream_ready: StreamReady | None = None,
        worker_id: str,
        concurrency: int = 1,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._cfg = settings.downlinks
        self._worker_id = worker_id
        self._stream_ready = stream_ready if self._cfg.require_stream else None
        self._own_client = client is None
        self._timeout = httpx.Timeout(self._cfg.request_timeout_s)
        self._client = client or httpx.AsyncClient(timeout=self._timeout)
        self._backoff = Backoff(
            base_s=self._cfg.retry_base_s,
            factor=2.0,
            max_s=self._cfg.retry_max_s,
            max_attempts=self._cfg.max_attempts,
        )
        self._concurrency = max(1, concurrency)
        self._stream_recheck_s = min(STREAM_WAIT_RECHECK_MAX_S, self._cfg.poll_interval_s)
        self._wakeup = asyncio.Event()
        self._paused_until: dict[str, float] = {}  # application_id -> monotonic deadline
        self._warnings = tts.WarningLog()
        self._auth_rejected: set[str] = set()
        self._waiting_for_stream: set[tuple[str, str]] = set()
        self.pushes = 0  # HTTP push requests sent (for tests, metrics)
        # Handling one row never takes longer than half a request timeout waiting to start
        # (_start_ready), a verify GET plus a push POST (each bounded by request_timeout_s)
        # and a few short transactions.
        self._row_max_s = 3 * self._cfg.request_timeout_s
        if self._cfg.stale_claim_s < self._row_max_s:
            log.warning(
                "downlink_stale_claim_too_short",
                stale_claim_s=self._cfg.stale_claim_s,
                request_timeout_s=self._cfg.request_timeout_s,
            )

    # -- main loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; an in-flight push gets ``shutdown_grace_s`` to finish."""
        listener = None
        if is_postgres(self._engine):
            listener = asyncio.create_task(self._listen(stop), name="downlink:listen")
        log.info(
            "downlink_worker_started", worker_id=self._worker_id, concurrency=self._concurrency
        )
        stopper = asyncio.create_task(stop.wait(), name="downlink:stop")
        rows = _Rows()
        try:
            try:
                await self._dispatch(stop, stopper, rows)
            finally:
                await self._drain(rows)
        finally:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            if self._own_client:
                await self._client.aclose()
            log.info("downlink_worker_stopped", worker_id=self._worker_id)

    async def _dispatch(self, stop: asyncio.Event, stopper: asyncio.Task[Any], rows: _Rows) -> None:
        """Keep ``concurrency`` rows in flight, taken from claimed rows kept ready, while
        one transaction at a time records finished rows' outcomes and tops the ready rows up.

        Busy, a transaction runs once no more than ``concurrency`` rows are ready; idle
        (the last claim found fewer rows than it asked for), after any row finished, a
        NOTIFY or the poll timer.
        """
        n = self._concurrency
        batch = max(n, CLAIM_BATCH_MIN)
        rows.slots = {
            asyncio.create_task(self._slot(rows, stop), name=f"downlink:slot{i}") for i in range(n)
        }
        next_stale_check, startup = 0.0, True  # stale claims are released first
        errors, retry_at = 0, 0.0
        idle, poked, asked = True, True, 0
        while not stop.is_set():
            if rows.finished.is_set():
                rows.finished.clear()
                poked = True
            now = time.monotonic()
            due = poked if idle else len(rows.ready) <= n
            if rows.txn is None and now >= retry_at and due:
                stale = None
                if now >= next_stale_check:
                    stale, startup = startup, False
                    next_stale_check = now + self._stale_check_interval_s
                # Clear before claiming: a NOTIFY arriving during the claim sets it again,
                # so no insert is missed between this claim and the next wait.
                self._wakeup.clear()
                # Busy, claim a batch ahead. Idle (the last claim was not full: few due
                # device heads), only what the slots lack: rows held ahead here would be
                # device heads that other workers cannot take.
                asked = 2 * n + (0 if idle else batch) - rows.busy - len(rows.ready)
                rows.txn = asyncio.create_task(self._cycle(rows.take_done(), asked, stale))
                poked = False
            waits: set[asyncio.Future[Any]] = {stopper}
            timeout: float | None = None
            if rows.txn is not None:  # rows finishing meanwhile are seen when it is done
                waits.add(rows.txn)
            elif now < retry_at:
                timeout = retry_at - now
            else:  # wait for a row to finish; idle, also for an insert or the poll timer
                waits.add(asyncio.ensure_future(rows.finished.wait()))
                if idle:
                    waits.add(asyncio.ensure_future(self._wakeup.wait()))
                    timeout = self._cfg.poll_interval_s
            try:
                finished, _ = await asyncio.wait(
                    waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waits - {stopper, rows.txn}:
                    waiter.cancel()
            if rows.txn is None or rows.txn not in finished:
                poked = True  # a row finished, an insert was notified or the timer ran out
            if rows.txn is not None and rows.txn.done():
                txn, rows.txn = rows.txn, None
                try:
                    items = txn.result()
                except Exception as exc:  # the loop's top: log, back off, go on
                    errors += 1
                    delay = min(LOOP_ERROR_RETRY_MAX_S, self._cfg.poll_interval_s * 2**errors)
                    log.exception("downlink_loop_failed", error=str(exc), retry_in_s=delay)
                    retry_at, idle = time.monotonic() + delay, True
                else:
                    errors = 0
                    if asked > 0:  # a claim of nothing says nothing about the backlog
                        idle = len(items) < asked
                    rows.add_ready(items)

    async def _slot(self, rows: _Rows, stop: asyncio.Event) -> None:
        """One of ``concurrency`` pushers: handle ready rows one after another until closing.

        Each takes its next row as soon as its last one is done, in the same step (a row
        per task and a dispatcher hop in between cost a sixth of the throughput).
        A row that waited longer than half a request timeout (every slot held by slow
        requests) is given back instead: claim to last request stays within ``_row_max_s``.
        """
        while not rows.closing:
            if not rows.ready:
                rows.filled.clear()
                await rows.filled.wait()
                continue
            claimed_at, item = rows.ready.popleft()
            if time.monotonic() - claimed_at > self._cfg.request_timeout_s / 2:
                done: _Done | None = self._release(item, 0.0, None)
            else:
                rows.busy += 1
                try:
                    done = await self._handle(item, stop)
                finally:
                    rows.busy -= 1
            if done is not None:
                rows.done.append(done)
            rows.finished.set()  # the dispatcher records it with the next claim

    async def _cycle(
        self, done: list[_Done], limit: int, stale: bool | None
    ) -> list[outbox.OutboxItem]:
        """Release stale claims (if ``stale`` is not None; True: at startup), then record
        ``done`` and claim up to ``limit`` rows in one transaction.

        If that transaction fails, those outcomes are not retried: the rows stay ``pushing``
        and are reconciled (TTS asked, never pushed blindly) once their claims expire.
        """
        try:
            if stale is not None:
                await self._release_stale(startup=stale)
            items = await self._db(
                outbox.claim_due,
                self._engine,
                worker_id=self._worker_id,
                limit=limit,
                now=_now(),
                record=[d.mark for d in done],
            )
        except Exception as exc:
            if done:
                log.warning(
                    "downlink_outcomes_lost",
                    error=type(exc).__name__,
                    outbox_ids=[d.mark.outbox_id for d in done],
                    note="left pushing; reconciled after stale_claim_s",
                )
            raise
        for d in done:
            d.report()
        return items

    @property
    def _stale_check_interval_s(self) -> float:
        return max(self._cfg.stale_claim_s / 4, self._cfg.poll_interval_s)

    async def _drain(self, rows: _Rows) -> None:
        """At stop: give the ready rows back, the rows in flight ``shutdown_grace_s`` (then
        cancel them), and record the outcomes.

        A push cancelled mid-flight leaves its row ``pushing``; it is reconciled after the
        claim expires (``stale_claim_s``), never pushed blindly.
        """
        rows.closing = True
        rows.filled.set()  # idle slots end; busy ones end after their row
        if rows.txn is not None:
            with contextlib.suppress(Exception):  # logged; those rows are reconciled
                rows.add_ready(await rows.txn)
            rows.txn = None
        while rows.ready:
            rows.done.append(self._release(rows.ready.popleft()[1], 0.0, None))
        if rows.slots:
            _, running = await asyncio.wait(rows.slots, timeout=self._cfg.shutdown_grace_s)
            if rows.busy:
                log.warning("downlink_push_abandoned", count=rows.busy)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            rows.slots.clear()
        if rows.done:  # what the last pushes got is recorded before we go
            with contextlib.suppress(Exception):  # logged; those rows are reconciled
                await self._cycle(rows.take_done(), 0, None)

    # -- one row ------------------------------------------------------------------------

    async def _handle(self, item: outbox.OutboxItem, stop: asyncio.Event) -> _Done | None:
        """The row's outcome, to be recorded with the next claim (None: none to record)."""
        with bound_contextvars(
            application_id=item.application_id, device_id=item.device_id, outbox_id=item.id
        ):
            try:
                return await self._handle_row(item, stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the row stays `pushing` and is reconciled later
                log.exception("downlink_row_failed", error=str(exc))
                return None

    async def _handle_row(self, item: outbox.OutboxItem, stop: asyncio.Event) -> _Done | None:
        problem = validate(item)
        if problem is not None:
            return self._fail(item, f"invalid row: {problem}", reason="invalid")
        if stop.is_set():
            return self._release(item, 0.0, None)
        if not self._gate_open(item):
            note = (
                f"waiting for a connected event stream of {item.application_id} "
                "(downlinks.require_stream)"
            )
            return self._release(item, self._stream_recheck_s, note)
        paused_s = self._paused_until.get(item.application_id, 0.0) - time.monotonic()
        if paused_s > 0:
            return self._release(item, paused_s, None)
        base_url, key = self._settings.credentials_for(item.application_id)
        if key is None:
            return self._fail(
                item, f"no API key configured for {item.application_id}", reason="no_api_key"
            )
        try:
            request = push_request(item, base_url, key)
        except (TypeError, ValueError) as exc:  # orjson: e.g. a payload nested too deep
            return self._fail(
                item, f"invalid row: cannot encode the push request: {exc}", reason="invalid"
            )
        if item.verify_before_push:  # an earlier push got no answer: did TTS take it?
            verdict = await self._reconcile(item, base_url, key)
            if verdict is not None:
                return verdict
        outcome = await self._push(request)
        return self._outcome(item, outcome)

    def _gate_open(self, item: outbox.OutboxItem) -> bool:
        if self._stream_ready is None:
            return True
        key = (item.application_id, item.device_id)
        if self._stream_ready(*key):
            self._waiting_for_stream.discard(key)
            return True
        if key not in self._waiting_for_stream:
            self._waiting_for_stream.add(key)
            log.info("downlink_waiting_for_stream", recheck_s=self._stream_recheck_s)
        return False

    async def _reconcile(self, item: outbox.OutboxItem, base_url: str, key: Secret) -> _Done | None:
        """Look for an unanswered earlier push in the stored events and TTS's device queue.

        None when it is absent (safe to push); else the row's outcome: ``queued`` when it
        was accepted, or a wait when TTS could not be asked or a recent ``receive`` may
        still turn into ``sent`` (the row keeps ``verify_before_push``).
        """
        accepted = await self._db(outbox.accepted_per_events, self._engine, item.id, now=_now())
        if accepted:
            return self._reconciled(item, "events")
        url, headers = list_request(item, base_url, key)
        error: str | None = None
        try:
            async with asyncio.timeout(self._cfg.request_timeout_s):
                response = await self._client.get(url, headers=headers, timeout=self._timeout)
        except (httpx.HTTPError, TimeoutError) as exc:
            error = transport_outcome(exc).error
        else:
            self._log_warnings(response)
            found = queue_has(response.content, item) if response.status_code == 200 else None
            if found:
                return self._reconciled(item, "device_queue")
            if found is None:
                error = classify_response(response).error or "unreadable device queue listing"
        if error is not None:
            return self._retry(
                item,
                f"could not check the device queue before re-pushing: {error}",
                self._backoff.delay_s(item.attempts),
                unknown=True,
            )
        if accepted is None:
            log.info("downlink_verify_waiting", recheck_s=VERIFY_RECHECK_S)
            return self._release(item, VERIFY_RECHECK_S, None)
        log.info("downlink_reconciled", found=False, attempts=item.attempts)
        return None

    def _reconciled(self, item: outbox.OutboxItem, source: str) -> _Done:
        return _Done(
            item,
            self._queued_mark(item),
            metric="reconciled",
            event="downlink_reconciled",
            fields={"found": True, "source": source, "attempts": item.attempts},
        )

    async def _push(self, request: tuple[str, dict[str, str], bytes]) -> Outcome:
        url, headers, body = request
        self.pushes += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.request_timeout_s):
                response = await self._client.post(
                    url, content=body, headers=headers, timeout=self._timeout
                )
        except (httpx.HTTPError, TimeoutError) as exc:
            return transport_outcome(exc)
        finally:
            metrics.DOWNLINK_PUSH_SECONDS.observe(time.monotonic() - started)
        self._log_warnings(response)
        return classify_response(response)

    def _outcome(self, item: outbox.OutboxItem, outcome: Outcome) -> _Done:
        if outcome.kind == "queued":
            return _Done(
                item,
                self._queued_mark(item),
                metric="queued",
                event="downlink_queued",
                fields={"attempts": item.attempts},
            )
        error = outcome.error or "unknown error"
        if outcome.kind == "failed":
            if outcome.auth_rejected and item.application_id not in self._auth_rejected:
                self._auth_rejected.add(item.application_id)
                log.error("downlink_auth_rejected", error=error)
            return self._fail(item, error, reason="rejected")
        delay = self._backoff.delay_s(item.attempts)
        if outcome.retry_after_s is not None:  # rate limited: pause the whole application
            delay = outcome.retry_after_s
            self._paused_until[item.application_id] = time.monotonic() + delay
        elif outcome.queue_full:
            delay = min(self._cfg.retry_max_s, max(QUEUE_FULL_MIN_RETRY_S, delay))
        return self._retry(item, error, delay, unknown=outcome.outcome_unknown)

    @staticmethod
    def _queued_mark(item: outbox.OutboxItem) -> outbox.Mark:
        rid = request_id(item.id, item.attempts)
        return outbox.Mark(kind="queued", outbox_id=item.id, now=_now(), request_id=rid)

    def _retry(
        self, item: outbox.OutboxItem, error: str, delay_s: float, *, unknown: bool = False
    ) -> _Done:
        if self._backoff.gives_up(item.attempts + 1):
            return self._fail(
                item,
                f"{error} (gave up after {item.attempts} attempts)",
                reason="attempts_exhausted",
            )
        now = _now()
        mark = outbox.Mark(
            kind="retry",
            outbox_id=item.id,
            now=now,
            error=error,
            next_attempt_at=now + timedelta(seconds=delay_s),
            outcome_unknown=unknown,
        )
        fields = {"error": error, "attempts": item.attempts, "retry_in_s": round(delay_s, 3)}
        return _Done(
            item, mark, metric="retry", event="downlink_retry", level=logging.WARNING, fields=fields
        )

    @staticmethod
    def _fail(item: outbox.OutboxItem, error: str, *, reason: str) -> _Done:
        mark = outbox.Mark(kind="failed", outbox_id=item.id, now=_now(), error=error)
        return _Done(
            item,
            mark,
            metric="invalid" if reason == "invalid" else "failed",
            event="downlink_failed",
            level=logging.WARNING,
            fields={"reason": reason, "error": error, "attempts": item.attempts},
        )

    @staticmethod
    def _release(item: outbox.OutboxItem, delay_s: float, note: str | None) -> _Done:
        now = _now()
        next_attempt_at = now + timedelta(seconds=delay_s)
        mark = outbox.Mark(
            kind="released",
            outbox_id=item.id,
            now=now,
            error=note,
            next_attempt_at=next_attempt_at,
        )
        return _Done(item, mark)

    def _log_warnings(self, response: httpx.Response | None) -> None:
        if response is not None:
            self._warnings.log(tts.warnings_of(response))

    # -- wakeups, stale claims, database calls ------------------------------------------

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN on PostgreSQL and set the wakeup on every NOTIFY; reconnect on failure."""
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        backoff = Backoff(base_s=0.5, max_s=LISTEN_RETRY_MAX_S)
        failures = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    failures = 0
                    self._wakeup.set()  # rows may have arrived while we were not listening
                    async for _ in conn.notifies():
                        self._wakeup.set()
            except Exception as exc:  # the loop's top; polling goes on meanwhile
                failures += 1
                delay = backoff.delay_s(failures)
                log.warning(
                    "outbox_listen_failed", error=type(exc).__name__, retry_in_s=round(delay, 3)
                )
                await sleep_or_stop(delay, stop)

    async def _release_stale(self, *, startup: bool) -> None:
        now = _now()
        released = await self._db(
            outbox.release_stale_claims,
            self._engine,
            older_than=now - timedelta(seconds=self._cfg.stale_claim_s),
            now=now,
        )
        if startup:
            # A request of our own earlier life (same worker_id) cannot still be in flight
            # once the longest a row can take has passed.
            released += await self._db(
                outbox.release_stale_claims,
                self._engine,
                older_than=now - timedelta(seconds=self._row_max_s),
                now=now,
                claimed_by=self._worker_id,
            )
        for item in released:
            log.warning(
                "downlink_claim_expired",
                outbox_id=item.id,
                application_id=item.application_id,
                device_id=item.device_id,
            )

    async def _db(self, fn: Callable[..., _R], /, *args: Any, **kwargs: Any) -> _R:
        return await asyncio.to_thread(fn, *args, **kwargs)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Done:
    """A row's outcome: the mark to record, and what to log and count once it is recorded."""

    item: outbox.OutboxItem
    mark: outbox.Mark
    metric: str | None = None  # the DOWNLINK_PUSHES outcome label
    event: str | None = None  # the log event
    level: int = logging.INFO
    fields: dict[str, Any] = field(default_factory=dict)

    def report(self) -> None:
        if self.metric is not None:
            metrics.DOWNLINK_PUSHES.labels(self.metric).inc()
        if self.event is not None:
            item = self.item
            log.log(
                self.level,
                self.event,
                application_id=item.application_id,
                device_id=item.device_id,
                outbox_id=item.id,
                **self.fields,
            )


@dataclass
class _Rows:
    """The worker's claimed rows: ready to start, being pushed, finished (outcome to record)."""

    ready: deque[tuple[float, outbox.OutboxItem]] = field(default_factory=deque)  # claimed at
    done: list[_Done] = field(default_factory=list)
    busy: int = 0  # rows the slots are handling
    txn: asyncio.Task[list[outbox.OutboxItem]] | None = None  # the record-and-claim running
    slots: set[asyncio.Task[None]] = field(default_factory=set)
    filled: asyncio.Event = field(default_factory=asyncio.Event)  # rows were made ready
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # a slot finished a row
    closing: bool = False  # stopping: slots take no more rows

    def add_ready(self, items: list[outbox.OutboxItem]) -> None:
        claimed_at = time.monotonic()
        self.ready.extend((claimed_at, item) for item in items)
        if items:
            self.filled.set()

    def take_done(self) -> list[_Done]:
        done, self.done = self.done, []
        return done
