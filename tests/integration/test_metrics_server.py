"""/metrics and /healthz served for real over loopback by MetricsServer (uvicorn in our loop)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestd import __version__, metrics
from ingestd.metrics import MetricsServer

TIMEOUT = httpx.Timeout(5.0)


class FakeHealth:
    """A health callback the test flips between healthy and not."""

    def __init__(self) -> None:
        self.healthy = True
        self.details: dict[str, Any] = {"streams": {"water-meters": "connected"}}

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        return self.healthy, self.details


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
async def server(health: FakeHealth) -> AsyncIterator[MetricsServer]:
    async with MetricsServer("127.0.0.1:0", health) as srv:
        yield srv


@pytest.fixture
async def client(server: MetricsServer) -> AsyncIterator[httpx.AsyncClient]:
    base_url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as c:
        yield c


def _stream() -> str:
    """A stream label no other test uses: the registry is process-wide."""
    return f"s-{uuid.uuid4().hex[:8]}"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, metric: str, /, **labels: str) -> float | None:
    return _samples(text).get((metric, frozenset(labels.items())))


async def test_counters_gauges_and_histograms_show_their_values(
    client: httpx.AsyncClient,
) -> None:
    stream = _stream()
    metrics.EVENTS_RECEIVED.labels(stream=stream, name="as.up.data.forward").inc(3)
    metrics.EVENTS_STORED.labels(stream=stream, name="as.up.data.forward").inc(2)
    metrics.EVENTS_DUPLICATE.labels(stream=stream).inc()
    metrics.RECONNECTS.labels(stream=stream, reason="idle_timeout").inc()
    metrics.GAP_SECONDS.labels(stream=stream, reason="no_event_store").inc(12.5)
    metrics.STREAM_CONNECTED.labels(stream=stream).set(1)
    metrics.CURSOR_LAG.labels(stream=stream).set(0.75)
    metrics.COMMIT_SECONDS.labels(stream=stream).observe(0.004)
    metrics.COMMIT_SECONDS.labels(stream=stream).observe(0.3)

    resp = await client.get("/metrics")

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    up = "as.up.data.forward"
    assert _value(text, "ingestd_events_received_total", stream=stream, name=up) == 3
    assert _value(text, "ingestd_events_stored_total", stream=stream, name=up) == 2
    assert _value(text, "ingestd_events_duplicate_total", stream=stream) == 1
    assert _value(text, "ingestd_reconnects_total", stream=stream, reason="idle_timeout") == 1
    assert _value(text, "ingestd_gap_seconds_total", stream=stream, reason="no_event_store") == 12.5
    assert _value(text, "ingestd_stream_connected", stream=stream) == 1
    assert _value(text, "ingestd_cursor_lag_seconds", stream=stream) == 0.75
    assert _value(text, "ingestd_commit_seconds_count", stream=stream) == 2
    assert _value(text, "ingestd_commit_seconds_bucket", stream=stream, le="0.005") == 1
    assert _value(text, "ingestd_build_info", version=__version__) == 1

    metrics.EVENTS_RECEIVED.labels(stream=stream, name=up).inc()
    text = (await client.get("/metrics")).text
    assert _value(text, "ingestd_events_received_total", stream=stream, name=up) == 4


async def test_every_documented_metric_is_exposed(client: httpx.AsyncClient) -> None:
    families = {
        f.name: f.type for f in text_string_to_metric_families((await client.get("/metrics")).text)
    }
    assert families == {
        "ingestd_events_received": "counter",
        "ingestd_events_stored": "counter",
        "ingestd_events_duplicate": "counter",
        "ingestd_events_rejected": "counter",
        "ingestd_batches": "counter",
        "ingestd_commit_seconds": "histogram",
        "ingestd_event_commit_latency_seconds": "histogram",
        "ingestd_reconnects": "counter",
        "ingestd_gaps": "counter",
        "ingestd_gap_seconds": "counter",
        "ingestd_backfill_rows": "counter",
        "ingestd_backfill_gaps": "gauge",
        "ingestd_stream_connected": "gauge",
        "ingestd_cursor_lag_seconds": "gauge",
        "ingestd_outbox_rows": "gauge",
        "ingestd_downlink_pushes": "counter",
        "ingestd_downlink_push_seconds": "histogram",
        "ingestd_build_info": "gauge",  # an Info, in the text format
    }


async def test_healthz_follows_the_health_callback(
    client: httpx.AsyncClient, health: FakeHealth
) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "streams": {"water-meters": "connected"}}

    health.healthy = False
    health.details = {"streams": {"water-meters": "retrying"}, "database": "unreachable"}
    resp = await client.get("/healthz")
    assert resp.status_code == 503
    assert resp.json() == {
        "status": "unavailable",
        "streams": {"water-meters": "retrying"},
        "database": "unreachable",
    }

    health.healthy = True
    assert (await client.get("/healthz")).status_code == 200


async def test_a_failing_health_check_is_503_without_its_message() -> None:
    async def broken() -> tuple[bool, dict[str, Any]]:
        raise ConnectionError("postgresql://ingestd:hunter2@db/ingestd refused")

    async with (
        MetricsServer("127.0.0.1:0", broken) as srv,
        httpx.AsyncClient(timeout=TIMEOUT) as c,
    ):
        resp = await c.get(f"http://127.0.0.1:{srv.port}/healthz")
    assert resp.status_code == 503
    assert resp.json() == {"status": "unavailable", "error": "ConnectionError"}
    assert "hunter2" not in resp.text


async def test_a_hung_health_check_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "HEALTH_TIMEOUT_S", 0.2)
    never = asyncio.Event()

    async def hung() -> tuple[bool, dict[str, Any]]:
        await never.wait()
        return True, {}

    async with (
        MetricsServer("127.0.0.1:0", hung) as srv,
        httpx.AsyncClient(timeout=TIMEOUT) as c,
    ):
        resp = await c.get(f"http://127.0.0.1:{srv.port}/healthz")
    assert resp.status_code == 503
    assert resp.json()["status"] == "unavailable"


async def test_unknown_paths_are_404_and_other_methods_405(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 404
    assert (await client.get("/metrics/extra")).status_code == 404
    assert (await client.post("/healthz")).status_code == 405
    assert (await client.head("/healthz")).status_code == 200


async def test_stop_is_fast_with_an_idle_keepalive_connection(health: FakeHealth) -> None:
    srv = MetricsServer("127.0.0.1:0", health)
    await srv.start()
    port = srv.port
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        assert (await c.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
        started = time.monotonic()
        await srv.stop()
        assert time.monotonic() - started < 1.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


async def test_stop_is_fast_while_a_healthz_request_hangs() -> None:
    never = asyncio.Event()
    entered = asyncio.Event()

    async def hung() -> tuple[bool, dict[str, Any]]:
        entered.set()
        await never.wait()
        return True, {}

    srv = MetricsServer("127.0.0.1:0", hung)
    await srv.start()
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        request = asyncio.create_task(c.get(f"http://127.0.0.1:{srv.port}/healthz"))
        await asyncio.wait_for(entered.wait(), 5.0)
        started = time.monotonic()
        await srv.stop()
        assert time.monotonic() - started < 1.2
        results = await asyncio.wait_for(asyncio.gather(request, return_exceptions=True), 5.0)
    # Cut short rather than answered "ok": a 5xx or a dropped connection.
    assert isinstance(results[0], httpx.HTTPError) or results[0].status_code >= 500


async def test_serving_leaves_the_signal_handlers_alone(health: FakeHealth) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    async with MetricsServer("127.0.0.1:0", health):
        assert {sig: signal.getsignal(sig) for sig in before} == before
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_an_address_in_use_fails_start(health: FakeHealth) -> None:
    async with MetricsServer("127.0.0.1:0", health) as first:
        second = MetricsServer(f"127.0.0.1:{first.port}", health)
        with pytest.raises(OSError, match="in use"):
            await second.start()
        await second.stop()  # a no-op after a failed start


async def test_port_is_only_known_once_started(health: FakeHealth) -> None:
    srv = MetricsServer("127.0.0.1:0", health)
    with pytest.raises(RuntimeError):
        _ = srv.port
    async with srv:
        assert srv.port > 0
