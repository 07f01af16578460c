"""Things Stack HTTP requests and responses: bodies, headers, error mapping. No loops here.

Everything TTS-specific about talking HTTP lives here so that the stream consumer and the
downlink worker share one reading of TTS_WIRE: the ``Accept`` that selects blank-line
framing, the User-Agent, rate-limit headers in both spellings, ``X-Warning``, and the
translation of status codes and ``google.rpc.Status`` bodies into our error tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from ingestd import __version__
from ingestd.errors import (
    AuthRejected,
    IngestdError,
    RateLimited,
    RequestRejected,
    ServerUnavailable,
    StreamDisconnected,
)
from ingestd.framing import TtsErrorInfo, parse_tts_error

USER_AGENT = f"ingestd/{__version__}"
EVENT_STREAM_ACCEPT = "text/event-stream"  # exactly this value selects "\n\n" framing (§1.2)
RATE_LIMIT_EXTRA_S = 1.0  # X-Rate-Limit-Retry is truncated to whole seconds (§7)
RATE_LIMIT_DEFAULT_S = 10.0  # when a 429 carries no retry header
STORE_DISABLED_WARNING = "Events storage is not enabled"


def http_client(*, prior_knowledge: bool = False, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client as ingestd talks to TTS, with its User-Agent.

    TTS serves HTTP/2: h2 on TLS, negotiated by ALPN (this client offers h2 and HTTP/1.1),
    and h2c on plain TCP (lorawan-stack ``pkg/component/web.go`` wraps its handler in
    ``h2c.NewHandler``), which httpx speaks only with prior knowledge: ``prior_knowledge``
    turns HTTP/1.1 off, so every request, on ``http://`` too, is HTTP/2 from the first byte.
    Long-lived HTTP/1.1 streams get stuck behind proxies (lorawan-stack#6653).
    """
    headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    return httpx.AsyncClient(http1=not prior_knowledge, http2=True, headers=headers, **kwargs)


def stream_body(
    *,
    application_id: str,
    device_ids: tuple[str, ...],
    names: tuple[str, ...],
    after: datetime | None,
    tail: int | None,
) -> dict[str, Any]:
    """The ``StreamEventsRequest`` for an application, or for a list of its devices."""
    if device_ids:
        identifiers = [
            {"device_ids": {"device_id": d, "application_ids": {"application_id": application_id}}}
            for d in device_ids
        ]
    else:
        identifiers = [{"application_ids": {"application_id": application_id}}]
    body: dict[str, Any] = {"identifiers": identifiers}
    if tail:
        body["tail"] = tail
    if after is not None:
        body["after"] = format_time(after)
    if names:
        body["names"] = list(names)
    return body


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with microseconds; TTS truncates ``after`` to milliseconds (§1.6)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def headers(api_key: str, *, accept: str = "application/json") -> dict[str, str]:
    """Request headers: only the API key as credentials, and who we are."""
    return {
        "Authorization": f"Bearer {api_key}",
        "User-Agent": USER_AGENT,
        "Accept": accept,
    }


def rate_limit_retry_s(headers: httpx.Headers) -> float | None:
    """Seconds to wait before retrying: ``X-Rate-Limit-Retry`` (or the documented
    ``X-Ratelimit-Retry`` spelling) plus 1 s, since TTS truncates it to whole seconds."""
    for name in ("x-rate-limit-retry", "x-ratelimit-retry"):
        value = headers.get(name)
        if value is not None:
            try:
                return max(float(value), 0.0) + RATE_LIMIT_EXTRA_S
            except ValueError:
                return None
    return None


def warnings_of(response: httpx.Response) -> list[str]:
    """Every ``X-Warning`` header value (one line per warning)."""
    return response.headers.get_list("x-warning")


def error_info(status_code: int, body: bytes) -> TtsErrorInfo:
    """The TTS error carried by a non-200 response body (either shape, or none)."""
    try:
        doc = orjson.loads(body.strip().split(b"\n", 1)[0]) if body.strip() else {}
    except orjson.JSONDecodeError:
        doc = {"message": body[:200].decode("utf-8", "replace") or f"HTTP {status_code}"}
    info = parse_tts_error(doc)
    if not info.message or info.message == "{}":
        info = TtsErrorInfo(
            code=info.code, name=info.name, namespace=info.namespace, message=f"HTTP {status_code}"
        )
    return info


def error_for_response(response: httpx.Response, body: bytes) -> IngestdError:
    """Translate a non-200 response into the error class that decides what happens next."""
    info = error_info(response.status_code, body)
    code = response.status_code
    kwargs: dict[str, Any] = {
        "status_code": code,
        "error_name": info.name,
        "tts_message": info.message,
    }
    text = f"HTTP {code}: {info.describe()}"
    if code == 429:
        retry = rate_limit_retry_s(response.headers)
        wait = retry if retry is not None else RATE_LIMIT_DEFAULT_S
        return RateLimited(text, retry_after_s=wait, **kwargs)
    if code in (401, 403):
        return AuthRejected(text, **kwargs)
    if code >= 500 or code == 499:
        return ServerUnavailable(text, **kwargs)
    return RequestRejected(text, **kwargs)


@contextlib.contextmanager
def map_transport_errors(*, idle_timeout_s: float | None = None) -> Iterator[None]:
    """Translate httpx transport failures into :class:`StreamDisconnected` with a reason."""
    try:
        yield
    except httpx.ReadTimeout as exc:
        raise StreamDisconnected(
            f"no data for {idle_timeout_s} s (TTS sends no heartbeats)", reason="idle_timeout"
        ) from exc
    except httpx.TimeoutException as exc:
        raise StreamDisconnected(f"timeout: {type(exc).__name__}", reason="transport") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise StreamDisconnected(f"{type(exc).__name__}: {exc}", reason="transport") from exc


def before(t: datetime, seconds: float) -> datetime:
    """``t`` minus ``seconds`` (the resume overlap)."""
    return t - timedelta(seconds=seconds)
