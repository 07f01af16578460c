"""One TTS event-stream connection: request, status and header checks, frames out.

:class:`EventStream` knows how to open ``POST /api/v3/events`` for a stream's settings
and cursor, turn a non-200 answer into our error tree, and hand back decoded frames as
they arrive. Reconnecting, batching and gap bookkeeping live in :mod:`ingestd.consumer`.

A server that is not TTS (a proxy's HTML page, a captive portal) or one gone wrong must fail
the connection rather than hang it or fill our memory, so every step has a bound:

- the status line and headers must arrive within twice ``connect_timeout_s`` of the request
  (httpx's read timeout restarts on every byte, so headers at 1 byte/s never hit it);
- a 200 must carry an event-stream ``Content-Type`` (``text/event-stream`` or
  ``application/json``, TTS_WIRE §1.2) and at most one layer of gzip; anything else is
  :class:`StreamDisconnected` with reason ``bad_response``;
- the body is read raw and gunzipped here, :data:`INFLATE_STEP_BYTES` at a time, yielding
  to the event loop between steps (httpx would inflate a whole chunk, or chained layers, in
  one call);
- a frame must complete within ``idle_timeout_s`` of reading: a frame begun and trickling in
  without end ends the connection (reason ``no_frame``) just as silence or a proxy's bare
  keep-alives do (``idle_timeout``), and so do :data:`NO_FRAME_SLACK_BYTES` past the frame
  bound without a frame (a flood of blank lines or of ``data:`` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import structlog

from ingestd import framing, tts
from ingestd.aio import wait_any
from ingestd.config import StreamSettings
from ingestd.errors import AuthRejected, StreamDisconnected
from ingestd.framing import FrameDecoder
from ingestd.models import Cursor

log = structlog.get_logger()

STREAM_WRITE_TIMEOUT_S = 10.0
STREAM_POOL_TIMEOUT_S = 10.0
ERROR_BODY_MAX_BYTES = 64 * 1024
HEADERS_TIMEOUT_FACTOR = 2.0  # times connect_timeout_s: the whole wait for status line + headers
# What TTS's two marshalers send (TTS_WIRE §1.2); NDJSON's own type for a re-framing proxy.
STREAM_CONTENT_TYPES = frozenset({"text/event-stream", "application/json", "application/x-ndjson"})
ACCEPT_ENCODING = "gzip"  # the one coding we inflate ourselves, with a bound
INFLATE_STEP_BYTES = 64 * 1024  # inflated per step, between which the event loop runs
NO_FRAME_SLACK_BYTES = 1024 * 1024  # beyond MAX_FRAME_BYTES, read without a frame: not TTS
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclass(kw_only=True)
class OpenStream:
    """An accepted stream response: what the server said in its headers, and the frames."""

    after: datetime | None
    warnings: list[str]
    store_disabled: bool
    request_id: str | None
    frames: AsyncIterator[bytes] = field(repr=False)
    http_version: str = "HTTP/1.1"  # as httpx names it: "HTTP/1.1" or "HTTP/2"


class EventStream:
    """Opens ``POST /api/v3/events`` for one configured stream."""

    def __init__(self, settings: StreamSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self._client = client
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout_s,
            # No heartbeats from TTS: the read timeout is the idle timeout.
            read=settings.idle_timeout_s,
            write=STREAM_WRITE_TIMEOUT_S,
            pool=STREAM_POOL_TIMEOUT_S,
        )

    def request_body(self, cursor: Cursor, *, overlap_s: float | None = None) -> dict[str, object]:
        """Resume from ``cursor - overlap``, always with a large ``tail``.

        ``tail`` does two jobs (TTS_WIRE §1.6): it bounds the replay (the last ``tail``
        events after ``after``), and it sizes the server's per-stream buffer,
        ``clamp(tail, 8, 1024)``, which silently drops events for a reader that falls
        behind. So a new stream sends it too: it then starts with the history the
        server's store still holds, and with a buffer that survives bursts.
        """
        s = self.settings
        overlap = s.overlap_s if overlap_s is None else overlap_s
        after = tts.before(cursor.last_time, overlap) if cursor.last_time else None
        return tts.stream_body(
            application_id=s.application_id,
            device_ids=s.device_ids,
            names=s.names,
            after=after,
            tail=s.tail,
        )

    @contextlib.asynccontextmanager
    async def open(
        self,
        cursor: Cursor,
        *,
        overlap_s: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[OpenStream]:
        """Open the stream; raise a mapped error for anything but an event stream.

        ``stop`` cuts a connect short (reason ``stopping``): shutting down must not wait
        for a server that is slow to answer.
        """
        s = self.settings
        if s.api_key is None:
            raise AuthRejected(f"stream {s.name!r} has no API key configured")
        body = self.request_body(cursor, overlap_s=overlap_s)
        headers = tts.headers(s.api_key.reveal(), accept=tts.EVENT_STREAM_ACCEPT)
        headers["Accept-Encoding"] = ACCEPT_ENCODING
        request = self._client.build_request(
            "POST",
            s.base_url.rstrip("/") + "/api/v3/events",
            json=body,
            headers=headers,
            timeout=self._timeout,
        )
        response = await self._send(request, stop)
        try:
            if response.status_code != 200:
                err_body = b""  # if it trickles in past the deadline, the status must do
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEADERS_TIMEOUT_FACTOR * s.connect_timeout_s):
                        with tts.map_transport_errors(idle_timeout_s=s.idle_timeout_s):
                            err_body = await _read_capped(response, ERROR_BODY_MAX_BYTES)
                raise tts.error_for_response(response, err_body)
            gzipped = _check_event_stream(response)
            warnings = tts.warnings_of(response)
            yield OpenStream(
                after=cursor.last_time,
                warnings=warnings,
                store_disabled=any(tts.STORE_DISABLED_WARNING in w for w in warnings),
                request_id=response.headers.get("x-request-id"),
                frames=self._frames(response, gzipped=gzipped),
                http_version=response.http_version,
            )
        finally:
            await response.aclose()

    async def _send(self, request: httpx.Request, stop: asyncio.Event | None) -> httpx.Response:
        """Send; return once the status line and headers are in, within their deadline."""
        s = self.settings
        headers_timeout_s = HEADERS_TIMEOUT_FACTOR * s.connect_timeout_s
        send = asyncio.ensure_future(self._client.send(request, stream=True))
        try:
            async with asyncio.timeout(headers_timeout_s):
                await wait_any(send, *([stop.wait()] if stop is not None else []))
        except TimeoutError as exc:  # wait_any cancelled the send on its way out
            raise StreamDisconnected(
                f"no response headers within {headers_timeout_s} s", reason="headers_timeout"
            ) from exc
        if send.cancelled():
            raise StreamDisconnected("stopped while connecting", reason="stopping")
        with tts.map_transport_errors(idle_timeout_s=s.idle_timeout_s):
            return send.result()

    async def _frames(self, response: httpx.Response, *, gzipped: bool) -> AsyncIterator[bytes]:
        """The frames of the body, with the frame-progress bounds from the module docstring.

        The ``idle_timeout_s`` clock restarts whenever the caller asks for the next frame,
        so time the consumer spends on a frame (a slow commit) never counts against the
        server.
        """
        loop = asyncio.get_running_loop()
        idle_s = self.settings.idle_timeout_s
        max_unframed = framing.MAX_FRAME_BYTES + NO_FRAME_SLACK_BYTES
        decoder = FrameDecoder()
        inflate = _Gunzip().pieces if gzipped else None
        chunks = response.aiter_raw()
        unframed = 0  # bytes decoded since the last frame
        deadline = loop.time() + idle_s
        with tts.map_transport_errors(idle_timeout_s=idle_s):
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    if decoder.pending_bytes:  # a frame begun and never finished
                        raise StreamDisconnected(
                            f"no complete frame for {idle_s} s, only bytes", reason="no_frame"
                        ) from exc
                    # Silence, or only a proxy's keep-alives (SSE comments, blank lines).
                    raise StreamDisconnected(
                        f"no frame for {idle_s} s (TTS sends no heartbeats)",
                        reason="idle_timeout",
                    ) from exc
                for n, piece in enumerate(inflate(chunk) if inflate else (chunk,)):
                    if n:
                        await asyncio.sleep(0)  # a large inflation must not hold the loop
                    frames = decoder.feed(piece)
                    if not frames:
                        unframed += len(piece)
                        if unframed > max_unframed:
                            raise StreamDisconnected(
                                f"{unframed} bytes without a complete frame", reason="no_frame"
                            )
                        continue
                    for frame in frames:
                        yield frame
                    unframed = 0
                    deadline = loop.time() + idle_s
        for frame in decoder.flush():
            yield frame


def _check_event_stream(response: httpx.Response) -> bool:
    """Raise unless a 200 is an event stream we can read; True when it is gzipped."""
    ctype = response.headers.get("content-type", "")
    if ctype.partition(";")[0].strip().lower() not in STREAM_CONTENT_TYPES:
        raise StreamDisconnected(
            f"HTTP 200 with Content-Type {ctype[:100]!r}: not an event stream",
            reason="bad_response",
        )
    return _gzipped(response)


def _gzipped(response: httpx.Response) -> bool:
    """True for one layer of gzip, False for none; raise for anything else."""
    header = ", ".join(response.headers.get_list("content-encoding"))
    codings = [
        c for c in (c.strip().lower() for c in header.split(",")) if c not in ("", "identity")
    ]
    if not codings:
        return False
    if codings in (["gzip"], ["x-gzip"]):
        return True
    raise StreamDisconnected(
        f"Content-Encoding {header[:100]!r}: at most one layer of gzip is accepted",
        reason="bad_response",
    )


class _Gunzip:
    """Incremental gunzip that hands out at most :data:`INFLATE_STEP_BYTES` per piece."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(_GZIP_WBITS)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """Inflate ``data`` lazily, piece by piece; raise on a corrupt stream."""
        try:
            while True:
                out = self._z.decompress(data, INFLATE_STEP_BYTES)
                if out:
                    yield out
                if self._z.eof:  # the end of one gzip member; another may follow
                    data = self._z.unused_data
                    self._z = zlib.decompressobj(_GZIP_WBITS)
                    if not data:
                        return
                    continue
                data = self._z.unconsumed_tail
                if not data and len(out) < INFLATE_STEP_BYTES:
                    return  # all input consumed and nothing more held back
        except zlib.error as exc:
            raise StreamDisconnected(f"gzip: {exc}", reason="bad_response") from exc


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of an error body, inflated with the same bound as a stream."""
    try:
        gzipped = _gzipped(response)
    except StreamDisconnected:
        return b""  # an encoding we do not read: the status code alone must do
    data = bytearray()
    gunzip = _Gunzip()
    async for chunk in response.aiter_raw():
        for piece in gunzip.pieces(chunk) if gzipped else (chunk,):
            data += piece
            if len(data) >= limit:
                return bytes(data[:limit])
    return bytes(data)
