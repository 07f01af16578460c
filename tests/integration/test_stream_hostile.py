"""Servers that are not TTS, or TTS gone wrong, against the stream and /healthz.

Each hostile server is a few lines of raw HTTP/1.1 on 127.0.0.1 (port 0) scripted per test:
an HTML page with 200, headers at a few bytes a second, a body that never completes a frame,
a ``data:`` flood, chained gzip, a gzip bomb. The stream must fail such a connection within
its bounds, keep its memory bounded and the event loop responsive, and ``/healthz`` must say
so. The same server with one honest layer of gzip must ingest normally.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from support import Db, make_settings, running, wait_for

from ingestd import framing, metrics
from ingestd.config import MetricsSettings, Settings, StreamSettings
from ingestd.errors import ServerUnavailable, StreamDisconnected
from ingestd.models import Cursor
from ingestd.service import Service
from ingestd.sim.server import Simulator
from ingestd.store import Store
from ingestd.stream import EventStream

APP = "hostile-app"
KEY = "NNSXS.HOSTILEHOSTILEHOSTILEHOSTILEHOSTILEHOST.KEYKEYKEYKEYKEYKEYKEYKEYKEYKEY"
STREAM_HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"


@dataclass
class Request:
    head: bytes
    body: bytes


Script = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


_RIGHTS_BODY = (
    b'{"rights":["RIGHT_APPLICATION_TRAFFIC_READ","RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE"]}'
)
_RIGHTS_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_RIGHTS_BODY), _RIGHTS_BODY)
)


class HostileServer:
    """One raw HTTP/1.1 answer per connection, written by ``script``; closed afterwards."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> HostileServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            request = Request(head, await reader.readexactly(length))
            if head.startswith(b"GET /api/v3/applications/") and b"/rights " in head:
                writer.write(_RIGHTS_ANSWER)  # the daemon's rights check: answered honestly
                await writer.drain()
                return
            self.requests.append(request)  # stream requests only
            await self.script(request, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up on us: that is the point
        finally:
            self._tasks.discard(task)
            writer.close()


def _stream_settings(base_url: str, **changes: Any) -> StreamSettings:
    fake = SimpleNamespace(base_url=base_url, api_key=KEY, application_id=APP)
    settings = make_settings(fake, "sqlite://")  # type: ignore[arg-type]  # only its stream
    return replace(settings.streams[0], **changes)


def _settings(base_url: str, db_url: str, *, grace_s: float = 0.5, **changes: Any) -> Settings:
    fake = SimpleNamespace(base_url=base_url, api_key=KEY, application_id=APP)
    name = f"h-{uuid.uuid4().hex[:8]}"  # metrics are process-wide: a label of its own
    settings = make_settings(
        fake,  # type: ignore[arg-type]  # only base_url, api_key, application_id are read
        db_url,
        streams=[{"name": name, "application_id": APP, **changes}],
    )
    return replace(settings, metrics=MetricsSettings(listen="127.0.0.1:0", health_grace_s=grace_s))


@asynccontextmanager
async def _opened(stream: StreamSettings) -> AsyncIterator[Any]:
    async with httpx.AsyncClient() as client, EventStream(stream, client).open(Cursor()) as conn:
        yield conn


async def _collect(
    stream: StreamSettings, frames: list[bytes] | None = None, *, timeout_s: float = 20
) -> list[bytes]:
    """Every frame of one connection, into ``frames`` (kept when the connection fails)."""
    frames = [] if frames is None else frames
    async with asyncio.timeout(timeout_s), _opened(stream) as conn:
        async for frame in conn.frames:
            frames.append(frame)
    return frames


def _frame(event: dict[str, Any]) -> bytes:
    return b'{"result":' + orjson.dumps(event) + b"}\n\n"


def _start_frame() -> bytes:
    return _frame(
        {
            "name": "events.stream.start",
            "time": "2030-01-01T00:00:00Z",
            "unique_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
            "identifiers": [{"application_ids": {"application_id": APP}}],
        }
    )


def _reconnects(stream: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "ingestd_reconnects_total", {"stream": stream, "reason": reason}
    )
    return value or 0.0


async def _healthz(service: Service) -> httpx.Response:
    await wait_for(lambda: service.metrics_port is not None, timeout_s=5, what="/healthz")
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{service.metrics_port}/healthz")


async def _wait_unhealthy(service: Service, *, timeout_s: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await _healthz(service)
        if resp.status_code == 503:
            body: dict[str, Any] = resp.json()
            return body
        assert time.monotonic() < deadline, f"/healthz still green: {resp.text}"
        await asyncio.sleep(0.05)


# --- a 200 that is not an event stream ---------------------------------------------------------


async def _html_page(request: Request, writer: asyncio.StreamWriter) -> None:
    page = b"<!doctype html><html><body>Please log in to the Wi-Fi</body></html>"
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
        + f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode()
        + page
    )


async def test_an_html_page_with_200_is_a_failed_connection_and_healthz_fails(
    db_url: str,
) -> None:
    async with HostileServer(_html_page) as server:
        settings = _settings(server.base_url, db_url)
        stream = settings.streams[0].name
        async with running(settings) as service:
            await wait_for(lambda: len(server.requests) >= 3, timeout_s=10, what="3 attempts")
            body = await _wait_unhealthy(service)
            consumer = service.consumers[0]
            assert not consumer.connected_event.is_set()  # never counted as connected
            assert not consumer.state.connected
    assert body["streams"][stream].startswith("down: ")
    assert "text/html" in body["streams"][stream]
    assert _reconnects(stream, "bad_response") >= 3


# --- timeouts: headers and frames ----------------------------------------------------------------


async def _headers_at_10_bytes_a_second(request: Request, writer: asyncio.StreamWriter) -> None:
    head = STREAM_HEADERS + b"X-Padding: "
    for i in range(1_000_000):  # never ends: a header line that goes on and on
        writer.write(head[i : i + 1] or b"a")
        await writer.drain()
        await asyncio.sleep(0.1)


async def test_response_headers_trickling_in_time_out_within_the_deadline() -> None:
    async with HostileServer(_headers_at_10_bytes_a_second) as server:
        stream = _stream_settings(server.base_url, connect_timeout_s=0.4, idle_timeout_s=30.0)
        started = time.monotonic()
        with pytest.raises(StreamDisconnected) as info:
            await _collect(stream)
        elapsed = time.monotonic() - started
    assert info.value.reason == "headers_timeout"
    assert 0.7 <= elapsed < 2.0  # twice connect_timeout_s, though every read got a byte


async def test_a_first_connect_that_never_finishes_turns_healthz_red(db_url: str) -> None:
    """The retry clock starts when the attempt starts, not when it fails."""
    async with HostileServer(_headers_at_10_bytes_a_second) as server:
        settings = _settings(server.base_url, db_url, grace_s=0.5, connect_timeout_s=30.0)
        async with running(settings) as service:
            body = await _wait_unhealthy(service, timeout_s=5)
            assert len(server.requests) == 1  # still the first attempt, still waiting
            stopping = time.monotonic()
        stopped_s = time.monotonic() - stopping
    assert body["streams"][settings.streams[0].name].startswith("down")
    assert stopped_s < 0.5  # stopping does not wait for the connect's 60 s deadline


async def _body_without_a_frame(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(STREAM_HEADERS + b"\r\n" + b'{"result":{"name":"as.up.data.forward"')
    while True:
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.02)


async def test_a_body_trickling_without_a_frame_times_out_as_no_frame() -> None:
    async with HostileServer(_body_without_a_frame) as server:
        stream = _stream_settings(server.base_url, idle_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(StreamDisconnected) as info:
            await _collect(stream)
        elapsed = time.monotonic() - started
    assert info.value.reason == "no_frame"  # httpx's read timeout never fires: 50 bytes/s
    assert 0.4 <= elapsed < 2.0


async def test_keep_alives_without_frames_are_an_idle_timeout_not_a_broken_stream() -> None:
    """A proxy's SSE comments keep bytes flowing on a quiet stream: still just quiet."""

    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEADERS + b"\r\n" + _start_frame())
        while True:
            writer.write(b": keep-alive\n\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with HostileServer(script) as server:
        frames: list[bytes] = []
        with pytest.raises(StreamDisconnected) as info:
            await _collect(_stream_settings(server.base_url, idle_timeout_s=0.5), frames)
    assert frames == [_start_frame().rstrip(b"\n")]
    assert info.value.reason == "idle_timeout"


async def test_a_body_trickling_without_a_frame_reconnects_and_healthz_fails(
    db_url: str,
) -> None:
    async with HostileServer(_body_without_a_frame) as server:
        settings = _settings(server.base_url, db_url, grace_s=0.5, idle_timeout_s=0.3)
        stream = settings.streams[0].name
        async with running(settings) as service:
            body = await _wait_unhealthy(service)
            await wait_for(lambda: _reconnects(stream, "no_frame") >= 2, timeout_s=5)
    assert body["streams"][stream].startswith("stalled: no valid frame")


async def test_a_stream_that_only_ever_sends_its_start_then_an_error_is_not_healthy(
    db_url: str,
) -> None:
    """A stream wedged on one event reconnects forever; its stream starts are no progress."""
    sim = Simulator(devices=2, seed=5).start()
    try:
        sim.error_frame_after_n = 0
        sim.error_frame_name = "internal"  # code 13: retried, not an auth problem
        settings = make_settings(
            sim,
            db_url,
            streams=[
                {
                    "name": f"w-{uuid.uuid4().hex[:8]}",
                    "application_id": sim.application_id,
                    "idle_timeout_s": 0.3,
                }
            ],
        )
        settings = replace(
            settings, metrics=MetricsSettings(listen="127.0.0.1:0", health_grace_s=0.5)
        )
        async with running(settings) as service:
            body = await _wait_unhealthy(service)
            assert len(sim.stream_requests) >= 3
    finally:
        sim.stop()
    assert body["streams"][settings.streams[0].name].startswith("stalled: no valid frame")


async def test_a_quiet_stream_stays_healthy_through_idle_reconnects(db_url: str) -> None:
    """TTS sends no heartbeats: a silent application is healthy while idle reconnects work."""
    sim = Simulator(devices=2, seed=6).start()
    try:
        settings = make_settings(
            sim,
            db_url,
            streams=[
                {
                    "name": f"q-{uuid.uuid4().hex[:8]}",
                    "application_id": sim.application_id,
                    "idle_timeout_s": 0.3,
                }
            ],
        )
        settings = replace(
            settings, metrics=MetricsSettings(listen="127.0.0.1:0", health_grace_s=0.5)
        )
        stream = settings.streams[0].name
        async with running(settings) as service:
            deadline = time.monotonic() + 3.0  # ten idle timeouts, six times the no-frame limit
            while time.monotonic() < deadline:
                resp = await _healthz(service)
                assert resp.status_code == 200, resp.text
                await asyncio.sleep(0.05)
            assert _reconnects(stream, "idle_timeout") >= 5
    finally:
        sim.stop()


# --- memory and the event loop: floods, chained gzip, a gzip bomb ---------------------------------


async def _data_flood(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(STREAM_HEADERS + b"\r\n")
    line = b"data: " + b"x" * 65_530 + b"\n"
    for _ in range(40 * 16):  # 40 MiB of data: lines in one SSE event, no blank line
        writer.write(line)
        await writer.drain()


async def test_a_data_line_flood_is_one_rejected_frame_then_a_disconnect() -> None:
    async with HostileServer(_data_flood) as server:
        stream = _stream_settings(server.base_url, idle_timeout_s=10.0)
        frames: list[bytes] = []
        with pytest.raises(StreamDisconnected) as info:
            await _collect(stream, frames, timeout_s=30)
    # The decoder held at most MAX_FRAME_BYTES of it (counted in test_framing), passed on
    # one marker for rejected_events, and the connection ended after as much again.
    assert frames == [framing.OVERSIZED_FRAME]
    assert info.value.reason == "no_frame"
    assert "without a complete frame" in str(info.value)


def _gzip_stream(frames: list[bytes]) -> bytes:
    """One gzip member, flushed after every frame, as a streaming server writes it."""
    z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return b"".join(z.compress(f) + z.flush(zlib.Z_SYNC_FLUSH) for f in frames) + z.flush()


async def test_chained_gzip_is_refused_before_a_byte_is_inflated() -> None:
    body = gzip.compress(gzip.compress(_start_frame() + b"\n" * 10_000_000))

    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEADERS + b"Content-Encoding: gzip, gzip\r\n\r\n" + body)

    async with HostileServer(script) as server:
        with pytest.raises(StreamDisconnected) as info:
            await _collect(_stream_settings(server.base_url))
    assert info.value.reason == "bad_response"
    assert "gzip, gzip" in str(info.value)


@pytest.mark.parametrize("encoding", [b"br", b"deflate", b"gzip, identity, gzip"])
async def test_other_content_encodings_are_refused(encoding: bytes) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEADERS + b"Content-Encoding: " + encoding + b"\r\n\r\n" + b"xx")

    async with HostileServer(script) as server:
        with pytest.raises(StreamDisconnected) as info:
            await _collect(_stream_settings(server.base_url))
    assert info.value.reason == "bad_response"


async def test_an_error_body_in_chained_gzip_is_not_inflated() -> None:
    body = gzip.compress(gzip.compress(b"\n" * 50_000_000))

    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            + f"Content-Encoding: gzip, gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async with HostileServer(script) as server:
        with pytest.raises(ServerUnavailable) as info:
            await _collect(_stream_settings(server.base_url))
    assert info.value.status_code == 503
    assert "HTTP 503" in str(info.value)


def _newline_bomb(mib: int) -> bytes:
    z = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    block = b"\n" * (1 << 20)
    return b"".join(z.compress(block) for _ in range(mib)) + z.flush()


async def test_a_gzip_bomb_is_cut_off_and_the_loop_stays_responsive() -> None:
    bomb = _newline_bomb(48)  # 48 MiB of newlines in 48 KiB, three times the frame bound
    assert len(bomb) < 60_000

    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEADERS + b"Content-Encoding: gzip\r\n\r\n")
        writer.write(_gzip_stream([_start_frame()]))  # a valid first frame, own member
        writer.write(bomb)
        await writer.drain()
        await asyncio.sleep(30)

    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            lags.append(now - last)
            last = now

    async with HostileServer(script) as server:
        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        frames: list[bytes] = []
        try:
            with pytest.raises(StreamDisconnected) as info:
                await _collect(_stream_settings(server.base_url), frames)
        finally:
            done.set()
            await tick
        elapsed = time.monotonic() - started
    assert frames == [_start_frame().rstrip(b"\n")]
    assert info.value.reason == "no_frame"
    inflated = int(str(info.value).split()[0])  # "<n> bytes without a complete frame"
    assert inflated <= framing.MAX_FRAME_BYTES + (2 << 20)  # not 48 MiB
    assert elapsed < 10
    assert max(lags) < 0.25, f"the event loop was blocked {max(lags):.3f} s"


