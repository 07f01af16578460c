"""Backfill: heal gaps from the Storage Integration, automatically or on demand.

A gap in ``stream_gaps`` is a window in which the event stream may have lost events (the
daemon or its database was down longer than TTS replays). TTS Cloud, Sandbox and
Enterprise keep uplinks in the Storage Integration for 24 h to 30 days, so:

- :class:`BackfillTask` (in ``ingestd run``) looks for each stream's gaps whose end lies
  ``settle_s`` in the past (storage writes are batched), fetches what storage holds for
  the window widened by ``margin_s`` (gap times are event times, storage is keyed by
  ``received_at``), and stores it idempotently. It fetches each window once more
  ``recheck_s`` later, for writes that were still on their way. The ledger columns of the
  gap record the outcome: ``backfilled_at`` (last pass), ``recovered`` (rows added),
  ``backfill_passes`` and ``backfill_error`` (why it could not run; the gap stays open).
- :func:`backfill_window` is the same fetch for ``ingestd backfill --since … --until …``.

Crash safety: each page's rows and the gap's ``recovered`` count commit in one
transaction, and the pass is recorded after its last page. A SIGKILL anywhere means the
pass runs again on restart; the rows it already stored are refused by their identity
(:mod:`ingestd.identity`), so nothing is stored twice and ``recovered`` stays exact.

The live stream is never blocked: the task has its own HTTP requests and commits one
page (≤ 1 000 uplinks) per short transaction in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from ingestd import metrics, schema
from ingestd.aio import sleep_or_stop
from ingestd.config import BackfillSettings, StreamSettings
from ingestd.errors import (
    AuthRejected,
    IngestdError,
    MalformedEvent,
    StorageNotEnabled,
    StoreUnavailable,
    TransientError,
)
from ingestd.models import Row
from ingestd.normalize import normalize_application_up
from ingestd.storage import Page, StorageClient
from ingestd.store import _BulkInsert, map_db_errors

log = structlog.get_logger()

TABLES = ("uplinks", "uplink_receptions", "joins")  # parents first
UP_TYPES = ("uplink_message",)  # TTS Cloud storage keeps only uplinks


def record_metrics_rows(stream: str, rows: int) -> None:
    metrics.BACKFILL_ROWS.labels(stream).inc(rows)


def record_metrics_gaps(stream: str, open_: int, healed: int) -> None:
    metrics.BACKFILL_GAPS.labels(stream, "open").set(open_)
    metrics.BACKFILL_GAPS.labels(stream, "healed").set(healed)


# --- results -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class BackfillResult:
    """What one fetch did: messages from storage, rows new to the database, per device."""

    fetched: int = 0
    new: int = 0
    rejected: int = 0
    per_device: dict[str, list[int]] = field(default_factory=dict)  # device -> [fetched, new]

    @property
    def already_present(self) -> int:
        return self.fetched - self.new - self.rejected

    def add(self, other: BackfillResult) -> None:
        self.fetched += other.fetched
        self.new += other.new
        self.rejected += other.rejected
        for dev, (f, n) in other.per_device.items():
            cur = self.per_device.setdefault(dev, [0, 0])
            cur[0] += f
            cur[1] += n


@dataclass(frozen=True, slots=True)
class DueGap:
    id: int
    stream: str
    gap_start: datetime
    gap_end: datetime
    passes: int


# --- SQL ----------------------------------------------------------------------------------


class BackfillStore:
    """The backfill's SQL: storage rows in, gap ledger updates. Synchronous (run in a thread).

    Kept beside :mod:`ingestd.store` rather than in it: it writes derived rows without an
    ``events`` row or a cursor, and owns the ledger columns of ``stream_gaps``.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        self._bulk = {n: _BulkInsert(schema.metadata.tables[n], dialect) for n in TABLES}

    def store_page(
        self, messages: Sequence[dict[str, Any]], *, gap_id: int | None = None
    ) -> BackfillResult:
        """Normalize and insert one page; count new rows; add them to the gap's ``recovered``."""
        result = BackfillResult()
        per_table: dict[str, list[Mapping[str, Any]]] = {n: [] for n in TABLES}
        for up in messages:
            result.fetched += 1
            device = str((up.get("end_device_ids") or {}).get("device_id"))
            try:
                rows: list[Row] = normalize_application_up(up, "storage")
            except MalformedEvent as exc:
                result.rejected += 1
                log.warning("backfill_message_rejected", device_id=device, error=str(exc))
                continue
            for table, values in rows:
                per_table[table].append(values)
            per = result.per_device.setdefault(device, [0, 0])
            per[0] += 1
        with map_db_errors(), self.engine.begin() as conn:
            uplinks = per_table["uplinks"]
            existing = self._existing_uplinks(conn, [r["uplink_id"] for r in uplinks])
            fresh = [r for r in uplinks if r["uplink_id"] not in existing]
            keep = {r["uplink_id"] for r in fresh}
            new_ups = self._insert(conn, "uplinks", fresh)
            self._insert(
                conn,
                "uplink_receptions",
                [r for r in per_table["uplink_receptions"] if r["uplink_id"] in keep],
            )
            new_joins = self._insert(conn, "joins", per_table["joins"])
            result.new = new_ups + new_joins
            for r in fresh:
                result.per_device.setdefault(r["device_id"], [0, 0])[1] += 1
            if gap_id is not None and result.new:
                g = schema.stream_gaps
                conn.execute(
                    sa.update(g)
                    .where(g.c.id == gap_id)
                    .values(recovered=g.c.recovered + result.new)
                )
        return result

    def _insert(self, conn: Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
        if not rows:
            return 0
        bulk = self._bulk[table]  # COPY on PostgreSQL, as the stream's batches are written
        return bulk.insert(conn, bulk.payload(rows), len(rows))

    @staticmethod
    def _existing_uplinks(conn: Connection, ids: list[str]) -> set[str]:
        up = schema.uplinks
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            q = sa.select(up.c.uplink_id).where(up.c.uplink_id.in_(ids[i : i + 500]))
            found.update(conn.execute(q).scalars())
        return found

    def due_gaps(self, stream: str, *, now: datetime, settings: BackfillSettings) -> list[DueGap]:
        """Gaps ready for their first pass (ended ``settle_s`` ago) or their re-check."""
        g = schema.stream_gaps
        settled = now - timedelta(seconds=settings.settle_s)
        recheck = now - timedelta(seconds=settings.recheck_s)
        q = sa.select(g.c.id, g.c.stream, g.c.gap_start, g.c.gap_end, g.c.backfill_passes).where(
            g.c.stream == stream,
            g.c.gap_start.is_not(None),
            g.c.gap_end.is_not(None),
            sa.or_(
                sa.and_(g.c.backfill_passes == 0, g.c.gap_end <= settled),
                sa.and_(g.c.backfill_passes == 1, g.c.backfilled_at <= recheck),
            ),
        )
        with map_db_errors(), self.engine.connect() as conn:
            rows = conn.execute(q.order_by(g.c.gap_start)).all()
        return [DueGap(r.id, r.stream, r.gap_start, r.gap_end, r.backfill_passes) for r in rows]

    def record_pass(self, gap_id: int, *, now: datetime) -> None:
        """A pass over the gap's window completed."""
        g = schema.stream_gaps
        with map_db_errors(), self.engine.begin() as conn:
            conn.execute(
                sa.update(g)
                .where(g.c.id == gap_id)
                .values(
                    backfilled_at=now,
                    backfill_passes=g.c.backfill_passes + 1,
                    backfill_error=None,
                )
            )

    def record_error(self, stream: str, error: str, gap_ids: Sequence[int]) -> None:
        """Why the gaps could not be healed (they stay open)."""
        g = schema.stream_gaps
        with map_db_errors(), self.engine.begin() as conn:
            conn.execute(
                sa.update(g).where(g.c.id.in_(list(gap_ids))).values(backfill_error=error[:2000])
            )

    def gap_counts(self, stream: str | None = None) -> tuple[int, int]:
        """(open, healed) gaps; healed = at least one pass and no error since."""
        g = schema.stream_gaps
        healed = sa.and_(g.c.backfill_passes > 0, g.c.backfill_error.is_(None))
        q = sa.select(
            sa.func.count().filter(sa.not_(healed)), sa.func.count().filter(healed)
        ).select_from(g)
        if stream is not None:
            q = q.where(g.c.stream == stream)
        with map_db_errors(), self.engine.connect() as conn:
            open_, healed_n = conn.execute(q).one()
        return int(open_ or 0), int(healed_n or 0)


# --- fetching -----------------------------------------------------------------------------


Progress = Callable[[BackfillResult], None]


async def backfill_window(
    client: StorageClient,
    store: BackfillStore,
    stream: StreamSettings,
    *,
    since: datetime,
    until: datetime,
    gap_id: int | None = None,
    progress: Progress | None = None,
) -> BackfillResult:
    """Fetch what storage holds for ``stream`` in ``[since, until]`` and store it.

    A stream of some devices reads each device's storage; an application stream reads the
    application's. Raises :class:`StorageNotEnabled`/:class:`AuthRejected` unchanged.
    """
    total = BackfillResult()
    storing: asyncio.Task[BackfillResult] | None = None  # the page before, while one is fetched

    async def stored() -> None:
        if storing is not None:
            total.add(await storing)
            if progress is not None:
                progress(total)

    scopes: Sequence[str | None] = stream.device_ids or (None,)
    try:
        for device in scopes:
            for up_type in UP_TYPES:
                async for page in client.pages(
                    since=since, until=until, device_id=device, up_type=up_type
                ):
                    await stored()
                    storing = asyncio.create_task(_store(store, page, gap_id))
        await stored()
    finally:
        if storing is not None and not storing.done():  # a fetch failed: let it finish
            await asyncio.gather(storing, return_exceptions=True)
    return total


async def _store(store: BackfillStore, page: Page, gap_id: int | None) -> BackfillResult:
    return await asyncio.to_thread(store.store_page, page.messages, gap_id=gap_id)


# --- the daemon's task ----------------------------------------------------------------------


class BackfillTask:
    """Heals every configured stream's gaps, forever; stops within a poll when told to."""

    def __init__(
        self,
        streams: Sequence[StreamSettings],
        *,
        engine: Engine,
        client: httpx.AsyncClient,
        settings: BackfillSettings,
        on_rows: Callable[[str, int], None] | None = record_metrics_rows,
        on_gaps: Callable[[str, int, int], None] | None = record_metrics_gaps,
    ) -> None:
        self.streams = list(streams)
        self.store = BackfillStore(engine)
        self.client = client
        self.settings = settings
        self._on_rows = on_rows
        self._on_gaps = on_gaps
        self._blocked_until: dict[str, float] = {}  # stream -> monotonic time
        self._warned: set[str] = set()  # streams whose storage refusal was logged once
        self.passes = 0  # completed passes (tests wait on it)
        self.attempts = 0  # looks at due gaps that went to storage

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for stream in self.streams:
                if stop.is_set():
                    return
                try:
                    await self.heal_stream(stream, stop)
                except asyncio.CancelledError:
                    raise
                except StoreUnavailable as exc:
                    log.warning("backfill_store_unavailable", stream=stream.name, error=str(exc))
                except Exception as exc:  # a loop's top: log, go on with the next stream
                    log.exception("backfill_failed", stream=stream.name, error=repr(exc))
                    self._blocked_until[stream.name] = time.monotonic() + self.settings.retry_s
            await sleep_or_stop(self.settings.poll_interval_s, stop)

    async def heal_stream(self, stream: StreamSettings, stop: asyncio.Event) -> None:
        """One look at ``stream``'s gaps: heal those that are due."""
        if self._blocked_until.get(stream.name, 0.0) > time.monotonic():
            return
        now = datetime.now(UTC)
        gaps = await asyncio.to_thread(
            self.store.due_gaps, stream.name, now=now, settings=self.settings
        )
        if gaps:
            await self._heal(stream, gaps, stop)
        if self._on_gaps is not None:
            open_, healed = await asyncio.to_thread(self.store.gap_counts, stream.name)
            self._on_gaps(stream.name, open_, healed)

    async def _heal(self, stream: StreamSettings, gaps: list[DueGap], stop: asyncio.Event) -> None:
        if stream.api_key is None:
            return
        self.attempts += 1

        async def stoppable_sleep(seconds: float) -> None:
            await sleep_or_stop(seconds, stop)

        client = StorageClient(
            self.client,
            base_url=stream.base_url,
            api_key=stream.api_key.reveal(),
            application_id=stream.application_id,
            page_limit=self.settings.page_limit,
            sleep=stoppable_sleep,
        )
        margin = timedelta(seconds=self.settings.margin_s)
        for gap in gaps:
            if stop.is_set():
                return
            try:
                result = await backfill_window(
                    client,
                    self.store,
                    stream,
                    since=gap.gap_start - margin,
                    until=gap.gap_end + margin,
                    gap_id=gap.id,
                )
            except (StorageNotEnabled, AuthRejected) as exc:
                await self._refused(stream, exc, [g.id for g in gaps])
                return
            except TransientError as exc:
                log.warning("backfill_deferred", stream=stream.name, gap_id=gap.id, error=str(exc))
                await asyncio.to_thread(self.store.record_error, stream.name, str(exc), [gap.id])
                self._blocked_until[stream.name] = time.monotonic() + self.settings.poll_interval_s
                return
            if stop.is_set():
                return  # not recorded: the pass runs again after a restart, adding nothing twice
            await asyncio.to_thread(self.store.record_pass, gap.id, now=datetime.now(UTC))
            self.passes += 1
            if self._on_rows is not None and result.new:
                self._on_rows(stream.name, result.new)
            log.info(
                "gap_backfilled",
                stream=stream.name,
                gap_id=gap.id,
                gap_start=gap.gap_start.isoformat(),
                gap_end=gap.gap_end.isoformat(),
                pass_=gap.passes + 1,
                fetched=result.fetched,
                recovered=result.new,
            )

    async def _refused(self, stream: StreamSettings, exc: IngestdError, gap_ids: list[int]) -> None:
        reason = (
            "Storage Integration not available (404)"
            if isinstance(exc, StorageNotEnabled)
            else "API key may not read the Storage Integration (needs 'read application traffic')"
        )
        if stream.name not in self._warned:
            self._warned.add(stream.name)
            log.warning(
                "backfill_storage_unavailable",
                stream=stream.name,
                application_id=stream.application_id,
                reason=reason,
                error=str(exc),
            )
        await asyncio.to_thread(self.store.record_error, stream.name, f"{reason}: {exc}", gap_ids)
        self._blocked_until[stream.name] = time.monotonic() + self.settings.retry_s


# --- `ingestd backfill` -------------------------------------------------------------------

PROGRESS_INTERVAL_S = 0.5
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: datetime) -> datetime:
    """``--since``: an RFC 3339 time, or a duration before now (``30d``, ``12h``, ``90m``)."""
    from ingestd.normalize import parse_time

    value = text.strip()
    if value[-1:].lower() in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        return now - timedelta(seconds=float(value[:-1]) * _UNITS[value[-1].lower()])
    try:
        return parse_time(value)
    except MalformedEvent:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-01T00:00:00Z) nor a duration (30d, 12h, 90m)"
        ) from None


