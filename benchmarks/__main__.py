"""The whole performance table of issue 12, with every baseline measured in the same run.

    python -m benchmarks [--quick] [--rounds 3] [--pg URL | --pg ''] [--only SECTION ...]

Sections (``--only`` picks some): ``import`` (SQLite and PostgreSQL, against a loop that
writes the same rows into the same migrated tables with the database's fastest bulk path,
and the same rows into a minimal schema; plus a capture whose events all share one
timestamp), ``run`` (the daemon flat-out and at a steady 1 000 events/s against the simulator
in this process; its CPU share is reported), ``backfill`` (vs import of the same uplinks),
``rss`` (peak RSS over a long import in its own process) and ``downlink`` (pushes/s with 8
in flight vs a raw httpx POST loop). Figures are medians of ``--rounds`` interleaved rounds;
ratios are taken within the run (this machine drifts ±20-30 % between runs). ``--quick``
uses tiny sizes and one round: a smoke test that the table is produced, not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines
import bench_backfill
import bench_downlink
import bench_run
from bench_import import fresh_pg
from capture import write_capture

from ingestd import migrate
from ingestd.db import create_engine
from ingestd.importer import import_stream
from ingestd.runtime import tune_for_database, tune_gc
from ingestd.sim.server import Simulator
from ingestd.store import Store

SECTIONS = ("import", "run", "backfill", "rss", "downlink")
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Table:
    """Rows of the printed table: path, database, ingestd, yardstick, ratio, target."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(
        self,
        path: str,
        db: str,
        value: float | None,
        base: float | None,
        base_name: str,
        target: str,
        *,
        unit: str = "/s",
        note: str = "",
    ) -> None:
        ratio = f"{value / base:.2f}x" if value and base else "-"
        self.rows.append(
            (path, db, _num(value, unit), f"{_num(base, unit)} ({base_name})", ratio, target, note)
        )

    def print(self) -> None:
        head = ("path", "db", "ingestd", "yardstick", "ratio", "target", "note")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@contextlib.contextmanager
def database(kind: str, tmp: Path, tag: str, pg: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'{tag}.db'}"
        return
    url, drop = fresh_pg(pg)
    try:
        yield url
    finally:
        drop()


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    n = fn()
    return n, n / (time.perf_counter() - started)


# -- import ----------------------------------------------------------------------------------


def import_file(url: str, path: Path) -> int:
    """``ingestd import`` of ``path`` into the migrated database at ``url``."""
    engine = create_engine(url)
    tune_for_database(engine.dialect.name)  # as the ingestd command does
    try:
        with path.open("rb") as f:
            return import_stream(Store(engine), f, stream="bench").result.events
    finally:
        engine.dispose()


