"""A stalled database loses nothing: the consumer spools what it reads and drains it later.

Each stall is real where loopback allows it (a PostgreSQL table lock, a SQLite write lock)
or a refused commit (an outage). The simulator's stream buffer is small (tail 200 sizes it
to 200 events) and events arrive in bursts of 100: without the spool, a reader that stops
reading makes it drop events once the buffer and the loopback socket are full. Invariant: every
event the simulator emitted is stored exactly once, or lies inside a recorded gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs
from support import Db, connected, make_settings, running, wait_for, with_stream

from ingestd import metrics
from ingestd.cli import status
from ingestd.config import Settings, SpoolSettings
from ingestd.consumer import StreamConsumer
from ingestd.errors import StoreUnavailable
from ingestd.normalize import parse_time
from ingestd.service import Service
from ingestd.sim.server import Simulator
from ingestd.spool import Spool, stream_dir
from ingestd.store import Store

STALLED = 3000  # uplinks published while the database stalls (~5 MB: more than loopback holds)
BUFFER = 200
BURST = 100


def _settings(sim: Simulator, db_url: str, spool_dir: Path, **spool: Any) -> Settings:
    settings = make_settings(
        sim,
        db_url,
        batch_max_events=100,
        spool=SpoolSettings(dir=str(spool_dir), **spool),
    )
    return with_stream(settings, tail=BUFFER)  # TTS: a per-stream buffer of clamp(tail, 8, 1024)


@contextlib.contextmanager
def _write_lock(db_url: str) -> Iterator[None]:
    """Another connection holds the write lock: LOCK TABLE on PostgreSQL, BEGIN IMMEDIATE
    on SQLite (the daemon's commit then waits inside the driver)."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database or "", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _outage(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Every commit refused as by an unreachable database, until the block ends."""
    real_commit = Store.commit_batch
    state = {"on": 1, "refused": 0}

    def commit(self: Store, batch: Any, prepared: Any = None) -> Any:
        if state["on"]:
            state["refused"] += 1
            raise StoreUnavailable("database unavailable: OperationalError")
        return real_commit(self, batch, prepared)

    monkeypatch.setattr(Store, "commit_batch", commit)
    try:
        yield state
    finally:
        state["on"] = 0


def _consumer(service: Service) -> StreamConsumer:
    return service.consumers[0]


def _spooled(service: Service) -> int:
    spool = _consumer(service)._spool
    return spool.frames if spool is not None else 0


async def _publish(
    sim: Simulator, n: int, executor: Executor | None = None
) -> list[dict[str, Any]]:
    """``n`` uplinks in bursts, generated in ``executor`` (default: the loop's, shared with
    the daemon under test)."""
    loop = asyncio.get_running_loop()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        out += await loop.run_in_executor(executor, sim.uplinks, min(BURST, n - len(out)))
        await asyncio.sleep(0.02)  # pacing the traffic
    return out


def _assert_stored_once_or_in_a_gap(db: Db, sent: list[dict[str, Any]]) -> set[str]:
    """The invariant; returns the ids that are not stored (each inside a gap)."""
    ids = db.column("SELECT event_unique_id FROM uplinks")
    assert len(ids) == len(set(ids)), "an uplink was stored twice"
    gaps = [
        (_aware(r.gap_start), _aware(r.gap_end))
        for r in db.rows("SELECT gap_start, gap_end FROM stream_gaps")
    ]
    missing = {str(e["unique_id"]) for e in sent} - set(ids)
    for event in sent:
        if event["unique_id"] in missing:
            t = parse_time(str(event["time"]))
            assert any(a <= t <= b for a, b in gaps), f"{event['unique_id']} lost, no gap"
    return missing


def _aware(v: Any) -> datetime:
    t = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


async def _ride_out(
    service: Service, sim: Simulator, db: Db, stall: contextlib.AbstractContextManager[Any]
) -> list[dict[str, Any]]:
    """Store 50, stall the database while STALLED more arrive, end the stall, wait."""
    await connected(service)
    sent = await _publish(sim, 50)
    await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 50)
    with stall:
        sent += await _publish(sim, STALLED)
        # Everything was read (the last batches wait in the builder): nothing left for the
        # simulator's small buffer to drop, however long the stall lasts.
        await wait_for(lambda: _spooled(service) >= STALLED - 300, timeout_s=30, what="spooled")
        frames = metrics.REGISTRY.get_sample_value("ingestd_spool_frames", {"stream": "app"})
        assert frames is not None and frames >= STALLED - 300
        assert _consumer(service).state.connected  # the stream stayed open all along
    await wait_for(
        lambda: db.scalar("SELECT count(*) FROM uplinks") >= len(sent),
        timeout_s=60,
        what="everything stored",
    )
    await wait_for(lambda: _spooled(service) == 0, timeout_s=10, what="spool acknowledged")
    return sent


