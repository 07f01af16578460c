"""systemd's notify protocol (``sd_notify(3)``), spoken directly over ``$NOTIFY_SOCKET``.

The protocol is one datagram of newline-separated ``KEY=value`` lines to a unix socket, so a
dependency would add nothing. Every function is a no-op returning False when ingestd is not
run by systemd (``$NOTIFY_SOCKET`` unset) or the socket cannot be reached: notifying is
best-effort and must never take the daemon down.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
_USEC_PER_S = 1_000_000


def _address(path: str) -> str | bytes:
    """A leading ``@`` names the abstract namespace, which Python spells with a NUL byte."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) as one datagram; True when it was sent."""
    path = os.environ.get(NOTIFY_SOCKET_ENV)
    if not path or not states:
        return False
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(path))
            sock.sendall(message)
    except OSError:
        return False
    return True


def ready() -> bool:
    """Tell systemd start-up is complete (``Type=notify`` units leave "activating")."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd a graceful stop has begun."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping; without one every ``WatchdogSec`` systemd kills and restarts us."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``; newlines are flattened."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval_s() -> float | None:
    """How often to call ``watchdog()``: half of ``$WATCHDOG_USEC``, or None when not asked.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    pid = os.environ.get(WATCHDOG_PID_ENV)
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / _USEC_PER_S / 2
