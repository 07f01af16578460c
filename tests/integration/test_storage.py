"""The Storage client against the simulated Storage Integration, over real loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from ingestd.errors import AuthRejected, ServerUnavailable, StorageNotEnabled
from ingestd.normalize import normalize_application_up
from ingestd.sim.server import Simulator
from ingestd.storage import StorageClient, StorageState


@pytest.fixture
def ssim() -> Iterator[Simulator]:
    simulator = Simulator(devices=5, seed=7, storage_enabled=True).start()
    yield simulator
    simulator.stop()


def _client(sim: Simulator, http: httpx.AsyncClient, **kw: Any) -> StorageClient:
    return StorageClient(
        http, base_url=sim.base_url, api_key=sim.api_key, application_id=sim.application_id, **kw
    )


def _fetch(sim: Simulator, since: datetime, until: datetime, **kw: Any) -> list[dict[str, Any]]:
    device_id = kw.pop("device_id", None)

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            client = _client(sim, http, **kw)
            out: list[dict[str, Any]] = []
            async for page in client.pages(since=since, until=until, device_id=device_id):
                out.extend(page.messages)
            return out

    return asyncio.run(go())


def _window(events: list[dict[str, Any]]) -> tuple[datetime, datetime]:
    times = [datetime.fromisoformat(e["data"]["received_at"]) for e in events]
    return min(times) - timedelta(seconds=1), max(times) + timedelta(seconds=1)


def _keys(messages: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(m["end_device_ids"]["device_id"], m["uplink_message"]["f_cnt"]) for m in messages]


@pytest.mark.parametrize("inclusive", [False, True], ids=["exclusive", "inclusive"])
@pytest.mark.parametrize("page_limit", [1000, 7])
def test_pages_return_every_stored_uplink_once_whatever_the_edges(
    ssim: Simulator, inclusive: bool, page_limit: int
) -> None:
    ssim.storage.inclusive_edges = inclusive
    events = ssim.uplinks(230)
    since, until = _window(events)
    got = _fetch(ssim, since, until, page_limit=page_limit)
    want = [
        (e["data"]["end_device_ids"]["device_id"], e["data"]["uplink_message"]["f_cnt"])
        for e in events
    ]
    assert _keys(got) == want  # all, once, in received_at order


@pytest.mark.parametrize("inclusive", [False, True], ids=["exclusive", "inclusive"])
def test_many_messages_sharing_one_timestamp_across_page_edges(
    ssim: Simulator, inclusive: bool
) -> None:
    ssim.storage.inclusive_edges = inclusive
    when = datetime.now(UTC)
    events = [ssim.uplink(d, time=when) for d in ssim.device_ids for _ in range(3)]
    since, until = _window(events)
    got = _fetch(ssim, since, until, page_limit=4)
    assert sorted(_keys(got)) == sorted(
        (e["data"]["end_device_ids"]["device_id"], e["data"]["uplink_message"]["f_cnt"])
        for e in events
    )


def test_device_level_read_and_field_mask_keep_what_ingestd_stores(ssim: Simulator) -> None:
    events = ssim.uplinks(20)
    since, until = _window(events)
    got = _fetch(ssim, since, until, device_id="dev-0002")
    assert {m["end_device_ids"]["device_id"] for m in got} == {"dev-0002"}
    assert len(got) == 4
    assert "correlation_ids" not in got[0]  # the mask left out what ingestd does not store
    assert "version_ids" not in got[0]["uplink_message"]
    event = next(e for e in events if e["data"]["received_at"] == got[0]["received_at"])
    (up_row, *rx_rows) = normalize_application_up(got[0])
    assert up_row.values["uplink_id"] == _uplink_row_of(event)["uplink_id"]
    assert len(rx_rows) == 2
    assert ssim.storage.requests[0].query["field_mask"].startswith("up.uplink_message.")
    assert ssim.storage.requests[0].query["order"] == "received_at"


def _uplink_row_of(event: dict[str, Any]) -> dict[str, Any]:
    from ingestd.normalize import normalize

    return normalize(event)[0].values


def test_write_delay_and_retention(ssim: Simulator) -> None:
    ssim.storage.write_delay_s = 3600.0
    events = ssim.uplinks(5)
    since, until = _window(events)
    assert _fetch(ssim, since, until) == []  # written, not yet visible
    ssim.storage.write_delay_s = 0.0
    later = ssim.uplinks(3)
    assert len(_fetch(ssim, since, _window(later)[1])) == 3
    ssim.storage.retention_s = 0.0
    assert _fetch(ssim, since, _window(later)[1]) == []


def test_probe_states_and_errors(ssim: Simulator) -> None:
    async def probe() -> StorageState:
        async with httpx.AsyncClient() as http:
            return await _client(ssim, http).probe()

    assert asyncio.run(probe()) is StorageState.OK
    ssim.storage.forbidden = True
    assert asyncio.run(probe()) is StorageState.NO_RIGHTS
    with pytest.raises(AuthRejected):
        _fetch(ssim, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))
    ssim.storage.forbidden = False
    ssim.storage.enabled = False  # open-source TTS: the route does not exist
    assert asyncio.run(probe()) is StorageState.NOT_ENABLED
    with pytest.raises(StorageNotEnabled, match="Storage Integration"):
        _fetch(ssim, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))


def test_rate_limit_and_server_errors_are_retried(ssim: Simulator) -> None:
    events = ssim.uplinks(12)
    since, until = _window(events)
    waits: list[float] = []

    async def fake_sleep(s: float) -> None:
        waits.append(s)

    ssim.storage.fail_next = [429, 503]
    assert len(_fetch(ssim, since, until, sleep=fake_sleep)) == 12
    assert waits[0] == 2.0  # X-Rate-Limit-Retry: 1, plus 1 s since TTS truncates it
    assert len(waits) == 2
    ssim.storage.error_frame_after_n = 3  # every answer breaks off with an error frame
    with pytest.raises(ServerUnavailable, match="error frame"):
        _fetch(ssim, since, until, sleep=fake_sleep, attempts=2)


def test_count(ssim: Simulator) -> None:
    ssim.uplinks(9)

    async def count() -> tuple[int, int]:
        async with httpx.AsyncClient() as http:
            c = _client(ssim, http)
            return await c.count(), await c.count("dev-0001")

    assert asyncio.run(count()) == (9, 2)
