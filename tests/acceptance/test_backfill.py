"""Healing gaps from the Storage Integration: daemon down past the replay, 404, CLI, SIGKILL."""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support import (
    DaemonProcess,
    Db,
    ProcessTracker,
    connected,
    daemon_config,
    make_settings,
    running,
    wait_for,
)

from ingestd.backfill import run_cli
from ingestd.config import BackfillSettings, Settings
from ingestd.metrics import REGISTRY
from ingestd.sim.server import Simulator

FAST = BackfillSettings(settle_s=0.0, recheck_s=0.5, margin_s=5.0, poll_interval_s=0.1)


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    helper = Db(db_url)
    yield helper
    helper.engine.dispose()


@pytest.fixture
def ssim() -> Iterator[Simulator]:
    # Replay holds only the last 20 events: any outage longer than that is a gap.
    s = Simulator(devices=5, store_entity_count=20, seed=3, storage_enabled=True).start()
    yield s
    s.stop()


def _settings(sim: Simulator, db_url: str, backfill: BackfillSettings = FAST) -> Settings:
    return replace(make_settings(sim, db_url), backfill=backfill)


def _published_uplinks(sim: Simulator) -> set[tuple[str, int]]:
    return {
        (e["data"]["end_device_ids"]["device_id"], e["data"]["uplink_message"]["f_cnt"])
        for e in sim.events
        if e["name"] == "as.up.data.forward"
    }


def _stored(db: Db) -> list[tuple[str, int]]:
    return [(r.device_id, r.f_cnt) for r in db.rows("SELECT device_id, f_cnt FROM uplinks")]


async def _outage(sim: Simulator, db_url: str, db: Db, settings: Settings) -> None:
    """Stream 30 uplinks, stop, publish 150 more (more than replay keeps)."""
    async with running(settings) as service:
        await connected(service)
        sim.uplinks(30)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 30, what="30 rows")
    sim.uplinks(150)


async def test_outage_longer_than_replay_is_healed_exactly_once(
    ssim: Simulator, db_url: str, db: Db
) -> None:
    settings = _settings(ssim, db_url)
    rows_metric = ("ingestd_backfill_rows_total", {"stream": "app"})
    rows_before = REGISTRY.get_sample_value(*rows_metric) or 0.0
    await _outage(ssim, db_url, db, settings)
    async with running(settings) as service:
        await connected(service)
        await wait_for(
            lambda: db.scalar("SELECT count(*) FROM stream_gaps WHERE backfill_passes >= 2") == 1,
            what="gap healed and re-checked",
        )
    stored = _stored(db)
    assert len(stored) == len(set(stored)) == 180  # every uplink, once
    assert set(stored) == _published_uplinks(ssim)
    gap = db.rows("SELECT reason, recovered, backfill_error, backfilled_at FROM stream_gaps")[0]
    assert gap.reason == "replay_truncated"
    assert gap.backfill_error is None and gap.backfilled_at is not None
    from_storage = db.scalar("SELECT count(*) FROM uplinks WHERE source = 'storage'")
    assert from_storage == gap.recovered >= 150 - 20  # what replay no longer held
    assert db.scalar("SELECT count(*) FROM uplinks WHERE event_unique_id IS NULL") == from_storage
    # Receptions came with the healed rows, and none twice.
    assert db.scalar("SELECT count(*) FROM uplink_receptions WHERE source = 'storage'") == (
        2 * from_storage
    )
    assert REGISTRY.get_sample_value(*rows_metric) == rows_before + from_storage
    # ingestd status says so.
    from datetime import UTC, datetime

    from ingestd.cli.status import collect_status

    report = collect_status(db.engine, settings, now=datetime.now(UTC))
    (app,) = report["streams"]
    assert (app["gaps_total"], app["gaps_healed"], app["gaps_recovered_rows"]) == (
        1,
        1,
        from_storage,
    )


async def test_the_same_uplink_by_stream_and_by_storage_is_one_row(
    ssim: Simulator, db_url: str, db: Db
) -> None:
    settings = _settings(ssim, db_url)
    async with running(settings) as service:
        await connected(service)
        sim_events = ssim.uplinks(25)
        await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 25)
    # Storage holds the same 25; the CLI fetches them all again: nothing new.
    out = io.StringIO()
    code = await _cli(settings, since="1h", out=out)
    assert code == 0, out.getvalue()
    assert "25 fetched, 0 new, 25 already present" in out.getvalue()
    assert db.scalar("SELECT count(*) FROM uplinks") == len(sim_events)
    assert db.scalar("SELECT count(DISTINCT source) FROM uplinks") == 1