async def test_a_write_lock_held_longer_than_the_stream_buffer_loses_nothing(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path
) -> None:
    """PostgreSQL: LOCK TABLE events in another session; SQLite: BEGIN IMMEDIATE."""
    settings = _settings(sim, db_url, tmp_path / "spool")
    with capture_logs() as logs:
        async with running(settings) as service:
            sent = await _ride_out(service, sim, db, _write_lock(db_url))
            assert len(sim.stream_requests) == 1  # no reconnect was needed
    assert _assert_stored_once_or_in_a_gap(db, sent) == set()
    assert db.scalar("SELECT count(*) FROM uplinks") == len(sent) == 50 + STALLED
    assert sim.dropped_events == 0
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0
    assert db.scalar("SELECT count(*) FROM rejected_events") == 0
    assert any(e["event"] == "spool_started" for e in logs)
    assert any(e["event"] == "spool_caught_up" for e in logs)
    assert not (tmp_path / "spool").exists()  # an empty spool leaves nothing behind


async def test_a_reconnect_while_the_spool_drains_resumes_behind_it_and_loses_nothing(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path
) -> None:
    """Frames arrive out of order; the stream drops while the database still stalls. The
    resume starts at the last spooled event (not after the newest): what it replays that
    the spool holds already is stored once, and nothing in between is lost."""
    sim.out_of_order_window = 25
    settings = _settings(sim, db_url, tmp_path / "spool")
    with (
        capture_logs() as logs,
        ThreadPoolExecutor(2) as own,  # the daemon's worker threads are what is tested
    ):
        async with running(settings) as service:
            await connected(service)
            sent = await _publish(sim, 50, own)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 50)
            with _write_lock(db_url):
                sent += await _publish(sim, 1000, own)
                await wait_for(lambda: _spooled(service) >= 700, timeout_s=30, what="spooled")
                requests = len(sim.stream_requests)
                sim.fail_next_requests = [503, 503, 503]  # closed a while: only replay has it
                await asyncio.get_running_loop().run_in_executor(own, sim.restart)
                sent += await _publish(sim, 100, own)  # within the resume's tail of BUFFER
                await wait_for(
                    lambda: any(r.status == 200 for r in sim.stream_requests[requests:]),
                    what="reconnect",
                    executor=own,
                )
                sent += await _publish(sim, 100, own)
                # Still locked: the new connection's frames go on into the spool (its writes
                # need worker threads, which state saves waiting on the lock must not hold).
                await wait_for(
                    lambda: _spooled(service) >= 1100, timeout_s=10, what="spooled", executor=own
                )
            await wait_for(
                lambda: db.scalar("SELECT count(*) FROM uplinks") >= len(sent),
                timeout_s=60,
                what="everything stored",
            )
            await wait_for(lambda: _spooled(service) == 0, timeout_s=10, what="spool acked")
    assert any(e["event"] == "stream_resuming_while_draining" for e in logs)
    resume = next(r for r in sim.stream_requests[requests:] if r.status == 200)
    assert resume.after is not None
    assert parse_time(resume.after) <= max(parse_time(str(e["time"])) for e in sent[:1050])
    assert _assert_stored_once_or_in_a_gap(db, sent) == set()
    assert db.scalar("SELECT count(*) FROM uplinks") == len(sent) == 1250
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_a_store_outage_is_ridden_out_by_the_spool(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(sim, db_url, tmp_path / "spool")
    async with running(settings) as service:
        await connected(service)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM stream_cursors") == 1)
        outage = _outage(monkeypatch)
        sent = await _ride_out(service, sim, db, outage)
    assert _assert_stored_once_or_in_a_gap(db, sent) == set()
    assert db.scalar("SELECT count(*) FROM uplinks") == 50 + STALLED
    assert sim.dropped_events == 0
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_without_the_spool_the_same_lock_makes_the_server_drop_events(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path
) -> None:
    """The control: a stall like the one above loses events without a spool.

    How much loopback holds before the server's buffer overflows depends on the kernel's
    socket buffer tuning at the time, so the stall goes on (up to 3x STALLED) until it does.
    """
    settings = _settings(sim, db_url, tmp_path / "spool", enabled=False)
    async with running(settings) as service:
        await connected(service)
        await _publish(sim, 50)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 50)
        with _write_lock(db_url):
            for _ in range(3):
                await _publish(sim, STALLED)
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: sim.dropped_events > 0, timeout_s=5, what="drops")
                    break
            assert sim.dropped_events > 0, "a stall of 3x STALLED events dropped nothing"
    assert not (tmp_path / "spool").exists()


