"""Benchmark the downlink outbox end to end against the TTS simulator in its own process.

Two figures, on SQLite (the worker polls) and PostgreSQL (LISTEN/NOTIFY wakes it):

- insert-to-queued latency: rows are INSERTed one at a time at random spacing into an
  idle system; latency is from the INSERT's commit to the worker recording TTS's 200
  (``queued_at``; both clocks are this machine's). p50/p99 over ``--latency-rows`` rows.
- pushes/s flat out: ``--rows`` rows over ``--devices`` devices are inserted, then one
  worker drains them to ``queued``. The yardstick is a raw httpx POST loop with the same
  bodies against the same simulator in the same run, at the same concurrency (PERF_NOTES:
  this machine drifts, compare ratios). Rounds are interleaved; medians are printed.

The simulator runs as ``ingestd simulate`` in a subprocess, so it does not share this
process's GIL with the worker (TTS is remote too).

    .venv/bin/python benchmarks/bench_downlink.py [--pg-url URL] [--rows 2000] [--rounds 3]

PostgreSQL runs when ``--pg-url`` or ``$INGESTD_TEST_PG_URL`` names a server whose
database may ``CREATE DATABASE`` (a scratch database is created and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import orjson
import sqlalchemy as sa
import structlog

from ingestd import migrate, schema
from ingestd.config import DownlinkSettings, Settings, TtsSettings
from ingestd.db import create_engine
from ingestd.outbox.worker import DownlinkWorker
from ingestd.secrets import Secret

T = schema.downlink_outbox
APP = "sim-app"


@dataclass(frozen=True)
class Sim:
    """The simulator subprocess: where it listens, the key it accepts, its devices."""

    base_url: str
    api_key: str
    device_ids: list[str]


@contextmanager
def simulator(devices: int) -> Iterator[Sim]:
    """``ingestd simulate`` on a free port, no uplinks; stopped with SIGTERM afterwards."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ingestd",
            "simulate",
            "--port",
            "0",
            "--rate",
            "0",
            "--devices",
            str(devices),
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        fields: dict[str, str] = {}
        while "api_key" not in fields:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the simulator did not start")
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
        yield Sim(
            fields["base_url"], fields["api_key"], [f"dev-{i + 1:04d}" for i in range(devices)]
        )
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def scratch_database(kind: str, pg_url: str | None) -> Iterator[str]:
    """A fresh migrated database URL of ``kind`` (sqlite | postgresql), removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            _migrate(url)
            yield url
        return
    assert pg_url is not None
    name = f"ingestd_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    try:
        _migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _migrate(url: str) -> None:
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()


def settings_for(sim: Sim, poll_s: float) -> Settings:
    return Settings(
        tts=TtsSettings(base_url=sim.base_url, api_key=Secret(sim.api_key)),
        downlinks=DownlinkSettings(enabled=True, poll_interval_s=poll_s, require_stream=False),
    )


def _queued_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(T.c.status == "queued")).scalar_one()


async def _wait_queued(
    engine: sa.Engine, count: int, *, timeout_s: float = 120.0, poll_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_queued_count, engine) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} rows queued")
        await asyncio.sleep(poll_s)


async def latency(url: str, sim: Sim, *, rows: int, poll_s: float) -> list[float]:
    """Seconds from each INSERT's commit to the worker recording TTS's acceptance."""
    engine = create_engine(url)
    worker = DownlinkWorker(engine, settings_for(sim, poll_s), worker_id="bench-latency")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    committed: dict[int, datetime] = {}
    rng = random.Random(1)

    def insert_one(device_id: str) -> None:
        with engine.begin() as conn:
            outbox_id = conn.execute(
                sa.insert(T)
                .values(application_id=APP, device_id=device_id, f_port=1, frm_payload=b"\x01")
                .returning(T.c.id)
            ).scalar_one()
        committed[outbox_id] = datetime.now(UTC)

    try:
        await asyncio.sleep(0.5)  # LISTEN up, first claim done: the system is idle
        for i in range(rows):
            await asyncio.to_thread(insert_one, sim.device_ids[i % len(sim.device_ids)])
            await asyncio.sleep(rng.uniform(0.005, 0.06))
        await _wait_queued(engine, rows)
        with engine.connect() as conn:
            queued = dict(conn.execute(sa.select(T.c.id, T.c.queued_at)).all())
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        engine.dispose()
    return [(queued[i] - t).total_seconds() for i, t in committed.items()]


def _bulk_insert(url: str, sim: Sim, rows: int, devices: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(T),
            [
                {
                    "application_id": APP,
                    "device_id": sim.device_ids[i % devices],
                    "f_port": 1,
                    "frm_payload": i.to_bytes(4, "big"),
                }
                for i in range(rows)
            ],
        )
    engine.dispose()


async def worker_throughput(
    url: str, sim: Sim, *, rows: int, devices: int, concurrency: int
) -> float:
    """Pushes/s of one worker draining ``rows`` pending rows to ``queued``."""
    await asyncio.to_thread(_bulk_insert, url, sim, rows, devices)
    engine = create_engine(url)
    worker = DownlinkWorker(
        engine, settings_for(sim, 0.5), worker_id="bench-tp", concurrency=concurrency
    )
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    try:
        # Watch the worker's own counter first: polling the table all along would put a
        # second database thread into the process being measured.
        while worker.pushes < rows and not task.done():  # noqa: ASYNC110 (a counter, no event)
            await asyncio.sleep(0.005)
        await _wait_queued(engine, rows, poll_s=0.005)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        engine.dispose()
    return rows / elapsed


async def raw_httpx_throughput(sim: Sim, *, rows: int, devices: int, concurrency: int) -> float:
    """Pushes/s of a bare httpx POST loop with the same bodies (no database at all)."""
    headers = {"Authorization": f"Bearer {sim.api_key}", "Content-Type": "application/json"}
    counter = iter(range(rows))

    async def loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            dev = sim.device_ids[i % devices]
            body = orjson.dumps(
                {
                    "downlinks": [
                        {
                            "f_port": 1,
                            "frm_payload": "AAAAAQ==",
                            "confirmed": False,
                            "priority": "NORMAL",
                            "correlation_ids": [f"bench:raw:{i}"],
                        }
                    ]
                }
            )
            r = await client.post(
                f"{sim.base_url}/api/v3/as/applications/{APP}/devices/{dev}/down/push",
                content=body,
                headers=headers | {"X-Request-ID": f"bench-raw-{i}"},
            )
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        return rows / (time.perf_counter() - started)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get("INGESTD_TEST_PG_URL"))
    parser.add_argument("--rows", type=int, default=2000, help="rows per throughput round")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--latency-rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    kinds = ["sqlite"] + (["postgresql"] if args.pg_url else [])
    with simulator(args.devices) as sim:
        print(
            f"{args.rows} rows over {args.devices} devices, {args.rounds} rounds, medians; "
            f"latency over {args.latency_rows} single INSERTs"
        )
        for kind in kinds:
            polls = [1.0, 0.1] if kind == "sqlite" else [1.0]
            for poll in polls:
                with scratch_database(kind, args.pg_url) as url:
                    lat = await latency(url, sim, rows=args.latency_rows, poll_s=poll)
                how = "poll" if kind == "sqlite" else "NOTIFY, poll fallback"
                print(
                    f"latency  {kind:<10} ({how} {poll:.1f} s): "
                    f"p50 {_pct(lat, 0.5) * 1000:7.1f} ms   p99 {_pct(lat, 0.99) * 1000:7.1f} ms"
                    f"   max {max(lat) * 1000:7.1f} ms"
                )
        for concurrency in (1, 8):
            figures: dict[str, list[float]] = {"raw httpx": [], **{k: [] for k in kinds}}
            for _ in range(args.rounds):
                figures["raw httpx"].append(
                    await raw_httpx_throughput(
                        sim, rows=args.rows, devices=args.devices, concurrency=concurrency
                    )
                )
                for kind in kinds:
                    with scratch_database(kind, args.pg_url) as url:
                        figures[kind].append(
                            await worker_throughput(
                                url,
                                sim,
                                rows=args.rows,
                                devices=args.devices,
                                concurrency=concurrency,
                            )
                        )
            raw = statistics.median(figures["raw httpx"])
            for name, values in figures.items():
                med = statistics.median(values)
                print(
                    f"pushes/s concurrency {concurrency}  {name:<10} {med:8.0f}"
                    f"   ({med / raw:.2f}x raw httpx)"
                )


if __name__ == "__main__":
    asyncio.run(main())