def _honest_gzip_server(
    events: list[dict[str, Any]], hold: asyncio.Event
) -> Callable[[Request, asyncio.StreamWriter], Awaitable[None]]:
    frames = [_start_frame(), *(_frame(e) for e in events)]
    body = _gzip_stream(frames)

    async def script(request: Request, writer: asyncio.StreamWriter) -> None:
        assert b"accept-encoding: gzip\r\n" in request.head.lower()
        writer.write(STREAM_HEADERS + b"Content-Encoding: gzip\r\n\r\n")
        for i in range(0, len(body), 997):  # chunk boundaries anywhere in the deflate stream
            writer.write(body[i : i + 997])
            await writer.drain()
        await hold.wait()

    return script


async def test_one_layer_of_gzip_ingests_every_event(db_url: str, db: Db) -> None:
    generator = Simulator(devices=5, seed=9)  # not started: it only writes the events
    events = generator.uplinks(300)
    hold = asyncio.Event()
    async with HostileServer(_honest_gzip_server(events, hold)) as server:
        settings = _settings(server.base_url, db_url, idle_timeout_s=30.0)
        try:
            async with running(settings) as service:
                await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 300)
                resp = await _healthz(service)
                assert resp.status_code == 200
                assert resp.json()["streams"][settings.streams[0].name] == "connected"
        finally:
            hold.set()
    assert set(db.column("SELECT event_unique_id FROM uplinks")) == {e["unique_id"] for e in events}
    assert db.scalar("SELECT count(*) FROM rejected_events") == 0
    assert len(server.requests) == 1


