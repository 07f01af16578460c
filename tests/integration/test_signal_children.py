"""Stop signals sent to a child process running install_stop_handlers: a second signal
kills a hung or blocked shutdown, also as PID 1; one signal lets it stop cleanly."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TIMEOUT_S = 5.0

# A daemon whose shutdown hangs: stop() is called but the loop keeps running for 30 s.
HUNG_CHILD = textwrap.dedent(
    """
    import asyncio
    from ingestd.signals import install_stop_handlers

    async def main():
        install_stop_handlers(asyncio.get_running_loop(), lambda: print("stop called", flush=True))
        print("ready", flush=True)
        await asyncio.sleep(30)

    asyncio.run(main())
    """
)

# A daemon whose shutdown blocks the event loop itself (a synchronous call that never returns).
BLOCKED_CHILD = textwrap.dedent(
    """
    import asyncio, time
    from ingestd.signals import install_stop_handlers

    async def main():
        stop = asyncio.Event()
        install_stop_handlers(asyncio.get_running_loop(), stop.set)
        print("ready", flush=True)
        await stop.wait()
        print("stop called", flush=True)
        time.sleep(30)

    asyncio.run(main())
    """
)

# A daemon that stops cleanly on the first signal.
GRACEFUL_CHILD = textwrap.dedent(
    """
    import asyncio
    from ingestd.signals import install_stop_handlers

    async def main():
        stop = asyncio.Event()
        uninstall = install_stop_handlers(asyncio.get_running_loop(), stop.set)
        print("ready", flush=True)
        await asyncio.wait_for(stop.wait(), 30)
        uninstall()
        print("stopped", flush=True)

    asyncio.run(main())
    """
)


def _spawn(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )


def _expect_line(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    assert ready, f"child did not print {line!r} within {TIMEOUT_S} s"
    assert proc.stdout.readline().strip() == line


def _finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGINT),
    ],
    ids=["TERM-TERM", "INT-INT", "TERM-INT"],
)
def test_second_signal_kills_a_hung_shutdown_at_once(first: int, second: int) -> None:
    proc = _spawn(HUNG_CHILD)
    try:
        _expect_line(proc, "ready")
        proc.send_signal(first)
        _expect_line(proc, "stop called")
        assert proc.poll() is None, "the first signal must not end the process"
        proc.send_signal(second)
    finally:
        returncode = _finish(proc)
    assert returncode == -second  # died by the signal itself, as an interrupted program should


def test_second_signal_kills_even_when_the_loop_is_blocked() -> None:
    proc = _spawn(BLOCKED_CHILD)
    try:
        _expect_line(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        _expect_line(proc, "stop called")
        proc.send_signal(signal.SIGTERM)
    finally:
        returncode = _finish(proc)
    assert returncode == -signal.SIGTERM


def _can_unshare_pid() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "true"], capture_output=True, timeout=TIMEOUT_S, check=False
    )
    return probe.returncode == 0


def _child_pid(parent: int) -> int:
    """The host pid of ``parent``'s only child (unshare --fork's payload)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("unshare started no child")


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs unshare --pid (a PID namespace)")
def test_second_signal_exits_as_pid_1_of_a_container() -> None:
    """PID 1 ignores default-action signals, so the forced exit must not rely on them."""
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-u", "-c", HUNG_CHILD],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        _expect_line(proc, "ready")
        pid_1 = _child_pid(proc.pid)
        os.kill(pid_1, signal.SIGTERM)
        _expect_line(proc, "stop called")
        os.kill(pid_1, signal.SIGTERM)
    finally:
        returncode = _finish(proc)
    assert returncode == 128 + signal.SIGTERM


def test_one_signal_lets_the_daemon_stop_cleanly() -> None:
    proc = _spawn(GRACEFUL_CHILD)
    try:
        _expect_line(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        _expect_line(proc, "stopped")
    finally:
        returncode = _finish(proc)
    assert returncode == 0
