"""Health is progress: the three clocks of ``metrics.stream_health``, and bounded labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from ingestd import metrics


def test_every_event_name_ingestd_handles_is_its_own_label() -> None:
    from ingestd.normalize import _HANDLERS

    assert set(_HANDLERS) <= metrics.KNOWN_EVENT_NAMES
    assert metrics.event_label("as.up.data.forward") == "as.up.data.forward"
    assert metrics.event_label("ns.down.data.schedule.attempt") == "ns.down.data.schedule.attempt"
    assert metrics.event_label("as.up.data.forward.x") == "other"
    assert metrics.event_label("") == "other"


# --- stream health: the three clocks (pure; ingestd.metrics.stream_health) ----------------------

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
GRACE_S = 180.0
IDLE_S = 120.0


def _ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def _state(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "connected": True,
        "standby": False,
        "permanent_error": False,
        "last_error": None,
        "retrying_since": None,
        "following_since": _ago(3600),
        "last_frame_at": _ago(1),
        "uncommitted_since": None,
        "rights_missing": (),
    }
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "healthy", "shown"),
    [
        pytest.param({}, True, "connected", id="connected-and-reading"),
        # TTS sends no heartbeats: silent up to one idle timeout plus a reconnect is normal.
        pytest.param({"last_frame_at": _ago(IDLE_S + GRACE_S - 1)}, True, "connected", id="quiet"),
        pytest.param(
            {"last_frame_at": _ago(IDLE_S + GRACE_S + 1)},
            False,
            "stalled: no valid frame",
            id="connected-but-no-frame",
        ),
        pytest.param(
            {"last_frame_at": None, "following_since": _ago(IDLE_S + GRACE_S + 1)},
            False,
            "stalled: no valid frame",
            id="never-a-frame",
        ),
        pytest.param(
            {"uncommitted_since": _ago(GRACE_S - 1)},
            True,
            "connected",
            id="slow-commit",
        ),
        pytest.param(
            {"uncommitted_since": _ago(GRACE_S + 1)},
            False,
            "stalled: a batch has waited",
            id="commit-stalled",
        ),
        pytest.param(
            {"connected": False, "retrying_since": _ago(GRACE_S - 1)},
            True,
            "retrying",
            id="retrying-within-grace",
        ),
        pytest.param(
            {"connected": False, "retrying_since": _ago(GRACE_S + 1), "last_error": "boom"},
            False,
            "down: boom",
            id="retrying-too-long",
        ),
        pytest.param(
            {"connected": False, "permanent_error": True, "last_error": "HTTP 401"},
            False,
            "down: HTTP 401",
            id="key-rejected",
        ),
        pytest.param(
            {"rights_missing": ("RIGHT_APPLICATION_TRAFFIC_READ",)},
            False,
            "down: the key lacks RIGHT_APPLICATION_TRAFFIC_READ",
            id="connected-without-traffic-rights",
        ),
        pytest.param(
            {"connected": False, "standby": True, "last_frame_at": None},
            True,
            "standby",
            id="standby",
        ),
    ],
)
def test_stream_health_judges_frames_commits_and_retries(
    fields: dict[str, Any], healthy: bool, shown: str
) -> None:
    ok, status = metrics.stream_health(
        _state(**fields), now=NOW, grace_s=GRACE_S, idle_timeout_s=IDLE_S
    )
    assert (ok, status[: len(shown)]) == (healthy, shown)
