"""Things Stack HTTP requests and responses: bodies, headers, error mapping. No loops here.

Everything TTS-specific about talking HTTP lives here so that the stream consumer and the
downlink worker share one reading of TTS_WIRE: the ``Accept`` that selects blank-line
framing, the User-Agent, rate-limit headers in both spellings, ``X-Warning``, and the
translation of status codes and ``google.rpc.Status`` bodies into our error tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import orjson
import structlog

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

log = structlog.get_logger()

USER_AGENT = f"ingestd/{__version__}"
EVENT_STREAM_ACCEPT = "text/event-stream"  # exactly this value selects "\n\n" framing (§1.2)
RATE_LIMIT_EXTRA_S = 1.0  # X-Rate-Limit-Retry is truncated to whole seconds (§7)
RATE_LIMIT_DEFAULT_S = 10.0  # when a 429 carries no retry header
STORE_DISABLED_WARNING = "Events storage is not enabled"
TTS_ID_MAX_CHARS = 36
# An application/device/gateway id. Matched with fullmatch: `$` would also accept a
# trailing newline ("dev-1\n").
_TTS_ID_RE = re.compile(r"[a-z0-9](?:-?[a-z0-9]){2,}")


def is_tts_id(value: object) -> bool:
    """True for a valid TTS entity id: lowercase letters, digits, single dashes, 3-36 chars."""
    return (
        isinstance(value, str)
        and len(value) <= TTS_ID_MAX_CHARS
        and bool(_TTS_ID_RE.fullmatch(value))
    )


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


class WarningLog:
    """Logs each distinct ``X-Warning`` once (``tts_warning``): TTS repeats its warnings
    (a deprecated field, a disabled store) on every answer."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def log(self, warnings: Iterable[str]) -> None:
        """Log the warnings not logged before."""
        for warning in warnings:
            if warning not in self._seen:
                self._seen.add(warning)
                log.warning("tts_warning", warning=warning)


def error_info(status_code: int, body: bytes) -> TtsErrorInfo:
    """The TTS error carried by a non-200 response body (either shape, or none)."""
    try:
        doc = orjson.loads(body.strip().split(b"\n", 1)[0]) if body.strip() else {}
    except orjson.JSONDecodeError:
        doc = {"message": body[:200].decode("utf-8", "replace").strip() or f"HTTP {status_code}"}
    info = parse_tts_error(doc)
    if not info.message or info.message == "{}":
        info = dataclasses.replace(info, message=f"HTTP {status_code}")
    return info


# Statuses worth asking again: 408 Request Timeout and 425 Too Early (the server did not
# act on the request), and 499, grpc-gateway's code for gRPC Canceled (the server gave up
# on the call while handling it). Every other 4xx is TTS refusing the request as it is.
_RETRY_4XX = frozenset({408, 425, 499})
_NOT_ACTED_ON = frozenset({408, 425})  # the request cannot have taken effect at TTS
_NO_ERROR = TtsErrorInfo(code=None, name=None, namespace=None, message="")

VerdictKind = Literal["ok", "retry", "rate_limited", "queue_full", "auth", "rejected"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a TTS answer means, the same for the event stream and the downlink worker.

    ``kind``: ``ok`` (2xx); ``retry`` (5xx, 408/425/499, or a status TTS never sends);
    ``rate_limited`` (429; wait ``retry_after_s`` if TTS said how long); ``queue_full``
    (429 ``downlink_queue_capacity``: the device's queue drains slowly); ``auth`` (401/403:
    the API key or its rights); ``rejected`` (any other 4xx: retrying the same request
    cannot help). ``may_have_reached`` is True when TTS may have acted on the request
    although it answered an error (a 5xx may come from a proxy while TTS went on).
    """

    kind: VerdictKind
    status_code: int
    info: TtsErrorInfo
    retry_after_s: float | None = None
    may_have_reached: bool = False

    @property
    def error_name(self) -> str | None:
        """TTS's error name (``details[0].name``), e.g. ``api_key_not_found``."""
        return self.info.name

    @property
    def error(self) -> str:
        """The answer as text, TTS error name first (``pkg/as:device_not_found: …``), or
        ``HTTP 502: <start of the body>`` when TTS named none."""
        if self.info.name:
            return self.info.describe()
        status = f"HTTP {self.status_code}"
        return status if self.info.message == status else f"{status}: {self.info.message}"

    @property
    def message(self) -> str:
        """:attr:`error` led by the status, for exceptions and logs."""
        if self.info.name:
            return f"HTTP {self.status_code}: {self.error}"
        return self.error


def classify(status_code: int, body: bytes, headers: httpx.Headers) -> Verdict:
    """The one reading of a TTS answer's status, error body and headers (TTS_WIRE §5.4, §7)."""
    if 200 <= status_code < 300:
        return Verdict("ok", status_code, _NO_ERROR)
    info = error_info(status_code, body)
    if status_code == 429:
        if info.name == "downlink_queue_capacity":
            return Verdict("queue_full", status_code, info)
        return Verdict("rate_limited", status_code, info, rate_limit_retry_s(headers))
    if status_code in (401, 403):
        return Verdict("auth", status_code, info)
    if 400 <= status_code < 500 and status_code not in _RETRY_4XX:
        return Verdict("rejected", status_code, info)
    reached = status_code >= 500 or (400 <= status_code < 500 and status_code not in _NOT_ACTED_ON)
    return Verdict("retry", status_code, info, may_have_reached=reached)


def error_for_response(response: httpx.Response, body: bytes) -> IngestdError:
    """Translate a non-200 response into the error class that decides what happens next."""
    verdict = classify(response.status_code, body, response.headers)
    kwargs: dict[str, Any] = {
        "status_code": verdict.status_code,
        "error_name": verdict.info.name,
        "tts_message": verdict.info.message,
    }
    text = verdict.message
    if verdict.kind in ("rate_limited", "queue_full"):
        wait = verdict.retry_after_s
        return RateLimited(
            text, retry_after_s=RATE_LIMIT_DEFAULT_S if wait is None else wait, **kwargs
        )
    if verdict.kind == "auth":
        return AuthRejected(text, **kwargs)
    if verdict.kind == "rejected":
        return RequestRejected(text, **kwargs)
    return ServerUnavailable(text, **kwargs)


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
