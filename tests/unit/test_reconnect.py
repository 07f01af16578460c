"""How each way a stream connection ends is retried, and the reason it is counted under."""

from __future__ import annotations

import pytest

from ingestd.consumer import classify_disconnect
from ingestd.errors import (
    AuthRejected,
    MalformedEvent,
    RateLimited,
    RequestRejected,
    ServerUnavailable,
    StoreUnavailable,
    StreamDisconnected,
    StreamError,
)


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        pytest.param(
            RateLimited("429", retry_after_s=3.0), "rate_limited", "rate_limited", id="429"
        ),
        pytest.param(AuthRejected("401", status_code=401), "refused", "auth", id="401"),
        pytest.param(AuthRejected("403", status_code=403), "refused", "auth", id="403"),
        pytest.param(
            RequestRejected("400", status_code=400, error_name="unknown_event_name"),
            "refused",
            "rejected",
            id="400 unknown_event_name",
        ),
        # An error frame about the key (Unauthenticated, PermissionDenied) is a refusal too.
        pytest.param(StreamError("frame", status_code=16), "refused", "auth", id="frame code 16"),
        pytest.param(StreamError("frame", status_code=7), "refused", "auth", id="frame code 7"),
        pytest.param(
            StreamError("frame", status_code=13), "backoff", "stream_error", id="frame 13"
        ),
        pytest.param(
            StreamDisconnected("idle", reason="idle_timeout"), "backoff", "idle_timeout", id="idle"
        ),
        pytest.param(
            StreamDisconnected("closed", reason="server_closed"),
            "backoff",
            "server_closed",
            id="closed",
        ),
        pytest.param(
            StreamDisconnected("junk", reason="reject_flood"), "backoff", "reject_flood", id="flood"
        ),
        pytest.param(
            ServerUnavailable("503", status_code=503), "backoff", "server_error", id="5xx"
        ),
        pytest.param(StoreUnavailable("db down"), "backoff", "server_error", id="transient"),
        pytest.param(MalformedEvent("bad"), "backoff", "error", id="permanent"),
        pytest.param(ZeroDivisionError("bug"), "backoff", "unexpected", id="a bug"),
    ],
)
def test_each_end_of_a_connection_has_one_retry_kind_and_reason(
    exc: BaseException, kind: str, reason: str
) -> None:
    assert classify_disconnect(exc) == (kind, reason)
