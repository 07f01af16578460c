"""Builders for Things Stack event dicts exactly as TTS writes them (TTS_WIRE §2-§5).

Used by the simulator, the tests and the benchmark capture generator. Everything here is
pure: pass a seeded ``random.Random`` for deterministic output. Dicts are built in TTS's
wire key order (orjson keeps insertion order), zero values are omitted, uint64 values are
quoted strings, bytes are base64 and EUIs uppercase hex.
"""

from __future__ import annotations

import base64
import math
import random
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
DEFAULT_ORIGIN = "ip-10-22-3-145.eu-west-1.compute.internal"
TTN_CONTEXT = {"tenant-id": "CgN0dG4="}  # proto TenantIdentifiers{tenant_id:"ttn"}
TRAFFIC_READ = {"rights": ["RIGHT_APPLICATION_TRAFFIC_READ"]}
PRIORITIES = ("LOWEST", "LOW", "BELOW_NORMAL", "NORMAL", "ABOVE_NORMAL", "HIGH", "HIGHEST")
EU868_LORA_HZ = (
    868100000,
    868300000,
    868500000,
    867100000,
    867300000,
    867500000,
    867700000,
    867900000,
)
EU868_FSK_HZ = 868800000
GATEWAY_TO_AS_DELAY_S = 0.26  # gateway reception → AS event, as in the §2.1 capture


# --- times and ids ------------------------------------------------------------------------


def _fraction(ns: int) -> str:
    """Fractional seconds with 0, 3, 6 or 9 digits, as protojson and TTS write them."""
    if ns == 0:
        return ""
    if ns % 1_000_000 == 0:
        return f".{ns // 1_000_000:03d}"
    if ns % 1000 == 0:
        return f".{ns // 1000:06d}"
    return f".{ns:09d}"


def format_time(dt: datetime, extra_ns: int = 0) -> str:
    """RFC 3339 UTC like TTS (``2024-10-30T09:15:40.349611524Z``); ``extra_ns`` adds sub-µs ns."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + _fraction(dt.microsecond * 1000 + extra_ns) + "Z"


def format_time_ns(unix_ns: int) -> str:
    """RFC 3339 UTC of a Unix time in nanoseconds (e.g. ``time.time_ns()``)."""
    secs, ns = divmod(unix_ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + _fraction(ns) + "Z"


_TIME_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)$"
)


def parse_time_ns(text: str) -> int:
    """Unix time in nanoseconds of an RFC 3339 string (up to 9 fractional digits)."""
    m = _TIME_RE.match(text)
    if m is None:
        raise ValueError(f"parsing time {text!r}: not RFC 3339")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    offset = timedelta(0)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        offset = sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC) - offset
    return int(dt.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def format_duration(seconds: float) -> str:
    """A protobuf Duration in JSON: ``"0.061696s"``."""
    whole, frac = divmod(round(seconds * 1e9), 1_000_000_000)
    return f"{whole}{_fraction(frac)}s"


def _encode_ulid(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join(CROCKFORD[(value >> (125 - 5 * i)) & 31] for i in range(26))


class UlidFactory:
    """Real ULIDs (48-bit ms time + 80 random bits, Crockford base32), monotonic within a ms."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self, time: datetime | None = None) -> str:
        ms = int((time or datetime.now(UTC)).timestamp() * 1000)
        with self._lock:
            if ms == self._last_ms:
                rand = self._last_rand + 1
                if rand >> 80:  # 2**80 ids in one ms: borrow the next ms
                    ms, rand = ms + 1, self._rng.getrandbits(79)
            else:
                rand = self._rng.getrandbits(80)
            self._last_ms, self._last_rand = ms, rand
        return _encode_ulid(ms, rand)


_default_ulids = UlidFactory()


def new_ulid(time: datetime | None = None) -> str:
    """A new ULID for ``time`` (default now), monotonic within this process."""
    return _default_ulids(time)


