"""The downlink worker's pure rules: row validation, the push request, and what each TTS
answer means for the row."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from ingestd import __version__
from ingestd.outbox.ids import request_id
from ingestd.outbox.rules import (
    classify_response,
    list_request,
    push_request,
    queue_has,
    transport_outcome,
    validate,
)
from ingestd.outbox.sql import OutboxItem
from ingestd.secrets import Secret
from ingestd.tts import rate_limit_retry_s

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = Secret("NNSXS.KEY.SECRET")
ITEM = OutboxItem(
    id=9223372036854775807,
    application_id="acme-app",
    device_id="wm-0001",
    f_port=10,
    frm_payload=b"\x01\x02",
    decoded_payload=None,
    confirmed=True,
    priority="HIGH",
    operation="push",
    status="pushing",
    attempts=2147483647,
    next_attempt_at=NOW,
    last_error=None,
    correlation_id=None,
    created_at=NOW,
    updated_at=NOW,
    claimed_at=NOW,
    claimed_by="w",
    queued_at=None,
    sent_at=None,
    acked_at=None,
    finished_at=None,
    request_id=None,
    verify_before_push=False,
)


def _error(status: int, name: str, namespace: str = "pkg/x", **headers: str) -> httpx.Response:
    body = {
        "code": 5,
        "message": f"error:{namespace}:{name} (boom)",
        "details": [{"namespace": namespace, "name": name, "message_format": "boom"}],
    }
    return httpx.Response(status, json=body, headers=headers)


def test_a_valid_row_passes() -> None:
    assert validate(ITEM) is None
    assert validate(replace(ITEM, frm_payload=None, decoded_payload={"a": 1})) is None
    assert validate(replace(ITEM, f_port=223, frm_payload=b"x" * 242)) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"priority": "normal"}, "priority 'normal' is not one of LOWEST"),
        ({"operation": "append"}, "operation 'append' is not one of push, replace"),
        ({"f_port": None}, "f_port None is outside 1-223"),
        ({"application_id": "ab"}, "application_id 'ab' is not a TTS id"),
        ({"device_id": "-dev"}, "is not a TTS id"),
        # `$` matched before a trailing newline; the row then cycled through verify forever
        ({"device_id": "wm-0001\n"}, "device_id 'wm-0001\\n' is not a TTS id"),
        ({"application_id": "acme-app\n"}, "application_id 'acme-app\\n' is not a TTS id"),
        ({"f_port": "10"}, "f_port '10' is outside 1-223"),
        ({"frm_payload": "AQI="}, "frm_payload must be bytes"),
        ({"problem": "decoded_payload is not valid JSON"}, "decoded_payload is not valid JSON"),
    ],
)
def test_invalid_values_are_named(changes: dict[str, object], reason: str) -> None:
    problem = validate(replace(ITEM, **changes))  # type: ignore[arg-type]
    assert problem is not None
    assert reason in problem


def test_push_request_matches_the_tts_wire_format() -> None:
    url, headers, body = push_request(
        replace(ITEM, operation="replace"), "https://tts.example/", KEY
    )
    assert url == "https://tts.example/api/v3/as/applications/acme-app/devices/wm-0001/down/replace"
    assert orjson.loads(body) == {
        "downlinks": [
            {
                "f_port": 10,
                "frm_payload": "AQI=",
                "confirmed": True,
                "priority": "HIGH",
                "correlation_ids": ["ingestd:outbox:9223372036854775807"],
            }
        ]
    }
    assert headers["Authorization"] == "Bearer NNSXS.KEY.SECRET"
    assert headers["User-Agent"] == f"ingestd/{__version__}"
    assert headers["X-Request-ID"] == request_id(ITEM.id, ITEM.attempts)
    # TTS's rpc:/ttn.lorawan.v3.AppAs/DownlinkQueueReplace:<id> must stay <= 100 chars
    assert len(request_id(ITEM.id, ITEM.attempts)) <= 55
    list_url, _ = list_request(ITEM, "https://tts.example", KEY)
    assert list_url.endswith("/devices/wm-0001/down")


def test_queue_listing_is_matched_by_correlation_id() -> None:
    mine = {
        "downlinks": [
            {
                "f_port": 1,
                "correlation_ids": ["as:downlink:01J", "ingestd:outbox:9223372036854775807"],
            }
        ]
    }
    assert queue_has(orjson.dumps(mine), ITEM) is True
    assert queue_has(b"{}", ITEM) is False  # TTS omits an empty list
    assert queue_has(b"<html>", ITEM) is None


@pytest.mark.parametrize(
    ("response", "kind", "flags"),
    [
        (httpx.Response(200, json={}), "queued", {}),
        (_error(404, "device_not_found", "pkg/applicationserver"), "failed", {}),
        # 403: the key lacks a right (e.g. TRAFFIC_DOWN_WRITE): an auth problem, reported once.
        (
            _error(403, "no_application_rights", "pkg/auth/rights"),
            "failed",
            {"auth_rejected": True},
        ),
        (_error(400, "no_device_session"), "failed", {}),
        (_error(401, "api_key_not_found"), "failed", {"auth_rejected": True}),
        (
            _error(429, "downlink_queue_capacity", "pkg/networkserver"),
            "retry",
            {"queue_full": True},
        ),
        (
            _error(429, "rate_limit_exceeded", **{"X-Rate-Limit-Retry": "3"}),
            "retry",
            {"retry_after_s": 4.0},
        ),
        (_error(503, "peer_unavailable"), "retry", {"outcome_unknown": True}),
        (httpx.Response(502, text="Bad Gateway"), "retry", {"outcome_unknown": True}),
        # A proxy's request timeout never reached TTS; grpc-gateway's Canceled (499) may
        # have, after TTS began handling the push: verify before pushing again.
        (httpx.Response(408, text="Request Timeout"), "retry", {"outcome_unknown": False}),
        (_error(499, "context_canceled", "pkg/errors"), "retry", {"outcome_unknown": True}),
    ],
)
def test_each_answer_has_a_verdict(
    response: httpx.Response, kind: str, flags: dict[str, object]
) -> None:
    outcome = classify_response(response)
    assert outcome.kind == kind
    for name, value in flags.items():
        assert getattr(outcome, name) == value
    if kind != "queued":
        assert outcome.error is not None
        if response.headers.get("content-type") == "application/json":
            assert outcome.error.startswith("pkg/")  # the TTS error name comes first


def test_rate_limit_header_in_either_spelling_plus_one_second() -> None:
    assert rate_limit_retry_s(httpx.Headers({"X-Ratelimit-Retry": "0"})) == 1.0
    assert rate_limit_retry_s(httpx.Headers({"X-Rate-Limit-Retry": "7"})) == 8.0
    assert rate_limit_retry_s(httpx.Headers({})) is None


def test_only_a_connect_failure_is_known_not_to_have_reached_tts() -> None:
    request = httpx.Request("POST", "https://tts.example")
    assert not transport_outcome(httpx.ConnectError("refused", request=request)).outcome_unknown
    assert transport_outcome(httpx.ReadTimeout("slow", request=request)).outcome_unknown
    assert transport_outcome(TimeoutError()).error == "transport: TimeoutError"
