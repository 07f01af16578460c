"""sd_notify over a real unix datagram socket (a path in tmp_path, and an abstract one)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd import sdnotify


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A listening datagram socket standing in for systemd, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_stopping_watchdog_reach_the_socket(notify_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert _received(notify_socket) == "READY=1"
    assert sdnotify.watchdog() is True
    assert _received(notify_socket) == "WATCHDOG=1"
    assert sdnotify.stopping() is True
    assert _received(notify_socket) == "STOPPING=1"


def test_several_states_go_in_one_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=streaming 2 applications") is True
    assert _received(notify_socket) == "READY=1\nSTATUS=streaming 2 applications"


def test_status_text_is_kept_on_one_line(notify_socket: socket.socket) -> None:
    assert sdnotify.status("connecting\nto eu1") is True
    assert _received(notify_socket) == "STATUS=connecting to eu1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ingestd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert _received(sock) == "READY=1"


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.ready() is False
