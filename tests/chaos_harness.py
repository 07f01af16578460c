"""A chaos run: ``ingestd run`` (a real process) against the simulator under random faults.

Shared by ``tests/acceptance/test_chaos.py`` (bounded, in CI) and ``benchmarks/soak.py``
(long, on purpose). Everything is on loopback. The simulator runs in this process (a
thread), so the harness can script its faults and knows every event it emitted; the daemon
is ``python -m ingestd --config … run``, so SIGKILL is real.

The fault plan comes from one seeded RNG and is printed before the run, so a failure can be
replayed (``CHAOS_SEED=<seed>``; timing still varies). Faults run one after the other,
with quiet spells between, while a publisher thread emits uplinks at a steady rate.

Invariant checked at the end (issue 8): every event the simulator emitted is stored exactly
once, or lies inside a recorded gap (a ``stream_gaps`` window covering its time); every
poison event is in ``rejected_events`` (the two kinds a database may refuse, a huge f_cnt
and a NUL, may instead be stored); every gap overlaps an injected fault; and the daemon
never exits on its own and stops on SIGTERM with 0.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from support import DaemonProcess, ProcessTracker, ingestd_env, stream_requests_ok

from ingestd.normalize import parse_time
from ingestd.sim.server import Poison, Simulator

STREAM = "chaos"
FAULT_KINDS = (
    "drop",  # the server ends every stream cleanly
    "reset",  # every stream's TCP connection is cut
    "stall",  # no frame for N s, connection kept (the daemon's idle timeout is shorter, sometimes)
    "out_of_order",  # frames shuffled within windows
    "http_errors",  # a burst of 5xx/429 answers to the next stream requests
    "poison",  # malformed events
    "db_lock",  # SQLite: BEGIN IMMEDIATE held; PostgreSQL: LOCK TABLE uplinks ACCESS EXCLUSIVE
    "pg_kill",  # pg_terminate_backend of the daemon's connections (PostgreSQL only)
    "sigkill",  # SIGKILL the daemon, restart it after a moment
)
REJECTED_ONLY = frozenset({"bad_field", "truncated", "bad_identifiers"})
IDLE_TIMEOUT_S = 2.0  # the daemon's; some stalls are longer, so it reconnects on its own
GAP_SLACK_S = 5.0  # a gap must overlap a fault window widened by this much
CONNECT_TIMEOUT_S = 30.0
PUBLISH_TICK_S = 0.01
POLL_S = 0.5


@dataclass(kw_only=True)
class ChaosConfig:
    seed: int
    duration_s: float
    dialect: str  # "sqlite" | "postgresql"
    kinds: tuple[str, ...] = FAULT_KINDS
    poison_kinds: tuple[str, ...] = ("bad_field", "truncated")
    rate: float = 100.0  # uplinks/s
    devices: int = 20
    stall_s: tuple[float, float] = (0.5, 3.0)
    db_lock_s: tuple[float, float] = (1.0, 4.0)
    quiet_s: tuple[float, float] = (0.2, 1.5)
    spool: dict[str, Any] | None = None  # a [spool] table for the daemon's config
    settle_timeout_s: float = 60.0  # after the faults: time to catch up
    stuck_s: float = 10.0  # ... cut short when nothing new is stored for this long


@dataclass(kw_only=True)
class Fault:
    at_s: float
    kind: str
    seconds: float = 0.0
    detail: str = ""
    began: datetime | None = None  # wall clock, for the gap check
    ended: datetime | None = None

    def __str__(self) -> str:
        extra = f" {self.seconds:.2f}s" if self.seconds else ""
        return f"+{self.at_s:6.2f}s {self.kind}{extra} {self.detail}".rstrip()


def plan(cfg: ChaosConfig) -> list[Fault]:
    """The fault schedule for ``cfg``: a function of the seed alone."""
    rng = random.Random(cfg.seed)
    kinds = [k for k in cfg.kinds if k != "pg_kill" or cfg.dialect == "postgresql"]
    faults: list[Fault] = []
    first = rng.sample(kinds, len(kinds))  # every kind at least once, in a random order
    t = 1.0
    while t < cfg.duration_s and kinds:
        kind = first.pop() if first else rng.choice(kinds)
        fault = Fault(at_s=round(t, 2), kind=kind)
        if kind == "stall":
            fault.seconds = rng.uniform(*cfg.stall_s)
        elif kind == "out_of_order":
            fault.seconds = rng.uniform(1.0, 4.0)
            fault.detail = f"window={rng.randrange(2, 30)}"
        elif kind == "http_errors":
            statuses = [rng.choice((500, 503, 429, 502)) for _ in range(rng.randrange(1, 5))]
            fault.detail = "statuses=" + ",".join(map(str, statuses))
        elif kind == "poison":
            picks = [rng.choice(cfg.poison_kinds) for _ in range(rng.randrange(1, 4))]
            if not any(f.kind == "poison" for f in faults):  # the first has every kind
                picks = rng.sample(cfg.poison_kinds, len(cfg.poison_kinds)) + picks[1:]
            fault.detail = "kinds=" + ",".join(picks)
        elif kind == "db_lock":
            fault.seconds = rng.uniform(*cfg.db_lock_s)
        elif kind == "sigkill":
            fault.seconds = rng.uniform(0.1, 1.5)  # down for this long
        faults.append(fault)
        t += fault.seconds + rng.uniform(*cfg.quiet_s)
    return faults


@dataclass(kw_only=True)
class Report:
    """What a run did and found; ``problems`` empty means the invariant held."""

    seed: int
    dialect: str
    faults: list[Fault]
    wall_s: float = 0.0
    emitted: int = 0
    poison: list[Poison] = field(default_factory=list)
    stored: int = 0
    stored_rows: int = 0  # events rows: more than ``stored`` would be duplicates
    duplicates: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (unique_id, time)
    in_gaps: int = 0
    gaps: list[tuple[Any, ...]] = field(default_factory=list)
    rejected: int = 0
    restarts: int = 0
    unexpected_exits: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    dropped_by_server: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by_kind = Counter(f.kind for f in self.faults)
        poison = Counter(p.kind for p in self.poison)
        lines = [
            f"chaos seed={self.seed} dialect={self.dialect} wall={self.wall_s:.1f}s",
            f"  events emitted      {self.emitted} (+{len(self.poison)} poison: "
            f"{dict(sorted(poison.items()))})",
            f"  faults injected     {len(self.faults)}: {dict(sorted(by_kind.items()))}",
            f"  daemon restarts     {self.restarts} (unexpected exits {self.unexpected_exits})",
            f"  stored              {self.stored} of {self.emitted} "
            f"(stored = emitted: {self.stored == self.emitted and not self.missing})",
            f"  duplicates          {self.duplicates}",
            f"  in recorded gaps    {self.in_gaps} events, {len(self.gaps)} gaps",
            f"  missing (no gap)    {len(self.missing)}",
            f"  rejected_events     {self.rejected} rows",
            f"  server buffer drops {self.dropped_by_server}",
            f"  daemon RSS          peak {self.rss_peak_kib / 1024:.1f} MiB, "
            f"at end {self.rss_end_kib / 1024:.1f} MiB",
        ]
        for gap in self.gaps:
            lines.append(f"  gap {gap}")
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)

    def schedule(self) -> str:
        return "\n".join(f"  {f}" for f in self.faults)


class _Rss:
    """Samples the daemon's VmRSS/VmHWM from /proc while it runs (peak over restarts)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.peak_kib = 0
        self.last_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)

    def sample(self) -> None:
        if self.pid is None:
            return
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0])
        hwm = int(fields.get("VmHWM", "0 kB").split()[0])
        if rss:
            self.last_kib = rss
        self.peak_kib = max(self.peak_kib, hwm, rss)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> _Rss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


