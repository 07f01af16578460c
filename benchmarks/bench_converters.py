"""Do the exec-generated row converters in ``store._BulkInsert`` pay for themselves?

Builds realistic rows (the import benchmark's capture: uplinks with 2 gateways, normalized
as on the stream: one ``events``, one ``uplinks`` and two ``uplink_receptions`` rows per
event) and turns them into driver tuples three ways, per dialect:

- ``generated``: ``_BulkInsert.rows`` (one ``exec``-generated function per table);
- ``loop``: a comprehension over ``(column, converter)`` pairs, the obvious plain code;
- ``itemgetter``: ``operator.itemgetter`` over all columns (the row TypedDicts are total,
  so every key is there), then the converters applied to the few columns that have one.

The yardstick is the whole per-event insert cost, ``Store.commit_batch`` of 500-event
batches into a fresh database (SQLite file; PostgreSQL with ``--pg-url``, an empty
database that this script migrates and fills). Rounds are interleaved (the
converters in a rotating order), medians printed.

    .venv/bin/python benchmarks/bench_converters.py [--events 20000] [--rounds 5]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/bench]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
from capture import write_capture

from ingestd import migrate, schema
from ingestd.db import create_engine
from ingestd.models import Batch, EventRow, Row
from ingestd.normalize import event_row, normalize
from ingestd.store import _CHECKED_TEXT, Store, _BulkInsert, _converter

TABLES = ("events", "uplinks", "uplink_receptions", "joins", "downlink_events")
BATCH = 500
Convert = Callable[[Sequence[Mapping[str, Any]]], list[tuple[Any, ...]]]


def _events(n: int, seed: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "capture.ndjson"
        write_capture(path, events=n, framing="ndjson", seed=seed)
        return [orjson.loads(line)["result"] for line in path.read_bytes().splitlines()]


def _items(events: list[dict[str, Any]]) -> list[tuple[EventRow, list[Row]]]:
    return [(event_row(e, stream="bench"), normalize(e)) for e in events]


def _per_table(items: list[tuple[EventRow, list[Row]]]) -> dict[str, list[Mapping[str, Any]]]:
    now = datetime.now(UTC)
    out: dict[str, list[Mapping[str, Any]]] = {t: [] for t in TABLES}
    for ev, rows in items:
        ev["ingested_at"] = now
        out["events"].append(ev)
        for table, values in rows:
            out[table].append(values)
    return out


def _columns(table: str, dialect: str) -> list[tuple[str, Callable[[Any], Any] | None]]:
    return [
        (c.name, None if c.name in _CHECKED_TEXT else _converter(c.type, dialect))
        for c in schema.metadata.tables[table].columns
    ]


def loop(table: str, dialect: str) -> Convert:
    cols = _columns(table, dialect)

    def rows(values: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            tuple([row.get(c) if f is None else f(row.get(c)) for c, f in cols]) for row in values
        ]

    return rows


def getter(table: str, dialect: str) -> Convert:
    cols = _columns(table, dialect)
    get = itemgetter(*(c for c, _ in cols))
    convs = [(i, f) for i, (_, f) in enumerate(cols) if f is not None]

    def rows(values: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        out = []
        for row in values:
            t = list(get(row))
            for i, f in convs:
                t[i] = f(t[i])
            out.append(tuple(t))
        return out

    return rows


def generated(table: str, dialect: str) -> Convert:
    return _BulkInsert(schema.metadata.tables[table], dialect).rows


def _time_convert(make: Callable[[str, str], Convert], dialect: str, rows: Any) -> float:
    """The best of three passes over every table's rows (the machine is shared and noisy)."""
    convs = {t: make(t, dialect) for t in TABLES}
    best = float("inf")
    for _ in range(3):
        gc.collect()
        started = time.perf_counter()
        for t in TABLES:
            convs[t](rows[t])
        best = min(best, time.perf_counter() - started)
    return best


def _time_commit(store: Store, items: list[tuple[EventRow, list[Row]]]) -> float:
    gc.collect()
    stored = 0
    started = time.perf_counter()
    for i in range(0, len(items), BATCH):
        stored += store.commit_batch(Batch(stream="bench", items=items[i : i + BATCH])).events
    took = time.perf_counter() - started
    assert stored == len(items), f"stored {stored} of {len(items)}: was the database empty?"
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pg-url", help="an empty PostgreSQL database to migrate and fill")
    args = ap.parse_args()
    n = args.events
    events = _events(n * (args.rounds + 1), seed=7)  # fresh ids for every commit round
    rows = _per_table(_items(events[:n]))
    counts = {t: len(r) for t, r in rows.items() if r}
    print(f"{n:,} uplink events -> rows per table {counts}")

    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/bench.db"}
        if args.pg_url:
            urls["postgresql"] = args.pg_url
        for dialect, url in urls.items():
            for make in (generated, loop, getter):  # all three agree, value for value
                assert make("uplinks", dialect)(rows["uplinks"]) == generated("uplinks", dialect)(
                    rows["uplinks"]
                )
                assert make("events", dialect)(rows["events"]) == generated("events", dialect)(
                    rows["events"]
                )
            engine = create_engine(url)
            migrate.upgrade(engine)
            store = Store(engine)
            times: dict[str, list[float]] = {"commit": [], "generated": [], "loop": []}
            times["itemgetter"] = []
            for r in range(args.rounds):
                chunk = _items(events[n * (r + 1) : n * (r + 2)])
                times["commit"].append(_time_commit(store, chunk))
                contenders = [("generated", generated), ("loop", loop), ("itemgetter", getter)]
                for name, make in contenders[r % 3 :] + contenders[: r % 3]:  # rotate the order
                    times[name].append(_time_convert(make, dialect, rows))
            engine.dispose()
            us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
            print(f"\n{dialect}: per event, median of {args.rounds} rounds")
            print(f"  commit_batch (whole insert)   {us['commit']:8.2f} us")
            for name in ("generated", "loop", "itemgetter"):
                share = us[name] / us["commit"] * 100
                print(f"  to tuples: {name:<12}      {us[name]:8.2f} us  ({share:4.1f} % of it)")
            saved = us["loop"] - us["generated"]
            print(
                f"  generated vs loop: {us['loop'] / us['generated']:.2f}x, saves {saved:.2f} us"
                f" = {saved / us['commit'] * 100:.1f} % of the per-event insert cost"
            )
            saved = us["itemgetter"] - us["generated"]
            print(
                f"  generated vs itemgetter: {us['itemgetter'] / us['generated']:.2f}x,"
                f" saves {saved:.2f} us = {saved / us['commit'] * 100:.1f} % of insert cost"
            )


if __name__ == "__main__":
    main()
