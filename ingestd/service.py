"""The daemon: owns the engine and HTTP clients, runs the named tasks, stops in order.

Tasks: ``stream:<name>`` per configured stream, ``downlink:<n>`` workers when enabled,
``metrics`` and ``watchdog``, and ``rights:<name>`` per stream (:mod:`ingestd.rights_watch`).
If one of the main tasks fails unexpectedly the service logs ``task_failed`` and stops
everything (the supervisor restarts the process). Shutdown order: streams stop
reading and commit the batch in flight with its cursor; the downlink worker gets
``shutdown_grace_s`` to finish its push; the rest is cancelled; the engine is disposed.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import sqlalchemy as sa
import structlog

from ingestd import __version__, db, metrics, migrate, sdnotify, tts
from ingestd.aio import cancel_and_wait, sleep_or_stop, wait_any
from ingestd.config import Settings
from ingestd.consumer import StreamConsumer
from ingestd.db import create_engine
from ingestd.errors import AlreadyRunning, SchemaNotReady
from ingestd.rights_watch import watch_rights
from ingestd.signals import install_stop_handlers
from ingestd.store import Store

log = structlog.get_logger()

HTTP_MAX_CONNECTIONS = 100
HEALTH_DB_TIMEOUT_S = 2.0
WATCHDOG_DEFAULT_S = 10.0
OUTBOX_GAUGE_INTERVAL_S = 10.0


class Service:
    """``async with Service(settings) as svc: await svc.run(stop)``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entered = False
        self.engine: sa.Engine | None = None
        self.client: httpx.AsyncClient | None = None  # for [tts]'s HTTP settings
        # One client per distinct http2_prior_knowledge: a stream may set its own.
        self.clients: dict[bool, httpx.AsyncClient] = {}
        self.consumers: list[StreamConsumer] = []
        self.metrics_port: int | None = None
        self.backfill_task: Any = None  # ingestd.backfill.BackfillTask while running

    async def __aenter__(self) -> Service:
        if self._entered:
            raise RuntimeError("a Service can be entered only once")
        self._entered = True
        s = self.settings
        self.engine = create_engine(s.database.url)
        store = Store(self.engine, downlink_hook=_downlink_hook())
        self.client = self.client_for(s.tts.http2_prior_knowledge)
        spool_root = s.spool.root(s.database.url) if s.spool.enabled else None
        self.consumers = [
            StreamConsumer(
                stream,
                store=store,
                client=self.client_for(stream.http2_prior_knowledge),
                batching=s.database,
                spool_root=spool_root,
                spool_max_bytes=s.spool.max_bytes,
            )
            for stream in s.streams
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for client in self.clients.values():
            await client.aclose()
        if self.engine is not None:
            self.engine.dispose()

    def client_for(self, prior_knowledge: bool) -> httpx.AsyncClient:
        """The HTTP client for ``http2_prior_knowledge = prior_knowledge`` (made once)."""
        if prior_knowledge not in self.clients:
            self.clients[prior_knowledge] = tts.http_client(
                prior_knowledge=prior_knowledge,
                limits=httpx.Limits(
                    max_connections=HTTP_MAX_CONNECTIONS, max_keepalive_connections=20
                ),
            )
        return self.clients[prior_knowledge]

    # -- health ------------------------------------------------------------------------------

    def stream_ready(self, application_id: str, device_id: str) -> bool:
        """True when a connected stream (here, or its leader elsewhere) receives this
        device's downlink events."""
        return any(
            c.state.receiving and c.state.covers(application_id, device_id) for c in self.consumers
        )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every stream makes progress (:func:`ingestd.metrics.stream_health`)
        and the database answers."""
        now = datetime.now(UTC)
        grace_s = self.settings.metrics.health_grace_s
        streams: dict[str, str] = {}
        progress: dict[str, dict[str, datetime | None]] = {}
        ok = True
        for c in self.consumers:
            st = c.state
            healthy, streams[st.name] = metrics.stream_health(
                st, now=now, grace_s=grace_s, idle_timeout_s=c.settings.idle_timeout_s
            )
            progress[st.name] = {
                "last_frame_at": st.last_frame_at,
                "last_commit_at": st.last_commit_at,
            }
            ok = ok and healthy
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ping_db), HEALTH_DB_TIMEOUT_S)
            database = "ok"
        except Exception as exc:  # any failure to answer is unhealthy
            database = f"down: {type(exc).__name__}"
            ok = False
        return ok, {"streams": streams, "database": database, "progress": progress}

    def _ping_db(self) -> None:
        assert self.engine is not None
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every task until ``stop`` is set or one of them fails.

        Streams, downlink workers, backfill and the metrics server must run until the stop;
        the side tasks (``ready``, ``watchdog``, ``outbox_gauge``) may finish early but must
        not fail. Either way a failure logs ``task_failed`` and stops the daemon (a dead
        watchdog task would otherwise have systemd kill it after ``WatchdogSec``, with no
        line saying why); errors that tasks raise while stopping are logged too.
        """
        server = await self._start_metrics()  # first: a bind failure leaves nothing running
        tasks: dict[str, asyncio.Task[Any]] = {}
        for consumer in self.consumers:
            name = f"stream:{consumer.settings.name}"
            tasks[name] = asyncio.create_task(consumer.run(stop), name=name)
        downlink_stop = asyncio.Event()
        for i, worker in enumerate(self._downlink_workers()):
            name = f"downlink:{i}"
            tasks[name] = asyncio.create_task(worker.run(downlink_stop), name=name)
        if self.settings.backfill.enabled and self.settings.streams:
            tasks["backfill"] = asyncio.create_task(self._backfill().run(stop), name="backfill")
        side: dict[str, asyncio.Task[Any]] = {
            "ready": asyncio.create_task(self._notify_ready(stop), name="ready"),
            "watchdog": asyncio.create_task(self._watchdog(stop), name="watchdog"),
            "outbox_gauge": asyncio.create_task(self._outbox_gauge(stop), name="outbox_gauge"),
        }
        if (retention := self.settings.retention).max_age is not None:
            from ingestd.prune import retention_loop

            assert self.engine is not None
            side["retention"] = asyncio.create_task(
                retention_loop(
                    self.engine,
                    max_age=retention.max_age,
                    interval_s=retention.interval_s,
                    stop=stop,
                ),
                name="retention",
            )
        for consumer in self.consumers:  # once at stream start, then every few minutes
            stream = consumer.settings
            side[f"rights:{stream.name}"] = asyncio.create_task(
                watch_rights(
                    stream,
                    consumer.state,
                    self.client_for(stream.http2_prior_knowledge),
                    stop,
                    downlinks=self.settings.downlinks.enabled,
                ),
                name=f"rights:{stream.name}",
            )
        if server is not None:
            tasks["metrics"] = server.task
        failed: BaseException | None = None
        try:
            failed = await self._monitor(tasks, side, stop)
        finally:
            sdnotify.stopping()
            stop.set()
            if self.engine is not None:
                db.shorten_waits(self.engine)  # a locked SQLite must not hold the shutdown
            # Backfill can stop anywhere: each page commits whole, an unrecorded pass reruns.
            await cancel_and_wait([t for n, t in tasks.items() if n == "backfill"])
            streams = [t for n, t in tasks.items() if n.startswith("stream:")]
            await asyncio.gather(*streams, return_exceptions=True)
            downlinks = [t for n, t in tasks.items() if n.startswith("downlink:")]
            downlink_stop.set()
            if downlinks:
                _, pending = await asyncio.wait(
                    downlinks, timeout=self.settings.downlinks.shutdown_grace_s
                )
                await cancel_and_wait(pending)
            await cancel_and_wait(side.values())
            if server is not None:
                await server.stop()
            _log_shutdown_errors({**tasks, **side}, reported=failed)
        if failed is not None:
            raise failed

    async def _monitor(
        self,
        tasks: dict[str, asyncio.Task[Any]],
        side: dict[str, asyncio.Task[Any]],
        stop: asyncio.Event,
    ) -> BaseException | None:
        """Wait for stop; if a task ends early (a side task: fails), log ``task_failed``
        and return its error, which stops everything."""
        while not stop.is_set():
            running = [t for t in (*tasks.values(), *side.values()) if not t.done()]
            if running:
                await wait_any(stop.wait(), asyncio.wait(running, return_when="FIRST_COMPLETED"))
            else:
                await stop.wait()
            if stop.is_set():
                break
            for name, task in tasks.items():
                if task.done():
                    exc = None if task.cancelled() else task.exception()
                    log.error("task_failed", task=name, error=repr(exc))
                    return exc or RuntimeError(f"task {name} ended unexpectedly")
            for name, task in side.items():
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None or task.cancelled():
                    log.error("task_failed", task=name, error=repr(exc))
                    return exc or RuntimeError(f"task {name} was cancelled")
        return None

    def _backfill(self) -> Any:
        from ingestd.backfill import BackfillTask  # heals gaps from the Storage Integration

        assert self.engine is not None and self.client is not None
        self.backfill_task = BackfillTask(
            self.settings.streams,
            engine=self.engine,
            client=self.client,
            settings=self.settings.backfill,
        )
        return self.backfill_task

    def _downlink_workers(self) -> list[Any]:
        d = self.settings.downlinks
        if not d.enabled:
            return []
        from ingestd.outbox.worker import DownlinkWorker

        assert self.engine is not None
        return [
            DownlinkWorker(
                self.engine,
                self.settings,
                client=self.client,
                stream_ready=self.stream_ready if d.require_stream else None,
                worker_id=f"{socket.gethostname()}:{os.getpid()}",
                concurrency=d.workers,
            )
        ]

    async def _start_metrics(self) -> Any:
        listen = self.settings.metrics.listen
        if not listen:
            return None
        server = metrics.MetricsServer(listen, self.health)
        await server.start()
        self.metrics_port = server.port
        return server

    async def _notify_ready(self, stop: asyncio.Event) -> None:
        """READY=1 after the first successful stream connection (at once without streams)."""
        if self.consumers:
            waits = [c.connected_event.wait() for c in self.consumers]
            await wait_any(stop.wait(), *waits)
        if not stop.is_set():
            sdnotify.ready()
            log.info("service_ready", streams=len(self.consumers))

    async def _outbox_gauge(self, stop: asyncio.Event) -> None:
        """Refresh ``ingestd_outbox_rows{status}`` (one indexed GROUP BY per interval)."""
        from ingestd.outbox import sql as outbox

        assert self.engine is not None
        engine = self.engine
        while True:
            try:
                counts = await asyncio.to_thread(outbox.outbox_counts, engine)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("outbox_gauge_failed", error=type(exc).__name__)
            else:
                for status, n in counts.items():
                    metrics.OUTBOX_ROWS.labels(status).set(n)
            if await sleep_or_stop(OUTBOX_GAUGE_INTERVAL_S, stop):
                return

    async def _watchdog(self, stop: asyncio.Event) -> None:
        """WATCHDOG=1 while the event loop keeps running."""
        interval = sdnotify.watchdog_interval_s()
        if interval is None:
            return
        while not await sleep_or_stop(min(interval, WATCHDOG_DEFAULT_S), stop):
            sdnotify.watchdog()


def _log_shutdown_errors(
    tasks: dict[str, asyncio.Task[Any]], *, reported: BaseException | None
) -> None:
    """Log what tasks raised while stopping (``task_failed_at_stop``), not drop it; the
    error that stopped the daemon was logged as ``task_failed`` already."""
    for name, task in tasks.items():
        if not task.done() or task.cancelled():
            continue
        exc = task.exception()
        if exc is not None and exc is not reported:
            log.error("task_failed_at_stop", task=name, error=repr(exc), exc_info=exc)


def _downlink_hook() -> Any:
    from ingestd.outbox import sql as outbox

    return outbox.apply_downlink_events


def run_service(settings: Settings, *, migrate_first: bool = True) -> int:
    """``ingestd run``: migrate, then serve until SIGTERM/SIGINT. Returns the exit code.

    On SQLite, only one ``run`` per database file: a second one raises
    :class:`AlreadyRunning` (PostgreSQL coordinates several through leadership locks).
    """
    settings.require_credentials()
    for warning in settings.warnings:
        log.warning("config_exposes_secrets", warning=warning)
    lock = sqlite_run_lock_path(settings.database.url)
    with _exclusive(lock, settings.database.safe_url) if lock is not None else nullcontext():
        _migrate_or_check(settings, migrate_first=migrate_first)
        code = asyncio.run(_main(settings))
    return code


RUN_LOCK_SUFFIX = ".ingestd-run.lock"


def sqlite_run_lock_path(url: str) -> Path | None:
    """``<database>.ingestd-run.lock`` for a SQLite file database, else None."""
    sa_url = sa.make_url(url)
    database = sa_url.database or ""
    if sa_url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):  # a URI filename: leave it to the user
        return None
    path = Path(database).resolve()
    return path.with_name(path.name + RUN_LOCK_SUFFIX)


@contextmanager
def _exclusive(path: Path, database: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (the kernel drops it when the process dies,
    so a SIGKILLed daemon never leaves a stale lock behind)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise AlreadyRunning(f"cannot create the run lock {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise AlreadyRunning(
                f"another `ingestd run`{pid} is already using {database} "
                f"(lock file {path}); stop it first, or give this one its own database"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _migrate_or_check(settings: Settings, *, migrate_first: bool) -> None:
    engine = create_engine(settings.database.url)
    try:
        if migrate_first:
            migrate.upgrade(engine)
        else:
            _, problem = migrate.schema_problem(engine)
            if problem is not None:
                raise SchemaNotReady(
                    f"{settings.database.safe_url}: schema {problem} (or drop --no-migrate)"
                )
    finally:
        engine.dispose()


async def _main(settings: Settings) -> int:
    stop = asyncio.Event()
    uninstall = install_stop_handlers(asyncio.get_running_loop(), stop.set)
    try:
        async with Service(settings) as service:
            log.info(
                "service_starting",
                version=__version__,
                streams=len(settings.streams),
                downlinks=settings.downlinks.enabled,
                database=settings.database.safe_url,
            )
            await service.run(stop)
        log.info("service_stopped")
        return 0
    finally:
        uninstall()