def section_import(args: argparse.Namespace, table: Table, tmp: Path) -> dict[str, float]:
    cap = tmp / "capture.txt"
    same_t = tmp / "capture-one-time.txt"
    size = write_capture(cap, events=args.events)
    write_capture(same_t, events=args.events, step_ms=0)
    print(f"import: {args.events:,} uplinks, {size / 2**20:.0f} MiB, 2 gateways", flush=True)
    kinds = ["sqlite"] + (["postgresql"] if args.pg else [])
    res: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for kind in kinds:
            for what in ("same", "ingestd", "minimal", "one-time"):
                with database(kind, tmp, f"imp-{kind}-{what}-{r}", args.pg) as url:
                    if what == "same":
                        baselines.prepare_same(url)
                        n, rate = timed(lambda url=url: baselines.same_schema(url, cap))
                    elif what == "minimal":
                        baselines.prepare_minimal(url)
                        n, rate = timed(lambda url=url: baselines.same_schema(url, cap))
                    else:
                        baselines.prepare_same(url)
                        src = cap if what == "ingestd" else same_t
                        n, rate = timed(lambda url=url, src=src: import_file(url, src))
                    assert n == args.events, (kind, what, n)
                    res.setdefault(f"{kind} {what}", []).append(rate)
                    print(f"  round {r + 1} {kind:<10} {what:<8} {rate:>9,.0f}/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    for kind in kinds:
        imp, same = med[f"{kind} ingestd"], med[f"{kind} same"]
        table.add("import", kind, imp, same, "same rows, same schema", ">= 0.8x")
        table.add("same-rows loop", kind, same, med[f"{kind} minimal"], "minimal schema", "-")
        table.add("import, one timestamp", kind, med[f"{kind} one-time"], imp, "import", "~1x")
    return {kind: med[f"{kind} ingestd"] for kind in kinds}


# -- run (daemon vs simulator) ----------------------------------------------------------------


def section_run(args: argparse.Namespace, table: Table, imports: dict[str, float]) -> None:
    rate = 1000.0
    seconds = 2.0 if args.quick else args.steady_seconds
    flat_n = 1000 if args.quick else min(args.events, 50_000)
    n_fixed = round(rate * seconds)
    steady = ("1000/s", lambda p: p.fixed(rate, n_fixed), n_fixed)
    flat = ("flat-out", lambda p: p.flat_out(flat_n), flat_n)
    kinds = ["sqlite"] + (["postgresql"] if args.pg else [])
    print(f"run: flat-out {flat_n:,} events, steady 1000/s for {seconds:g} s", flush=True)
    got: dict[tuple[str, str], list[bench_run.Phase]] = {}
    for r in range(args.rounds):
        for kind in kinds:
            for p in bench_run.session(kind, [steady, flat], args.pg):
                got.setdefault((kind, p.phase), []).append(p)
                print(
                    f"  round {r + 1} {kind:<10} {p.phase:<8} {p.events_s:>9,.0f}/s"
                    f" p99 {p.p99_ms:.0f} ms missing {p.published - p.stored}"
                    f" sim CPU {p.sim_cpu_pct or 0:.0f} %",
                    flush=True,
                )
    for kind in kinds:
        flat_runs = got[(kind, "flat-out")]
        ev = _median([p.events_s for p in flat_runs])
        sim_cpu = _median([p.sim_cpu_pct for p in flat_runs if p.sim_cpu_pct is not None])
        daemon_cpu = _median([p.cpu_pct for p in flat_runs if p.cpu_pct is not None])
        missing = max(p.published - p.stored for p in flat_runs)
        table.add(
            "run flat-out",
            kind,
            ev,
            imports.get(kind),
            "import",
            ">= 0.8x",
            note=f"simulator CPU {sim_cpu or 0:.0f} %, daemon CPU {daemon_cpu or 0:.0f} %"
            f", missing {missing}",
        )
    for kind in kinds:
        runs = got[(kind, "1000/s")]
        p99 = _median([p.p99_ms for p in runs])
        p50 = _median([p.p50_ms for p in runs])
        missing = max(p.published - p.stored for p in runs)
        table.add(
            "steady 1000/s, event->commit p99",
            kind,
            p99,
            None,
            "-",
            "< 250 ms",
            unit=" ms",
            note=f"p50 {p50 or 0:.0f} ms, missing {missing}",
        )


# -- backfill --------------------------------------------------------------------------------


def section_backfill(args: argparse.Namespace, table: Table, tmp: Path) -> None:
    n = 500 if args.quick else 20_000
    kinds = ["sqlite"] + (["postgresql"] if args.pg else [])
    print(f"backfill: {n:,} uplinks from the simulator's storage", flush=True)
    sim = Simulator(devices=50, seed=1, storage_enabled=True, store_entity_count=10).start()
    res: dict[str, list[float]] = {}
    try:
        events = sim.uplinks(n)
        since = datetime.now(UTC) - timedelta(hours=1)
        until = datetime.now(UTC) + timedelta(minutes=1)
        cap = tmp / "backfill-capture.txt"
        cap.write_bytes(b"".join(orjson.dumps({"result": e}) + b"\n\n" for e in events))
        for r in range(args.rounds):
            for kind in kinds:
                for what in ("backfill", "import"):
                    with database(kind, tmp, f"bf-{kind}-{what}-{r}", args.pg) as url:
                        if what == "backfill":
                            got, rate = timed(
                                lambda url=url: bench_backfill.run_backfill(sim, url, since, until)
                            )
                        else:
                            got, rate = timed(lambda url=url: bench_backfill.run_import(url, cap))
                    assert got == n, (kind, what, got)
                    res.setdefault(f"{kind} {what}", []).append(rate)
                    print(f"  round {r + 1} {kind:<10} {what:<8} {rate:>9,.0f}/s", flush=True)
    finally:
        sim.stop()
    for kind in kinds:
        table.add(
            "backfill",
            kind,
            _median(res[f"{kind} backfill"]),
            _median(res[f"{kind} import"]),
            "import",
            ">= 0.8x",
            note="backfill writes no events rows",
        )


# -- RSS -------------------------------------------------------------------------------------


class _Restamped:
    """A file-like capture of ``n`` uplinks: one template re-stamped per event (no disk)."""

    def __init__(self, template: dict[str, Any], n: int) -> None:
        self.ev = template
        self.n = n
        self.i = 0
        self.start = datetime(2026, 11, 1, tzinfo=UTC)

    def read(self, size: int = -1) -> bytes:
        out = []
        total = 0
        ev = self.ev
        up = ev["data"]["uplink_message"]
        while self.i < self.n and (size < 0 or total < size):
            t = (self.start + timedelta(milliseconds=10 * self.i)).isoformat()
            t = t.replace("+00:00", "Z")
            ev["time"] = ev["data"]["received_at"] = up["received_at"] = t
            ev["unique_id"] = f"01RSS{self.i:021d}"
            up["f_cnt"] = self.i
            frame = orjson.dumps({"result": ev}) + b"\n\n"
            out.append(frame)
            total += len(frame)
            self.i += 1
        return b"".join(out)


def rss_child(url: str, n: int, checkpoint: int) -> None:
    """Import ``n`` re-stamped uplinks into ``url``; print VmRSS at ``checkpoint`` and end."""
    from ingestd.importer import ImportSummary

    tmp = Path(tempfile.mkdtemp())
    write_capture(tmp / "t.txt", events=1)
    template = orjson.loads((tmp / "t.txt").read_bytes().split(b"\n\n")[0])["result"]
    engine = create_engine(url)
    migrate.upgrade(engine)
    marks: dict[str, float] = {}

    def progress(s: ImportSummary) -> None:
        if "at_checkpoint" not in marks and s.result.events >= checkpoint:
            marks["at_checkpoint"] = _status_mib("VmRSS")

    started = time.perf_counter()
    summary = import_stream(Store(engine), _Restamped(template, n), stream="rss", progress=progress)  # type: ignore[arg-type]
    marks["rate"] = summary.result.events / (time.perf_counter() - started)
    marks["at_end"] = _status_mib("VmRSS")
    marks["peak"] = _status_mib("VmHWM")
    marks["events"] = summary.result.events
    engine.dispose()
    print(orjson.dumps(marks).decode())


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def section_rss(args: argparse.Namespace, table: Table, tmp: Path) -> None:
    n = 20_000 if args.quick else args.rss_events
    checkpoint = min(100_000, n // 10)
    print(f"rss: import of {n:,} re-stamped uplinks in its own process (SQLite)", flush=True)
    url = f"sqlite:///{tmp / 'rss.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--rss-child", url, str(n), str(checkpoint)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    ).stdout
    marks = orjson.loads(out.strip().splitlines()[-1])
    table.add(
        "import peak RSS",
        "sqlite",
        marks["peak"],
        None,
        "-",
        "< 150 MiB, flat",
        unit=" MiB",
        note=f"RSS {marks['at_checkpoint']:.0f} MiB at {checkpoint:,}, {marks['at_end']:.0f} MiB"
        f" at {n:,} events; {marks['rate']:,.0f} events/s",
    )


# -- downlinks -------------------------------------------------------------------------------


async def _downlink(args: argparse.Namespace, table: Table) -> None:
    rows = 200 if args.quick else 2000
    devices = 200
    concurrency = 8
    kinds = ["sqlite"] + (["postgresql"] if args.pg else [])
    print(f"downlink: {rows:,} pushes, {concurrency} in flight", flush=True)
    res: dict[str, list[float]] = {}
    with bench_downlink.simulator(devices) as sim:
        for r in range(args.rounds):
            raw = await bench_downlink.raw_httpx_throughput(
                sim, rows=rows, devices=devices, concurrency=concurrency
            )
            res.setdefault("raw", []).append(raw)
            for kind in kinds:
                with bench_downlink.scratch_database(kind, args.pg or None) as url:
                    rate = await bench_downlink.worker_throughput(
                        url, sim, rows=rows, devices=devices, concurrency=concurrency
                    )
                res.setdefault(kind, []).append(rate)
                print(f"  round {r + 1} {kind:<10} {rate:>7,.0f}/s (raw {raw:,.0f}/s)", flush=True)
    for kind in kinds:
        table.add(
            f"downlink pushes, {concurrency} in flight",
            kind,
            _median(res[kind]),
            _median(res["raw"]),
            "raw httpx POST loop",
            ">= 0.7x",
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="median of N rounds (default 3)")
    ap.add_argument("--events", type=int, default=None, help="uplinks in the import capture")
    ap.add_argument("--steady-seconds", type=float, default=15.0, help="of the 1000/s phase")
    ap.add_argument("--rss-events", type=int, default=1_000_000, help="events of the RSS import")
    ap.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL admin URL ('' to skip)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tune_gc()  # as the ingestd command does: import and backfill run in this process
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.rss_child:
        url, n, checkpoint = args.rss_child
        rss_child(url, int(n), int(checkpoint))
        return
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.events = args.events or (2000 if args.quick else 100_000)
    load0 = os.getloadavg()[0]
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average"
        f" {load0:.2f}, median of {args.rounds} round(s)",
        flush=True,
    )
    table = Table()
    imports: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ingestd_bench_") as tmp_name:
        tmp = Path(tmp_name)
        if "import" in args.only:
            imports = section_import(args, table, tmp)
        if "run" in args.only:
            section_run(args, table, imports)
        if "backfill" in args.only:
            section_backfill(args, table, tmp)
        if "rss" in args.only:
            section_rss(args, table, tmp)
        if "downlink" in args.only:
            asyncio.run(_downlink(args, table))
    print(f"\nload average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n")
    table.print()


if __name__ == "__main__":
    main()
