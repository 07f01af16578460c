"""The simulator models what TTS v3.32 does beyond the wire format (issue 11): keys with
rights and event visibility, the full event-name catalogue with RE2, simulated uplinks,
entity expiry and the transports TTS serves (gzip, h2c) or suffers (abrupt close)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from ingestd import rights
from ingestd.errors import AuthRejected
from ingestd.sim.server import Simulator

APP = "sim-app"
APP_IDS = {"application_ids": {"application_id": APP}}
INFO_ONLY = ["RIGHT_APPLICATION_INFO"]
CONSOLE_DEFAULT = r"/^ns\.mac\..*\.answer\.reject$/"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(seed=11, devices=3) as s:
        yield s


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Stream:
    """A ``POST /api/v3/events`` read frame by frame (blank-line framing)."""

    def __init__(
        self,
        sim: Simulator,
        body: dict[str, Any],
        *,
        key: str | None = None,
        client: httpx.Client | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client or httpx.Client(timeout=httpx.Timeout(5.0, read=3.0))
        hdrs = {"Accept": "text/event-stream", **auth(key or sim.api_key), **(headers or {})}
        self.cm = self.client.stream(
            "POST", f"{sim.base_url}/api/v3/events", json=body, headers=hdrs
        )
        self.resp = self.cm.__enter__()
        self.chunks = self.resp.iter_bytes()
        self.buf = b""

    def frames(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            if b"\n\n" in self.buf:
                frame, self.buf = self.buf.split(b"\n\n", 1)
                out.append(orjson.loads(frame))
                continue
            chunk = next(self.chunks, None)
            if chunk is None:
                raise AssertionError(f"stream ended after {len(out)} of {n} frames")
            self.buf += chunk
        return out

    def events(self, n: int) -> list[dict[str, Any]]:
        return [f["result"] for f in self.frames(n)]

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def marker(sim: Simulator) -> dict[str, Any]:
    """An event without visibility: every key with access sees it (EventIsVisible)."""
    event = {
        "name": "application.update",
        "time": "2024-10-30T10:00:00Z",
        "identifiers": [APP_IDS],
        "unique_id": sim.ulids(),
    }
    sim.publish(event)
    return event


# --- event names ------------------------------------------------------------------------------


def test_the_consoles_default_filter_opens_a_stream(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "names": [CONSOLE_DEFAULT]}) as s:
        assert s.resp.status_code == 200
        (start,) = s.events(1)
        assert start["name"] == "events.stream.start"
        assert len(start["data"]["value"]) == 9
        assert "ns.mac.link_adr.answer.reject" in start["data"]["value"]


@pytest.mark.parametrize(
    ("names", "status", "error_name"),
    [
        pytest.param([r"/^as\.(?!down)/"], 400, "invalid_regexp", id="lookahead: RE2 rejects"),
        pytest.param([r"/forward\Z/"], 400, "invalid_regexp", id="backslash-Z: RE2 rejects"),
        pytest.param([r"/^as\.up\.data\.forward\z/"], 200, None, id="backslash-z: RE2 accepts"),
        pytest.param(["gs.gateway.connection.stats"], 200, None, id="a name the old table lacked"),
        pytest.param(["as.down.ack.forward"], 400, "unknown_event_name", id="not a TTS name"),
    ],
)
def test_names_are_matched_with_re2_against_the_full_catalogue(
    sim: Simulator, names: list[str], status: int, error_name: str | None
) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "names": names}) as s:
        assert s.resp.status_code == status
        if error_name is None:
            assert s.events(1)[0]["name"] == "events.stream.start"
        else:
            s.resp.read()
            details = orjson.loads(s.resp.content.split(b"\n")[0])["error"]["details"][0]
            assert details["name"] == error_name
            assert "cause" not in details  # Go's regexp error is not carried (pkg/errors)
    assert sim.stream_requests[-1].error_name == error_name


def test_identifiers_in_lower_camel_case_are_accepted(sim: Simulator) -> None:
    camel = {"deviceIds": {"deviceId": "dev-0001", "applicationIds": {"applicationId": APP}}}
    with Stream(sim, {"identifiers": [camel]}) as s:
        (start,) = s.events(1)
        assert start["identifiers"] == [
            {"device_ids": {"device_id": "dev-0001", "application_ids": {"application_id": APP}}}
        ]
        sent = sim.uplink("dev-0001")
        assert s.events(1)[0]["unique_id"] == sent["unique_id"]


# --- rights and visibility --------------------------------------------------------------------


def test_a_key_without_traffic_read_gets_a_healthy_stream_with_no_traffic(sim: Simulator) -> None:
    info_key = sim.add_api_key(INFO_ONLY)
    with (
        Stream(sim, {"identifiers": [APP_IDS]}, key=info_key) as blind,
        Stream(sim, {"identifiers": [APP_IDS]}) as full,
    ):
        assert blind.resp.status_code == 200
        assert blind.events(1)[0]["name"] == "events.stream.start"
        full.events(1)
        ups = sim.uplinks(3)
        mark = marker(sim)
        # The full key sees the uplinks, then the marker; the blind key only the marker.
        assert [e["unique_id"] for e in full.events(4)] == [
            *(u["unique_id"] for u in ups),
            mark["unique_id"],
        ]
        assert blind.events(1)[0]["unique_id"] == mark["unique_id"]


def test_replayed_history_is_filtered_by_visibility_too(sim: Simulator) -> None:
    ups = sim.uplinks(2)
    info_key = sim.add_api_key(INFO_ONLY)
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}, key=info_key) as s:
        s.events(1)
        mark = marker(sim)
        assert s.events(1)[0]["unique_id"] == mark["unique_id"]
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        assert [e["unique_id"] for e in s.events(3)[1:]] == [u["unique_id"] for u in ups]


def test_a_key_with_no_rights_on_the_application_cannot_open_a_stream(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS]}, key=sim.add_api_key([])) as s:
        assert s.resp.status_code == 403
    assert sim.stream_requests[-1].error_name == "no_application_rights"


def test_the_rights_endpoint_lists_the_keys_application_rights(sim: Simulator) -> None:
    def get(app: str, key: str | None) -> httpx.Response:
        return httpx.get(f"{sim.base_url}/api/v3/applications/{app}/rights", headers=auth(key))

    full = get(APP, sim.api_key)
    assert full.status_code == 200
    assert sorted(full.json()["rights"]) == sorted(rights.APPLICATION_RIGHTS)
    assert get(APP, sim.add_api_key(INFO_ONLY)).json() == {"rights": INFO_ONLY}
    link = set(get(APP, sim.add_api_key(["RIGHT_APPLICATION_LINK"])).json()["rights"])
    assert link == {
        "RIGHT_APPLICATION_LINK",
        "RIGHT_APPLICATION_INFO",
        rights.TRAFFIC_READ,
        rights.TRAFFIC_DOWN_WRITE,
    }
    assert get("other-app", sim.api_key).json() == {}  # no rights there: empty, not an error
    assert get(APP, None).json() == {}
    bad = sim.api_key[:-4] + "AAAA"
    assert (get(APP, bad).status_code, get(APP, bad).json()["details"][0]["name"]) == (
        401,
        "invalid_authorization",
    )


def push(sim: Simulator, key: str, op: str = "push") -> httpx.Response:
    return httpx.post(
        f"{sim.base_url}/api/v3/as/applications/{APP}/devices/dev-0001/down/{op}",
        json={"downlinks": [{"f_port": 2, "frm_payload": "AQI="}]},
        headers=auth(key),
    )


def test_a_push_without_the_downlink_right_is_403_insufficient_application_rights(
    sim: Simulator,
) -> None:
    read_key = sim.add_api_key([rights.TRAFFIC_READ])
    for op in ("push", "replace"):
        r = push(sim, read_key, op)
        assert r.status_code == 403
        body = r.json()
        assert body["code"] == 7
        assert body["message"] == (
            "error:pkg/auth/rights:insufficient_application_rights "
            "(insufficient rights for application `sim-app`)"
        )
        (detail,) = body["details"]
        assert detail["@type"] == "type.googleapis.com/ttn.lorawan.v3.ErrorDetails"
        assert (detail["namespace"], detail["name"], detail["code"]) == (
            "pkg/auth/rights",
            "insufficient_application_rights",
            7,
        )
        assert detail["message_format"] == "insufficient rights for application `{uid}`"
        assert detail["attributes"] == {"missing": [rights.TRAFFIC_DOWN_WRITE], "uid": APP}
    assert sim.queue("dev-0001") == []
    assert [r.error_name for r in sim.downlink_requests] == ["insufficient_application_rights"] * 2
    assert push(sim, sim.add_api_key([rights.TRAFFIC_DOWN_WRITE])).status_code == 200


def test_listing_the_queue_needs_traffic_read_and_an_empty_queue_is_an_empty_object(
    sim: Simulator,
) -> None:
    url = f"{sim.base_url}/api/v3/as/applications/{APP}/devices/dev-0002/down"
    listed = httpx.get(url, headers=auth(sim.api_key))
    assert (listed.status_code, listed.json()) == (200, {})
    denied = httpx.get(url, headers=auth(sim.add_api_key([rights.TRAFFIC_DOWN_WRITE])))
    assert denied.status_code == 403
    assert denied.json()["details"][0]["attributes"]["missing"] == [rights.TRAFFIC_READ]


async def test_fetch_rights_asks_the_simulator_with_ingestds_user_agent(sim: Simulator) -> None:
    info_key = sim.add_api_key(INFO_ONLY)
    async with httpx.AsyncClient(timeout=5.0) as client:
        granted = await rights.fetch_rights(client, sim.base_url, sim.api_key, APP)
        assert rights.missing_rights(granted, rights.STREAM_TRAFFIC | rights.DOWNLINKS) == []
        limited = await rights.fetch_rights(client, sim.base_url, info_key, APP)
        assert rights.missing_rights(limited, rights.STREAM_TRAFFIC) == [rights.TRAFFIC_READ]
        with pytest.raises(AuthRejected) as info:
            await rights.fetch_rights(client, sim.base_url, sim.api_key[:-4] + "AAAA", APP)
    assert info.value.error_name == "invalid_authorization"


# --- simulated uplinks ------------------------------------------------------------------------


def test_a_simulated_uplink_is_an_uplink_flagged_simulated(sim: Simulator) -> None:
    with Stream(sim, {"identifiers": [APP_IDS], "names": ["as.up.data.forward"]}) as s:
        s.events(1)
        sent = sim.simulated_uplink("dev-0001", f_port=7, payload=b"\x0a\x0b")
        (got,) = s.events(1)
    assert got == sent
    assert got["name"] == "as.up.data.forward"
    data = got["data"]
    assert data["simulated"] is True and list(data)[-1] == "simulated"  # proto field 14, last
    assert data["uplink_message"]["f_port"] == 7
    assert "f_cnt" not in data["uplink_message"]  # the Console sends none
    assert data["correlation_ids"][0].startswith("rpc:/ttn.lorawan.v3.AppAs/SimulateUplink:")
    assert "simulated" not in sim.uplink("dev-0001")["data"]  # real traffic: false, omitted


def test_the_control_api_and_the_generator_emit_simulated_uplinks() -> None:
    with Simulator(seed=3, devices=2, uplink_rate=400.0, simulated_uplink_fraction=0.5) as sim:
        r = httpx.post(f"{sim.base_url}/_sim/uplinks", json={"count": 2, "simulated": True})
        ids = set(r.json()["unique_ids"])
        with Stream(sim, {"identifiers": [APP_IDS], "tail": 100}) as s:
            events = s.events(41)[1:]
    flags = {e["unique_id"]: e["data"].get("simulated", False) for e in events}
    assert all(flags[i] for i in ids if i in flags)
    assert 0 < sum(flags.values()) < len(flags)  # a mix, at about the asked fraction


# --- entity expiry ----------------------------------------------------------------------------


def test_history_is_forgotten_entity_ttl_after_the_last_publish() -> None:
    now = [1000.0]
    with Simulator(seed=5, devices=2, entity_ttl_s=60.0) as sim:
        sim.event_store.clock = lambda: now[0]
        first = sim.uplink("dev-0001")
        now[0] += 50
        second = sim.uplink("dev-0001")  # renews the entity's TTL, not the first event's
        now[0] += 50  # 100 s after the first publish, 50 after the last
        with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
            got = [e["unique_id"] for e in s.events(3)[1:]]
        assert got == [first["unique_id"], second["unique_id"]]
        now[0] += 11  # 61 s after the last publish
        with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
            s.events(1)
            mark = marker(sim)
            assert s.events(1)[0]["unique_id"] == mark["unique_id"]  # nothing replayed


def test_expire_entities_forgets_every_history(sim: Simulator) -> None:
    sim.uplinks(3)
    sim.expire_entities()
    with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}) as s:
        s.events(1)
        mark = marker(sim)
        assert s.events(1)[0]["unique_id"] == mark["unique_id"]


# --- transport --------------------------------------------------------------------------------


def test_a_gzip_stream_decodes_frame_by_frame() -> None:
    with Simulator(seed=2, devices=2, gzip_stream=True) as sim:
        raw = httpx.Client(timeout=httpx.Timeout(5.0, read=3.0))
        with raw.stream(
            "POST",
            f"{sim.base_url}/api/v3/events",
            json={"identifiers": [APP_IDS]},
            headers={"Accept": "text/event-stream", "Accept-Encoding": "gzip", **auth(sim.api_key)},
        ) as resp:
            assert resp.headers["content-encoding"] == "gzip"
            assert resp.headers["vary"] == "Accept-Encoding"
            decoder = zlib.decompressobj(31)
            chunks = resp.iter_raw()
            text = b""
            while b"\n\n" not in text:  # the start frame decodes before anything else is sent
                text += decoder.decompress(next(chunks))
            assert orjson.loads(text.split(b"\n\n")[0])["result"]["name"] == "events.stream.start"
            sent = sim.uplinks(3)
            while text.count(b"\n\n") < 4:
                text += decoder.decompress(next(chunks))
        raw.close()
        frames = [orjson.loads(f) for f in text.split(b"\n\n") if f]
        assert [f["result"]["unique_id"] for f in frames[1:]] == [e["unique_id"] for e in sent]
        with Stream(sim, {"identifiers": [APP_IDS]}, headers={"Accept-Encoding": "identity"}) as s:
            assert "content-encoding" not in s.resp.headers


def test_h2c_serves_http2_with_prior_knowledge_and_http11_too() -> None:
    with Simulator(seed=4, devices=2, h2c=True) as sim:
        h2 = httpx.Client(http1=False, http2=True, timeout=httpx.Timeout(5.0, read=3.0))
        with Stream(sim, {"identifiers": [APP_IDS]}, client=h2) as s:
            assert s.resp.http_version == "HTTP/2"
            s.events(1)
            sent = sim.uplinks(3)
            assert [e["unique_id"] for e in s.events(3)] == [e["unique_id"] for e in sent]
        with Stream(sim, {"identifiers": [APP_IDS]}) as s:
            assert s.resp.http_version == "HTTP/1.1"
            assert s.events(1)[0]["name"] == "events.stream.start"
        r = httpx.get(f"{sim.base_url}/api/v3/applications/{APP}/rights", headers=auth(sim.api_key))
        assert r.status_code == 200


@pytest.mark.parametrize("h2c", [False, True], ids=["http1.1", "h2c"])
def test_an_abrupt_close_ends_the_body_without_its_final_chunk(h2c: bool) -> None:
    with Simulator(seed=6, devices=2, h2c=h2c, abrupt_close_after_n_frames=2) as sim:
        sent = sim.uplinks(3)
        client = httpx.Client(http1=not h2c, http2=h2c, timeout=httpx.Timeout(5.0, read=3.0))
        with Stream(sim, {"identifiers": [APP_IDS], "tail": 10}, client=client) as s:
            got = s.events(3)
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                s.frames(1)
    assert [e["unique_id"] for e in got[1:]] == [e["unique_id"] for e in sent[:2]]
