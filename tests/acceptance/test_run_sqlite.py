"""``ingestd run`` on a SQLite file as a user meets it: a second daemon on the same file, and
a SIGTERM while another process holds the database's write lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import daemon_config

from ingestd.sim.server import Simulator

START_TIMEOUT_S = 20.0


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(devices=5, store_entity_count=100_000, seed=9).start()
    yield s
    s.stop()


def _config(tmp_path: Path, sim: Simulator, database: Path) -> Path:
    return daemon_config(tmp_path / "ingestd.toml", sim, f"sqlite:///{database}")


class Run:
    """One ``python -m ingestd run``; always stopped by the test's ``finally``."""

    def __init__(self, config: Path, sim: Simulator, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env["SIM_KEY"] = sim.api_key
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "--config", str(config), "run"],
            env=env,
            stdout=self._out,
            stderr=self._out,
        )

    def wait_connected(self, sim: Simulator, requests_before: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len([r for r in sim.stream_requests if r.status == 200]) <= requests_before:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "daemon did not connect"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._out.close()


def _connected_requests(sim: Simulator) -> int:
    return len([r for r in sim.stream_requests if r.status == 200])


def test_a_second_run_on_the_same_sqlite_file_is_refused_in_one_line(
    sim: Simulator, tmp_path: Path
) -> None:
    database = tmp_path / "ingestd.db"
    config = _config(tmp_path, sim, database)
    first = Run(config, sim, tmp_path / "first.log")
    runs = [first]
    try:
        first.wait_connected(sim, 0)
        second = Run(config, sim, tmp_path / "second.log")
        runs.append(second)
        assert second.proc.wait(timeout=20) == 1
        lines = second.log.read_text().splitlines()
        assert lines == [
            f"ingestd: error: another `ingestd run` (pid {first.proc.pid}) is already using "
            f"sqlite:///{database} (lock file {database}.ingestd-run.lock); stop it first, "
            "or give this one its own database"
        ]
        assert first.proc.poll() is None  # the first one is undisturbed
        # SIGKILL leaves no stale lock: the kernel drops a dead process's flock.
        first.proc.kill()
        first.proc.wait(timeout=10)
        requests = _connected_requests(sim)
        third = Run(config, sim, tmp_path / "third.log")
        runs.append(third)
        third.wait_connected(sim, requests)
    finally:
        for run in runs:
            run.stop()


def test_sigterm_while_another_process_holds_the_write_lock_exits_within_seconds(
    sim: Simulator, tmp_path: Path
) -> None:
    """Each commit attempt waited out the 30 s busy timeout: a SIGTERM took ~120 s. What
    could not be committed is replayed by the next start (the cursor did not move)."""
    database = tmp_path / "ingestd.db"
    config = _config(tmp_path, sim, database)
    run = Run(config, sim, tmp_path / "daemon.log")
    holder = sqlite3.connect(database, isolation_level=None, timeout=30)
    runs = [run]
    try:
        run.wait_connected(sim, 0)
        holder.execute("BEGIN IMMEDIATE")  # another process (a user's shell) writes
        sim.uplinks(30)
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = run.proc.wait(timeout=30)
        took = time.monotonic() - began
        assert code == 0, run.log.read_text()[-3000:]
        assert took < 5.0, f"shutdown took {took:.1f} s"
        holder.execute("ROLLBACK")

        requests = _connected_requests(sim)
        again = Run(config, sim, tmp_path / "again.log")
        runs.append(again)
        again.wait_connected(sim, requests)
        deadline = time.monotonic() + 20
        while holder.execute("SELECT count(*) FROM uplinks").fetchone()[0] < 30:
            assert time.monotonic() < deadline, "the uplinks were not replayed"
            time.sleep(0.05)
    finally:
        holder.close()
        for r in runs:
            r.stop()
