"""Import benchmark: events/s for ``ingestd import`` on SQLite and PostgreSQL.

    python benchmarks/bench_import.py [--events 100000] [--rounds 3] [--pg URL]

Generates a capture of realistic uplinks (2 gateways, ~2.4 KB each), then per round and
interleaved: the baseline (the same file read, framed and JSON-decoded, nothing else),
``import_stream`` into a fresh SQLite file, and into a fresh PostgreSQL database. Prints
medians and each figure as a ratio of the baseline measured in the same run (the
machine drifts ±20-30 % between runs; compare ratios, not absolute numbers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture import write_capture

from ingestd import migrate
from ingestd.db import create_engine
from ingestd.framing import FrameDecoder
from ingestd.importer import import_stream
from ingestd.store import Store

READ_BYTES = 1 << 20


def baseline(path: Path) -> int:
    """Read, frame and JSON-decode the capture: the floor any import must stand on."""
    decoder = FrameDecoder()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(READ_BYTES):
            for frame in decoder.feed(chunk):
                orjson.loads(frame)
                n += 1
    return n


def import_into(url: str, path: Path) -> int:
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        with path.open("rb") as f:
            summary = import_stream(Store(engine), f, stream="bench")
        return summary.result.events
    finally:
        engine.dispose()


def fresh_pg(admin: str) -> tuple[str, Callable[[], None]]:
    name = f"ingestd_bench_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        eng.dispose()

    return sa.make_url(admin).set(database=name).render_as_string(hide_password=False), drop


def timed(fn: Callable[[], int]) -> float:
    started = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--pg",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="admin URL of a PostgreSQL server ('' to skip)",
    )
    args = ap.parse_args()
    results: dict[str, list[float]] = {
        "baseline (read+frame+json)": [],
        "sqlite": [],
        "postgresql": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        cap = Path(tmp) / "capture.txt"
        size = write_capture(cap, events=args.events)
        print(f"capture: {args.events:,} uplinks, {size / 2**20:.0f} MiB")
        for r in range(args.rounds):
            results["baseline (read+frame+json)"].append(timed(lambda: baseline(cap)))
            db = Path(tmp) / f"r{r}.db"
            results["sqlite"].append(timed(lambda db=db: import_into(f"sqlite:///{db}", cap)))
            if args.pg:
                url, drop = fresh_pg(args.pg)
                try:
                    results["postgresql"].append(timed(lambda url=url: import_into(url, cap)))
                finally:
                    drop()
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items() if v)
            )
    base = statistics.median(results["baseline (read+frame+json)"])
    print(f"\nmedian of {args.rounds} rounds, events/s (ratio to baseline):")
    for k, v in results.items():
        if v:
            med = statistics.median(v)
            print(f"  {k:<28} {med:>10,.0f}   {med / base:5.3f}x")


if __name__ == "__main__":
    main()
