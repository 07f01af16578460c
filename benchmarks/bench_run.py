"""Live-daemon benchmark: ``ingestd run`` following the simulator, on SQLite and PostgreSQL.

    python benchmarks/bench_run.py [--rate 200] [--seconds 20] [--events 50000]
        [--rss-events 200000] [--rounds 1] [--pg URL | --pg ''] [--quick]

Per round and interleaved, each target gets a fresh simulator (and database) and two phases:
a fixed offered rate (``--rate`` events/s for ``--seconds``) and flat-out (``--events``
events published as fast as the reader drains them). Targets: the baseline (a bare httpx
client in its own process that reads the same stream and only JSON-decodes the frames), then
the real daemon (``python -m ingestd run``) on a fresh SQLite file and a fresh PostgreSQL
database. Last, one daemon run of ``--rss-events`` flat-out on SQLite for peak RSS
(``VmHWM`` of the daemon, read just before SIGTERM).

Figures: events/s = stored events / (last commit - first event time); latency = event time
at the simulator (its publish time) to the committed row. The daemon logs ``batch_committed``
(info level, one line per batch) right after each commit; its rows all carry the same
``ingested_at`` (stamped as the batch's insert begins), so each event gets the log line's
time as its commit time. ``stamp`` columns give event time to ``ingested_at`` for reference.
For the baseline, latency is event time to receipt. events/s are also given as a ratio to
the baseline of the same phase (the machine drifts ±20-30 %: compare ratios).

Why the simulator runs in this process: flat-out must publish exactly as fast as the reader
drains, and only the simulator's own buffer shows that (publish a chunk when the stream's
buffer has room; its clamp(tail, 8, 1024) buffer drops events otherwise, like TTS). So the
publisher and simulator share this process (one core) and the daemon has its own (the
other core); the baseline client likewise runs in its own process. Events are re-stamped
copies (new ``time`` and ``unique_id``) of 1 000 generated uplinks: generating each one from
scratch costs ~150 µs here, which would make the supply, not the daemon, the limit.

A phase ends when the reader has its last event: for the daemon, when the stream cursor
(committed with the rows) reaches it, polled every 0.25 s (a ``count(*)`` over 200k events
of 2.6 KB would itself load the machine). Each phase is preceded by the previous one or by a
200-event warm-up (not measured). Flat-out latency is mostly queueing: up to ~3k events sit
in the simulator's buffer, the loopback socket and the daemon's two batches.

Reported as well: the reader's CPU %, events published but not stored, events dropped by the
simulator's buffer, ``stream_gaps`` rows and reconnects (all of these should be 0).
Everything started is stopped, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_import import fresh_pg

from ingestd import schema
from ingestd.config import LoggingSettings
from ingestd.db import create_engine
from ingestd.logs import configure_logging
from ingestd.sim import events as eventgen
from ingestd.sim.server import Simulator

DEVICES = 50
TEMPLATES = 1000  # distinct generated uplinks, re-stamped on publish
STORE_ENTITY_COUNT = 2000  # 20x TTS's default; enough to replay a short reconnect at 200/s
TAIL_EVENTS = 100_000  # the daemon's tail: the simulator's buffer is then at its 1024 cap
BUFFER_EVENTS = 1024
FLAT_CHUNK = 128  # events published at once when flat-out
WARMUP_EVENTS = 200  # published and drained before the first phase, not measured
CONNECT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.25
KEY_ENV = "BENCH_TTS_KEY"
UPLINK = "as.up.data.forward"
STREAM = "bench"
PAIR_BYTES = 16  # the client writes (event ns, receipt ns) as two int64


# Production batching defaults; info level for the one batch_committed line per batch.
CONFIG = """\
[database]
url = "{db_url}"
[tts]
base_url = "{sim.base_url}"
api_key = "${{{key_env}}}"
tail = {tail}
[[streams]]
name = "{stream}"
application_id = "{sim.application_id}"
[metrics]
listen = ""
[logging]
level = "info"
format = "json"
"""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Interrupted(Exception):
    """SIGTERM, turned into an exception so every ``finally`` runs."""


@dataclass
class Phase:
    """One measured phase: what was offered and what came out of it."""

    target: str
    phase: str
    published: int
    stored: int = 0
    events_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    stamp_p50_ms: float | None = None
    stamp_p99_ms: float | None = None
    cpu_pct: float | None = None  # the reader process's CPU time over the phase's wall time
    sim_cpu_pct: float | None = None  # this process's (simulator + publisher) likewise
    peak_rss_mib: float | None = None
    start_rss_mib: float | None = None
    dropped: int = 0
    gaps: int = 0
    reconnects: int = 0


FIGURES = [f.name for f in fields(Phase)][3:]  # everything after target, phase, published


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


# --- the supply ------------------------------------------------------------------------------


class Publisher:
    """Publishes re-stamped uplinks into ``sim``, paced or as fast as the stream drains."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        maker = Simulator(
            application_id=sim.application_id,
            devices=DEVICES,
            store=False,
            seed=1,
            max_recorded_events=TEMPLATES,
        )
        self.templates = maker.uplinks(TEMPLATES)
        self.sent = 0
        self.last_time = EPOCH  # of the newest published event

    def _one(self) -> None:
        ev = dict(self.templates[self.sent % TEMPLATES])
        when = self.sim.next_time()
        ev["time"] = eventgen.format_time(when)
        ev["unique_id"] = self.sim.ulids(when)
        self.sim.publish(ev)
        self.sent += 1
        self.last_time = when

    def buffered(self) -> int:
        subs = list(self.sim.event_store.subscriptions)
        return max((len(s.buffer) for s in subs), default=0)

    def fixed(self, rate: float, n: int) -> None:
        started = time.monotonic()
        for i in range(n):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._one()

    def flat_out(self, n: int) -> None:
        done = 0
        while done < n:
            if BUFFER_EVENTS - self.buffered() < FLAT_CHUNK:
                time.sleep(0.0005)
                continue
            for _ in range(min(FLAT_CHUNK, n - done)):
                self._one()
            done += min(FLAT_CHUNK, n - done)


