"""tests/unit is pure and fast: a test here that opens a network socket, starts a process or
connects to a database fails at once, naming what it tried (such tests belong in
tests/integration or tests/acceptance)."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"a unit test must not {what}: move it to tests/integration")

    return refused


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> None:
    # connect/bind cover TCP, UDP and unix sockets alike (HTTP clients and servers, sd_notify,
    # psycopg); the event loop's own self-pipe is a socketpair, which neither calls.
    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, _refuse(f"{method} a socket"))
    # asyncio.create_subprocess_exec and os.popen go through Popen too.
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    monkeypatch.setattr(sqlite3, "connect", _refuse("open a database"))
