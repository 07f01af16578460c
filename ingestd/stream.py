"""One TTS event-stream connection: request, status and header checks, frames out.

:class:`EventStream` knows how to open ``POST /api/v3/events`` for a stream's settings
and cursor, turn a non-200 answer into our error tree, and hand back decoded frames as
they arrive. Reconnecting, batching and gap bookkeeping live in :mod:`ingestd.consumer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import structlog

from ingestd import tts
from ingestd.config import StreamSettings
from ingestd.errors import AuthRejected
from ingestd.framing import FrameDecoder
from ingestd.models import Cursor

log = structlog.get_logger()

STREAM_WRITE_TIMEOUT_S = 10.0
STREAM_POOL_TIMEOUT_S = 10.0
ERROR_BODY_MAX_BYTES = 64 * 1024


@dataclass(kw_only=True)
class OpenStream:
    """An accepted stream response: what the server said in its headers, and the frames."""

    after: datetime | None
    warnings: list[str]
    store_disabled: bool
    request_id: str | None
    frames: AsyncIterator[bytes] = field(repr=False)


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
        self, cursor: Cursor, *, overlap_s: float | None = None
    ) -> AsyncIterator[OpenStream]:
        """Open the stream; raise a mapped error for anything but a 200."""
        s = self.settings
        if s.api_key is None:
            raise AuthRejected(f"stream {s.name!r} has no API key configured")
        body = self.request_body(cursor, overlap_s=overlap_s)
        request = self._client.build_request(
            "POST",
            s.base_url.rstrip("/") + "/api/v3/events",
            json=body,
            headers=tts.headers(s.api_key.reveal(), accept=tts.EVENT_STREAM_ACCEPT),
            timeout=self._timeout,
        )
        with tts.map_transport_errors(idle_timeout_s=s.idle_timeout_s):
            response = await self._client.send(request, stream=True)
        try:
            if response.status_code != 200:
                with tts.map_transport_errors(idle_timeout_s=s.idle_timeout_s):
                    err_body = await _read_capped(response, ERROR_BODY_MAX_BYTES)
                raise tts.error_for_response(response, err_body)
            warnings = tts.warnings_of(response)
            yield OpenStream(
                after=cursor.last_time,
                warnings=warnings,
                store_disabled=any(tts.STORE_DISABLED_WARNING in w for w in warnings),
                request_id=response.headers.get("x-request-id"),
                frames=self._frames(response),
            )
        finally:
            await response.aclose()

    async def _frames(self, response: httpx.Response) -> AsyncIterator[bytes]:
        decoder = FrameDecoder()
        with tts.map_transport_errors(idle_timeout_s=self.settings.idle_timeout_s):
            async for chunk in response.aiter_bytes():
                for frame in decoder.feed(chunk):
                    yield frame
        for frame in decoder.flush():
            yield frame


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])