# --- the readers -----------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=STOP_TIMEOUT_S)


def _status_mib(pid: int, field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


class Daemon:
    """``python -m ingestd run`` on ``db_url`` following ``sim``; JSON logs to a file."""

    def __init__(self, tmp: Path, sim: Simulator, db_url: str, env: dict[str, str]) -> None:
        self.db_url = db_url
        config = tmp / "ingestd.toml"
        config.write_text(
            CONFIG.format(db_url=db_url, sim=sim, stream=STREAM, key_env=KEY_ENV, tail=TAIL_EVENTS)
        )
        self.log = tmp / "daemon.log"
        with self.log.open("wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "--config", str(config), "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=logf,
            )
        self.engine = create_engine(db_url)

    def progress(self) -> datetime:
        """The stream cursor: every event up to it is committed (a cheap poll, unlike count)."""
        cursors = schema.stream_cursors.c
        query = sa.select(cursors.last_event_time).where(cursors.stream == STREAM)
        with (
            contextlib.suppress(sa.exc.OperationalError, sa.exc.ProgrammingError),
            self.engine.connect() as conn,
        ):
            return conn.execute(query).scalar() or EPOCH
        return EPOCH  # not migrated yet

    def stop(self) -> int:
        try:
            return _stop_process(self.proc)
        finally:
            self.engine.dispose()

    def commits(self) -> list[tuple[float, int]]:
        """``(unix time, events)`` of every ``batch_committed`` line that stored events."""
        out = []
        for line in self.log.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                rec = orjson.loads(line)
                if rec.get("event") == "batch_committed" and rec.get("events"):
                    ts = datetime.fromisoformat(rec["timestamp"]).timestamp()
                    out.append((ts, int(rec["events"])))
        return out

    def reconnects(self) -> int:
        return self.log.read_bytes().count(b'"stream_disconnected"')

    def measure(self, phase: Phase, start: float, end: float) -> None:
        """Fill ``phase`` from the rows of events timed within ``[start, end]``."""
        with self.engine.connect() as conn:
            ev = schema.events.c
            rows = conn.execute(sa.select(ev.time, ev.ingested_at).where(ev.name == UPLINK)).all()
            phase.gaps = int(conn.execute(sa.text("SELECT count(*) FROM stream_gaps")).scalar_one())
        stamps = [(_ts(t), _ts(i)) for t, i in rows]
        committed = _commit_times(stamps, self.commits())
        mine = [(t, i) for t, i in stamps if start <= t <= end]
        _fill(phase, [(t, committed.get(i, i)) for t, i in mine])
        if mine:
            stamp = [(i - t) * 1000 for t, i in mine]
            phase.stamp_p50_ms, phase.stamp_p99_ms = pct(stamp, 0.5), pct(stamp, 0.99)


def _fill(phase: Phase, done: list[tuple[float, float]]) -> None:
    """events/s and latency from ``(event time, committed or received time)`` pairs."""
    phase.stored = len(done)
    if done:
        lat = [(d - t) * 1000 for t, d in done]
        first, last = min(t for t, _ in done), max(d for _, d in done)
        phase.events_s = len(done) / max(last - first, 1e-6)
        phase.p50_ms, phase.p99_ms = pct(lat, 0.5), pct(lat, 0.99)


def _ts(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _commit_times(
    stamps: list[tuple[float, float]], commits: list[tuple[float, int]]
) -> dict[float, float]:
    """``ingested_at → commit time``: the k-th distinct stamp is the k-th non-empty commit.

    Empty when the counts do not line up (then ``ingested_at`` stands in for the commit).
    """
    sizes: dict[float, int] = {}
    for _, i in stamps:
        sizes[i] = sizes.get(i, 0) + 1
    batches = sorted(sizes)
    if len(batches) != len(commits) or any(
        sizes[b] != n for b, (_, n) in zip(batches, commits, strict=True)
    ):
        print(
            f"  (commit log does not match: {len(batches)} batches, {len(commits)} log lines;"
            " latency is to ingested_at)",
            file=sys.stderr,
        )
        return {}
    return {b: ts for b, (ts, _) in zip(batches, commits, strict=True)}


class Client:
    """The baseline: ``bench_run.py --client`` reading the stream in its own process."""

    def __init__(self, tmp: Path, sim: Simulator, env: dict[str, str]) -> None:
        self.out = tmp / "client.bin"
        self.out.touch()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", sim.base_url, sim.application_id, str(self.out)],
            env=env,
            stdout=subprocess.DEVNULL,
        )

    def pairs(self) -> int:
        return self.out.stat().st_size // PAIR_BYTES

    def progress(self) -> datetime:
        """Time of the newest event read (the stream is in order)."""
        with self.out.open("rb") as f:
            f.seek(max(0, self.pairs() - 1) * PAIR_BYTES)
            last = array("q", f.read(PAIR_BYTES))
        return EPOCH + timedelta(microseconds=last[0] // 1000) if last else EPOCH

    def stop(self) -> int:
        return _stop_process(self.proc)

    def measure(self, phase: Phase, start: float, end: float) -> None:
        raw = array("q", self.out.read_bytes()[: self.pairs() * PAIR_BYTES])
        pairs = [(raw[k] / 1e9, raw[k + 1] / 1e9) for k in range(0, len(raw), 2)]
        _fill(phase, [(t, r) for t, r in pairs if start <= t <= end])


def client_main(base_url: str, application_id: str, out: str) -> None:
    """Read the stream, JSON-decode each frame, append (event ns, receipt ns) to ``out``."""

    def on_term(*_: object) -> None:
        raise Interrupted

    signal.signal(signal.SIGTERM, on_term)
    body = {
        "identifiers": [{"application_ids": {"application_id": application_id}}],
        "tail": TAIL_EVENTS,
    }
    headers = {"Authorization": f"Bearer {os.environ[KEY_ENV]}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(10.0, read=None)
    with (
        contextlib.suppress(Interrupted, KeyboardInterrupt),
        open(out, "ab") as f,
        httpx.Client(timeout=timeout) as http,
        http.stream("POST", f"{base_url}/api/v3/events", json=body, headers=headers) as r,
    ):
        r.raise_for_status()
        rest = b""
        for chunk in r.iter_raw():
            now = time.time_ns()
            *frames, rest = (rest + chunk).split(b"\n\n")
            got = array("q")
            for frame in frames:
                ev = orjson.loads(frame)["result"]
                if ev["name"] == UPLINK:
                    got.extend((eventgen.parse_time_ns(ev["time"]), now))
            if got:
                f.write(got.tobytes())
                f.flush()


# --- running -----------------------------------------------------------------------------------


Reader = Daemon | Client


def wait_until(reader: Reader, last: datetime, *, timeout_s: float, what: str) -> None:
    """Wait until ``reader`` has the event published at ``last`` (and so all before it)."""
    deadline = time.monotonic() + timeout_s
    while (got := reader.progress()) < last:
        behind = f"{(last - got).total_seconds():.1f} s behind"
        if reader.proc.poll() is not None:
            raise RuntimeError(f"{what}: reader exited with {reader.proc.returncode}, {behind}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still {behind} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


@contextlib.contextmanager
def database(kind: str, tmp: Path, pg_admin: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    url, drop = fresh_pg(pg_admin)
    try:
        yield url
    finally:
        drop()


def session(
    target: str, phases: list[tuple[str, Callable[[Publisher], None], int]], pg_admin: str
) -> list[Phase]:
    """One fresh simulator (+ database) and reader; run ``phases`` in order and measure each."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_run_")))
        sim = Simulator(
            devices=DEVICES,
            store_entity_count=STORE_ENTITY_COUNT,
            max_recorded_events=TEMPLATES,
            seed=7,
        )
        stack.enter_context(sim)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env[KEY_ENV] = sim.api_key
        reader: Reader
        if target == "baseline":
            reader = Client(tmp, sim, env)
        else:
            url = stack.enter_context(database(target, tmp, pg_admin))
            reader = Daemon(tmp, sim, url, env)
        stack.callback(reader.stop)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not any(r.status == 200 for r in sim.stream_requests):
            if reader.proc.poll() is not None or time.monotonic() > deadline:
                log = getattr(reader, "log", None)
                tail = log.read_text()[-2000:] if log is not None else ""
                raise RuntimeError(f"{target}: reader did not connect\n{tail}")
            time.sleep(0.02)
        pub = Publisher(sim)
        start_rss = _status_mib(reader.proc.pid, "VmRSS")
        pub.flat_out(WARMUP_EVENTS)
        wait_until(reader, pub.last_time, timeout_s=CONNECT_TIMEOUT_S, what="warm-up")
        windows = []
        for name, publish, n in phases:
            cpu0, wall0 = _cpu_s(reader.proc.pid), time.monotonic()
            sim0 = time.process_time()
            start = time.time()
            publish(pub)
            end = time.time()
            wait_until(reader, pub.last_time, timeout_s=60 + n / 100, what=f"{target} {name}")
            phase = Phase(target, name, n)
            cpu1 = _cpu_s(reader.proc.pid)
            phase.sim_cpu_pct = 100 * (time.process_time() - sim0) / (time.monotonic() - wall0)
            if cpu0 is not None and cpu1 is not None:
                phase.cpu_pct = 100 * (cpu1 - cpu0) / (time.monotonic() - wall0)
            windows.append((phase, start, end))
        peak = _status_mib(reader.proc.pid, "VmHWM")
        code = reader.stop()
        if code != 0:
            print(f"  {target}: reader exited with {code}", file=sys.stderr)
        for phase, start, end in windows:
            reader.measure(phase, start, end)
            phase.dropped = sim.dropped_events
            if isinstance(reader, Daemon):
                phase.peak_rss_mib, phase.start_rss_mib = peak, start_rss
                phase.reconnects = reader.reconnects()
        return [p for p, _, _ in windows]


def report(results: list[Phase], rounds: int) -> None:
    keys = list(dict.fromkeys((p.target, p.phase) for p in results))
    med: dict[tuple[str, str], dict[str, float | None]] = {}
    for key in keys:
        runs = [p for p in results if (p.target, p.phase) == key]
        med[key] = {f: _median([getattr(p, f) for p in runs]) for f in FIGURES}
        med[key]["missing"] = _median([p.published - p.stored for p in runs])
    print(
        f"\nmedian of {rounds} round(s); latency = event time at the simulator to committed row"
        " (baseline: to receipt);\nstamp = to ingested_at (the batch's insert start);"
        " x base = events/s over the baseline's in the same phase\n"
    )
    head = (
        f"{'target':<11}{'phase':<16}{'stored':>9}{'events/s':>10}{'x base':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'stamp p50':>10}{'stamp p99':>10}"
        f"{'CPU %':>7}{'RSS MiB':>14}{'missing':>8}{'dropped':>8}{'gaps':>5}{'reconn':>7}"
    )
    print(head)
    print("-" * len(head))
    for target, phase in keys:
        m = med[(target, phase)]
        base = med.get(("baseline", phase.replace(" (RSS)", "")), {}).get("events_s")
        ratio = f"{m['events_s'] / base:.3f}" if base and m["events_s"] else "-"
        rss = (
            f"{m['start_rss_mib']:.0f}->{m['peak_rss_mib']:.0f}"
            if m["peak_rss_mib"] is not None and m["start_rss_mib"] is not None
            else "-"
        )
        print(
            f"{target:<11}{phase:<16}{m['stored']:>9,.0f}{m['events_s']:>10,.0f}{ratio:>8}"
            f"{m['p50_ms']:>9.1f}{m['p99_ms']:>9.1f}{_fmt(m['stamp_p50_ms']):>10}"
            f"{_fmt(m['stamp_p99_ms']):>10}{_fmt(m['cpu_pct'], 0):>7}{rss:>14}"
            f"{m['missing']:>8.0f}{m['dropped']:>8.0f}{m['gaps']:>5.0f}"
            f"{m['reconnects']:>7.0f}"
        )
    print(
        "\nCPU % = the reader process's CPU time / wall time from the phase's first publish"
        " until drained\nmissing = published but not stored; dropped = by the simulator's"
        " buffer (whole session)\nRSS MiB = daemon VmRSS once connected -> VmHWM (peak)"
        " just before SIGTERM"
    )


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="fixed offered rate, events/s")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the fixed-rate phase")
    ap.add_argument("--events", type=int, default=50_000, help="events in the flat-out phase")
    ap.add_argument(
        "--rss-events",
        type=int,
        default=200_000,
        help="events in the SQLite peak-RSS run (0 skips it)",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--pg",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="admin URL of a PostgreSQL server ('' to skip)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(*args.client)
        return
    if args.quick:
        args.rate, args.seconds, args.events, args.rss_events, args.rounds = 100, 1, 1000, 2000, 1

    def on_term(*_: object) -> None:
        raise Interrupted

    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits SIG_IGN
        signal.signal(sig, on_term)
    configure_logging(LoggingSettings(level="warning", format="console"))
    fixed_n = max(1, round(args.rate * args.seconds))
    fixed = (f"{args.rate:g}/s", lambda p: p.fixed(args.rate, fixed_n), fixed_n)
    flat = ("flat-out", lambda p: p.flat_out(args.events), args.events)
    targets = ["baseline", "sqlite"] + (["postgresql"] if args.pg else [])
    print(
        f"fixed {args.rate:g} events/s for {args.seconds:g} s, flat-out {args.events:,} events,"
        f" {DEVICES} devices, {args.rounds} round(s); load average"
        f" {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (a shared machine: compare ratios)"
    )
    results: list[Phase] = []
    try:
        for r in range(args.rounds):
            for target in targets:
                for p in session(target, [fixed, flat], args.pg):
                    results.append(p)
                    print(
                        f"round {r + 1}: {p.target:<10} {p.phase:<9} {p.stored:>8,} stored"
                        f" {p.events_s:>9,.0f}/s p50 {p.p50_ms:.1f} ms p99 {p.p99_ms:.1f} ms",
                        flush=True,
                    )
        if args.rss_events:
            rss = ("flat-out (RSS)", lambda p: p.flat_out(args.rss_events), args.rss_events)
            [p] = session("sqlite", [rss], args.pg)
            results.append(p)
            print(f"rss run: {p.stored:,} stored, peak RSS {p.peak_rss_mib:.0f} MiB", flush=True)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: everything started was stopped", file=sys.stderr)
        sys.exit(130)
    report(results, args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
