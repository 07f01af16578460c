"""Client of the Storage Integration API (``ApplicationUpStorage``): what TTS kept, by time.

``GET /api/v3/as/applications/{app}[/devices/{dev}]/packages/storage/{type}`` (lorawan-stack
``api/ttn/lorawan/v3/applicationserver_integrations_storage.proto``) answers a stream of
``{"result": ApplicationUp}`` frames, framed like ``/api/v3/events``, so the frames go
through the same :class:`~ingestd.framing.FrameDecoder` and
:func:`~ingestd.framing.parse_frame`. It needs "read application traffic".

Paging is by time, never by ``continuation_token`` (the HTTP gateway does not pass the
header through): each page asks for ``order=received_at`` from just before the newest
``received_at`` seen, so whether the server's ``after``/``before`` are inclusive or
exclusive, and however many messages share one timestamp at a page edge, nothing falls
between two pages; the overlap is removed by the messages' identity. A window ends when a
page brings nothing new (robust against a server that caps ``limit`` below what was asked).

States a caller must tell apart (:func:`probe`):
- ``ok``: the API answers.
- ``not_enabled``: 404, the route does not exist (open-source TTS) or the package is off:
  :class:`~ingestd.errors.StorageNotEnabled`.
- ``no_rights``: 401/403: :class:`~ingestd.errors.AuthRejected`.
Transient failures (transport errors, timeouts, 5xx, 429 with ``X-Rate-Limit-Retry``, an
error frame in the body) are retried per page with backoff, then raised.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from ingestd import tts
from ingestd.errors import (
    AuthRejected,
    IngestdError,
    MalformedEvent,
    RateLimited,
    ServerUnavailable,
    StorageNotEnabled,
    TransientError,
)
from ingestd.framing import ErrorFrame, FrameDecoder, parse_frame

log = structlog.get_logger()

PAGE_LIMIT = 1000  # TTN answers at most 1 000 messages per request
EDGE = timedelta(microseconds=1)  # asked-for windows are widened by this on both sides
TIMEOUT_S = 30.0
ATTEMPTS = 5
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
ERROR_BODY_MAX_BYTES = 64 * 1024
# What ingestd stores of each type (end_device_ids and received_at always come back).
FIELD_MASKS = {
    "uplink_message": ",".join(
        f"up.uplink_message.{f}"
        for f in (
            "session_key_id",
            "f_port",
            "f_cnt",
            "frm_payload",
            "decoded_payload",
            "rx_metadata",
            "settings",
            "received_at",
            "confirmed",
            "consumed_airtime",
            "packet_error_rate",
        )
    ),
    "join_accept": "up.join_accept.session_key_id,up.join_accept.received_at",
}


class StorageState(enum.StrEnum):
    """What the Storage Integration said to a probe."""

    OK = "ok"
    NOT_ENABLED = "not_enabled"
    NO_RIGHTS = "no_rights"


Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Page:
    """One page's new messages (overlap removed) and how many the server sent."""

    messages: list[dict[str, Any]]
    received: int