def add_arguments(parser: Any) -> None:
    """Options of ``ingestd backfill``."""
    parser.add_argument("--stream", default=None, help="only this configured stream")
    parser.add_argument(
        "--since", required=True, help="start: RFC 3339 time, or a duration ago (30d, 12h)"
    )
    parser.add_argument("--until", default=None, help="end: RFC 3339 time (default: now)")
    parser.add_argument(
        "--page-limit", type=int, default=1000, help="messages per storage request (max 1000)"
    )


def run_cli(args: Any, settings: Any, *, out: Any = None, err: Any = None) -> int:
    """``ingestd backfill``: fetch a window from storage for each (or one) stream; summary."""
    import sys

    from ingestd import migrate as migrations
    from ingestd.db import create_engine

    out = out or sys.stdout
    err = err or sys.stderr
    now = datetime.now(UTC)
    try:
        since = parse_since(args.since, now=now)
        until = parse_since(args.until, now=now) if args.until else now
    except ValueError as exc:
        print(f"ingestd backfill: {exc}", file=err)
        return 2
    streams = [s for s in settings.streams if args.stream in (None, s.name)]
    if not streams:
        what = f"no stream named {args.stream!r}" if args.stream else "no streams configured"
        print(f"ingestd backfill: {what} (config from {settings.source})", file=err)
        return 2
    settings.require_credentials()
    engine = create_engine(settings.database.url)
    try:
        migrations.upgrade(engine)
        store = BackfillStore(engine)
        return asyncio.run(_run_cli(streams, store, since, until, args.page_limit, out, err))
    finally:
        engine.dispose()


