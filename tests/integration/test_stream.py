"""The live-stream daemon against the simulated TTS over loopback HTTP, on both databases."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import orjson
import pytest
from structlog.testing import capture_logs
from support import Db, connected, make_settings, running, wait_for, with_stream

from ingestd.normalize import parse_time
from ingestd.service import Service
from ingestd.sim.server import Simulator


def _times(events: list[dict[str, object]]) -> list[datetime]:
    return [parse_time(str(e["time"])) for e in events]


def _covered(t: datetime, gaps: list[tuple[datetime, datetime]]) -> bool:
    return any(start <= t <= end for start, end in gaps)


def _gaps(db: Db, reason: str | None = None) -> list[tuple[datetime, datetime]]:
    rows = db.rows("SELECT gap_start, gap_end, reason FROM stream_gaps")
    return [
        (_aware(r.gap_start), _aware(r.gap_end))
        for r in rows
        if reason is None or r.reason == reason
    ]


def _aware(v: object) -> datetime:
    from datetime import UTC

    t = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


async def _publish_paced(
    sim: Simulator, n: int, *, chunk: int = 200, pause_s: float = 0.05
) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while len(out) < n:
        out += sim.uplinks(min(chunk, n - len(out)))
        await asyncio.sleep(pause_s)  # pacing the traffic
    return out


async def test_ten_thousand_uplinks_through_drops_and_reordering_stored_exactly_once(
    sim: Simulator, db_url: str, db: Db
) -> None:
    sim.drop_every_n_frames = 700
    sim.out_of_order_window = 25
    # The simulator's store holds everything; a tail this large lets every replay reach back.
    settings = with_stream(make_settings(sim, db_url), tail=20_000)
    async with running(settings) as service:
        await connected(service)
        sent = await _publish_paced(sim, 10_000)
        await wait_for(
            lambda: db.scalar("SELECT count(*) FROM uplinks") >= 10_000,
            timeout_s=120,  # generous: the 2-core machine may be shared
            what="10 000 uplinks",
        )
        await asyncio.sleep(0.3)  # anything still in flight would show up as an extra row
    stored = db.column("SELECT event_unique_id FROM uplinks")
    assert len(stored) == 10_000
    assert set(stored) == {e["unique_id"] for e in sent}
    assert db.scalar("SELECT count(DISTINCT device_id) FROM uplinks") == 50
    assert len([r for r in sim.stream_requests if r.status == 200]) >= 10_000 // 700
    assert db.scalar("SELECT count(*) FROM rejected_events") == 0
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_a_new_stream_saves_the_stream_start_time_as_its_cursor_at_once(
    sim: Simulator, db_url: str, db: Db
) -> None:
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        await wait_for(
            lambda: (
                db.scalar("SELECT count(*) FROM stream_cursors WHERE last_event_time IS NOT NULL")
                == 1
            ),
            timeout_s=5,
        )
    start = sim.stream_requests[0]
    assert start.after is None
    assert start.tail >= 1000  # a large tail also sizes TTS's per-stream buffer


async def test_reconnect_resumes_after_cursor_minus_overlap_with_a_tail(
    sim: Simulator, db_url: str, db: Db
) -> None:
    settings = make_settings(sim, db_url)
    async with running(settings) as service:
        await connected(service)
        sent = await _publish_paced(sim, 30)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 30)
    last = max(_times(sent))
    async with running(settings) as service:
        await connected(service)  # connected: the resume request has been answered
    resume = sim.stream_requests[-1]
    assert resume.after is not None
    assert parse_time(resume.after) == last - timedelta(seconds=settings.streams[0].overlap_s)
    assert resume.tail == settings.streams[0].tail
    assert db.scalar("SELECT count(*) FROM uplinks") == 30  # the replay added no duplicates
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0  # the replay reached the cursor


async def test_events_published_while_down_are_replayed_from_the_store(
    sim: Simulator, db_url: str, db: Db
) -> None:
    settings = make_settings(sim, db_url)
    async with running(settings) as service:
        await connected(service)
        await _publish_paced(sim, 20)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 20)
    sim.uplinks(150)  # while the daemon is down
    async with running(settings) as service:
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 170)
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0


async def test_no_store_server_records_a_gap_covering_what_was_published_while_down(
    db_url: str, db: Db
) -> None:
    with Simulator(devices=5, store=False, seed=2) as sim:
        settings = make_settings(sim, db_url)
        async with running(settings) as service:
            await connected(service)
            await _publish_paced(sim, 10)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10)
        lost = sim.uplinks(25)
        with capture_logs() as logs:
            async with running(settings) as service:
                await connected(service)
                await wait_for(lambda: db.scalar("SELECT count(*) FROM stream_gaps") == 1)
                later = await _publish_paced(sim, 5)
                await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 15)
    gaps = _gaps(db, "store_disabled")
    assert all(_covered(t, gaps) for t in _times(lost))
    assert not any(_covered(t, gaps) for t in _times(later))
    warnings = [e for e in logs if e["event"] == "tts_warning"]
    assert [w["warning"] for w in warnings] == ["Events storage is not enabled"]


async def test_a_store_that_kept_only_the_newest_100_records_a_gap_over_the_rest(
    db_url: str, db: Db
) -> None:
    with Simulator(devices=5, store_entity_count=100, seed=3) as sim:
        settings = make_settings(sim, db_url)
        async with running(settings) as service:
            await connected(service)
            await _publish_paced(sim, 10)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10)
        published_while_down = sim.uplinks(300)
        async with running(settings) as service:
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") >= 110)
            await wait_for(lambda: bool(_gaps(db, "replay_truncated")), what="the gap")
            # Nothing to wait on for "no more than the store's 100": give extras a moment.
            await asyncio.sleep(0.2)
    stored = set(db.column("SELECT event_unique_id FROM uplinks"))
    missing = [e for e in published_while_down if e["unique_id"] not in stored]
    assert len(missing) == 200  # the store replayed only its newest 100
    gaps = _gaps(db, "replay_truncated")
    assert gaps
    assert all(_covered(t, gaps) for t in _times(missing))


async def test_sparse_replays_are_kept_in_events_and_recorded_as_a_gap(
    sim: Simulator, db_url: str, db: Db
) -> None:
    settings = make_settings(sim, db_url)
    async with running(settings) as service:
        await connected(service)
        await _publish_paced(sim, 5)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 5)
    sparse = sim.uplinks(12)
    sim.expire_payloads()  # the payload TTL passes while the daemon is down
    async with running(settings) as service:
        ids = {e["unique_id"] for e in sparse}
        await wait_for(lambda: ids <= set(db.column("SELECT unique_id FROM events")))
        # The gap is written with the batch that stores the events (and no uplink rows).
        await wait_for(
            lambda: all(_covered(t, _gaps(db, "sparse_replay")) for t in _times(sparse)),
            what="the sparse_replay gap",
        )
    assert db.scalar("SELECT count(*) FROM uplinks") == 5  # sparse events are not uplinks
    gaps = _gaps(db, "sparse_replay")
    assert all(_covered(t, gaps) for t in _times(sparse))


async def test_a_bad_frame_lands_in_rejected_events_and_the_stream_goes_on(
    sim: Simulator, db_url: str, db: Db
) -> None:
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        good = sim.uplink(sim.device_ids[0])
        bad = dict(sim.uplink(sim.device_ids[1]))
        bad["unique_id"] = "01ZZBADBADBADBADBADBADBADB"
        bad["data"] = {**bad["data"], "uplink_message": {"settings": {"frequency": "x"}}}  # type: ignore[dict-item]
        sim.publish(bad)
        after = sim.uplink(sim.device_ids[2])
        await wait_for(lambda: db.scalar("SELECT count(*) FROM rejected_events") == 1)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 3)
    raw = db.scalar("SELECT raw FROM rejected_events")
    assert "01ZZBADBADBADBADBADBADBADB" in raw
    assert orjson.loads(raw)["result"]["unique_id"] == bad["unique_id"]
    assert {good["unique_id"], after["unique_id"]} <= set(
        db.column("SELECT event_unique_id FROM uplinks")
    )


async def test_401_is_one_clear_error_and_the_other_streams_keep_running(
    sim: Simulator, db_url: str, db: Db
) -> None:
    wrong_key = "NNSXS." + "A" * 39 + "." + "B" * 52
    settings = make_settings(
        sim,
        db_url,
        streams=[
            {"name": "good", "application_id": sim.application_id},
            {"name": "bad-key", "application_id": sim.application_id},
        ],
    )
    from dataclasses import replace

    from ingestd.secrets import Secret

    settings = replace(
        settings,
        streams=(settings.streams[0], replace(settings.streams[1], api_key=Secret(wrong_key))),
    )
    with capture_logs() as logs:
        async with running(settings) as service:
            await wait_for(lambda: service.consumers[0].state.connected)
            await wait_for(lambda: service.consumers[1].state.last_error is not None)
            sim.uplinks(3)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 3)
            await asyncio.sleep(0.5)  # a window in which a hot retry loop would show itself
            assert not service.consumers[1].state.connected
    rejected = [e for e in logs if e["event"] == "stream_auth_rejected"]
    assert len(rejected) == 1  # one clear line, then a long back-off (no hot loop)
    assert rejected[0]["stream"] == "bad-key"
    assert rejected[0]["error_name"] == "api_key_not_found"
    bad_requests = [r for r in sim.stream_requests if r.status == 401]
    assert len(bad_requests) == 1
    dumped = repr(logs)
    assert wrong_key not in dumped
    assert sim.api_key not in dumped
    assert db.scalar("SELECT last_error FROM stream_cursors WHERE stream='good'") is None
    assert "api_key_not_found" in db.scalar(
        "SELECT last_error FROM stream_cursors WHERE stream='bad-key'"
    )


async def test_429_waits_for_x_rate_limit_retry_plus_one_second(
    sim: Simulator, db_url: str, db: Db
) -> None:
    sim.fail_next_requests = [429]
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
    first, second = sim.stream_requests[0], sim.stream_requests[1]
    assert first.status == 429
    assert second.time - first.time >= 2.0  # X-Rate-Limit-Retry: 1, plus 1 s


async def test_503_is_retried_with_backoff_until_it_connects(
    sim: Simulator, db_url: str, db: Db
) -> None:
    sim.fail_next_requests = [503, 503, 503]
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        sim.uplinks(2)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 2)
    assert [r.status for r in sim.stream_requests[:4]] == [503, 503, 503, 200]


async def test_an_idle_stream_is_reconnected_after_the_idle_timeout(
    sim: Simulator, db_url: str, db: Db
) -> None:
    settings = with_stream(make_settings(sim, db_url), idle_timeout_s=0.4)
    with capture_logs() as logs:
        async with running(settings) as service:
            await connected(service)
            await wait_for(lambda: len(sim.stream_requests) >= 3, timeout_s=5)
            sim.uplinks(2)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 2)
    reasons = {e.get("reason") for e in logs if e["event"] == "stream_disconnected"}
    assert "idle_timeout" in reasons


async def test_stop_commits_the_batch_in_flight_within_half_a_second(
    sim: Simulator, db_url: str, db: Db
) -> None:
    # A long batch delay: only the graceful stop can have committed these rows.
    settings = make_settings(sim, db_url, batch_max_delay_s=30.0, batch_max_events=10_000)
    stop = asyncio.Event()
    from ingestd.service import Service

    async with Service(settings) as service:
        task = asyncio.create_task(service.run(stop))
        await connected(service)
        sent = sim.uplinks(40)
        await wait_for(lambda: len(service.consumers[0]._builder or []) >= 40, timeout_s=5)  # type: ignore[arg-type]
        assert db.scalar("SELECT count(*) FROM uplinks") == 0
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        took = time.monotonic() - began
    assert took < 0.5
    assert db.scalar("SELECT count(*) FROM uplinks") == 40
    cursor = _aware(db.scalar("SELECT last_event_time FROM stream_cursors WHERE stream='app'"))
    assert cursor == max(_times(sent))


async def test_on_postgresql_one_process_leads_a_stream_and_a_standby_takes_over(
    sim: Simulator, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestd import consumer

    monkeypatch.setattr(consumer, "LEADER_RETRY_S", 0.1)
    db = Db(pg_url)
    settings = make_settings(sim, pg_url)
    leader_stop = asyncio.Event()
    async with Service(settings) as leader:
        leader_task = asyncio.create_task(leader.run(leader_stop))
        await connected(leader)
        async with running(settings) as standby:
            await _standby_takes_over(sim, db, leader_stop, leader_task, standby)
    assert db.scalar("SELECT count(*) FROM events") == 15
    db.engine.dispose()


async def _standby_takes_over(
    sim: Simulator,
    db: Db,
    leader_stop: asyncio.Event,
    leader_task: asyncio.Task[None],
    standby: Service,
) -> None:
    await wait_for(lambda: standby.consumers[0].state.standby, timeout_s=5)
    sim.uplinks(10)
    await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10)
    assert not standby.consumers[0].state.connected
    assert len([r for r in sim.stream_requests if r.status == 200]) == 1
    ok, details = await standby.health()
    assert ok
    assert details["streams"]["app"] == "standby"

    leader_stop.set()  # the leader shuts down and its lock goes with its session
    await asyncio.wait_for(leader_task, timeout=5)
    await connected(standby)
    sim.uplinks(5)
    await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 15)


async def test_a_database_outage_is_retried_and_does_not_delay_stopping(
    sim: Simulator, db_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestd.errors import StoreUnavailable
    from ingestd.store import Store

    real_commit = Store.commit_batch
    outage = {"on": False, "refused": 0}

    def flaky_commit(self: Store, batch: object, prepared: object = None) -> object:
        if outage["on"]:
            outage["refused"] += 1
            raise StoreUnavailable("database unavailable: OperationalError")
        return real_commit(self, batch, prepared)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "commit_batch", flaky_commit)
    stop = asyncio.Event()
    async with Service(make_settings(sim, db_url)) as service:
        task = asyncio.create_task(service.run(stop))
        await connected(service)
        sim.uplinks(5)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 5)
        outage["on"] = True
        sim.uplinks(5)
        await wait_for(lambda: outage["refused"] >= 2, timeout_s=10)  # retried with backoff
        outage["on"] = False
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10, timeout_s=10)

        outage["on"] = True  # down again, then asked to stop: the stop must not hang
        sim.uplinks(3)
        await wait_for(lambda: outage["refused"] >= 4, timeout_s=10)
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        assert time.monotonic() - began < 1.5
    assert db.scalar("SELECT count(*) FROM uplinks") == 10  # the 3 are replayed after restart


async def test_an_unknown_event_name_in_the_filter_is_a_clear_error_not_a_hot_loop(
    sim: Simulator, db_url: str
) -> None:
    settings = with_stream(make_settings(sim, db_url), names=("as.up.data.forwarded",))
    with capture_logs() as logs:
        async with running(settings) as service:
            await wait_for(lambda: service.consumers[0].state.permanent_error, timeout_s=5)
            await asyncio.sleep(0.3)  # a window in which a hot retry loop would show itself
    rejected = [e for e in logs if e["event"] == "stream_request_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["error_name"] == "unknown_event_name"
    assert len(sim.stream_requests) == 1  # waits auth_retry_s before asking again


async def test_an_error_frame_mid_stream_keeps_what_came_before_and_names_the_error(
    sim: Simulator, db_url: str, db: Db
) -> None:
    sim.error_frame_after_n = 4  # TTS re-checks rights per event; an expired key ends the stream
    with capture_logs() as logs:
        async with running(make_settings(sim, db_url)) as service:
            await connected(service)
            sent = sim.uplinks(6)
            await wait_for(lambda: service.consumers[0].state.permanent_error, timeout_s=5)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 4)
    stored = set(db.column("SELECT event_unique_id FROM uplinks"))
    assert stored == {e["unique_id"] for e in sent[:4]}
    rejected = [e for e in logs if e["event"] == "stream_auth_rejected"]
    assert [e["error_name"] for e in rejected] == ["api_key_expired"]