class StorageClient:
    """Reads one application's stored messages. ``sleep`` lets a stopping caller cut waits."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        application_id: str,
        page_limit: int = PAGE_LIMIT,
        timeout_s: float = TIMEOUT_S,
        attempts: int = ATTEMPTS,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/") + "/api/v3/as/applications/" + application_id
        self._api_key = api_key
        self.application_id = application_id
        self.page_limit = page_limit
        self._timeout = httpx.Timeout(timeout_s)
        self._attempts = attempts
        self._sleep = sleep
        self.requests = 0
        self.malformed = 0  # stored messages that could not be read (skipped, logged)

    def url(self, up_type: str, device_id: str | None = None, *, count: bool = False) -> str:
        """The storage URL for ``up_type`` of the application or one of its devices."""
        dev = f"/devices/{device_id}" if device_id else ""
        return f"{self._base}{dev}/packages/storage/{up_type}" + ("/count" if count else "")

    async def probe(self, device_id: str | None = None) -> StorageState:
        """Ask for one message: is the Storage Integration there, and may this key read it?

        Transient failures are raised (after retries), since they say nothing either way.
        """
        try:
            await self._get_page("uplink_message", device_id, {"limit": "1"})
        except StorageNotEnabled:
            return StorageState.NOT_ENABLED
        except AuthRejected:
            return StorageState.NO_RIGHTS
        return StorageState.OK

    async def pages(
        self,
        *,
        since: datetime,
        until: datetime,
        device_id: str | None = None,
        up_type: str = "uplink_message",
    ) -> AsyncIterator[Page]:
        """Every stored message with ``since <= received_at <= until``, page by page.

        Each message comes once; the order is by ``received_at``.
        """
        after = since - EDGE
        seen_at_edge: set[tuple[Any, ...]] = set()  # keys of messages at >= after
        split_at: datetime | None = None  # an instant already read device by device
        while True:
            query = {
                "order": "received_at",
                "limit": str(self.page_limit),
                "after": tts.format_time(after),
                "before": tts.format_time(until + EDGE),
            }
            mask = FIELD_MASKS.get(up_type)
            if mask:
                query["field_mask"] = mask
            raw = await self._get_page(up_type, device_id, query)
            fresh: list[dict[str, Any]] = []
            newest: datetime | None = None
            for up, when in raw:
                if when < since or when > until:
                    continue  # an inclusive edge of the widened window
                key = _key(up, when)
                if when >= after and key in seen_at_edge:
                    continue  # the overlap with the previous page
                seen_at_edge.add(key)
                fresh.append(up)
                if newest is None or when > newest:
                    newest = when
            if fresh:
                yield Page(fresh, len(raw))
                assert newest is not None
                # Next page from just before the newest time: an exclusive ``after`` then
                # still returns the messages that share that time but did not fit here.
                after = newest - EDGE
                seen_at_edge = {k for k in seen_at_edge if k[0] >= after}
                continue
            times = {when for _, when in raw if since <= when <= until}
            if len(times) != 1 or len(raw) < self.page_limit:
                return  # nothing new: the window is done
            # A full page of one instant, all seen: more messages share that time than a
            # page holds. Read that instant device by device, then go past it.
            (stuck,) = times
            if stuck == split_at:
                after = stuck + EDGE  # an inclusive server: step over the instant
                continue
            if device_id is not None:
                log.warning(
                    "storage_instant_overfull",
                    application_id=self.application_id,
                    device_id=device_id,
                    received_at=tts.format_time(stuck),
                )
                after = stuck + EDGE
                continue
            split_at, after = stuck, stuck
            for device in await self._devices_at(stuck, up_type):
                async for page in self.pages(
                    since=stuck, until=stuck, device_id=device, up_type=up_type
                ):
                    new = [m for m in page.messages if _key(m, stuck) not in seen_at_edge]
                    seen_at_edge.update(_key(m, stuck) for m in new)
                    if new:
                        yield Page(new, page.received)

    async def _devices_at(self, when: datetime, up_type: str) -> list[str]:
        query = {"after": tts.format_time(when - EDGE), "before": tts.format_time(when + EDGE)}
        response = await self._request(self.url(up_type, count=True), query)
        return sorted((response.json().get("count") or {}).keys())

    async def count(self, device_id: str | None = None, up_type: str = "uplink_message") -> int:
        """How many messages storage holds (``…/count``, summed over devices)."""
        response = await self._request(self.url(up_type, device_id, count=True), {})
        body = response.json()
        counts = body.get("count") or {}
        return sum(int(v) for v in counts.values())

    # --- one request, with retries -------------------------------------------------------------

    async def _get_page(
        self, up_type: str, device_id: str | None, query: dict[str, str]
    ) -> list[tuple[dict[str, Any], datetime]]:
        url = self.url(up_type, device_id)
        for attempt in range(self._attempts):
            try:
                return await self._read_page(url, query)
            except TransientError as exc:
                if attempt + 1 >= self._attempts:
                    raise
                wait = (
                    exc.retry_after_s
                    if isinstance(exc, RateLimited)
                    else BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                )
                log.warning(
                    "storage_request_retry",
                    application_id=self.application_id,
                    attempt=attempt + 1,
                    wait_s=wait,
                    error=str(exc),
                )
                await self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_page(
        self, url: str, query: dict[str, str]
    ) -> list[tuple[dict[str, Any], datetime]]:
        self.requests += 1
        request = self._client.build_request(
            "GET",
            url,
            params=query,
            headers=tts.headers(self._api_key, accept=tts.EVENT_STREAM_ACCEPT),
            timeout=self._timeout,
        )
        out: list[tuple[dict[str, Any], datetime]] = []
        with tts.map_transport_errors(idle_timeout_s=self._timeout.read):
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    body = await _read_capped(response, ERROR_BODY_MAX_BYTES)
                    raise _storage_error(response, body)
                decoder = FrameDecoder()
                async for chunk in response.aiter_bytes():
                    for frame in decoder.feed(chunk):
                        self._add(out, frame)
                for frame in decoder.flush():
                    self._add(out, frame)
            finally:
                await response.aclose()
        return out

    def _add(self, out: list[tuple[dict[str, Any], datetime]], frame: bytes) -> None:
        try:
            out.append(_message(frame))
        except MalformedEvent as exc:
            # One unreadable message must not stop the healing of the rest.
            self.malformed += 1
            log.warning(
                "storage_message_unreadable", application_id=self.application_id, error=str(exc)
            )

    async def _request(self, url: str, query: dict[str, str]) -> httpx.Response:
        for attempt in range(self._attempts):
            try:
                with tts.map_transport_errors(idle_timeout_s=self._timeout.read):
                    response = await self._client.get(
                        url,
                        params=query,
                        headers=tts.headers(self._api_key),
                        timeout=self._timeout,
                    )
                if response.status_code != 200:
                    raise _storage_error(response, response.content)
                return response
            except TransientError as exc:
                if attempt + 1 >= self._attempts:
                    raise
                wait = exc.retry_after_s if isinstance(exc, RateLimited) else BACKOFF_S[attempt]
                await self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _storage_error(response: httpx.Response, body: bytes) -> IngestdError:
    """Map a refused storage request; 404 means there is no Storage Integration here."""
    if response.status_code == 404:
        info = tts.error_info(404, body)
        return StorageNotEnabled(
            f"HTTP 404 from the Storage Integration API: {info.describe()} (open-source TTS "
            "has no Storage Integration; on TTS Cloud/Enterprise enable it for the application)",
            status_code=404,
            error_name=info.name,
            tts_message=info.message,
        )
    return tts.error_for_response(response, body)


def _message(frame: bytes) -> tuple[dict[str, Any], datetime]:
    """A stored ApplicationUp and its ``received_at``; an error frame is transient."""
    from ingestd.normalize import parse_time  # local: normalize imports nothing of ours back

    parsed = parse_frame(frame)
    if isinstance(parsed, ErrorFrame):
        raise ServerUnavailable(
            f"error frame from storage: {parsed.error.describe()}",
            status_code=200,
            error_name=parsed.error.name,
        )
    up = parsed.event
    received = up.get("received_at")
    if type(received) is not str:
        raise MalformedEvent("a stored message without received_at")
    return up, parse_time(received)


def _key(up: dict[str, Any], when: datetime) -> tuple[Any, ...]:
    """Identity of a stored message for de-duplicating page overlaps (time first)."""
    ids = up.get("end_device_ids") or {}
    members = tuple(k for k in up if k not in ("end_device_ids", "received_at", "correlation_ids"))
    return (when, ids.get("device_id"), up.get("received_at"), members)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]
