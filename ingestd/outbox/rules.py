"""Pure helpers of the downlink worker: row validation, TTS requests, response verdicts.

No I/O here (the worker in :mod:`ingestd.outbox.worker` does it), so every rule is unit-testable:
what a valid row is (TTS_WIRE 5.3, 6), what a push looks like (5.1, 5.2, 7), and what each
TTS answer means for the row (5.4, 7).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson

from ingestd import tts
from ingestd.models import TX_PRIORITIES
from ingestd.outbox.ids import outbox_correlation_id, request_id
from ingestd.schema import OUTBOX_OPERATIONS

if TYPE_CHECKING:
    from ingestd.outbox.sql import OutboxItem
    from ingestd.secrets import Secret

F_PORT_MIN = 1
F_PORT_MAX = 223  # TTS accepts 1-255 except 224; the docs say up to 223 (TTS_WIRE 5.3)
FRM_PAYLOAD_MAX_BYTES = 242  # EU868: 250 - 8 (TTS_WIRE 5.3); lower data rates allow less

PUSH_PATH = "/api/v3/as/applications/{app}/devices/{dev}/down/{operation}"
LIST_PATH = "/api/v3/as/applications/{app}/devices/{dev}/down"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a TTS answer means for the row."""

    kind: Literal["queued", "failed", "retry"]
    error: str | None = None
    retry_after_s: float | None = None  # rate limited: wait this long (application-wide)
    queue_full: bool = False  # downlink_queue_capacity: retry with a long backoff
    auth_rejected: bool = False  # 401/403: the API key or its rights are refused
    outcome_unknown: bool = False  # TTS may have accepted it: verify before pushing again


def validate(item: OutboxItem) -> str | None:
    """Why TTS would refuse this row, checked before any HTTP call; None when it is fine."""
    if item.problem is not None:
        return item.problem
    for what, value in (("application_id", item.application_id), ("device_id", item.device_id)):
        if not tts.is_tts_id(value):
            return (
                f"{what} {value!r} is not a TTS id (lowercase letters, digits and single "
                f"dashes, 3-{tts.TTS_ID_MAX_CHARS} characters)"
            )
    if not isinstance(item.f_port, int) or not F_PORT_MIN <= item.f_port <= F_PORT_MAX:
        return f"f_port {item.f_port!r} is outside {F_PORT_MIN}-{F_PORT_MAX}"
    if item.frm_payload is not None and not isinstance(item.frm_payload, bytes):
        return "frm_payload must be bytes"
    has_frm = bool(item.frm_payload)
    has_decoded = item.decoded_payload is not None
    if has_frm == has_decoded:
        return (
            "set exactly one of frm_payload and decoded_payload"
            if has_frm
            else "no payload: set frm_payload (non-empty) or decoded_payload"
        )
    if has_frm and len(item.frm_payload or b"") > FRM_PAYLOAD_MAX_BYTES:
        return (
            f"frm_payload is {len(item.frm_payload or b'')} bytes; at most "
            f"{FRM_PAYLOAD_MAX_BYTES} fit a LoRaWAN downlink"
        )
    if has_decoded and not isinstance(item.decoded_payload, Mapping):
        return "decoded_payload must be a JSON object (the input of the downlink formatter)"
    if item.priority not in TX_PRIORITIES:
        return f"priority {item.priority!r} is not one of {', '.join(TX_PRIORITIES)}"
    if item.operation not in OUTBOX_OPERATIONS:
        return f"operation {item.operation!r} is not one of {', '.join(OUTBOX_OPERATIONS)}"
    return None


def push_request(item: OutboxItem, base_url: str, key: Secret) -> tuple[str, dict[str, str], bytes]:
    """(url, headers, body) of the ``down/push`` or ``down/replace`` call for ``item``."""
    downlink: dict[str, Any] = {
        "f_port": item.f_port,
        "confirmed": item.confirmed,
        "priority": item.priority,
        "correlation_ids": [outbox_correlation_id(item.id)],
    }
    if item.frm_payload:
        downlink["frm_payload"] = base64.b64encode(item.frm_payload).decode()
    else:
        downlink["decoded_payload"] = item.decoded_payload
    path = PUSH_PATH.format(app=item.application_id, dev=item.device_id, operation=item.operation)
    headers = tts.headers(key.reveal()) | {
        "Content-Type": "application/json",
        "X-Request-ID": request_id(item.id, item.attempts),
    }
    return base_url.rstrip("/") + path, headers, orjson.dumps({"downlinks": [downlink]})


def list_request(item: OutboxItem, base_url: str, key: Secret) -> tuple[str, dict[str, str]]:
    """(url, headers) of the device queue listing (``GET …/down``)."""
    path = LIST_PATH.format(app=item.application_id, dev=item.device_id)
    return base_url.rstrip("/") + path, tts.headers(key.reveal())


def queue_has(content: bytes, item: OutboxItem) -> bool | None:
    """Whether a ``GET …/down`` body lists ``item`` (by correlation id); None if unreadable."""
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    downlinks = doc.get("downlinks") or []  # TTS omits the empty list
    if not isinstance(downlinks, list):
        return None
    cid = outbox_correlation_id(item.id)
    return any(isinstance(d, dict) and cid in (d.get("correlation_ids") or ()) for d in downlinks)


def classify_response(response: httpx.Response) -> Outcome:
    """The verdict on a push answer (:func:`ingestd.tts.classify`; TTS error name first)."""
    verdict = tts.classify(response.status_code, response.content, response.headers)
    kind = verdict.kind
    if kind == "ok":
        return Outcome("queued")
    error = verdict.error
    if kind == "queue_full":
        return Outcome("retry", error, queue_full=True)
    if kind == "rate_limited":
        return Outcome("retry", error, retry_after_s=verdict.retry_after_s)
    if kind == "auth":
        return Outcome("failed", error, auth_rejected=True)
    if kind == "rejected":
        return Outcome("failed", error)
    # A 5xx may come after the AS accepted the item (e.g. a proxy's 504 while TTS went
    # on), so the next attempt verifies first.
    return Outcome("retry", error, outcome_unknown=verdict.may_have_reached)


def transport_outcome(exc: Exception) -> Outcome:
    """The verdict on a push that got no HTTP answer.

    A connect failure never reached TTS (a plain retry); anything later (timeouts while
    waiting for the answer, a dropped connection) may have been accepted: verify first.
    """
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return Outcome("retry", f"transport: {text}", outcome_unknown=sent)
