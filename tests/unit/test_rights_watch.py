"""The run-time rights check when TTS's rights endpoint itself fails: a warning, no verdict.

(The simulator always answers ``ListRights``; a 5xx and a refused connection come from an
``httpx.MockTransport`` here. The verdicts themselves are tested against the simulator in
tests/integration/test_fidelity_daemon.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from structlog.testing import capture_logs

from ingestd.config import StreamSettings
from ingestd.rights_watch import watch_rights
from ingestd.secrets import Secret

KEY = "NNSXS." + "A" * 39 + "." + "B" * 52
STREAM = StreamSettings(
    name="app", application_id="sim-app", base_url="http://tts.invalid", api_key=Secret(KEY)
)


def _failing(kind: str, asked_twice: asyncio.Event) -> httpx.MockTransport:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls >= 2:
            asked_twice.set()
        if kind == "transport":
            raise httpx.ConnectError("connection refused", request=request)
        body = {"code": 14, "message": "error:pkg/cluster:peer_unavailable (unavailable)"}
        return httpx.Response(503, json=body)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("kind", ["5xx", "transport"])
async def test_a_failing_rights_endpoint_warns_and_changes_nothing(kind: str) -> None:
    state = SimpleNamespace(rights_missing=("RIGHT_APPLICATION_TRAFFIC_READ",))  # last verdict
    stop, asked_twice = asyncio.Event(), asyncio.Event()
    async with httpx.AsyncClient(transport=_failing(kind, asked_twice)) as client:
        with capture_logs() as logs:
            task = asyncio.create_task(
                watch_rights(STREAM, state, client, stop, downlinks=False, recheck_s=0.01)
            )
            await asyncio.wait_for(asked_twice.wait(), 5)  # checked, then checked again
            stop.set()
            await asyncio.wait_for(task, 5)  # ends on stop, never raised
    unknown = [e for e in logs if e["event"] == "stream_rights_unknown"]
    assert len(unknown) >= 1 and {e["log_level"] for e in unknown} == {"warning"}
    assert state.rights_missing == ("RIGHT_APPLICATION_TRAFFIC_READ",)
    assert not [e for e in logs if e["event"] in ("stream_rights_missing", "stream_rights_ok")]
    assert KEY not in repr(logs)
