"""``ingestd demo``: the simulator and the daemon into a local SQLite file, then a summary.

Everything runs in this process on loopback: a simulated Things Stack with a few devices
sending uplinks, the real :class:`~ingestd.service.Service` following its event stream,
and the downlink worker draining one row queued with a plain SQL ``INSERT``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from ingestd import migrate
from ingestd.config import (
    BackfillSettings,
    DatabaseSettings,
    DownlinkSettings,
    MetricsSettings,
    Settings,
    StreamSettings,
)
from ingestd.db import create_engine
from ingestd.secrets import Secret
from ingestd.service import Service
from ingestd.sim.server import Simulator

DEMO_DEVICES = 5
DEMO_UPLINKS_PER_S = 8.0
DEMO_REPLAY_EVENTS = 40  # events the simulated TTS keeps for replay
DEMO_OUTAGE_UPLINKS = 100
DOWNLINK_TIMEOUT_S = 20.0
POLL_S = 0.1

SUMMARY_SQL = """
SELECT device_id, count(*) AS uplinks, max(rssi) AS best_rssi, max(snr) AS best_snr,
       max(f_cnt) AS last_f_cnt
FROM uplinks GROUP BY device_id ORDER BY device_id
"""
DOWNLINK_INSERT = (
    "INSERT INTO downlink_outbox (application_id, device_id, f_port, frm_payload, confirmed) "
    "VALUES (:app, :dev, 10, x'01020304', 1)"
)


def run_demo(*, database: str, seconds: float) -> int:
    """Run the demo and print what was stored; 0 when the downlink reached ``acked``."""
    path = Path(database).resolve()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    _quiet_logs()
    print(f"ingestd demo: simulated TTS + daemon into {path} for {seconds:.0f} s")
    with Simulator(
        devices=DEMO_DEVICES,
        uplink_rate=DEMO_UPLINKS_PER_S,
        downlink_ack_delay_s=1.0,
        seed=7,
        store_entity_count=DEMO_REPLAY_EVENTS,
        storage_enabled=True,
    ) as sim:
        settings = _settings(sim, url)
        engine = create_engine(url)
        try:
            migrate.upgrade(engine)
            status = asyncio.run(_run(settings, engine, sim, seconds))
            healed = asyncio.run(_outage_and_heal(settings, engine, sim))
            _print_summary(engine, path, status)
        finally:
            engine.dispose()
    return 0 if status == "acked" and healed else 1


async def _outage_and_heal(settings: Settings, engine: sa.Engine, sim: Simulator) -> bool:
    """The daemon is down while more uplinks arrive than TTS replays; storage heals the gap."""
    sim.uplinks(DEMO_OUTAGE_UPLINKS)
    print(
        f"\n  daemon stopped; {DEMO_OUTAGE_UPLINKS} uplinks arrive meanwhile (the simulated TTS "
        f"replays only the last {DEMO_REPLAY_EVENTS} events)"
    )
    settings = dataclasses.replace(
        settings, backfill=BackfillSettings(settle_s=0.0, poll_interval_s=0.2)
    )
    stop = asyncio.Event()
    healed = False
    async with Service(settings) as service:
        task = asyncio.create_task(service.run(stop))
        try:
            deadline = time.monotonic() + DOWNLINK_TIMEOUT_S
            while time.monotonic() < deadline and not healed:
                await asyncio.sleep(POLL_S)
                row = await asyncio.to_thread(_gap, engine)
                healed = row is not None and row.backfill_passes > 0
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
    row = await asyncio.to_thread(_gap, engine)
    if row is None:
        print("  no gap was recorded")
        return False
    print(
        f"  restarted: gap recorded ({row.reason}, {str(row.gap_start)[11:23]} -> "
        f"{str(row.gap_end)[11:23]} UTC)"
    )
    if healed:
        print(
            f"  healed from the Storage Integration: {row.recovered} uplinks recovered "
            "(source = 'storage')"
        )
    else:
        print(f"  not healed: {row.backfill_error or 'timed out'}")
    return healed


def _gap(engine: sa.Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT reason, gap_start, gap_end, recovered, backfill_passes, backfill_error "
                "FROM stream_gaps ORDER BY id DESC LIMIT 1"
            )
        ).first()


def _settings(sim: Simulator, url: str) -> Settings:
    stream = StreamSettings(
        name="demo",
        application_id=sim.application_id,
        base_url=sim.base_url,
        api_key=Secret(sim.api_key),
    )
    return Settings(
        database=DatabaseSettings(url=url),
        streams=(stream,),
        downlinks=DownlinkSettings(enabled=True, poll_interval_s=0.2),
        metrics=MetricsSettings(listen=""),
    )


async def _run(settings: Settings, engine: sa.Engine, sim: Simulator, seconds: float) -> str:
    started = time.monotonic()
    stop = asyncio.Event()
    async with Service(settings) as service:
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(service.consumers[0].connected_event.wait(), timeout=10)
            print(f"  connected to {sim.base_url}, streaming uplinks from {DEMO_DEVICES} devices")
            await asyncio.sleep(min(1.0, seconds / 2))
            device = sim.device_ids[0]
            await asyncio.to_thread(_insert_downlink, engine, sim.application_id, device)
            shown = DOWNLINK_INSERT.replace(":app", f"'{sim.application_id}'")
            print(f"  queued a confirmed downlink: {shown.replace(':dev', repr(device))}")
            status = await _follow_downlink(engine, deadline=time.monotonic() + DOWNLINK_TIMEOUT_S)
            rest = seconds - (time.monotonic() - started)
            if rest > 0:
                await asyncio.sleep(rest)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
    return status


def _insert_downlink(engine: sa.Engine, application_id: str, device_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(DOWNLINK_INSERT), {"app": application_id, "dev": device_id})


async def _follow_downlink(engine: sa.Engine, *, deadline: float) -> str:
    seen: list[str] = []
    status = "pending"
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(_downlink_status, engine)
        if not seen or seen[-1] != status:
            seen.append(status)
            print(f"  downlink status: {' -> '.join(seen)}")
        if status in ("acked", "failed", "invalidated", "dropped"):
            break
        await asyncio.sleep(POLL_S)
    return status


def _downlink_status(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT status FROM downlink_outbox")).scalar_one())


def _print_summary(engine: sa.Engine, path: Path, status: str) -> None:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(SUMMARY_SQL)).all()
        events = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        down = (
            conn.execute(
                sa.text(
                    "SELECT kind FROM downlink_events WHERE outbox_id IS NOT NULL ORDER BY time"
                )
            )
            .scalars()
            .all()
        )
    print(f"\nstored {events} events; uplinks per device:")
    print(f"  {'device':<12}{'uplinks':>8}{'best RSSI':>11}{'best SNR':>10}{'last f_cnt':>12}")
    for r in rows:
        print(
            f"  {r.device_id:<12}{r.uplinks:>8}{r.best_rssi:>11.0f}{r.best_snr:>10.1f}"
            f"{r.last_f_cnt:>12}"
        )
    print(f"\ndownlink: {status} (events: {', '.join(down) or 'none'})")
    print(
        f'\nlook further:\n  sqlite3 {path} "SELECT device_id, received_at, rssi, snr, '
        'decoded_payload FROM uplinks ORDER BY received_at DESC LIMIT 10"'
    )
    print(f'  sqlite3 {path} "SELECT id, status, last_error FROM downlink_outbox"')


def _quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger().setLevel(logging.WARNING)