# --- commits that stall --------------------------------------------------------------------------


async def test_healthz_fails_while_commits_stall_and_recovers_after(
    db_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    release = threading.Event()
    blocking = threading.Event()
    real_commit = Store.commit_batch

    def stuck_commit(self: Store, batch: Any, prepared: Any = None) -> Any:
        if blocking.is_set():
            release.wait(30)  # a table lock, a full disk, a read-only file...
        return real_commit(self, batch, prepared)

    monkeypatch.setattr(Store, "commit_batch", stuck_commit)
    sim = Simulator(devices=3, seed=7).start()
    try:
        settings = make_settings(
            sim,
            db_url,
            streams=[{"name": f"c-{uuid.uuid4().hex[:8]}", "application_id": sim.application_id}],
        )
        settings = replace(
            settings, metrics=MetricsSettings(listen="127.0.0.1:0", health_grace_s=0.5)
        )
        stream = settings.streams[0].name
        async with running(settings) as service:
            sim.uplinks(5)
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 5)
            assert (await _healthz(service)).status_code == 200
            blocking.set()
            sim.uplinks(5)
            try:
                body = await _wait_unhealthy(service)
                assert service.consumers[0].state.connected  # the socket alone looks fine
            finally:
                release.set()
            await wait_for(lambda: db.scalar("SELECT count(*) FROM uplinks") == 10)
            resp = await _healthz(service)
            assert resp.status_code == 200, resp.text
            assert resp.json()["progress"][stream]["last_commit_at"] is not None
    finally:
        release.set()
        sim.stop()
    assert body["streams"][stream].startswith("stalled: a batch has waited")
