"""The daemon against TTS as the simulator models it since issue 11, on SQLite and PostgreSQL:
a key TTS lets stream but shows no traffic, and the transports TTS serves (gzip, h2c) or
suffers (a connection dropped without its final chunk)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs
from support import Db, connected, make_settings, running, wait_for, with_stream

from ingestd import rights, rights_watch
from ingestd.sim.server import Simulator

TRAFFIC_READ = "RIGHT_APPLICATION_TRAFFIC_READ"


async def test_a_traffic_less_key_is_logged_once_and_unhealthy_until_its_rights_are_fixed(
    db_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TTS opens the stream (any right will do) and sends nothing of the application's
    traffic: connected, yet /healthz must not be green, and the log must say why."""
    monkeypatch.setattr(rights_watch, "RIGHTS_RECHECK_S", 0.1)
    listings: list[frozenset[str]] = []
    real_fetch = rights.fetch_rights

    async def counted(*args: Any) -> frozenset[str]:
        listings.append(granted := await real_fetch(*args))
        return granted

    monkeypatch.setattr(rights, "fetch_rights", counted)
    info_only = Simulator(devices=3, seed=13, api_key_rights=("RIGHT_APPLICATION_INFO",))
    with info_only as sim, capture_logs() as logs:
        async with running(make_settings(sim, db_url)) as service:
            state = service.consumers[0].state
            await connected(service)
            await wait_for(lambda: state.rights_missing == (TRAFFIC_READ,), what="flagged")
            sent = sim.uplinks(3)
            ok, details = await service.health()
            assert not ok
            assert details["streams"]["app"].startswith(f"down: the key lacks {TRAFFIC_READ}")
            assert state.connected  # the stream itself runs on
            seen = len(listings)
            await wait_for(lambda: len(listings) >= seen + 3, what="rechecks")

            sim.keyring.add(sim.api_key, [rights.APPLICATION_ALL])  # the key is fixed
            await wait_for(lambda: state.rights_missing == (), what="flag cleared")
            ok, details = await service.health()
            assert ok, details
            assert details["streams"]["app"] == "connected"
    missing = [e for e in logs if e["event"] == "stream_rights_missing"]
    assert len(missing) == 1  # once, though checked again and again
    assert missing[0]["log_level"] == "error"
    assert missing[0]["missing"] == [TRAFFIC_READ]
    assert missing[0]["stream"] == "app"
    assert [e["event"] for e in logs].count("stream_rights_ok") == 1
    # TTS hid them from this key: the stream stored none of them.
    stored = set(db.column("SELECT event_unique_id FROM uplinks"))
    assert stored.isdisjoint(e["unique_id"] for e in sent)


async def test_without_downlinks_a_read_only_key_is_healthy_and_logs_nothing(
    db_url: str, db: Db
) -> None:
    read_only = Simulator(devices=3, seed=17, api_key_rights=(TRAFFIC_READ,))
    with read_only as sim, capture_logs() as logs:
        async with running(make_settings(sim, db_url)) as service:
            await connected(service)
            sent = sim.uplinks(3)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 3)
            ok, details = await service.health()
            assert ok, details
    assert not [e for e in logs if e["event"].startswith("stream_rights_")]
    assert set(db.column("SELECT event_unique_id FROM uplinks")) == {e["unique_id"] for e in sent}


CUT_AFTER = 30  # frames per connection
TRANSPORTS = {
    "gzip": {"gzip_stream": True},
    "h2c": {"h2c": True},
    "abrupt-close": {"abrupt_close_after_n_frames": CUT_AFTER},
    "h2c-abrupt-close": {"h2c": True, "abrupt_close_after_n_frames": CUT_AFTER},
}
# Fewer where every connection is cut: each reconnect replays its overlap again (and
# shrinks it while that brings nothing new), which is ingestd's real, slower, way through.
UPLINKS = {"gzip": 1000, "h2c": 1000, "abrupt-close": 300, "h2c-abrupt-close": 300}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_each_transport_tts_serves_or_suffers_is_ingested_with_nothing_lost(
    transport: str, db_url: str, db: Db
) -> None:
    options, n = TRANSPORTS[transport], UPLINKS[transport]
    h2c = bool(options.get("h2c"))
    with Simulator(devices=20, store_entity_count=100_000, seed=19, **options) as sim:
        settings = with_stream(make_settings(sim, db_url), tail=20_000, http2_prior_knowledge=h2c)
        with capture_logs() as logs:
            async with running(settings) as service:
                await connected(service)
                sent: list[dict[str, Any]] = []
                while len(sent) < n:
                    sent += sim.uplinks(100)
                    await asyncio.sleep(0.02)  # pacing the traffic
                await wait_for(
                    lambda: db.scalar("SELECT count(*) FROM uplinks") >= n,
                    timeout_s=60,
                    what=f"{n} uplinks",
                )
        requests = [r for r in sim.stream_requests if r.status == 200]
    stored = db.column("SELECT event_unique_id FROM uplinks")
    assert len(stored) == n
    assert set(stored) == {e["unique_id"] for e in sent}
    assert db.scalar("SELECT count(*) FROM rejected_events") == 0
    assert db.scalar("SELECT count(*) FROM stream_gaps") == 0
    assert all(r.headers.get("accept-encoding") == "gzip" for r in requests)
    connects = [e for e in logs if e["event"] == "stream_connected"]
    assert len(connects) == len(requests)
    if "abrupt_close_after_n_frames" in options:
        assert len(requests) >= n // CUT_AFTER  # it really was cut again and again
    warned = [e for e in logs if e["event"] == "stream_http1"]
    if h2c:
        assert {e["http_version"] for e in connects} == {"HTTP/2"}
        assert warned == []
    else:
        assert {e["http_version"] for e in connects} == {"HTTP/1.1"}
        assert len(warned) == 1  # once per stream, not per reconnect