async def test_a_full_spool_closes_the_stream_and_records_a_gap_from_its_end(
    db_url: str, db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that keeps little: the resume after the full spool cannot replay everything.
    with Simulator(devices=5, store_entity_count=100, seed=5) as sim:
        settings = _settings(sim, db_url, tmp_path / "spool", max_bytes=1_000_000)
        with capture_logs() as logs:
            async with running(settings) as service:
                await connected(service)
                sent = await _publish(sim, 20)
                await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 20)
                with _outage(monkeypatch):
                    sent += await _publish(sim, 1500)
                    await wait_for(
                        lambda: any(e["event"] == "spool_full" for e in logs),
                        timeout_s=20,
                        what="spool full",
                    )
                    assert not _consumer(service).state.connected
                    closed_at = datetime.now(UTC)
                    sent += await _publish(sim, 500)  # while closed: only the store keeps them
                await wait_for(
                    lambda: (
                        db.scalar("SELECT count(*) FROM stream_gaps WHERE reason = 'spool_full'")
                        == 1
                    ),
                    timeout_s=30,
                    what="gap",
                )
                await connected(service)
                later = await _publish(sim, 30)
                ids = {e["unique_id"] for e in later}
                await wait_for(
                    lambda: ids <= set(db.column("SELECT event_unique_id FROM uplinks")),
                    timeout_s=20,
                )
    gap = db.rows("SELECT gap_start, gap_end FROM stream_gaps WHERE reason = 'spool_full'")[0]
    assert _aware(gap.gap_end) > closed_at
    missing = _assert_stored_once_or_in_a_gap(db, sent + later)
    assert missing  # the small store could not replay the whole closed window
    assert not (ids & missing)
    spooled_max = max(parse_time(str(e["time"])) for e in sent[:200])
    assert _aware(gap.gap_start) >= spooled_max  # everything spooled was stored before it
    assert db.scalar("SELECT count(*) FROM uplinks") >= 220


async def test_a_spool_left_by_a_crash_is_drained_before_the_stream_connects(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path
) -> None:
    """Spooled frames are stored once (also those the database already had: an ack lost
    in a crash), and the resume starts after them, not at the stored cursor."""
    settings = _settings(sim, db_url, tmp_path / "spool")
    async with running(settings) as service:
        await connected(service)
        first = await _publish(sim, 20)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 20)
    spooled = first[10:] + sim.uplinks(40)  # 10 already stored (their ack was lost) + 40 new
    spool = Spool(stream_dir(tmp_path / "spool", "app"))
    spool.open()
    frames = [b'{"result":' + orjson.dumps(e) + b"}" for e in spooled]
    spool.append(frames[:25])
    spool.append(frames[25:])
    spool._close_fds()  # as a crash leaves it: files and no ack of these frames
    assert spool._lock_fd is not None
    import os

    os.close(spool._lock_fd)
    requests_before = len(sim.stream_requests)

    report = status.collect_status(db.engine, settings, now=datetime.now(UTC))
    assert report["streams"][0]["spool"]["frames"] == 50

    async with running(settings) as service:
        await connected(service)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 60)
        await wait_for(lambda: _spooled(service) == 0)
    resume = sim.stream_requests[requests_before]
    assert resume.after is not None
    last = max(parse_time(str(e["time"])) for e in spooled)
    overlap = timedelta(seconds=settings.streams[0].overlap_s)
    assert parse_time(resume.after) == last - overlap
    assert _assert_stored_once_or_in_a_gap(db, first + spooled) == set()
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_a_commit_that_fails_unexpectedly_stops_the_stream_and_keeps_the_cursor(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(sim, db_url, tmp_path / "spool")
    real_commit = Store.commit_batch
    broken = threading.Event()

    def commit(self: Store, batch: Any, prepared: Any = None) -> Any:
        if broken.is_set() and batch.items:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real_commit(self, batch, prepared)

    monkeypatch.setattr(Store, "commit_batch", commit)
    stop = asyncio.Event()
    with capture_logs() as logs:
        async with Service(settings) as service:
            task = asyncio.create_task(service.run(stop))
            await connected(service)
            await _publish(sim, 10)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10)
            cursor = db.scalar("SELECT last_event_time FROM stream_cursors")
            broken.set()
            await _publish(sim, 300)
            with pytest.raises(OverflowError):
                await asyncio.wait_for(task, timeout=10)
    assert db.scalar("SELECT count(*) FROM uplinks") == 10  # no later batch passed it
    assert db.scalar("SELECT last_event_time FROM stream_cursors") == cursor
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert failed and failed[0]["task"] == "stream:app"
    assert any(e["event"] == "batch_not_stored" for e in logs)
    assert not any(e["event"] == "flush_failed" for e in logs)


async def test_a_reject_flood_ends_the_connection_and_it_reconnects(
    sim: Simulator, db_url: str, db: Db
) -> None:
    """A connection that brings mostly junk (frames that are not events) is dropped and
    reopened with backoff instead of filling rejected_events without end."""
    from ingestd.batch import REJECT_FLOOD_FRAMES

    def reconnects() -> float:
        labels = {"stream": "app", "reason": "reject_flood"}
        return metrics.REGISTRY.get_sample_value("ingestd_reconnects_total", labels) or 0.0

    before = reconnects()
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        for _ in range(REJECT_FLOOD_FRAMES + 5):
            sim.poison("truncated")  # not JSON: junk, not an event
        await wait_for(lambda: reconnects() >= before + 1, timeout_s=10, what="reconnect")
    assert db.scalar("SELECT count(*) FROM rejected_events") >= 3
