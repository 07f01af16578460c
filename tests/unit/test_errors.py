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
