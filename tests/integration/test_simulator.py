"""The simulated Things Stack behaves like TTS on the wire (TTS_WIRE §1-§7), over loopback."""

from __future__ import annotations

import base64
import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from ingestd.sim import events as eventgen
from ingestd.sim.server import Simulator

APP = "sim-app"
APP_IDS = {"application_ids": {"application_id": APP}}


def dev_ids(device_id: str) -> dict[str, Any]:
    return {"device_ids": {"device_id": device_id, "application_ids": {"application_id": APP}}}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(seed=7, devices=3) as s:
        yield s


class Stream:
    """A ``POST /api/v3/events`` response read frame by frame, as a TTS client must."""

    def __init__(
        self,
        sim: Simulator,
        body: dict[str, Any],
        *,
        accept: str = "text/event-stream",
        key: str | None = "default",
        headers: dict[str, str] | None = None,
        read_timeout_s: float = 3.0,
    ) -> None:
        hdrs = {"Accept": accept, **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {sim.api_key if key == 'default' else key}"
        self.client = httpx.Client(timeout=httpx.Timeout(5.0, read=read_timeout_s))
        self.cm = self.client.stream(
            "POST", f"{sim.base_url}/api/v3/events", json=body, headers=hdrs
        )
        self.resp = self.cm.__enter__()
        self.delim = b"\n\n" if self.resp.headers["content-type"] == "text/event-stream" else b"\n"
        self.chunks = self.resp.iter_bytes()
        self.buf = b""
        self.raw = b""
        self.ended = False

    def frames(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` frames (``{"result":…}`` or ``{"error":…}``)."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            if self.delim in self.buf:
                frame, self.buf = self.buf.split(self.delim, 1)
                out.append(orjson.loads(frame))
                continue
            chunk = next(self.chunks, None)
            if chunk is None:
                self.ended = True
                raise AssertionError(f"stream ended after {len(out)} of {n} frames")
            self.raw += chunk
            self.buf += chunk
        return out

    def events(self, n: int) -> list[dict[str, Any]]:
        return [f["result"] for f in self.frames(n)]

    def rest(self) -> list[dict[str, Any]]:
        """Every remaining frame until the server ends the response."""
        for chunk in self.chunks:
            self.raw += chunk
            self.buf += chunk
        self.ended = True
        parts = [p for p in self.buf.split(self.delim) if p]
        self.buf = b""
        return [orjson.loads(p) for p in parts]

    def _raw_frame(self) -> bytes:
        """The next frame's bytes, undecoded (it may be a poison frame)."""
        while self.delim not in self.buf:
            chunk = next(self.chunks, None)
            assert chunk is not None, "stream ended"
            self.buf += chunk
        frame, self.buf = self.buf.split(self.delim, 1)
        return frame

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _stopping(sim: Simulator) -> Iterator[Simulator]:
    """Stop ``sim`` on exit, whatever happened (stop() is idempotent)."""
    try:
        yield sim
    finally:
        sim.stop()


def post(
    sim: Simulator,
    path: str,
    body: Any = None,
    *,
    key: str | None = "default",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> httpx.Response:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {sim.api_key if key == 'default' else key}"
    content = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
    return httpx.request(
        method, f"{sim.base_url}{path}", content=content, headers=hdrs, timeout=5.0
    )


def push(
    sim: Simulator, device: str, *items: dict[str, Any], op: str = "push", **kw: Any
) -> httpx.Response:
    path = f"/api/v3/as/applications/{APP}/devices/{device}/down/{op}"
    return post(sim, path, {"downlinks": list(items)}, **kw)


def wait_for(pred: Any, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- framing, start frame, heartbeats -----------------------------------------------------


def test_exact_event_stream_accept_gets_blank_line_framing_and_start_frame(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS]}, headers={"X-Request-ID": "req-abc"}) as s:
        assert s.resp.status_code == 200
        assert s.resp.headers["content-type"] == "text/event-stream"
        assert s.resp.headers["x-request-id"] == "req-abc"
        (start,) = s.events(1)
        assert s.raw.startswith(b'{"result":{"name":"events.stream.start",')
        assert s.raw.endswith(b"}}\n\n")
    assert list(start) == ["name", "time", "identifiers", "correlation_ids", "origin", "unique_id"]
    assert start["identifiers"] == [APP_IDS]
    assert start["correlation_ids"] == ["rpc:/ttn.lorawan.v3.Events/Stream:req-abc"]
    assert len(start["unique_id"]) == 26
    assert abs(eventgen.parse_time_ns(start["time"]) - time.time_ns()) < 5 * 10**9
    assert sim.stream_requests[-1].authorization_present


@pytest.mark.parametrize("accept", ["text/event-stream, */*", "*/*", "application/json"])
def test_any_other_accept_gets_ndjson(sim: Simulator, accept: str) -> None:
    sim.uplinks(2)
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 5}, accept=accept) as s:
        assert s.resp.headers["content-type"] == "application/json"
        events = s.events(3)
    assert [e["name"] for e in events] == ["events.stream.start"] + ["as.up.data.forward"] * 2
    assert b"\n\n" not in s.raw
    assert s.raw.count(b"\n") == 3


def test_stream_sends_nothing_after_the_start_frame_without_events(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS]}, read_timeout_s=0.5) as s:
        s.events(1)
        with pytest.raises(httpx.ReadTimeout):
            s.frames(1)


def test_names_filter_expands_regexps_and_filters_events(sim: Simulator) -> None:
    body = {"identifiers": [APP_IDS], "names": ["as.up.join.forward", r"/^as\.down\.data\.ack/"]}
    with Stream(sim, body) as s:
        (start,) = s.events(1)
        sim.uplink("dev-0001")
        join = sim.join("dev-0002")
        (event,) = s.events(1)
    assert start["data"] == {
        "@type": "type.googleapis.com/google.protobuf.Value",
        "value": ["as.down.data.ack.forward", "as.up.join.forward"],
    }
    assert event["unique_id"] == join["unique_id"]


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["as.down.ack.forward"], "unknown_event_name"),
        (["events.stream.start"], "unknown_event_name"),
        (["/^as\\.down\\.queued/"], "no_matching_events"),
        (["/as.(/"], "invalid_regexp"),
    ],
)
def test_bad_names_fail_before_the_stream_with_an_error_frame(
    sim: Simulator, names: list[str], error: str
) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "names": names}) as s:
        assert s.resp.status_code == 400
        (frame,) = s.rest()
    assert s.raw.endswith(b"}\n\n")
    assert frame["error"]["code"] == 3
    assert frame["error"]["details"][0]["name"] == error


# --- auth and request errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "status", "name", "namespace"),
    [
        (
            "NNSXS.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.BBBB",
            401,
            "api_key_not_found",
            "pkg/identityserver",
        ),
        (None, 403, "no_application_rights", "pkg/auth/rights"),
        ("not-a-token", 400, "token", "pkg/auth"),
    ],
)
def test_stream_auth_errors_have_tts_bodies(
    sim: Simulator, key: str | None, status: int, name: str, namespace: str
) -> None:
    with Stream(sim, {"identifiers": [APP_IDS]}, key=key, accept="*/*") as s:
        assert s.resp.status_code == status
        (frame,) = s.rest()
    detail = frame["error"]["details"][0]
    assert (detail["name"], detail["namespace"]) == (name, namespace)
    assert frame["error"]["message"].startswith(f"error:{namespace}:{name} (")
    assert detail["@type"] == "type.googleapis.com/ttn.lorawan.v3.ErrorDetails"


def test_other_application_is_forbidden_but_wrong_secret_is_unauthenticated(sim: Simulator) -> None:
    other = {"application_ids": {"application_id": "other-app"}}
    with Stream(sim, {"identifiers": [APP_IDS, other]}) as s:
        assert s.resp.status_code == 403
        assert s.rest()[0]["error"]["details"][0]["attributes"] == {"uid": "other-app"}
    wrong_secret = sim.api_key.rpartition(".")[0] + ".WRONG"
    with Stream(sim, {"identifiers": [APP_IDS]}, key=wrong_secret) as s:
        assert s.resp.status_code == 401
        assert s.rest()[0]["error"]["details"][0]["name"] == "invalid_authorization"


def test_invalid_json_gets_a_bare_status_and_empty_identifiers_no_identifiers(
    sim: Simulator,
) -> None:
    r = post(sim, "/api/v3/events", b"{not json")
    assert r.status_code == 400
    assert set(r.json()) == {"code", "message"} and r.json()["code"] == 3
    r = post(sim, "/api/v3/events", {"identifiers": []})
    assert r.status_code == 400
    assert r.json()["error"]["details"][0]["name"] == "no_identifiers"


# --- history: after, tail, sparse, no store -----------------------------------------------


def test_after_is_exclusive_at_millisecond_resolution(sim: Simulator) -> None:
    base = (datetime.now(UTC) - timedelta(seconds=5)).replace(microsecond=100_000)
    same_ms_early = sim.uplink("dev-0001", time=base + timedelta(microseconds=200))
    same_ms_late = sim.uplink("dev-0001", time=base + timedelta(microseconds=700))
    next_ms = sim.uplink("dev-0001", time=base + timedelta(microseconds=1000))
    assert same_ms_early and same_ms_late
    after = eventgen.format_time(base + timedelta(microseconds=200))  # = same_ms_early's time
    with Stream(sim, {"identifiers": [APP_IDS], "after": after, "tail": 100}) as s:
        events = s.events(2)
        sim.uplink("dev-0002")
        live = s.events(1)
    assert [e["unique_id"] for e in events[1:]] == [next_ms["unique_id"]]
    assert live[0]["identifiers"][0]["device_ids"]["device_id"] == "dev-0002"
    assert sim.stream_requests[-1].after == after


def test_tail_returns_the_last_n_and_names_filter_after_counting(sim: Simulator) -> None:
    ups = sim.uplinks(6)
    join = sim.join("dev-0001")
    last = sim.uplink("dev-0002")
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 3}) as s:
        got = [e["unique_id"] for e in s.events(4)[1:]]
    assert got == [ups[-1]["unique_id"], join["unique_id"], last["unique_id"]]
    # The last 2 entries are join + uplink; the name filter keeps only the join.
    body = {"identifiers": [APP_IDS], "tail": 2, "names": ["as.up.join.forward"]}
    with Stream(sim, body, read_timeout_s=0.3) as s:
        assert s.events(2)[1]["unique_id"] == join["unique_id"]
        with pytest.raises(httpx.ReadTimeout):
            s.frames(1)


def test_replay_is_per_identifier_one_after_another(sim: Simulator) -> None:
    a = sim.uplinks(2, devices=["dev-0001"])
    b = sim.uplinks(2, devices=["dev-0002"])
    body = {"identifiers": [dev_ids("dev-0002"), dev_ids("dev-0001")], "tail": 10}
    with Stream(sim, body) as s:
        got = [e["unique_id"] for e in s.events(5)[1:]]
    assert got == [e["unique_id"] for e in b + a]


def test_replay_after_payload_ttl_is_sparse_but_live_events_are_full(sim: Simulator) -> None:
    (old,) = sim.uplinks(1)
    sim.expire_payloads()
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        sparse = s.events(2)[1]
        new = sim.uplink("dev-0001")
        (live,) = s.events(1)
    assert list(sparse) == ["name", "time", "identifiers", "context", "visibility", "unique_id"]
    assert sparse["unique_id"] == old["unique_id"] and sparse["time"] == old["time"]
    assert sparse["identifiers"] == [dev_ids("dev-0001")]
    assert live == new


def test_no_store_warns_and_streams_live_events_only() -> None:
    with Simulator(store=False, seed=1) as sim:
        sim.uplinks(3)
        with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
            assert s.resp.headers["x-warning"] == "Events storage is not enabled"
            s.events(1)
            new = sim.uplink("dev-0001")
            assert s.events(1)[0]["unique_id"] == new["unique_id"]


def test_store_without_after_or_tail_is_live_only(sim: Simulator) -> None:
    sim.uplinks(3)
    with Stream(sim, {"identifiers": [APP_IDS]}) as s:
        assert "x-warning" not in s.resp.headers
        s.events(1)
        new = sim.uplink("dev-0003")
        assert s.events(1)[0]["unique_id"] == new["unique_id"]


def test_events_published_during_the_stream_are_neither_lost_nor_repeated(sim: Simulator) -> None:
    first = sim.uplinks(40)
    publisher = threading.Thread(target=sim.uplinks, args=(60,))
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 1000}) as s:
        s.events(1)
        publisher.start()
        got = [e["unique_id"] for e in s.events(100)]
        publisher.join()
    assert len(set(got)) == 100
    assert set(got) >= {e["unique_id"] for e in first}


def test_full_buffer_drops_events_like_tts(sim: Simulator) -> None:
    sim.uplinks(20)
    after = eventgen.format_time(datetime.now(UTC) - timedelta(minutes=1))
    # tail=0: the buffer is clamp(0, 8, 1024) = 8, and the replay arrives all at once.
    with Stream(sim, {"identifiers": [APP_IDS], "after": after}, read_timeout_s=0.3) as s:
        assert len(s.events(9)) == 9
        with pytest.raises(httpx.ReadTimeout):
            s.frames(1)
    assert sim.dropped_events == 12


# --- subscriptions ------------------------------------------------------------------------


def test_device_only_events_are_not_on_the_application_stream(sim: Simulator) -> None:
    sim.downlink_ack_delay_s = sim.downlinks.ack_delay_s = 30.0
    with (
        Stream(sim, {"identifiers": [APP_IDS]}) as app,
        Stream(sim, {"identifiers": [dev_ids("dev-0001")]}) as dev,
    ):
        app.events(1)
        dev.events(1)
        assert push(sim, "dev-0001", {"f_port": 1, "frm_payload": "AQ=="}).status_code == 200
        assert [e["name"] for e in dev.events(2)] == [
            "as.down.data.receive",
            "as.down.data.forward",
        ]
        sim.uplink("dev-0001")
        assert [e["name"] for e in app.events(2)] == ["as.down.data.receive", "as.up.data.forward"]


def test_app_and_device_subscription_with_a_store_sends_duplicates_like_tts(sim: Simulator) -> None:
    (old,) = sim.uplinks(1, devices=["dev-0001"])
    with Stream(sim, {"identifiers": [APP_IDS, dev_ids("dev-0001")], "tail": 10}) as s:
        replayed = [e["unique_id"] for e in s.events(3)[1:]]
        new = sim.uplink("dev-0001")
        live = [e["unique_id"] for e in s.events(2)]
    assert replayed == [old["unique_id"]] * 2
    assert live == [new["unique_id"]] * 2


# --- stream faults ------------------------------------------------------------------------


def test_drop_every_n_frames_ends_the_stream(sim: Simulator) -> None:
    sim.uplinks(5)
    sim.drop_every_n_frames = 2
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        frames = s.rest()
    assert [f["result"]["name"] for f in frames] == ["events.stream.start"] + [
        "as.up.data.forward"
    ] * 2


def test_error_frame_ends_the_stream_with_api_key_expired(sim: Simulator) -> None:
    sim.uplinks(1)
    sim.error_frame_after_n = 1
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        assert s.resp.status_code == 200
        frames = s.rest()
    assert "result" in frames[1] and frames[2]["error"]["code"] == 16
    assert frames[2]["error"]["details"][0]["name"] == "api_key_expired"


def test_failed_requests_rate_limit_and_restart(sim: Simulator) -> None:
    sim.fail_next_requests = [503]
    r = post(sim, "/api/v3/events", {"identifiers": [APP_IDS]})
    assert r.status_code == 503
    assert r.json()["error"]["details"][0]["name"] == "peer_unavailable"
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        s.events(1)
        sim.restart()
        assert s.rest() == []
    assert sim.conns == set()


def test_stall_streams_sends_nothing_for_a_while_on_an_open_connection(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        s.events(1)  # the stream start
        sim.stall_streams(0.6)
        started = time.monotonic()
        sent = sim.uplinks(3)
        got = s.events(3)  # arrive once the stall is over, on the same connection
        assert time.monotonic() - started >= 0.5
        assert [e["unique_id"] for e in got] == [e["unique_id"] for e in sent]
        assert len(sim.conns) == 1


def test_reset_streams_cuts_the_connection_without_a_clean_end(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        s.events(1)
        sim.reset_streams()
        with pytest.raises(httpx.RemoteProtocolError):
            s.rest()
    wait_for(lambda: not sim.conns)


@pytest.mark.parametrize("kind", ["bad_field", "truncated", "bad_identifiers", "huge_f_cnt", "nul"])
def test_poison_events_are_stored_and_replayed_with_their_unique_id_on_the_wire(
    sim: Simulator, kind: str
) -> None:
    before = sim.uplinks(1)[0]
    poison = sim.poison(kind, "dev-0002")
    after = sim.uplinks(1)[0]
    assert sim.poisoned == [poison]
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        s.frames(1)  # the stream start
        frames = [s._raw_frame() for _ in range(3)]
    assert orjson.loads(frames[0])["result"]["unique_id"] == before["unique_id"]
    assert orjson.loads(frames[2])["result"]["unique_id"] == after["unique_id"]
    raw = frames[1]
    assert poison.unique_id.encode() in raw
    if kind == "truncated":
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
        return
    event = orjson.loads(raw)["result"]
    if kind == "bad_field":
        assert event["data"]["uplink_message"]["f_port"] == "two"
    elif kind == "bad_identifiers":
        assert event["identifiers"] == [{"device_ids": "dev-0002"}]
    elif kind == "huge_f_cnt":
        assert event["data"]["uplink_message"]["f_cnt"] == 2**63 + 7
    else:
        assert event["unique_id"] == poison.unique_id + "\x00"


def test_rate_limited_stream_accepts_answer_429_with_retry_header() -> None:
    with Simulator(rate_limit_per_min=2, seed=3) as sim:
        for _ in range(2):
            with Stream(sim, {"identifiers": [APP_IDS]}) as s:
                assert s.resp.status_code == 200
                assert s.resp.headers["x-rate-limit-limit"] == "2"
                assert s.resp.headers["x-rate-limit-retry"] == "0"
        r = post(sim, "/api/v3/events", {"identifiers": [APP_IDS]})
        assert r.status_code == 429
        assert int(r.headers["x-rate-limit-retry"]) >= 29
        assert r.json()["error"]["details"][0]["name"] == "rate_limit_exceeded"


def test_stop_returns_within_a_second_with_a_stream_open() -> None:
    sim = Simulator(seed=5).start()
    try:
        with Stream(sim, {"identifiers": [APP_IDS]}) as s:
            s.events(1)
            started = time.monotonic()
            sim.stop()
            assert time.monotonic() - started < 1.0
            assert s.rest() == []
    finally:
        sim.stop()  # a no-op once stopped; stops it when an assertion failed first


def test_stop_returns_within_a_second_when_the_client_stopped_reading() -> None:
    sim = Simulator(seed=6, devices=5).start()
    host, port = sim.base_url.removeprefix("http://").split(":")
    body = orjson.dumps({"identifiers": [APP_IDS], "tail": 1024})
    with socket.socket() as client, _stopping(sim):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((host, int(port)))
        client.sendall(
            b"POST /api/v3/events HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer "
            + sim.api_key.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        wait_for(lambda: len(sim.conns) == 1)
        sim.uplinks(1500)  # far more than the socket buffers hold: the writer blocks
        wait_for(lambda: any(s.buffer for s in sim.event_store.subscriptions))
        started = time.monotonic()
        sim.stop()
        assert time.monotonic() - started < 1.0


# --- downlink API -------------------------------------------------------------------------


def test_push_replace_and_list(sim: Simulator) -> None:
    sim.downlinks.ack_delay_s = 30.0
    r = push(
        sim,
        "dev-0001",
        {"f_port": 10, "frm_payload": "AQI=", "priority": "HIGH"},
        headers={"X-Request-ID": "req-1"},
    )
    assert (r.status_code, r.json(), r.headers["x-request-id"]) == (200, {}, "req-1")
    assert push(sim, "dev-0001", {"fPort": 11, "decodedPayload": {"on": True}}).status_code == 200
    listed = post(sim, f"/api/v3/as/applications/{APP}/devices/dev-0001/down", method="GET")
    assert listed.json() == {"downlinks": sim.queue("dev-0001")}
    first, second = listed.json()["downlinks"]
    assert (first["f_port"], first["f_cnt"], first["priority"]) == (10, 1, "HIGH")
    assert "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:req-1" in first["correlation_ids"]
    assert second["decoded_payload"] == {"on": True} and second["f_cnt"] == 2
    assert (
        push(sim, "dev-0001", {"f_port": 3, "frm_payload": "AA=="}, op="replace").status_code == 200
    )
    assert [(d["f_port"], d["f_cnt"]) for d in sim.queue("dev-0001")] == [(3, 1)]
    assert push(sim, "dev-0001", op="replace").status_code == 200
    assert sim.queue("dev-0001") == []
    assert [(r.op, r.status) for r in sim.downlink_requests] == [
        ("push", 200),
        ("push", 200),
        ("list", 200),
        ("replace", 200),
        ("replace", 200),
    ]
    assert sim.downlink_requests[0].headers["authorization"].endswith(".…")


@pytest.mark.parametrize(
    ("item", "status", "name", "field"),
    [
        ({"f_port": 224, "frm_payload": "AQ=="}, 400, "validation", "f_port"),
        ({"f_port": 256, "frm_payload": "AQ=="}, 400, "validation", "f_port"),
        (
            {"f_port": 1, "frm_payload": base64.b64encode(bytes(256)).decode()},
            400,
            "validation",
            "frm_payload",
        ),
        ({"f_port": 1, "frm_payload": "AQ==", "priority": 9}, 400, "validation", "priority"),
        (
            {"f_port": 1, "frm_payload": "AQ==", "correlation_ids": ["x" * 101]},
            400,
            "validation",
            "correlation_ids[0]",
        ),
        ({"frm_payload": "AQ=="}, 400, "no_f_port", None),
        ({"f_port": 1}, 400, "no_payload", None),
        (
            {"f_port": 1, "frm_payload": base64.b64encode(bytes(243)).decode()},
            400,
            "application_downlink_too_long",
            None,
        ),
    ],
)
def test_push_validation_errors(
    sim: Simulator, item: dict[str, Any], status: int, name: str, field: str | None
) -> None:
    r = push(sim, "dev-0001", item)
    detail = r.json()["details"][0]
    assert (r.status_code, detail["name"]) == (status, name)
    if field is not None:
        assert detail["namespace"] == "pkg/errors"
        assert detail["attributes"]["field"] == "downlinks[0]"
        assert detail["cause"]["attributes"]["field"] == field
    assert sim.queue("dev-0001") == []


def test_push_auth_unknown_device_and_queue_capacity() -> None:
    with Simulator(queue_capacity=2, downlink_ack_delay_s=30.0, seed=9) as sim:
        r = push(sim, "dev-0001", {"f_port": 1, "frm_payload": "AQ=="}, key="NNSXS.X.Y")
        assert r.status_code == 401 and r.headers["www-authenticate"] == r.json()["message"]
        r = push(sim, "dev-0001", {"f_port": 1, "frm_payload": "AQ=="}, key=None)
        assert (r.status_code, r.json()["details"][0]["name"]) == (403, "no_application_rights")
        r = push(sim, "dev-9999", {"f_port": 1, "frm_payload": "AQ=="})
        assert (r.status_code, r.json()["details"][0]["attributes"]) == (
            404,
            {"device_uid": "sim-app.dev-9999"},
        )
        assert push(sim, "dev-0001", *[{"f_port": 1, "frm_payload": "AQ=="}] * 2).status_code == 200
        r = push(sim, "dev-0001", {"f_port": 1, "frm_payload": "AQ=="})
        assert (r.status_code, r.json()["details"][0]["name"]) == (429, "downlink_queue_capacity")


def test_forced_push_failures_then_success(sim: Simulator) -> None:
    sim.fail_next_pushes["dev-0002"] = [503, 429]
    item = {"f_port": 1, "frm_payload": "AQ=="}
    assert push(sim, "dev-0002", item).status_code == 503
    r = push(sim, "dev-0002", item)
    assert r.status_code == 429 and r.headers["x-rate-limit-retry"] == "1"
    assert push(sim, "dev-0002", item).status_code == 200


def test_lifecycle_events_carry_the_client_correlation_id(sim: Simulator) -> None:
    cid = "ingestd:outbox:7"
    with Stream(sim, {"identifiers": [dev_ids("dev-0001")]}) as s:
        s.events(1)
        r = push(
            sim,
            "dev-0001",
            {"f_port": 5, "frm_payload": "AQI=", "confirmed": True, "correlation_ids": [cid]},
            headers={"X-Request-ID": "req-7"},
        )
        assert r.status_code == 200
        receive, forward, sent, ack = s.events(4)
    assert [e["name"] for e in (receive, forward, sent, ack)] == [
        "as.down.data.receive",
        "as.down.data.forward",
        "as.down.data.sent.forward",
        "as.down.data.ack.forward",
    ]
    rpc = "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:req-7"
    assert cid not in receive["correlation_ids"] and rpc in receive["correlation_ids"]
    assert cid in receive["data"]["correlation_ids"]
    assert "f_cnt" not in receive["data"] and forward["data"]["f_cnt"] == 1
    assert forward["data"]["frm_payload"] != "AQI="  # encrypted
    assert (
        cid in sent["correlation_ids"]
        and sent["correlation_ids"] == sent["data"]["correlation_ids"]
    )
    assert cid in sent["data"]["downlink_sent"]["correlation_ids"]
    assert cid in ack["data"]["downlink_ack"]["correlation_ids"]
    assert sim.queue("dev-0001") == []


def test_failing_device_downlink_ends_in_failed_forward(sim: Simulator) -> None:
    sim.failing_devices.add("dev-0003")
    assert (
        push(
            sim, "dev-0003", {"f_port": 1, "frm_payload": "AQ==", "correlation_ids": ["c:1"]}
        ).status_code
        == 200
    )
    wait_for(lambda: sim.events[-1]["name"] == "as.down.data.failed.forward")
    failed = sim.events[-1]["data"]["downlink_failed"]
    assert "c:1" in failed["downlink"]["correlation_ids"]
    assert failed["error"]["name"] == "transmission"


# --- event builders -----------------------------------------------------------------------


def test_uplink_event_is_wire_shaped_and_about_2_5_kb(sim: Simulator) -> None:
    ev = sim.uplink("dev-0001")
    assert list(ev) == [
        "name",
        "time",
        "identifiers",
        "data",
        "correlation_ids",
        "origin",
        "context",
        "visibility",
        "unique_id",
    ]
    up = ev["data"]["uplink_message"]
    assert isinstance(up["settings"]["frequency"], str) and len(up["rx_metadata"]) == 2
    assert ev["identifiers"][0]["device_ids"]["dev_eui"] == "70B3D57ED0050001"
    assert ev["time"].endswith("Z") and len(ev["time"].split(".")[1]) in (4, 7, 10)
    assert 2000 < len(orjson.dumps(ev)) < 3200
    fsk = eventgen.uplink_event(
        application_id=APP,
        device_id="d-1",
        dev_eui="00" * 8,
        f_cnt=1,
        f_port=1,
        payload=b"\x01",
        time=datetime.now(UTC),
        unique_id=eventgen.new_ulid(),
        fsk=True,
        gateways=1,
        rng=random.Random(1),
    )
    fsk_up = fsk["data"]["uplink_message"]
    assert fsk_up["settings"]["data_rate"] == {"fsk": {"bit_rate": 50000}}
    assert "snr" not in fsk_up["rx_metadata"][0]


def test_ulids_are_monotonic_within_a_millisecond_and_encode_time() -> None:
    t = datetime(2024, 10, 30, 9, 15, 40, 349000, tzinfo=UTC)
    ids = [eventgen.new_ulid(t) for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert all(len(u) == 26 for u in ids)
    assert eventgen.ulid_time(ids[0]) == t
    assert eventgen.format_time(t) == "2024-10-30T09:15:40.349Z"
    assert eventgen.format_time(t, 5) == "2024-10-30T09:15:40.349000005Z"
