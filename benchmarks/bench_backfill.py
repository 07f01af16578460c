"""Backfill benchmark: rows/s healed from the simulator's Storage Integration, next to import.

    python benchmarks/bench_backfill.py [--uplinks 20000] [--rounds 3] [--pg URL]

The simulator publishes N realistic uplinks (2 gateways each) with its Storage Integration
on; the same events are written to a capture file. Per round and interleaved, into fresh
databases: ``ingestd backfill``'s core (HTTP pages of 1 000 from the simulator on loopback,
frame, normalize, store) and ``ingestd import`` of the capture. Prints medians and the
ratio backfill / import from the same run (the machine drifts between runs: compare ratios).
Note the two do not write the same tables: import also writes the raw ``events`` rows,
storage rows have no event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import sqlalchemy as sa

from ingestd import migrate
from ingestd.backfill import BackfillStore, backfill_window
from ingestd.config import StreamSettings
from ingestd.db import create_engine
from ingestd.importer import import_stream
from ingestd.runtime import tune_for_database
from ingestd.sim.server import Simulator
from ingestd.storage import StorageClient
from ingestd.store import Store


def run_backfill(sim: Simulator, url: str, since: datetime, until: datetime) -> int:
    engine = create_engine(url)
    tune_for_database(engine.dialect.name)  # as the ingestd command does
    try:
        migrate.upgrade(engine)
        store = BackfillStore(engine)
        stream = StreamSettings(name="bench", application_id=sim.application_id)

        async def go() -> int:
            async with httpx.AsyncClient() as http:
                client = StorageClient(
                    http,
                    base_url=sim.base_url,
                    api_key=sim.api_key,
                    application_id=sim.application_id,
                )
                result = await backfill_window(client, store, stream, since=since, until=until)
                return result.new

        return asyncio.run(go())
    finally:
        engine.dispose()


def run_import(url: str, path: Path) -> int:
    engine = create_engine(url)
    tune_for_database(engine.dialect.name)
    try:
        migrate.upgrade(engine)
        with path.open("rb") as f:
            return import_stream(Store(engine), f, stream="bench").result.events
    finally:
        engine.dispose()


def fresh_pg(admin: str) -> tuple[str, sa.Engine, str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return sa.make_url(admin).set(database=name).render_as_string(hide_password=False), eng, name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uplinks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg", default=None, help="PostgreSQL server URL (CREATE DATABASE rights)")
    args = ap.parse_args()
    sim = Simulator(devices=50, seed=1, storage_enabled=True, store_entity_count=10).start()
    try:
        events = sim.uplinks(args.uplinks)
        since = datetime.now(UTC) - timedelta(hours=1)
        until = datetime.now(UTC) + timedelta(minutes=1)
        with tempfile.TemporaryDirectory() as tmp:
            capture = Path(tmp) / "capture.txt"
            capture.write_bytes(b"".join(orjson.dumps({"result": e}) + b"\n\n" for e in events))
            results: dict[str, list[float]] = {}
            for r in range(args.rounds):
                targets = [("sqlite", None)] + ([("postgresql", args.pg)] if args.pg else [])
                for dialect, admin in targets:
                    for what in ("backfill", "import"):
                        if admin is None:
                            url = f"sqlite:///{tmp}/{what}-{r}.db"
                            cleanup = None
                        else:
                            url, eng, name = fresh_pg(admin)
                            cleanup = (eng, name)
                        t0 = time.perf_counter()
                        n = (
                            run_backfill(sim, url, since, until)
                            if what == "backfill"
                            else run_import(url, capture)
                        )
                        took = time.perf_counter() - t0
                        assert n == args.uplinks, (what, n)
                        results.setdefault(f"{what} {dialect}", []).append(n / took)
                        if cleanup is not None:
                            eng, name = cleanup
                            with eng.connect() as conn:
                                conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
                            eng.dispose()
    finally:
        sim.stop()
    print(f"{args.uplinks:,} uplinks, median of {args.rounds} rounds (rows/s):")
    for dialect in ("sqlite", "postgresql"):
        b, i = results.get(f"backfill {dialect}"), results.get(f"import {dialect}")
        if b and i:
            mb, mi = statistics.median(b), statistics.median(i)
            print(
                f"  {dialect:<10} backfill {mb:>9,.0f}   import {mi:>9,.0f}   "
                f"backfill/import {mb / mi:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
