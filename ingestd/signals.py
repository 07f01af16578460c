"""SIGTERM/SIGINT: the first asks the daemon to stop gracefully, a second exits at once.

The handlers run through ``loop.add_signal_handler``, so they execute as ordinary loop
callbacks (never in the middle of other code) and only call ``stop()``: no logging, no
awaiting, nothing that could block or fail in a signal path. Two stages, like dlt: once the
first signal is seen, both signals get a plain ``signal.signal`` handler that ends the process
straight away, so a second SIGTERM or Ctrl-C works even when shutdown hangs. The process then
dies *by* that signal (a shell shows 143/130, systemd counts it as a clean stop), the
convention for programs interrupted on purpose. As PID 1 in a container the kernel ignores
default-action signals, so there it exits with status 128 + signal number instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _die_by(signum: int) -> None:
    """Exit now, the way an unhandled ``signum`` would."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # delivered to this thread before returning ...
    os._exit(128 + signum)  # ... unless we are PID 1, which ignores default-action signals


def _exit_at_once(signum: int, _frame: FrameType | None) -> None:
    _die_by(signum)


def install_stop_handlers(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None]
) -> Callable[[], None]:
    """Make SIGTERM/SIGINT call ``stop()`` once; return a function that undoes this.

    Must be called from the main thread with ``loop`` being the loop that runs there (an
    asyncio rule for signal handlers). If the loop is blocked when both signals arrive, the
    second is acted on as soon as the loop runs callbacks again.
    """
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    received = 0

    def on_signal(signum: int) -> None:
        nonlocal received
        received += 1
        if received > 1:
            _die_by(signum)
            return
        for sig in STOP_SIGNALS:
            # Runs from the interpreter's own signal check, not the loop: works if the loop hangs.
            signal.signal(sig, _exit_at_once)
        stop()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)

    def uninstall() -> None:
        for sig in STOP_SIGNALS:
            if not loop.is_closed():
                loop.remove_signal_handler(sig)
            handler = previous[sig]
            if handler is not None:  # None: set outside Python, cannot be restored
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(sig, handler)

    return uninstall
