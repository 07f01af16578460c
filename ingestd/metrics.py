"""Prometheus metrics and the ``/metrics`` + ``/healthz`` endpoint.

The metric objects live at module level in ingestd's own ``REGISTRY`` (not the client's
global one, so nothing else in the process leaks into our exposition and tests can read exact
values). Every name is prefixed ``ingestd_``. ``MetricsServer`` serves them with uvicorn as a
task inside the daemon's own event loop: no thread, no second loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Generator
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import structlog
import uvicorn
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    make_asgi_app,
)

from ingestd import __version__
from ingestd.config.values import split_host_port
from ingestd.models import Batch, CommitResult
from ingestd.normalize.down import DOWNLINK_KINDS

if TYPE_CHECKING:
    from ingestd.spool import Spool

log = structlog.get_logger()

# No ``*_created`` series: they double the series count and Prometheus ignores them in text.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
REGISTRY = CollectorRegistry(auto_describe=True)

# Database commits: 1 ms (SQLite, small batch) .. 10 s (a struggling PostgreSQL).
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Event time to commit: sub-second when live, minutes to hours while replaying after downtime.
EVENT_TO_COMMIT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
# One downlink HTTP request: bounded by [downlinks] request_timeout_s (10 s by default).
PUSH_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Event names that may be a label value: those TTS defines (TTS_WIRE §3) and the stream start.
# Any other name (a newer TTS, a typo'd regexp, a hostile server) is counted as ``other``, so
# the number of series stays fixed whatever the stream sends: 200k distinct names once cost
# 300 MB of RSS and a 29 MB /metrics.
KNOWN_EVENT_NAMES = frozenset(
    {
        "events.stream.start",
        *(
            f"as.up.{n}"
            for n in (
                "data.receive",
                "data.forward",
                "data.drop",
                "data.decode.fail",
                "data.decode.warning",
                "data.normalize.warning",
                "normalized.forward",
                "join.receive",
                "join.forward",
                "join.drop",
                "location.forward",
                "service.forward",
            )
        ),
        *DOWNLINK_KINDS,  # the as.down.data.* names ingestd turns into downlink_events
        *(
            f"as.down.data.{n}"
            for n in ("encode.fail", "decode.fail", "encode.warning", "decode.warning")
        ),
        *(f"ns.up.{n}" for n in ("data.receive", "data.process", "data.forward")),
        *(f"ns.up.join.{n}" for n in ("receive", "process", "accept.forward")),
        *(
            f"ns.down.{k}.schedule.{n}"
            for k in ("data", "join")
            for n in ("attempt", "success", "fail")
        ),
        "ns.down.transmission.success",
        "ns.down.transmission.fail",
        "js.join.accept",
        "js.join.reject",
        *(f"end_device.{n}" for n in ("create", "update", "delete", "batch.delete")),
        *(
            f"{c}.end_device.{n}"
            for c in ("as", "ns", "js")
            for n in ("create", "update", "delete")
        ),
    }
)
OTHER_EVENT_NAME = "other"


def event_label(name: str) -> str:
    """The ``name`` label for an event name: itself when known, else ``other``."""
    return name if name in KNOWN_EVENT_NAMES else OTHER_EVENT_NAME


EVENTS_RECEIVED = Counter(
    "ingestd_events_received_total",
    "Event frames parsed from the stream, by stream and TTS event name (unknown names: other).",
    ("stream", "name"),
    registry=REGISTRY,
)
EVENTS_STORED = Counter(
    "ingestd_events_stored_total",
    "Events newly stored (not duplicates), by stream and TTS event name (unknown: other).",
    ("stream", "name"),
    registry=REGISTRY,
)
EVENTS_DUPLICATE = Counter(
    "ingestd_events_duplicate_total",
    "Events already stored (replays after a reconnect), by stream.",
    ("stream",),
    registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "ingestd_events_rejected_total",
    "Events that could not be normalized (kept in rejected_events), by stream.",
    ("stream",),
    registry=REGISTRY,
)
BATCHES = Counter(
    "ingestd_batches_total",
    "Batches committed (rows and cursor in one transaction), by stream.",
    ("stream",),
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "ingestd_commit_seconds",
    "Time to commit one batch, by stream.",
    ("stream",),
    buckets=COMMIT_BUCKETS_S,
    registry=REGISTRY,
)
EVENT_TO_COMMIT_SECONDS = Histogram(
    "ingestd_event_commit_latency_seconds",
    "From an event's TTS time to its commit, by stream.",
    ("stream",),
    buckets=EVENT_TO_COMMIT_BUCKETS_S,
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "ingestd_reconnects_total",
    "Stream reconnects, by stream and reason (transport, idle_timeout, no_frame,"
    " headers_timeout, bad_response, reject_flood, spool_full, server_error, rate_limited,"
    " auth, rejected, stream_error, server_closed, error, unexpected).",
    ("stream", "reason"),
    registry=REGISTRY,
)
GAPS = Counter(
    "ingestd_gaps_total",
    "Windows of events known to be missing (recorded in stream_gaps), by stream and reason.",
    ("stream", "reason"),
    registry=REGISTRY,
)
GAP_SECONDS = Counter(
    "ingestd_gap_seconds_total",
    "Total length of the windows known to be missing, by stream and reason.",
    ("stream", "reason"),
    registry=REGISTRY,
)
# Healing from the Storage Integration (ingestd.backfill counts them).
BACKFILL_ROWS = Counter(
    "ingestd_backfill_rows_total",
    "Rows healed from the Storage Integration (new to the database), by stream.",
    ("stream",),
    registry=REGISTRY,
)
BACKFILL_GAPS = Gauge(
    "ingestd_backfill_gaps",
    "Gaps in stream_gaps by state: open (not healed, or backfill failed) or healed.",
    ("stream", "state"),
    registry=REGISTRY,
)
STREAM_CONNECTED = Gauge(
    "ingestd_stream_connected",
    "1 while the stream is connected and reading, else 0.",
    ("stream",),
    registry=REGISTRY,
)
CURSOR_LAG = Gauge(
    "ingestd_cursor_lag_seconds",
    "Wall-clock time minus the stream cursor's event time.",
    ("stream",),
    registry=REGISTRY,
)
OUTBOX_ROWS = Gauge(
    "ingestd_outbox_rows",
    "Rows in downlink_outbox, by status.",
    ("status",),
    registry=REGISTRY,
)
DOWNLINK_PUSHES = Counter(
    "ingestd_downlink_pushes_total",
    "Downlink push attempts, by outcome (queued, retry, failed, invalid, reconciled).",
    ("outcome",),
    registry=REGISTRY,
)
DOWNLINK_PUSH_SECONDS = Histogram(
    "ingestd_downlink_push_seconds",
    "Duration of one downlink push request.",
    buckets=PUSH_BUCKETS_S,
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "ingestd_spool_bytes",
    "Bytes in the stream's local spool: frames read while the database stalled, not yet stored.",
    ("stream",),
    registry=REGISTRY,
)
SPOOL_FRAMES = Gauge(
    "ingestd_spool_frames",
    "Frames in the stream's local spool not yet stored.",
    ("stream",),
    registry=REGISTRY,
)
SPOOL_OLDEST_AGE = Gauge(
    "ingestd_spool_oldest_age_seconds",
    "Age of the oldest frame in the stream's local spool not yet stored (0 when empty).",
    ("stream",),
    registry=REGISTRY,
)
BUILD_INFO = Info(
    "ingestd_build",
    "The running ingestd version (exposed as ingestd_build_info).",
    registry=REGISTRY,
)
BUILD_INFO.info({"version": __version__})

# ---------------------------------------------------------------------------------------------
# Health: is each stream making progress?


class StreamProgress(Protocol):
    """What :func:`stream_health` reads of a stream (``ingestd.consumer.StreamState``)."""

    connected: bool
    standby: bool
    permanent_error: bool
    last_error: str | None
    retrying_since: datetime | None
    following_since: datetime | None
    last_frame_at: datetime | None
    uncommitted_since: datetime | None
    rights_missing: tuple[str, ...]


def stream_health(
    st: StreamProgress, *, now: datetime, grace_s: float, idle_timeout_s: float
) -> tuple[bool, str]:
    """(healthy, what ``/healthz`` shows) for one stream: health is progress, not a socket.

    A stream is unhealthy when any of these clocks runs past its limit:

    - **frames**: no valid frame (an event, or TTS's ``events.stream.start``) for
      ``idle_timeout_s + grace_s`` since the last one (or since following began). TTS sends
      no heartbeats, so a quiet application is silent; but its idle timeout ends the
      connection and the reconnect starts with a fresh ``events.stream.start``, so a quiet,
      working stream still sees a valid frame every ``idle_timeout_s`` plus one reconnect.
      Connected or not does not matter: a connection that trickles bytes without a frame,
      or that is dropped and reopened without one, makes no progress either;
    - **commits**: a batch taken for commit (database, or spool) has waited over
      ``grace_s``: events are read but not made durable;
    - **retries**: not connected for over ``grace_s`` since the first failed attempt began
      (the clock starts when the attempt starts, so a connect that never finishes counts);
      an error retrying will not fix (a rejected key) is unhealthy at once;
    - **rights**: TTS says the key lacks the right to read traffic (``rights_missing``):
      the stream opens, but TTS sends none of its uplinks (issue 11), so it is down however
      well connected.

    A standby (another process leads the stream) is healthy; its leader reports its own.
    """
    if st.standby:
        return True, "standby"
    if st.rights_missing:
        return False, f"down: the key lacks {', '.join(st.rights_missing)}: no traffic is sent"
    if st.permanent_error:
        return False, f"down: {st.last_error or 'rejected'}"
    if st.uncommitted_since is not None:
        waited_s = (now - st.uncommitted_since).total_seconds()
        if waited_s > grace_s:
            return False, f"stalled: a batch has waited {waited_s:.0f} s to be committed"
    if not st.connected:
        since = st.retrying_since or now
        if (now - since).total_seconds() > grace_s:
            return False, f"down: {st.last_error or 'not connected'}"
    origin = max((t for t in (st.last_frame_at, st.following_since) if t is not None), default=None)
    if origin is not None:
        silent_s = (now - origin).total_seconds()
        if silent_s > idle_timeout_s + grace_s:
            why = f" (last error: {st.last_error})" if st.last_error else ""
            return False, f"stalled: no valid frame for {silent_s:.0f} s{why}"
    return True, "connected" if st.connected else "retrying"


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint

HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
"""Returns (healthy, details); details are shown on /healthz and must hold no secrets."""

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 0.8  # a scrape in flight may finish this long, then it is cancelled
HEALTH_TIMEOUT_S = 2.0  # a health check that hangs (e.g. the database) counts as unhealthy

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handling: ingestd's own handlers stay in charge.

    ``Server.serve`` would replace SIGTERM/SIGINT with ``signal.signal`` handlers of its own
    and re-raise caught signals on exit, fighting ``ingestd.signals``.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


def _bind(listen: str) -> socket.socket:
    """A listening TCP socket for ``host:port`` (``[v6]:port`` too; port 0 picks one)."""
    host, port = split_host_port(listen)
    family, *_ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    dualstack = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
    return socket.create_server((host, port), family=family, dualstack_ipv6=dualstack)


class MetricsServer:
    """``GET /metrics`` (Prometheus text from ``REGISTRY``) and ``GET /healthz`` over HTTP.

    ``/healthz`` answers 200 ``{"status": "ok", ...details}`` when ``health()`` says healthy,
    else 503 ``{"status": "unavailable", ...details}``; anything else is 404. Runs as a task in
    the current event loop between ``start()`` and ``stop()`` (or ``async with``).
    """

    def __init__(self, listen: str, health: HealthCheck) -> None:
        self.listen = listen
        self._health = health
        self._metrics_app = make_asgi_app(registry=REGISTRY)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def task(self) -> asyncio.Task[None]:
        """The task serving requests (only after ``start()``): it runs until ``stop()``."""
        if self._task is None:
            raise RuntimeError("MetricsServer is not started")
        return self._task

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0); only after ``start()``."""
        if self._port is None:
            raise RuntimeError("MetricsServer is not started")
        return self._port

    async def start(self) -> None:
        """Bind ``listen`` and serve; raises ``OSError`` when the address cannot be bound."""
        if self._task is not None:
            raise RuntimeError("MetricsServer is already started")
        sock = _bind(self.listen)
        config = uvicorn.Config(
            self._app,
            http="h11",
            ws="none",
            interface="asgi3",  # a bound method defeats auto-detection
            lifespan="off",
            log_config=None,  # keep ingestd's logging setup (logs.py routes uvicorn's loggers)
            access_log=False,
            server_header=False,
        )
        server = _Server(config)
        self._server = server
        self._port = sock.getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]), name="metrics")
        self._task = task
        listening = asyncio.create_task(server.listening.wait())
        try:
            # Whichever comes first: listening, or the server task ending (a startup failure).
            await asyncio.wait(
                [task, listening], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled while starting: leave nothing running
            await self.stop()
            sock.close()
            raise
        finally:
            listening.cancel()
        if not server.listening.is_set():
            await self.stop()
            sock.close()
            exc = task.exception() if task.done() and not task.cancelled() else None
            raise RuntimeError(f"metrics server did not start on {self.listen}") from exc
        log.info("metrics_listening", listen=self.listen, port=self._port)

    async def stop(self) -> None:
        """Stop serving; returns within about a second even with scrapes in flight."""
        task, server = self._task, self._server
        self._task = None
        if task is None or server is None:
            return
        server.should_exit = True
        # asyncio.wait neither raises on timeout nor cancels; a slow shutdown is cut short below.
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        if not done:
            server.force_exit = True
            for request in list(server.server_state.tasks):
                request.cancel()  # e.g. a /healthz waiting on a hung database check
            task.cancel()
            await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("metrics_server_failed", error=repr(task.exception()))

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app: routes on path, GET and HEAD only."""
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in ("/metrics", "/healthz"):
            await _respond(send, 404, _TEXT, b"not found\n")
        elif method not in ("GET", "HEAD"):
            await _respond(send, 405, [*_TEXT, (b"allow", b"GET, HEAD")], b"method not allowed\n")
        elif path == "/metrics":
            await self._metrics_app(scope, receive, send)
        else:
            status, body = await self._healthz()
            await _respond(send, status, _JSON, b"" if method == "HEAD" else body)

    async def _healthz(self) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                healthy, details = await self._health()
        except TimeoutError:
            healthy, details = False, {"error": f"health check took over {HEALTH_TIMEOUT_S} s"}
        except Exception as exc:  # the endpoint must answer, whatever the check does
            log.warning("health_check_failed", error_type=type(exc).__name__)
            healthy, details = False, {"error": type(exc).__name__}
        body = {**details, "status": "ok" if healthy else "unavailable"}
        return (200 if healthy else 503), orjson.dumps(body, default=str)


def track_spool(stream: str, spool: Spool | None) -> None:
    """Report ``spool``'s depth and age, read at scrape time (nothing on the hot path)."""
    if spool is None:
        for gauge in (SPOOL_BYTES, SPOOL_FRAMES, SPOOL_OLDEST_AGE):
            gauge.labels(stream).set(0)
        return
    SPOOL_BYTES.labels(stream).set_function(lambda: spool.bytes)
    SPOOL_FRAMES.labels(stream).set_function(lambda: spool.frames)
    SPOOL_OLDEST_AGE.labels(stream).set_function(spool.oldest_age_s)


def record_commit(
    stream: str,
    batch: Batch,
    result: CommitResult,
    *,
    received: dict[str, int],
    elapsed_s: float,
) -> None:
    """Count one committed batch: events per name, duplicates, rejects, gaps, latency, lag."""
    now = datetime.now(UTC)
    for name, n in received.items():
        EVENTS_RECEIVED.labels(stream, event_label(name)).inc(n)
    for name, n in result.stored_by_name.items():
        EVENTS_STORED.labels(stream, event_label(name)).inc(n)
    EVENTS_DUPLICATE.labels(stream).inc(result.duplicates)
    EVENTS_REJECTED.labels(stream).inc(result.rejected)
    BATCHES.labels(stream).inc()
    COMMIT_SECONDS.labels(stream).observe(elapsed_s)
    if batch.items:
        # One observation per batch, for its oldest event: the worst latency in it.
        oldest = min(ev["time"] for ev, _ in batch.items)
        EVENT_TO_COMMIT_SECONDS.labels(stream).observe((now - oldest).total_seconds())
    for gap in batch.gaps:
        GAPS.labels(stream, gap.reason).inc()
        if gap.gap_start and gap.gap_end:
            seconds = max((gap.gap_end - gap.gap_start).total_seconds(), 0.0)
            GAP_SECONDS.labels(stream, gap.reason).inc(seconds)
    cursor = batch.cursor
    if cursor is not None and cursor.last_time is not None:
        CURSOR_LAG.labels(stream).set(max((now - cursor.last_time).total_seconds(), 0.0))