class Chaos:
    """One chaos run; ``run()`` returns the :class:`Report`."""

    def __init__(
        self,
        cfg: ChaosConfig,
        *,
        db_url: str,
        workdir: Path,
        tracker: ProcessTracker,
        out: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.db_url = db_url
        self.workdir = workdir
        self.tracker = tracker
        self.out = out
        self.faults = plan(cfg)
        self.report = Report(seed=cfg.seed, dialect=cfg.dialect, faults=self.faults)
        self.sim = Simulator(
            devices=cfg.devices, store_entity_count=10_000_000, seed=cfg.seed
        )  # a store that holds the whole run: a resume can always be replayed
        self.engine = sa.create_engine(db_url, pool_pre_ping=True)  # survives pg_kill
        self.daemon: DaemonProcess | None = None
        self.log = workdir / "daemon.log"
        self._rng = random.Random(cfg.seed ^ 0x5EED)
        self._publishing = threading.Event()
        self._rss = _Rss()

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        cfg = self.cfg
        self.out(
            f"chaos seed={cfg.seed} dialect={cfg.dialect} duration={cfg.duration_s}s "
            f"rate={cfg.rate}/s (replay: CHAOS_SEED={cfg.seed})\nfault plan:\n"
            + self.report.schedule()
        )
        began = time.monotonic()
        self.sim.start()
        try:
            with self._rss:
                self._start_daemon()
                publisher = threading.Thread(target=self._publish, name="chaos-pub", daemon=True)
                self._publishing.set()
                publisher.start()
                try:
                    self._inject(began)
                finally:
                    self._publishing.clear()
                    publisher.join(5)
                self._calm()
                self._settle()
                self._stop_daemon()
            self._evaluate()
        finally:
            if self.daemon is not None and self.daemon.alive():
                self.daemon.kill()
            self.sim.stop()
            self.engine.dispose()
        self.report.wall_s = time.monotonic() - began
        self.out(self.report.summary())
        return self.report

    def _config(self) -> Path:
        lines = [
            "[database]",
            f'url = "{self.db_url}"',
            "batch_max_delay_s = 0.1",
            "[tts]",
            f'base_url = "{self.sim.base_url}"',
            'api_key = "${SIM_KEY}"',
            "reconnect_min_s = 0.05",
            "reconnect_max_s = 0.5",
            f"idle_timeout_s = {IDLE_TIMEOUT_S}",
            "connect_timeout_s = 5",
            "[[streams]]",
            f'name = "{STREAM}"',
            f'application_id = "{self.sim.application_id}"',
            "[metrics]",
            'listen = ""',
            "[logging]",
            'level = "info"',
            'format = "json"',
        ]
        # The daemon's spool lives in the work directory: by default it would be ./ingestd-spool
        # (PostgreSQL) and a run that ends with frames spooled would feed them to the next.
        spool = self.cfg.spool if self.cfg.spool is not None else {"dir": self.workdir / "spool"}
        if spool:
            lines.append("[spool]")
            for key, value in spool.items():
                rendered = (
                    str(value).lower()
                    if isinstance(value, bool)
                    else f'"{value}"'
                    if isinstance(value, str | Path)
                    else str(value)
                )
                lines.append(f"{key} = {rendered}")
        path = self.workdir / "ingestd.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start_daemon(self) -> None:
        before = stream_requests_ok(self.sim)
        env = ingestd_env(SIM_KEY=self.sim.api_key)
        self.daemon = DaemonProcess(self.tracker, self._config(), env, self.log)
        self._rss.pid = self.daemon.pid
        self.daemon.wait_connected(self.sim, before, timeout_s=CONNECT_TIMEOUT_S)

    def _ensure_alive(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        if not daemon.alive():
            self.report.unexpected_exits += 1
            self.report.problems.append(
                f"the daemon exited by itself with {daemon.proc.returncode}:\n{daemon.log_tail()}"
            )
            self._start_daemon()

    def _publish(self) -> None:
        sim, rate = self.sim, self.cfg.rate
        started, sent = time.monotonic(), 0
        while self._publishing.is_set():
            due = int((time.monotonic() - started) * rate)
            for _ in range(min(due - sent, 1000)):
                sim.uplink(sim.device_ids[sent % len(sim.device_ids)])
                sent += 1
            time.sleep(PUBLISH_TICK_S)

    def _inject(self, began: float) -> None:
        for fault in self.faults:
            delay = began + fault.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._ensure_alive()
            fault.began = datetime.now(UTC)
            getattr(self, f"_fault_{fault.kind}")(fault)
            fault.ended = datetime.now(UTC)

    # -- faults ----------------------------------------------------------------------------

    def _fault_drop(self, fault: Fault) -> None:
        self.sim.restart()

    def _fault_reset(self, fault: Fault) -> None:
        self.sim.reset_streams()

    def _fault_stall(self, fault: Fault) -> None:
        self.sim.stall_streams(fault.seconds)
        time.sleep(fault.seconds)

    def _fault_out_of_order(self, fault: Fault) -> None:
        self.sim.out_of_order_window = int(fault.detail.partition("=")[2])
        try:
            time.sleep(fault.seconds)
        finally:
            self.sim.out_of_order_window = 0

    def _fault_http_errors(self, fault: Fault) -> None:
        statuses = [int(s) for s in fault.detail.partition("=")[2].split(",")]
        self.sim.fail_next_requests[:] = statuses
        self.sim.restart()  # the daemon reconnects into the burst
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while self.sim.fail_next_requests and time.monotonic() < deadline:
            time.sleep(0.05)

    def _fault_poison(self, fault: Fault) -> None:
        for kind in fault.detail.partition("=")[2].split(","):
            device = self._rng.choice(self.sim.device_ids)
            self.sim.poison(kind, device)
            time.sleep(self._rng.uniform(0.0, 0.05))

    def _fault_db_lock(self, fault: Fault) -> None:
        with self._db_locked():
            time.sleep(fault.seconds)

    @contextlib.contextmanager
    def _db_locked(self) -> Iterator[None]:
        if self.cfg.dialect == "sqlite":
            path = sa.make_url(self.db_url).database
            assert path is not None
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '30s'")
            conn.exec_driver_sql("LOCK TABLE uplinks IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()

    def _fault_pg_kill(self, fault: Fault) -> None:
        with self.engine.connect() as conn:
            killed = conn.exec_driver_sql(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            ).scalar_one()
            conn.commit()
        fault.detail = f"killed={killed}"

    def _fault_sigkill(self, fault: Fault) -> None:
        assert self.daemon is not None
        self._rss.sample()
        self.daemon.kill()
        self.report.restarts += 1
        time.sleep(fault.seconds)
        self._start_daemon()

    # -- the end ---------------------------------------------------------------------------

    def _calm(self) -> None:
        sim = self.sim
        sim.stall_until = 0.0
        sim.out_of_order_window = 0
        sim.fail_next_requests.clear()

    def _good_and_poison(self) -> tuple[dict[str, datetime], list[Poison]]:
        poison = list(self.sim.poisoned)
        bad = {p.unique_id for p in poison}
        good: dict[str, datetime] = {}
        for event in list(self.sim.events):
            uid = str(event.get("unique_id", ""))
            if uid.rstrip("\x00") not in bad:  # a `nul` poison's id is its own plus U+0000
                good[uid] = parse_time(event["time"])
        return good, poison

    def _read(self) -> tuple[list[str], list[tuple[Any, ...]], list[str]]:
        with self.engine.connect() as conn:
            stored = list(conn.execute(sa.text("SELECT unique_id FROM events")).scalars())
            gaps = [
                tuple(r)
                for r in conn.execute(
                    sa.text(
                        "SELECT reason, gap_start, gap_end FROM stream_gaps "
                        "WHERE stream = :s ORDER BY id"
                    ),
                    {"s": STREAM},
                )
            ]
            raws = list(conn.execute(sa.text("SELECT raw FROM rejected_events")).scalars())
        return stored, [_gap_times(g) for g in gaps], raws

    def _settle(self) -> None:
        """Wait until everything emitted is accounted for, or nothing moves any more."""
        self._ensure_alive()
        good, _ = self._good_and_poison()
        deadline = time.monotonic() + self.cfg.settle_timeout_s
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            self._ensure_alive()
            self._rss.sample()
            try:
                stored, gaps, _ = self._read()
            except sa.exc.OperationalError:
                time.sleep(POLL_S)
                continue
            have = set(stored)
            if all(uid in have or _in_gap(t, gaps) for uid, t in good.items()):
                return
            if len(have) != last_count:
                last_count, last_change = len(have), time.monotonic()
            elif time.monotonic() - last_change > self.cfg.stuck_s:
                return  # stuck: evaluate what we have
            time.sleep(POLL_S)

    def _stop_daemon(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        self._rss.sample()
        self.report.rss_end_kib = self._rss.last_kib
        if not daemon.alive():
            self._ensure_alive()
        try:
            code, _ = daemon.terminate()
        except AssertionError as exc:
            self.report.problems.append(str(exc))
            return
        if code != 0:
            self.report.problems.append(f"SIGTERM: exit {code}:\n{daemon.log_tail()}")

    def _evaluate(self) -> None:
        rep = self.report
        rep.rss_peak_kib = self._rss.peak_kib
        good, poison = self._good_and_poison()
        stored, gaps, raws = self._read()
        have = set(stored)
        rep.emitted, rep.poison, rep.gaps = len(good), poison, gaps
        rep.stored_rows = len(stored)
        rep.stored = len(have & good.keys())
        rep.duplicates = len(stored) - len(have)
        rep.rejected = len(raws)
        rep.dropped_by_server = self.sim.dropped_events
        with self.engine.connect() as conn:
            uplinks = list(conn.execute(sa.text("SELECT event_unique_id FROM uplinks")).scalars())
        rep.duplicates += len(uplinks) - len(set(uplinks))
        uplink_ids = set(uplinks)
        for uid, t in sorted(good.items(), key=lambda kv: kv[1]):
            if uid in have and uid in uplink_ids:
                continue
            if _in_gap(t, gaps):
                rep.in_gaps += 1
            else:
                rep.missing.append((uid, t.isoformat()))
        if rep.missing:
            first = ", ".join(f"{u} at {t}" for u, t in rep.missing[:5])
            rep.problems.append(f"{len(rep.missing)} events neither stored nor in a gap: {first}")
        if rep.duplicates:
            rep.problems.append(f"{rep.duplicates} rows stored twice")
        bad = {p.unique_id for p in poison}
        strangers = [u for u in have if u not in good and not any(u.startswith(b) for b in bad)]
        if strangers:
            rep.problems.append(f"{len(strangers)} stored events nobody emitted: {strangers[:3]}")
        for p in poison:
            rejected = any(p.unique_id in raw for raw in raws)
            kept = any(u.startswith(p.unique_id) for u in have)
            if p.kind in REJECTED_ONLY and (kept or not rejected):
                where = "stored as an event" if kept else "not in rejected_events"
                rep.problems.append(f"poison {p.kind} {p.unique_id}: {where}")
            elif not (rejected or kept):
                rep.problems.append(f"poison {p.kind} {p.unique_id}: neither stored nor rejected")
        windows = [
            (f.began - timedelta(seconds=GAP_SLACK_S), f.ended + timedelta(seconds=GAP_SLACK_S))
            for f in self.faults
            if f.began is not None and f.ended is not None
        ]
        for gap in gaps:
            _, start, end = gap
            if not any(
                (start is None or start <= w_end) and (end is None or end >= w_start)
                for w_start, w_end in windows
            ):
                rep.problems.append(f"gap {gap} overlaps no injected fault")


def _gap_times(gap: tuple[Any, ...]) -> tuple[Any, ...]:
    reason, start, end = gap
    return reason, _aware(start), _aware(end)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in_gap(t: datetime, gaps: list[tuple[Any, ...]]) -> bool:
    return any((s is None or s <= t) and (e is None or t <= e) for _, s, e in gaps)


def seed_from_env(default: int | None = None) -> int:
    """``CHAOS_SEED`` if set, else ``default``, else a fresh random seed (printed by the run)."""
    raw = os.environ.get("CHAOS_SEED")
    if raw:
        return int(raw)
    return default if default is not None else random.SystemRandom().randrange(1, 2**31)
