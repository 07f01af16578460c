"""What an operator sees of a running daemon: /metrics values and /healthz."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from support import Db, connected, make_settings, running, wait_for

from ingestd.config import DownlinkSettings, MetricsSettings
from ingestd.sim.server import Simulator

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _scrape_when(base: str, ready: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape /metrics until ``ready`` holds (counters land just after the commit they count)."""
    scraped: list[Samples] = []

    def check() -> bool:
        scraped.append(_samples(httpx.get(f"{base}/metrics", timeout=5).text))
        return ready(scraped[-1])

    await wait_for(check, timeout_s=10, what=what)
    return scraped[-1]


async def test_metrics_count_what_was_stored_and_healthz_flips_when_tts_goes_away(
    db_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestd import service as service_module

    monkeypatch.setattr(service_module, "OUTBOX_GAUGE_INTERVAL_S", 0.1)
    stream = f"m-{uuid.uuid4().hex[:8]}"  # metrics are process-wide: a fresh label per test
    sim = Simulator(devices=4, seed=21).start()
    try:
        settings = make_settings(
            sim, db_url, streams=[{"name": stream, "application_id": sim.application_id}]
        )
        settings = replace(
            settings,
            metrics=MetricsSettings(listen="127.0.0.1:0", health_grace_s=0.5),
            downlinks=DownlinkSettings(enabled=True, poll_interval_s=0.1),
        )
        async with running(settings) as service:
            await connected(service)
            sim.uplinks(25)
            sim.join(sim.device_ids[0])
            bad = dict(sim.uplinks(1)[0])
            bad["unique_id"] = "01ZZZZZZZZZZZZZZZZZZZZZZZZ"
            bad["data"] = {"uplink_message": {"settings": {"frequency": "?"}}}
            sim.publish(bad)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 26)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM rejected_events") == 1)
            base = f"http://127.0.0.1:{service.metrics_port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                lbl = (("name", "as.up.data.forward"), ("stream", stream))
                m = await _scrape_when(
                    base,
                    lambda m: m.get(("ingestd_events_stored_total", lbl)) == 26,
                    "26 uplinks counted as stored",
                )
                assert m[("ingestd_events_stored_total", lbl)] == 26
                assert m[("ingestd_events_received_total", lbl)] == 26
                join = (("name", "as.up.join.forward"), ("stream", stream))
                assert m[("ingestd_events_stored_total", join)] == 1
                assert m[("ingestd_events_rejected_total", (("stream", stream),))] == 1
                assert m[("ingestd_stream_connected", (("stream", stream),))] == 1
                assert m[("ingestd_batches_total", (("stream", stream),))] >= 1
                assert m[("ingestd_commit_seconds_count", (("stream", stream),))] >= 1

                queued_before = m.get(
                    ("ingestd_downlink_pushes_total", (("outcome", "queued"),)), 0
                )
                with db.engine.begin() as conn:
                    conn.execute(
                        sa.text(
                            "INSERT INTO downlink_outbox (application_id, device_id, f_port, "
                            f"frm_payload) VALUES ('{sim.application_id}', '{sim.device_ids[1]}', 5, :p)"
                        ),
                        {"p": b"\x01"},
                    )
                await wait_for(lambda: db.scalar("SELECT status FROM downlink_outbox") == "sent")
                m = await _scrape_when(
                    base,
                    lambda m: m.get(("ingestd_outbox_rows", (("status", "sent"),))) == 1,
                    "the outbox gauge counting the sent row",
                )
                assert (
                    m[("ingestd_downlink_pushes_total", (("outcome", "queued"),))]
                    == queued_before + 1
                )
                assert m[("ingestd_downlink_push_seconds_count", ())] >= 1
                assert m[("ingestd_outbox_rows", (("status", "sent"),))] == 1
                assert m[("ingestd_outbox_rows", (("status", "pending"),))] == 0

                health = await client.get("/healthz")
                assert health.status_code == 200
                assert health.json()["streams"][stream] == "connected"

                sim.stop()  # TTS goes away: the stream retries, then exceeds its grace
                await wait_for(lambda: not service.consumers[0].state.connected, timeout_s=5)
                await wait_for(  # once the 0.5 s grace has passed
                    lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 503,
                    timeout_s=5,
                    what="/healthz failing",
                )
                health = await client.get("/healthz")
                assert health.status_code == 503
                assert health.json()["streams"][stream].startswith("down")
                text = (await client.get("/metrics")).text
                m = _samples(text)
                assert m[("ingestd_stream_connected", (("stream", stream),))] == 0
                reconnects = [
                    v
                    for (n, labels), v in m.items()
                    if n == "ingestd_reconnects_total" and ("stream", stream) in labels
                ]
                assert sum(reconnects) >= 1
    finally:
        sim.stop()


async def test_a_dying_side_task_stops_the_daemon_with_a_task_failed_line(
    sim: Simulator, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watchdog task that dies must not leave systemd to kill a silent daemon later."""
    from ingestd import sdnotify
    from ingestd.service import Service

    def notify_socket_gone() -> None:
        raise OSError("notify socket gone")

    monkeypatch.setattr(sdnotify, "watchdog_interval_s", lambda: 0.05)
    monkeypatch.setattr(sdnotify, "watchdog", notify_socket_gone)
    with capture_logs() as logs:
        async with Service(make_settings(sim, db_url)) as service:
            with pytest.raises(OSError, match="notify socket gone"):
                await asyncio.wait_for(service.run(asyncio.Event()), timeout=10)
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert [e["task"] for e in failed] == ["watchdog"]
    assert "notify socket gone" in failed[0]["error"]


async def test_an_error_a_task_raises_while_stopping_is_logged(
    sim: Simulator, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestd.service import Service

    async def gauge_failing_at_stop(self: Service, stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("gauge broke while stopping") from None

    monkeypatch.setattr(Service, "_outbox_gauge", gauge_failing_at_stop)
    with capture_logs() as logs:
        async with running(make_settings(sim, db_url)) as service:
            await connected(service)
    at_stop = [e for e in logs if e["event"] == "task_failed_at_stop"]
    assert [e["task"] for e in at_stop] == ["outbox_gauge"]
    assert "gauge broke while stopping" in at_stop[0]["error"]
    assert not [e for e in logs if e["event"] == "task_failed"]