async def _run_cli(
    streams: list[StreamSettings],
    store: BackfillStore,
    since: datetime,
    until: datetime,
    page_limit: int,
    out: Any,
    err: Any,
) -> int:
    started = time.perf_counter()
    progress = _TtyProgress(err) if err.isatty() else None
    total = BackfillResult()
    async with httpx.AsyncClient(http2=True) as http:
        for stream in streams:
            assert stream.api_key is not None
            client = StorageClient(
                http,
                base_url=stream.base_url,
                api_key=stream.api_key.reveal(),
                application_id=stream.application_id,
                page_limit=page_limit,
            )
            try:
                result = await backfill_window(
                    client, store, stream, since=since, until=until, progress=progress
                )
            except StorageNotEnabled as exc:
                if progress:
                    progress.done()
                print(
                    f"ingestd backfill: stream {stream.name!r}: the Storage Integration is not "
                    f"available for application {stream.application_id!r} ({exc.status_code}; "
                    "open-source TTS has none, on TTS Cloud/Enterprise enable it)",
                    file=err,
                )
                return 1
            except AuthRejected as exc:
                if progress:
                    progress.done()
                print(
                    f"ingestd backfill: stream {stream.name!r}: the API key may not read the "
                    f"Storage Integration (HTTP {exc.status_code} {exc.error_name or ''}; needs "
                    "'read application traffic')",
                    file=err,
                )
                return 1
            except TransientError as exc:
                if progress:
                    progress.done()
                print(f"ingestd backfill: stream {stream.name!r}: {exc}", file=err)
                return 1
            total.add(result)
            _print_summary(out, stream.name, result)
    if progress:
        progress.done()
    elapsed = time.perf_counter() - started
    rate = total.fetched / elapsed if elapsed > 0 else 0.0
    print(
        f"backfill {tsfmt(since)} .. {tsfmt(until)}: {total.fetched:,} fetched, "
        f"{total.new:,} new, {total.already_present:,} already present"
        + (f", {total.rejected:,} unreadable" if total.rejected else "")
        + f" in {elapsed:.1f} s ({rate:,.0f} rows/s)",
        file=out,
    )
    return 0


def tsfmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_summary(out: Any, name: str, result: BackfillResult) -> None:
    print(f"stream {name}: {result.fetched:,} fetched, {result.new:,} new", file=out)
    for device in sorted(result.per_device):
        fetched, new = result.per_device[device]
        print(f"  {device:<36} {fetched:>8,} fetched {new:>8,} new", file=out)


class _TtyProgress:
    def __init__(self, err: Any) -> None:
        self.err = err
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, result: BackfillResult) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        rate = result.fetched / max(now - self.started, 1e-9)
        self.err.write(f"\r{result.fetched:,} fetched, {result.new:,} new, {rate:,.0f} rows/s   ")
        self.err.flush()

    def done(self) -> None:
        self.err.write("\n")
        self.err.flush()
