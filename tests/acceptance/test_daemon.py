"""``ingestd run`` as a real process against the simulator: signals, crashes, restarts."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import DaemonProcess, ProcessTracker, daemon_config, ingestd_env, stream_requests_ok

from ingestd.sim.server import Simulator


@pytest.fixture
def daemon_factory(procs: ProcessTracker, tmp_path: Path) -> Callable[..., DaemonProcess]:
    """Start ``ingestd run`` processes; the ``procs`` fixture kills any left at teardown."""

    def start(config: Path, env: dict[str, str], log: Path | None = None) -> DaemonProcess:
        return DaemonProcess(procs, config, env, log or tmp_path / "daemon.log")

    return start


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = Simulator(devices=20, store_entity_count=1_000_000, seed=5).start()
    yield s
    s.stop()


@pytest.fixture
def env(sim: Simulator) -> dict[str, str]:
    return ingestd_env(SIM_KEY=sim.api_key)


def _count(db_url: str, sql: str) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def _wait_count(db_url: str, sql: str, expected: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (n := _count(db_url, sql)) < expected:
        assert time.monotonic() < deadline, f"{sql}: {n} < {expected}"
        time.sleep(0.05)


def test_sigterm_exits_0_within_a_second_and_a_restart_resumes_without_duplicates(
    sim: Simulator,
    env: dict[str, str],
    db_url: str,
    tmp_path: Path,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    config = daemon_config(tmp_path / "ingestd.toml", sim, db_url)
    log = tmp_path / "daemon.log"
    daemon = daemon_factory(config, env, log)
    daemon.wait_connected(sim, 0)
    first = sim.uplinks(120)
    _wait_count(db_url, "SELECT count(*) FROM uplinks", 120)
    code, took = daemon.terminate()
    assert code == 0
    assert took < 1.0
    cursor_rows = _count(
        db_url, "SELECT count(*) FROM stream_cursors WHERE last_event_time IS NOT NULL"
    )
    assert cursor_rows == 1
    # `ingestd status` must not show a stopped daemon as connected.
    assert _count(db_url, "SELECT count(*) FROM stream_cursors WHERE connected_since IS NULL") == 1

    second = sim.uplinks(80)  # published while the daemon is down
    requests = stream_requests_ok(sim)
    daemon = daemon_factory(config, env, log)
    daemon.wait_connected(sim, requests)
    _wait_count(db_url, "SELECT count(*) FROM uplinks", 200)
    time.sleep(0.3)  # a window in which a duplicate would land (absence has no event to wait on)
    code, _ = daemon.terminate()
    assert code == 0
    assert _count(db_url, "SELECT count(*) FROM uplinks") == len(first) + len(second)
    assert _count(db_url, "SELECT count(*) FROM events WHERE name = 'as.up.data.forward'") == 200
    text = log.read_text()
    assert sim.api_key not in text
    assert sim.api_key.split(".")[1] not in text  # not even the key id


def test_three_sigkills_at_random_points_lose_nothing_and_store_nothing_twice(
    sim: Simulator,
    env: dict[str, str],
    db_url: str,
    tmp_path: Path,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    rng = random.Random(1234)
    config = daemon_config(tmp_path / "ingestd.toml", sim, db_url)
    log = tmp_path / "daemon.log"
    published: list[dict[str, object]] = []
    for _round in range(3):
        requests = stream_requests_ok(sim)
        daemon = daemon_factory(config, env, log)
        daemon.wait_connected(sim, requests)
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline:
            published += sim.uplinks(rng.randrange(5, 40))
            time.sleep(rng.uniform(0.0, 0.05))  # pacing the traffic, at random
        daemon.kill()  # SIGKILL: no chance to commit anything in flight
        published += sim.uplinks(rng.randrange(0, 50))  # more while it is dead
    requests = stream_requests_ok(sim)
    daemon = daemon_factory(config, env, log)
    daemon.wait_connected(sim, requests)
    _wait_count(db_url, "SELECT count(*) FROM uplinks", len(published), timeout_s=30)
    time.sleep(0.3)  # a window in which a duplicate would land (absence has no event to wait on)
    assert daemon.terminate()[0] == 0
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        stored = list(conn.execute(sa.text("SELECT event_unique_id FROM uplinks")).scalars())
        events = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        gaps = conn.execute(sa.text("SELECT count(*) FROM stream_gaps")).scalar_one()
    engine.dispose()
    assert len(stored) == len(set(stored))
    assert set(stored) == {e["unique_id"] for e in published}
    assert events == len(published)
    assert gaps == 0


def test_systemd_notify_socket_gets_ready_and_stopping(
    sim: Simulator,
    env: dict[str, str],
    tmp_path: Path,
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(15)
    try:
        config = daemon_config(tmp_path / "ingestd.toml", sim, f"sqlite:///{tmp_path / 'n.db'}")
        daemon = daemon_factory(
            config, {**env, "NOTIFY_SOCKET": str(sock_path)}, tmp_path / "d.log"
        )
        first = listener.recv(4096).decode()
        assert "READY=1" in first
        assert stream_requests_ok(sim) >= 1  # after connecting
        code, _ = daemon.terminate()
        assert code == 0
        messages = []
        listener.settimeout(2)
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                break
        assert any("STOPPING=1" in m for m in messages)
    finally:
        listener.close()


def test_run_no_migrate_on_an_unmigrated_database_says_to_migrate(
    sim: Simulator, env: dict[str, str], tmp_path: Path
) -> None:
    config = daemon_config(tmp_path / "ingestd.toml", sim, f"sqlite:///{tmp_path / 'blank.db'}")
    res = subprocess.run(
        [sys.executable, "-m", "ingestd", "--config", str(config), "run", "--no-migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "run `ingestd migrate`" in res.stderr
    assert sim.stream_requests == []  # it never started streaming