def ulid_time(ulid: str) -> datetime:
    """The timestamp encoded in a ULID."""
    value = 0
    for ch in ulid[:10]:
        value = value * 32 + CROCKFORD.index(ch)
    return datetime.fromtimestamp(value / 1000, UTC)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rand_ulid(rng: random.Random, time: datetime) -> str:
    return _encode_ulid(int(time.timestamp() * 1000), rng.getrandbits(80))


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _pb_varint(number << 3) + _pb_varint(payload)
    return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def uplink_token(gateway_id: str, eui: str, timestamp: int, server_time: datetime) -> str:
    """The opaque ``uplink_token``: protobuf ``UplinkToken`` as the Gateway Server encodes it."""
    gw = _pb_field(1, gateway_id.encode()) + _pb_field(2, bytes.fromhex(eui))
    secs = int(server_time.timestamp())
    ts = _pb_field(1, secs) + _pb_field(2, server_time.microsecond * 1000)
    token = (
        _pb_field(1, _pb_field(1, gw))
        + _pb_field(2, timestamp)
        + _pb_field(3, ts)
        + _pb_field(4, timestamp)
    )
    return b64(token)


# --- radio --------------------------------------------------------------------------------


def lora_airtime_s(payload_len: int, sf: int, bandwidth_hz: int = 125000) -> float:
    """LoRa time on air (Semtech AN1200.13) for a PHY payload, CR 4/5, 8 preamble symbols."""
    t_sym = (2**sf) / bandwidth_hz
    de = 1 if sf >= 11 and bandwidth_hz == 125000 else 0
    n = 8 + max(math.ceil((8 * payload_len - 4 * sf + 28 + 16) / (4 * (sf - 2 * de))) * 5, 0)
    return float((8 + 4.25) * t_sym + n * t_sym)


def fsk_airtime_s(payload_len: int, bit_rate: int = 50000) -> float:
    """FSK time on air: 5 B preamble, 3 B sync word, 1 B length, payload, 2 B CRC."""
    return (5 + 3 + 1 + payload_len + 2) * 8 / bit_rate


@dataclass(frozen=True, kw_only=True, slots=True)
class Gateway:
    """A gateway that receives simulated uplinks."""

    gateway_id: str
    eui: str
    latitude: float | None = None
    longitude: float | None = None
    altitude: int = 0


def default_gateways(count: int) -> list[Gateway]:
    """``count`` gateways; odd ones have a registry location, like a mixed fleet."""
    out = []
    for i in range(count):
        loc = i % 2 == 0
        out.append(
            Gateway(
                gateway_id=f"sim-gw-{i + 1:02d}",
                eui=f"B827EBFFFE{0x61A2C3 + i:06X}",
                latitude=round(52.37403 + 0.01 * i, 5) if loc else None,
                longitude=round(4.88969 + 0.01 * i, 5) if loc else None,
                altitude=32 + i if loc else 0,
            )
        )
    return out


def _nz(**fields: Any) -> dict[str, Any]:
    """Fields in the given order without zero values, as TTS omits them (``f_port: 0``...)."""
    return {k: v for k, v in fields.items() if v not in (None, 0, "", False, [], {})}


def _location(lat: float, lon: float, alt: int, source: str = "SOURCE_REGISTRY") -> dict[str, Any]:
    return _nz(latitude=lat, longitude=lon, altitude=alt, source=source)


