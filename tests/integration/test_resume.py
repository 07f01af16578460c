"""Resumes that used to lose events silently (issue 8, issue 11 "Entity expiry").

Each case runs the daemon in-process against the loopback simulator on SQLite and
PostgreSQL. Invariant: every event the simulator emitted is stored exactly once or lies
inside a recorded gap.

- A replay as large as TTS's per-stream buffer (``clamp(tail, 8, 1024)``) fills it, and the
  live events published while it drains are dropped: the daemon reconnects once the
  replay is read, so the store replays them.
- A stream connection lost while the spool drains behind a locked database reconnects at
  once, from the newest spooled event, instead of waiting for the database.
- A resume whose cursor is older than the entity TTL finds no history at all: the window
  is a ``history_expired`` gap; if the history is still there, no gap.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from support import Db, connected, make_settings, running, wait_for, with_stream
from test_spool import (
    _assert_stored_once_or_in_a_gap,
    _aware,
    _publish,
    _settings,
    _spooled,
    _write_lock,
)

from ingestd.normalize import parse_time
from ingestd.sim.server import Simulator
from ingestd.spool import Spool, stream_dir

TAIL = 20  # the replay's bound and the simulator's buffer (TTS: clamp(tail, 8, 1024))


def _stored(db: Db) -> int:
    return int(db.scalar("SELECT count(*) FROM uplinks"))


async def test_a_replay_that_fills_the_buffer_is_followed_by_a_reconnect_that_replays_the_drops(
    db_url: str, db: Db
) -> None:
    with Simulator(devices=3, store_entity_count=10_000, seed=21) as sim:
        settings = with_stream(make_settings(sim, db_url), tail=TAIL)
        async with running(settings) as service:
            await connected(service)
            sent = await asyncio.to_thread(sim.uplinks, 10)
            await wait_for(lambda: _stored(db) == 10)
        sent += await asyncio.to_thread(sim.uplinks, 100)  # downtime: more than the tail
        # Hold the replay in the buffer while live events arrive, as a slow first read does.
        sim.stall_streams(30)
        requests = len(sim.stream_requests)
        async with running(settings) as service:
            await wait_for(lambda: bool(sim.event_store.subscriptions), what="subscribed")
            live = await asyncio.to_thread(sim.uplinks, 15)
            assert sim.dropped_events >= 15  # the buffer was full of the replay
            sim.stall_until = 0.0
            ids = {str(e["unique_id"]) for e in live}
            await wait_for(
                lambda: ids <= set(db.column("SELECT event_unique_id FROM uplinks")),
                what="the dropped live events",
            )
            assert len(sim.stream_requests) >= requests + 2  # the resume, then the refill
    missing = _assert_stored_once_or_in_a_gap(db, sent + live)
    assert missing and not missing & ids  # only the truncated part of the downtime is a gap
    reasons = db.column("SELECT reason FROM stream_gaps")
    assert reasons == ["replay_truncated"]


async def test_a_stream_reset_during_a_database_lock_reconnects_while_the_spool_drains(
    sim: Simulator, db_url: str, db: Db, tmp_path: Path
) -> None:
    settings = _settings(sim, db_url, tmp_path / "spool")
    async with running(settings) as service:
        await connected(service)
        sent = await _publish(sim, 50)
        await wait_for(lambda: _stored(db) == 50)
        consumer = service.consumers[0]
        with _write_lock(db_url):
            sent += await _publish(sim, 1000)
            await wait_for(lambda: _spooled(service) >= 700, timeout_s=30, what="spooled")
            requests = len(sim.stream_requests)
            await asyncio.to_thread(sim.reset_streams)
            await wait_for(
                lambda: len(sim.stream_requests) > requests and consumer.state.connected,
                what="reconnected during the lock",
            )
            resume = sim.stream_requests[requests]
            assert resume.after is not None
            # After the newest spooled event (the database's cursor is event 50's).
            overlap = timedelta(seconds=settings.streams[0].overlap_s)
            assert parse_time(resume.after) + overlap >= parse_time(str(sent[749]["time"]))
            sent += await _publish(sim, 1000)
            await wait_for(lambda: _spooled(service) >= 1700, timeout_s=30, what="spooled")
            assert consumer.state.connected
        await wait_for(lambda: _stored(db) >= len(sent), timeout_s=60, what="everything stored")
        await wait_for(lambda: _spooled(service) == 0, timeout_s=10, what="spool acknowledged")
    assert _assert_stored_once_or_in_a_gap(db, sent) == set()
    assert _stored(db) == len(sent) == 2050
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0
    assert sim.dropped_events == 0


async def _down_past_the_entity_ttl(
    sim: Simulator, db_url: str, db: Db, *, expire: bool
) -> tuple[Any, list[dict[str, Any]]]:
    """Store 10, stop; 20 more while down; (the server forgets them); wait out the TTL."""
    settings = with_stream(make_settings(sim, db_url), entity_ttl_s=0.5)
    async with running(settings) as service:
        await connected(service)
        sent = await asyncio.to_thread(sim.uplinks, 10)
        await wait_for(lambda: _stored(db) == 10)
    down = await asyncio.to_thread(sim.uplinks, 20)
    if expire:
        sim.expire_entities()  # as 24 h without a publish does on TTS
    last = parse_time(str(down[-1]["time"]))
    await wait_for(lambda: datetime.now(UTC) - last > timedelta(seconds=1), what="the TTL")
    return settings, sent + down


async def test_a_downtime_past_the_entity_ttl_leaves_a_history_expired_gap(
    db_url: str, db: Db
) -> None:
    with Simulator(devices=3, seed=31) as sim:
        settings, sent = await _down_past_the_entity_ttl(sim, db_url, db, expire=True)
        started = time.monotonic()
        async with running(settings) as service:
            await wait_for(
                lambda: db.scalar("SELECT count(*) FROM stream_gaps") == 1,
                what="the expiry gap",
            )
            assert time.monotonic() - started < 15
            later = await asyncio.to_thread(sim.uplinks, 5)
            await wait_for(lambda: _stored(db) == 15)
            await connected(service)
    gap = db.rows("SELECT reason, gap_start, gap_end FROM stream_gaps")[0]
    assert gap.reason == "history_expired"
    assert _aware(gap.gap_start) == parse_time(str(sent[9]["time"]))  # from the cursor
    assert _aware(gap.gap_end) > parse_time(str(sent[-1]["time"]))
    missing = _assert_stored_once_or_in_a_gap(db, sent + later)
    assert missing == {str(e["unique_id"]) for e in sent[10:]}


async def test_a_downtime_past_the_entity_ttl_with_the_history_kept_is_no_gap(
    db_url: str, db: Db
) -> None:
    with Simulator(devices=3, seed=32) as sim:
        settings, sent = await _down_past_the_entity_ttl(sim, db_url, db, expire=False)
        async with running(settings):
            await wait_for(lambda: _stored(db) == 30, what="the replay")
            # The check ends when the replay reaches back; a later batch must add nothing.
            later = await asyncio.to_thread(sim.uplinks, 5)
            await wait_for(lambda: _stored(db) == 35)
    assert _assert_stored_once_or_in_a_gap(db, sent + later) == set()
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_poison_replayed_after_reconnects_is_rejected_once(db_url: str, db: Db) -> None:
    with Simulator(devices=3, seed=41) as sim:
        async with running(make_settings(sim, db_url)) as service:
            await connected(service)
            poison = [sim.poison("bad_field"), sim.poison("truncated")]
            sent = await asyncio.to_thread(sim.uplinks, 5)
            await wait_for(lambda: _stored(db) == 5)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM rejected_events") == 2)
            for _ in range(2):  # each resume replays the poison (within the overlap)
                requests = len(sim.stream_requests)
                await asyncio.to_thread(sim.restart)
                await wait_for(lambda r=requests: len(sim.stream_requests) > r)  # type: ignore[misc]
                sent += await asyncio.to_thread(sim.uplinks, 1)  # after the replay, in order
                n = len(sent)
                await wait_for(lambda n=n: _stored(db) == n)  # type: ignore[misc]
            resumes = sim.stream_requests[-2:]
            first_poison = min(parse_time(p.time) for p in poison)
            assert all(r.after and parse_time(r.after) < first_poison for r in resumes)
    assert db.scalar("SELECT count(*) FROM rejected_events") == 2
    raws = db.column("SELECT raw FROM rejected_events")
    assert all(any(p.unique_id in raw for raw in raws) for p in poison)


async def test_a_truncated_replay_spooled_before_a_crash_still_leaves_its_gap(
    db_url: str, db: Db, tmp_path: Path
) -> None:
    """The resume's replay went to the spool (a stalled commit) and the process died before
    the batch with its replay_truncated gap was stored: draining the spool finds it again."""
    with Simulator(devices=3, seed=51, store_entity_count=20) as sim:  # only `replayed` kept
        settings = _settings(sim, db_url, tmp_path / "spool")
        async with running(settings) as service:
            await connected(service)
            stored = await asyncio.to_thread(sim.uplinks, 10)
            await wait_for(lambda: _stored(db) == 10)
        lost = await asyncio.to_thread(sim.uplinks, 30)  # beyond what the replay brought
        replayed = await asyncio.to_thread(sim.uplinks, 20)
        start = {
            "name": "events.stream.start",
            "time": replayed[-1]["time"],
            "identifiers": [{"application_ids": {"application_id": sim.application_id}}],
            "correlation_ids": ["rpc:/ttn.lorawan.v3.Events/Stream:01CRASHEDCRASHEDCRASHEDCRA"],
            "unique_id": "01CRASHEDCRASHEDCRASHEDCRA",
        }
        spool = Spool(stream_dir(tmp_path / "spool", "app"))
        spool.open()
        spool.append([b'{"result":' + orjson.dumps(e) + b"}" for e in [start, *replayed]])
        spool._close_fds()  # as a crash leaves it
        assert spool._lock_fd is not None
        os.close(spool._lock_fd)
        async with running(settings) as service:
            await wait_for(lambda: _stored(db) == 30, what="the spool drained")
            await connected(service)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM stream_gaps") == 1)
    gap = db.rows("SELECT reason, gap_start, gap_end FROM stream_gaps")[0]
    assert gap.reason == "replay_truncated"
    assert _aware(gap.gap_start) == parse_time(str(stored[-1]["time"]))
    assert _aware(gap.gap_end) == parse_time(str(replayed[0]["time"]))
    missing = _assert_stored_once_or_in_a_gap(db, stored + lost + replayed)
    assert missing == {str(e["unique_id"]) for e in lost}
