"""Stop signals: real signals to our own pid inside a running loop (the child-process cases
are in tests/integration/test_signal_children.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from types import FrameType

import pytest

from ingestd.signals import install_stop_handlers

TIMEOUT_S = 5.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_first_signal_calls_stop_and_the_loop_keeps_running(signum: int) -> None:
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signum)
    stopped = asyncio.Event()
    calls: list[str] = []

    def stop() -> None:
        calls.append("stop")
        stopped.set()

    uninstall = install_stop_handlers(loop, stop)
    try:
        os.kill(os.getpid(), signum)
        await asyncio.wait_for(stopped.wait(), TIMEOUT_S)
        # The loop is still alive and serving other work after the signal.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), TIMEOUT_S) == 42
        assert calls == ["stop"]
    finally:
        uninstall()
    assert signal.getsignal(signum) is previous


async def test_uninstall_restores_the_previous_handler() -> None:
    seen: list[int] = []

    def recorder(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, recorder)
    try:
        calls: list[str] = []
        uninstall = install_stop_handlers(asyncio.get_running_loop(), lambda: calls.append("x"))
        uninstall()
        assert signal.getsignal(signal.SIGTERM) is recorder
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0)
        assert seen == [signal.SIGTERM]
        assert calls == []
    finally:
        signal.signal(signal.SIGTERM, old)