def _number_struct(value: Any) -> Any:
    """Struct values as protojson writes them: sorted keys, integral doubles without ``.0``."""
    if isinstance(value, Mapping):
        return {k: _number_struct(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_number_struct(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# --- events -------------------------------------------------------------------------------


def event(
    *,
    name: str,
    time: str,
    identifiers: list[dict[str, Any]],
    unique_id: str,
    data: dict[str, Any] | None = None,
    correlation_ids: Sequence[str] = (),
    origin: str | None = DEFAULT_ORIGIN,
    context: Mapping[str, str] | None = None,
    visibility: Mapping[str, Any] | None = TRAFFIC_READ,
    authentication: Mapping[str, str] | None = None,
    remote_ip: str | None = None,
    user_agent: str | None = None,
) -> dict[str, Any]:
    """An ``Event`` in wire key order; absent/empty fields are omitted."""
    ev: dict[str, Any] = {"name": name, "time": time, "identifiers": identifiers}
    if data is not None:
        ev["data"] = data
    if correlation_ids:
        ev["correlation_ids"] = list(correlation_ids)
    for key, value in (
        ("origin", origin),
        ("context", context),
        ("visibility", visibility),
        ("authentication", authentication),
        ("remote_ip", remote_ip),
        ("user_agent", user_agent),
    ):
        if value:
            ev[key] = dict(value) if isinstance(value, Mapping) else value
    ev["unique_id"] = unique_id
    return ev


def device_ids(
    application_id: str,
    device_id: str,
    *,
    dev_eui: str | None = None,
    join_eui: str | None = None,
    dev_addr: str | None = None,
) -> dict[str, Any]:
    """``EndDeviceIdentifiers`` in wire order."""
    ids: dict[str, Any] = {
        "device_id": device_id,
        "application_ids": {"application_id": application_id},
    }
    for key, value in (("dev_eui", dev_eui), ("join_eui", join_eui), ("dev_addr", dev_addr)):
        if value:
            ids[key] = value.upper()
    return ids


def network_ids(tenant_id: str = "ttn", cluster_id: str = "eu1") -> dict[str, str]:
    """``NetworkIdentifiers`` as TTN Sandbox's NS sets them."""
    return {
        "net_id": "000013",
        "ns_id": "EC656E0000000182",
        "tenant_id": tenant_id,
        "cluster_id": cluster_id,
        "cluster_address": f"{cluster_id}.cloud.thethings.network",
    }


def uplink_event(
    *,
    application_id: str,
    device_id: str,
    dev_eui: str,
    f_cnt: int,
    f_port: int,
    payload: bytes,
    gateways: int | Sequence[Gateway] = 2,
    time: datetime,
    unique_id: str,
    fsk: bool = False,
    join_eui: str = "70B3D57ED0000000",
    dev_addr: str = "260B4A7C",
    session_key_id: bytes = b"\x01\x92\xdc;]<o\xf3\xbc\x85~I\xf6I\xa4:",
    decoded_payload: Mapping[str, Any] | None = None,
    confirmed: bool = False,
    spreading_factor: int = 7,
    packet_error_rate: float | None = None,
    rng: random.Random | None = None,
    origin: str = DEFAULT_ORIGIN,
    context: Mapping[str, str] | None = TTN_CONTEXT,
    version_ids: Mapping[str, str] | None = None,
    location: tuple[float, float, int] | None = None,
) -> dict[str, Any]:
    """An ``as.up.data.forward`` event carrying ``ApplicationUp.uplink_message`` (TTS_WIRE §2.1).

    ``time`` is the event time; gateway, NS and AS times are derived before it. With 2
    gateways and a decoded payload it encodes to about 2.5 KB, like a real one.
    """
    rng = rng or random.Random()
    gws = default_gateways(gateways) if isinstance(gateways, int) else list(gateways)
    gw_time = time - timedelta(seconds=GATEWAY_TO_AS_DELAY_S + rng.random() * 0.02)
    ids = device_ids(
        application_id, device_id, dev_eui=dev_eui, join_eui=join_eui, dev_addr=dev_addr
    )
    cids = sorted(
        [
            f"gs:uplink:{_rand_ulid(rng, gw_time)}",
            f"rpc:/ttn.lorawan.v3.GsNs/HandleUplink:{_rand_ulid(rng, gw_time)}",
            f"rpc:/ttn.lorawan.v3.NsAs/HandleUplink:{_rand_ulid(rng, time)}",
        ]
    )
    if fsk:
        freq, channel = EU868_FSK_HZ, 8
        airtime = fsk_airtime_s(13 + len(payload))
    else:
        channel = rng.randrange(len(EU868_LORA_HZ))
        freq = EU868_LORA_HZ[channel]
        airtime = lora_airtime_s(13 + len(payload), spreading_factor)
    first_ts = rng.getrandbits(32)
    rx: list[dict[str, Any]] = []
    for i, gw in enumerate(gws):
        ts = first_ts if i == 0 else rng.getrandbits(32)
        t_rx = gw_time + timedelta(microseconds=4 * i)
        rssi = -60 - rng.randrange(20) - 15 * i
        snr = None if fsk else _number_struct(rng.randrange(-60, 48) / 4)  # float32: 10, not 10.0
        offset = rng.randrange(-5000, 5000) if i else 0  # int64: quoted, omitted when 0
        rx.append(
            _nz(
                gateway_ids={"gateway_id": gw.gateway_id, "eui": gw.eui},
                time=format_time(t_rx),
                timestamp=ts,
                rssi=rssi,
                channel_rssi=rssi,
                snr=snr,
                frequency_offset=str(offset) if offset else None,
                location=(
                    _location(gw.latitude, gw.longitude, gw.altitude)
                    if gw.latitude is not None and gw.longitude is not None
                    else None
                ),
                uplink_token=uplink_token(gw.gateway_id, gw.eui, ts, t_rx),
                channel_index=channel,
                received_at=format_time(
                    t_rx + timedelta(milliseconds=13 + 12 * i), rng.randrange(1000)
                ),
            )
        )
    data_rate: dict[str, Any] = (
        {"fsk": {"bit_rate": 50000}}
        if fsk
        else {
            "lora": {
                "bandwidth": 125000,
                "spreading_factor": spreading_factor,
                "coding_rate": "4/5",
            }
        }
    )
    settings = {
        "data_rate": data_rate,
        "frequency": str(freq),
        "timestamp": first_ts,
        "time": rx[0]["time"] if rx else format_time(gw_time),
    }
    up = _nz(
        session_key_id=b64(session_key_id),
        f_port=f_port,
        f_cnt=f_cnt,
        frm_payload=b64(payload),
        decoded_payload=None if decoded_payload is None else _number_struct(decoded_payload),
        rx_metadata=rx,
        settings=settings,
        received_at=format_time(gw_time + timedelta(milliseconds=27), rng.randrange(1000)),
        confirmed=confirmed,
        consumed_airtime=format_duration(airtime),
        packet_error_rate=packet_error_rate,
        locations=None if location is None else {"user": _location(*location)},
        version_ids=dict(version_ids or {}),
        network_ids=network_ids(),
    )
    data = {
        "@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
        "end_device_ids": ids,
        "correlation_ids": cids,
        "received_at": format_time(time - timedelta(milliseconds=18), rng.randrange(1000)),
        "uplink_message": up,
    }
    return event(
        name="as.up.data.forward",
        time=format_time(time, rng.randrange(1000)),
        identifiers=[{"device_ids": ids}],
        data=data,
        correlation_ids=cids,
        origin=origin,
        context=context,
        unique_id=unique_id,
    )


def join_event(
    *,
    application_id: str,
    device_id: str,
    dev_eui: str,
    dev_addr: str,
    time: datetime,
    unique_id: str,
    join_eui: str = "70B3D57ED0000000",
    session_key_id: bytes | None = None,
    rng: random.Random | None = None,
    origin: str = DEFAULT_ORIGIN,
    context: Mapping[str, str] | None = TTN_CONTEXT,
) -> dict[str, Any]:
    """An ``as.up.join.forward`` event (``ApplicationUp.join_accept``, AppSKey stripped)."""
    rng = rng or random.Random()
    ids = device_ids(
        application_id, device_id, dev_eui=dev_eui, join_eui=join_eui, dev_addr=dev_addr
    )
    gw_time = time - timedelta(seconds=GATEWAY_TO_AS_DELAY_S)
    cids = sorted(
        [
            f"gs:uplink:{_rand_ulid(rng, gw_time)}",
            f"rpc:/ttn.lorawan.v3.GsNs/HandleUplink:{_rand_ulid(rng, gw_time)}",
            f"rpc:/ttn.lorawan.v3.NsJs/HandleJoin:{_rand_ulid(rng, gw_time)}",
            f"rpc:/ttn.lorawan.v3.NsAs/HandleUplink:{_rand_ulid(rng, time)}",
        ]
    )
    skid = session_key_id if session_key_id is not None else rng.randbytes(16)
    accept = {
        "session_key_id": b64(skid),
        "received_at": format_time(gw_time + timedelta(milliseconds=27), rng.randrange(1000)),
    }
    data = {
        "@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
        "end_device_ids": ids,
        "correlation_ids": cids,
        "received_at": format_time(time - timedelta(milliseconds=18), rng.randrange(1000)),
        "join_accept": accept,
    }
    return event(
        name="as.up.join.forward",
        time=format_time(time, rng.randrange(1000)),
        identifiers=[{"device_ids": ids}],
        data=data,
        correlation_ids=cids,
        origin=origin,
        context=context,
        unique_id=unique_id,
    )


# --- downlinks ----------------------------------------------------------------------------

_DOWNLINK_KEYS = (
    "session_key_id",
    "f_port",
    "f_cnt",
    "frm_payload",
    "decoded_payload",
    "decoded_payload_warnings",
    "confirmed",
    "class_b_c",
    "priority",
    "correlation_ids",
    "confirmed_retry",
)


def downlink_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """An ``ApplicationDownlink`` in wire order: only the fields the AS keeps, zeros omitted."""
    out: dict[str, Any] = {}
    for key in _DOWNLINK_KEYS:
        value = item.get(key)
        if key == "priority" and isinstance(value, int) and 0 <= value < len(PRIORITIES):
            value = PRIORITIES[value]
        if value in (None, 0, False, "", [], {}, "LOWEST"):
            continue
        out[key] = _number_struct(value) if key == "decoded_payload" else value
    return out


def merge_correlation_ids(*groups: Iterable[str]) -> list[str]:
    """``sort(unique(...))`` as TTS does for ids taken from a context."""
    return sorted({cid for group in groups for cid in group})


def downlink_as_event(
    kind: str,
    *,
    ids: Mapping[str, Any],
    item: Mapping[str, Any],
    context_ids: Sequence[str],
    time: datetime,
    unique_id: str,
    token_id: str | None = None,
    remote_ip: str | None = "127.0.0.1",
    user_agent: str | None = None,
    origin: str = DEFAULT_ORIGIN,
    context: Mapping[str, str] | None = TTN_CONTEXT,
) -> dict[str, Any]:
    """``as.down.data.receive`` (plaintext item, as pushed) or ``as.down.data.forward``.

    ``forward`` is device-only and carries the encrypted item with ``f_cnt`` and session key,
    without ``decoded_payload``. Event-level ``correlation_ids`` are the request context ids
    only; the client's ids are in ``data.correlation_ids`` (TTS_WIRE §4.4).
    """
    auth = {"type": "Bearer", "token_type": "APIKey", "token_id": token_id} if token_id else None
    body = downlink_item(item if kind == "receive" else {**item, "decoded_payload": None})
    data = {"@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationDownlink", **body}
    return event(
        name=f"as.down.data.{kind}",
        time=format_time(time),
        identifiers=[{"device_ids": dict(ids)}],
        data=data,
        correlation_ids=sorted(context_ids),
        origin=origin,
        context=context,
        authentication=auth,
        remote_ip=remote_ip,
        user_agent=user_agent,
        unique_id=unique_id,
    )


def downlink_up_event(
    kind: str,
    *,
    ids: Mapping[str, Any],
    item: Mapping[str, Any],
    correlation_ids: Sequence[str],
    time: datetime,
    unique_id: str,
    error: Mapping[str, Any] | None = None,
    origin: str = DEFAULT_ORIGIN,
    context: Mapping[str, str] | None = TTN_CONTEXT,
) -> dict[str, Any]:
    """``as.down.data.{sent,ack,nack,failed}.forward``: ``ApplicationUp{downlink_<kind>}``.

    Event-level ``correlation_ids`` equal ``data.correlation_ids`` (TTS_WIRE §4.9).
    """
    body: dict[str, Any] = downlink_item(item)
    if kind == "failed":
        body = {"downlink": body, "error": dict(error or {})}
    cids = merge_correlation_ids(correlation_ids)
    data = {
        "@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
        "end_device_ids": dict(ids),
        "correlation_ids": cids,
        "received_at": format_time(time - timedelta(milliseconds=1)),
        f"downlink_{kind}": body,
    }
    return event(
        name=f"as.down.data.{kind}.forward",
        time=format_time(time),
        identifiers=[{"device_ids": dict(ids)}],
        data=data,
        correlation_ids=cids,
        origin=origin,
        context=context,
        unique_id=unique_id,
    )
