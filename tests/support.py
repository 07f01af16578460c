"""Helpers for tests that run the daemon against the simulator, in-process or as a process."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ingestd.config import (
    DatabaseSettings,
    DownlinkSettings,
    MetricsSettings,
    Settings,
    SpoolSettings,
    StreamSettings,
)
from ingestd.db import create_engine
from ingestd.secrets import Secret
from ingestd.service import Service
from ingestd.sim.server import Simulator

FAST_STREAM = {
    "reconnect_min_s": 0.05,
    "reconnect_max_s": 0.3,
    "auth_retry_s": 30.0,
    "idle_timeout_s": 30.0,
    "overlap_s": 2.0,
    "connect_timeout_s": 5.0,
}


_spool_dirs = itertools.count()


def fresh_spool_dir() -> str:
    """A spool directory of one test's own (created only if a test spools; removed when
    drained), so that tests running in parallel never share a stream's spool."""
    name = f"ingestd-test-spool-{os.getpid()}-{next(_spool_dirs)}"
    return os.path.join(tempfile.gettempdir(), name)


def make_settings(
    sim: Simulator,
    db_url: str,
    *,
    streams: list[dict[str, Any]] | None = None,
    downlinks: DownlinkSettings | None = None,
    spool: SpoolSettings | None = None,
    **db: Any,
) -> Settings:
    """Settings for a daemon on ``db_url`` following ``sim``: one app stream by default."""
    specs = streams or [{"name": "app", "application_id": sim.application_id}]
    stream_settings = tuple(
        StreamSettings(
            **{
                "base_url": sim.base_url,
                "api_key": Secret(sim.api_key),
                **FAST_STREAM,
                **spec,
            }
        )
        for spec in specs
    )
    return Settings(
        database=DatabaseSettings(url=db_url, **{"batch_max_delay_s": 0.05, **db}),
        streams=stream_settings,
        downlinks=downlinks or DownlinkSettings(),
        metrics=MetricsSettings(listen=""),
        spool=spool or SpoolSettings(dir=fresh_spool_dir()),
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """A Service running in this loop; stopped (and awaited) on exit."""
    stop = asyncio.Event()
    async with Service(settings) as service:
        task = asyncio.create_task(service.run(stop))
        try:
            yield service
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)


async def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout_s: float = 20.0,
    what: str = "",
    executor: Executor | None = None,
) -> None:
    """Poll ``predicate`` (in a thread: it may query the database) until true or timeout.

    ``executor``: where it runs (default: the loop's, which a daemon under test shares)."""
    deadline = time.monotonic() + timeout_s
    loop = asyncio.get_running_loop()
    while True:
        if await loop.run_in_executor(executor, predicate):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)


async def connected(service: Service, *, timeout_s: float = 10.0) -> None:
    await wait_for(
        lambda: all(c.state.connected for c in service.consumers),
        timeout_s=timeout_s,
        what="streams connected",
    )


class Db:
    """Tiny query helper over a test database."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def column(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).scalars())


def with_stream(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with every stream changed by ``changes``."""
    return replace(settings, streams=tuple(replace(s, **changes) for s in settings.streams))


# --- processes ------------------------------------------------------------------------------

PROCESS_STOP_TIMEOUT_S = 10.0
SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


class ProcessTracker:
    """Every process a test starts, so teardown can stop the ones still running.

    The ``procs`` fixture (tests/conftest.py) hands one to each test and kills what is left
    when the test ends, passed or failed; a test that passed yet left one running fails.
    """

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args)``, which also dies if this process is killed outright.

        Teardown never runs when pytest itself is SIGKILLed (a CI timeout); the child then
        gets SIGKILL from the kernel (``setpriv --pdeathsig``, which execs, so the pid is
        the command's). Call it from the main thread: the signal follows the forking thread.
        """
        if SETPRIV is not None:
            args = [SETPRIV, "--pdeathsig", "KILL", "--", *args]
        proc: subprocess.Popen[Any] = subprocess.Popen(args, **kwargs)
        self.started.append(proc)
        return proc

    def running(self) -> list[subprocess.Popen[Any]]:
        return [p for p in self.started if p.poll() is None]

    def kill_all(self) -> list[subprocess.Popen[Any]]:
        """SIGKILL every process still running, wait for each; return those that were."""
        alive = self.running()
        for proc in alive:
            proc.kill()
        for proc in alive:
            proc.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        for proc in self.started:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        return alive


def ingestd_env(**extra: str) -> dict[str, str]:
    """This environment without INGESTD_* settings (they would override the config file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(extra)
    return env


class DaemonProcess:
    """One ``python -m ingestd --config … run``; stdout and stderr are appended to ``log``."""

    def __init__(
        self, tracker: ProcessTracker, config: Path, env: dict[str, str], log: Path
    ) -> None:
        self.log = log
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = tracker.popen(
                [sys.executable, "-m", "ingestd", "--config", str(config), "run"],
                env=env,
                stdout=out,
                stderr=out,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_connected(self, sim: Simulator, requests_before: int, timeout_s: float = 20.0) -> None:
        """Wait for a stream request answered 200 beyond the first ``requests_before``."""
        deadline = time.monotonic() + timeout_s
        while len([r for r in sim.stream_requests if r.status == 200]) <= requests_before:
            assert self.alive(), f"daemon exited {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"daemon did not connect:\n{self.log_tail()}"
            time.sleep(0.02)

    def terminate(self, timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> tuple[int, float]:
        """SIGTERM and wait: (exit code, seconds it took). Killed, and an error, on timeout."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"daemon did not stop within {timeout_s} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        return code, time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL: no chance to commit anything in flight."""
        self.proc.kill()
        self.proc.wait(timeout=PROCESS_STOP_TIMEOUT_S)


def stream_requests_ok(sim: Simulator) -> int:
    """How many stream requests the simulator answered with 200 so far."""
    return len([r for r in sim.stream_requests if r.status == 200])


def daemon_config(path: Path, sim: Simulator, db_url: str, **extra: str) -> Path:
    """A config file for ``ingestd run`` against ``sim``: fast batches and reconnects, JSON
    logs, no metrics listener (``listen=`` to set one), the spool in the test's directory."""
    lines = [
        "[database]",
        f'url = "{db_url}"',
        "batch_max_delay_s = 0.05",
        "[tts]",
        f'base_url = "{sim.base_url}"',
        'api_key = "${SIM_KEY}"',
        "reconnect_min_s = 0.05",
        "reconnect_max_s = 0.5",
        "[[streams]]",
        'name = "app"',
        f'application_id = "{sim.application_id}"',
        "[metrics]",
        f'listen = "{extra.get("listen", "")}"',
        "[logging]",
        'level = "info"',
        'format = "json"',
        "[spool]",  # the test's own directory, never one in the working tree
        f'dir = "{path.parent / "spool"}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
