"""Retries are decided by class: the tree says which errors are transient, with data attached."""

from __future__ import annotations

import httpx
import pytest

from ingestd import tts
from ingestd.errors import (
    AuthRejected,
    IngestdError,
    PermanentError,
    RateLimited,
    RequestRejected,
    ServerUnavailable,
    TransientError,
)

BODY_404 = (
    b'{"code":5,"message":"error:pkg/applicationserver:device_not_found (device `a.d` not found)",'
    b'"details":[{"@type":"type.googleapis.com/ttn.lorawan.v3.ErrorDetails",'
    b'"namespace":"pkg/applicationserver","name":"device_not_found","code":5}]}'
)


@pytest.mark.parametrize(
    ("status", "headers", "body", "cls", "transient"),
    [
        (
            401,
            {},
            b'{"code":16,"message":"x","details":[{"name":"api_key_not_found"}]}',
            AuthRejected,
            False,
        ),
        (
            403,
            {},
            b'{"code":7,"message":"x","details":[{"name":"no_application_rights"}]}',
            AuthRejected,
            False,
        ),
        (404, {}, BODY_404, RequestRejected, False),
        (400, {}, b'{"code":3,"message":"bad json"}', RequestRejected, False),
        (503, {}, b"", ServerUnavailable, True),
        # A proxy's request timeout and grpc-gateway's Canceled: ask again, with backoff
        # (not the long auth_retry_s wait of a permanent error).
        (408, {}, b"", ServerUnavailable, True),
        (425, {}, b"", ServerUnavailable, True),
        (499, {}, b'{"code":1,"message":"context canceled"}', ServerUnavailable, True),
        (
            429,
            {"X-Rate-Limit-Retry": "4"},
            b'{"code":8,"message":"x","details":[{"name":"rate_limit_exceeded"}]}',
            RateLimited,
            True,
        ),
    ],
)
def test_responses_map_to_the_class_that_decides_retrying(
    status: int, headers: dict[str, str], body: bytes, cls: type[IngestdError], transient: bool
) -> None:
    response = httpx.Response(status, headers=headers, content=body)
    err = tts.error_for_response(response, body)
    assert type(err) is cls
    assert isinstance(err, TransientError) is transient
    assert isinstance(err, PermanentError) is not transient
    assert err.status_code == status  # type: ignore[attr-defined]


def test_404_carries_the_tts_error_name_and_message() -> None:
    err = tts.error_for_response(httpx.Response(404, content=BODY_404), BODY_404)
    assert err.error_name == "device_not_found"  # type: ignore[attr-defined]
    assert "pkg/applicationserver:device_not_found" in str(err)


def test_rate_limit_waits_the_header_plus_one_second_in_either_spelling() -> None:
    for name in ("X-Rate-Limit-Retry", "X-Ratelimit-Retry"):
        r = httpx.Response(429, headers={name: "3"})
        err = tts.error_for_response(r, b"")
        assert isinstance(err, RateLimited)
        assert err.retry_after_s == 4.0


def test_docstring_is_the_default_message() -> None:
    assert str(ServerUnavailable()) == "The Things Stack answered with a server error."


def _push_answer(status: int, body: bytes) -> httpx.Response:
    request = httpx.Request(
        "POST", "https://tts.example/api/v3/as/applications/a/devices/d/down/push"
    )
    return httpx.Response(status, content=body, request=request)


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 408, 409, 425, 429, 499, 500, 502, 503, 504]
)
def test_the_stream_and_the_downlink_worker_read_an_answer_alike(status: int) -> None:
    """One classifier: a status the stream retries the worker retries; an auth problem is one
    on both paths; what the stream gives up on, the worker fails."""
    from ingestd.outbox.rules import classify_response

    body = b'{"code":2,"message":"x","details":[{"namespace":"pkg/x","name":"some_error"}]}'
    stream_error = tts.error_for_response(httpx.Response(status, content=body), body)
    outcome = classify_response(_push_answer(status, body))
    assert (outcome.kind == "retry") is isinstance(stream_error, TransientError)
    assert outcome.auth_rejected is isinstance(stream_error, AuthRejected)
    assert outcome.error == "pkg/x:some_error: x"
    assert str(stream_error) == f"HTTP {status}: pkg/x:some_error: x"


def test_an_answer_without_a_tts_error_reads_as_its_status_and_body() -> None:
    verdict = tts.classify(502, b"  <html>Bad Gateway</html>\n", httpx.Headers())
    assert verdict.error == verdict.message == "HTTP 502: <html>Bad Gateway</html>"
    assert tts.classify(504, b"", httpx.Headers()).message == "HTTP 504"


@pytest.mark.parametrize(
    ("status", "reached"), [(500, True), (503, True), (499, True), (408, False), (425, False)]
)
def test_only_answers_before_tts_acted_are_known_not_to_have_reached_it(
    status: int, reached: bool
) -> None:
    assert tts.classify(status, b"", httpx.Headers()).may_have_reached is reached