async def test_storage_404_keeps_the_daemon_running_and_the_gap_open(db_url: str, db: Db) -> None:
    sim = Simulator(devices=5, store_entity_count=20, seed=4, storage_enabled=False).start()
    try:
        settings = _settings(sim, db_url, replace(FAST, retry_s=0.2))
        await _outage(sim, db_url, db, settings)
        with capture_logs() as logs:
            async with running(settings) as service:
                await connected(service)
                await wait_for(
                    lambda: (
                        db.scalar(
                            "SELECT count(*) FROM stream_gaps WHERE backfill_error IS NOT NULL"
                        )
                        == 1
                    ),
                    what="gap marked with the storage error",
                )
                # Still streaming, several retry periods later.
                sim.uplinks(10)
                await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") >= 30 + 20 + 10)
                # Several retry periods (retry_s = 0.2) went by: still one log line.
                await wait_for(lambda: service.backfill_task.attempts >= 3, what="3 attempts")
        refused = [e for e in logs if e["event"] == "backfill_storage_unavailable"]
        assert len(refused) == 1
        assert "404" in refused[0]["reason"]
        gap = db.rows("SELECT backfill_passes, backfill_error FROM stream_gaps")[0]
        assert gap.backfill_passes == 0 and "Storage Integration" in gap.backfill_error
    finally:
        sim.stop()


async def _cli(settings: Settings, *, since: str, out: io.StringIO, err: Any = None) -> int:
    import asyncio

    args = argparse.Namespace(stream=None, since=since, until=None, page_limit=7)
    return await asyncio.to_thread(run_cli, args, settings, out=out, err=err or io.StringIO())


async def test_cli_backfill_twice_adds_nothing_the_second_time(
    ssim: Simulator, db_url: str, db: Db
) -> None:
    ssim.uplinks(40)
    settings = _settings(ssim, db_url)
    first, second = io.StringIO(), io.StringIO()
    assert await _cli(settings, since="1h", out=first) == 0
    assert await _cli(settings, since="1h", out=second) == 0
    assert "40 fetched, 40 new, 0 already present" in first.getvalue()
    assert "40 fetched, 0 new, 40 already present" in second.getvalue()
    assert "dev-0001" in first.getvalue()  # the per-device lines
    assert db.scalar("SELECT count(*) FROM uplinks WHERE source = 'storage'") == 40
    ssim.storage.enabled = False
    err = io.StringIO()
    assert await _cli(settings, since="1h", out=io.StringIO(), err=err) == 1
    assert "Storage Integration is not available" in err.getvalue()
    ssim.storage.enabled, ssim.storage.forbidden = True, True
    err = io.StringIO()
    assert await _cli(settings, since="1h", out=io.StringIO(), err=err) == 1
    assert "read application traffic" in err.getvalue()


def test_sigkill_during_backfill_then_restart_stores_every_uplink_once(
    ssim: Simulator, db_url: str, tmp_path: Path, procs: ProcessTracker
) -> None:
    db = Db(db_url)
    try:
        config = daemon_config(tmp_path / "ingestd.toml", ssim, db_url)
        with config.open("a") as f:
            f.write("[backfill]\nsettle_s = 0\npoll_interval_s = 0.1\npage_limit = 5\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env["SIM_KEY"] = ssim.api_key
        log = tmp_path / "daemon.log"
        first = DaemonProcess(procs, config, env, log)
        first.wait_connected(ssim, 0)
        ssim.uplinks(30)
        _wait(lambda: db.scalar("SELECT count(*) FROM uplinks") == 30)
        assert first.terminate()[0] == 0
        ssim.uplinks(150)
        ssim.storage.delay_s = 0.05  # a slow storage: the backfill takes a few seconds
        second = DaemonProcess(procs, config, env, log)
        _wait(lambda: db.scalar("SELECT count(*) FROM uplinks WHERE source = 'storage'") >= 20)
        second.kill()  # SIGKILL in the middle of the backfill
        healed_before = db.scalar("SELECT count(*) FROM uplinks WHERE source = 'storage'")
        assert db.scalar("SELECT backfill_passes FROM stream_gaps") == 0
        ssim.storage.delay_s = 0.0
        third = DaemonProcess(procs, config, env, log)
        _wait(lambda: db.scalar("SELECT backfill_passes FROM stream_gaps") == 1, timeout_s=30)
        assert third.terminate()[0] == 0
        stored = _stored(db)
        assert len(stored) == len(set(stored)) == 180, log.read_text()[-3000:]
        recovered = db.scalar("SELECT recovered FROM stream_gaps")
        assert recovered == db.scalar("SELECT count(*) FROM uplinks WHERE source = 'storage'")
        assert recovered > healed_before
    finally:
        db.engine.dispose()


def _wait(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
