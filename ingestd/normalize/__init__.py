"""Pure normalization: one TTS event in, rows for the SQL tables out.

This is the per-event hot path, so it touches no clock, log or database, copies nothing
deeply, runs no regex and reads the orjson-decoded dicts directly with ``.get``.

- :func:`event_row` gives the raw ``events`` row that every event gets.
- :func:`normalize` gives the derived rows (``uplinks`` + ``uplink_receptions``, ``joins``,
  ``downlink_events``; the downlink half lives in :mod:`ingestd.normalize.down`). An
  unknown event name gives ``[]``, and so does a known event without ``data``: TTS replays
  events without payload once its store's payload TTL has passed (TTS_WIRE §1.6). A
  known event that is malformed raises :class:`MalformedEvent` saying what was wrong, so
  the caller can put it in ``rejected_events`` and go on.

TTS omits zero and default values (TTS_WIRE §2): a missing ``f_port``/``f_cnt`` is 0, a
missing ``confirmed`` is false, a missing ``frm_payload`` is empty, and a missing
``rssi``/``channel_rssi``/``snr``/``channel_index`` of a gateway entry that is present is
0 (except ``snr`` on FSK, which has none). Those defaults are applied here, where TTS's
rule is known, so the tables hold what TTS meant rather than what it happened to print.
Fields that older servers never send (``packet_error_rate``) or that are messages rather
than scalars (``consumed_airtime``, ``settings``, ``location``) stay None when absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeGuard, cast

from ingestd.errors import MalformedEvent
from ingestd.identity import uplink_id
from ingestd.models import DerivedRow, EventRow, Row
from ingestd.normalize.down import (
    DOWNLINK_KINDS,
    EMPTY,
    FPORT_MAX,
    app_device_of,
    bytes_of,
    device_ids_of,
    downlink_row,
    show,
    uint_of,
)

__all__ = [
    "event_row",
    "normalize",
    "normalize_application_up",
    "parse_duration_s",
    "parse_time",
    "valid_unique_id",
]

_fromisoformat = datetime.fromisoformat
# Column widths in ingestd.schema.events; longer values would fail the whole batch on
# PostgreSQL, so they are rejected here, per event.
_UNIQUE_ID_MAX_CHARS = 64
_NAME_MAX_CHARS = 200
_ENTITY_ID_MAX_CHARS = 64  # application_id, device_id
_EUI_MAX_CHARS = 16
_INT64_MAX = 2**63 - 1  # BIGINT columns (frequency)
_INT32_MAX = 2**31 - 1  # INTEGER columns (spreading_factor, bandwidth, bit_rate)
_CODING_RATE_MAX_CHARS = 16

_NUMBER = (float, int)  # JSON numbers as orjson decodes them (bool is neither)
_NO_ROW = Row("", cast(DerivedRow, {}))  # a placeholder, replaced before it is returned

_Handler = Callable[[Mapping[str, Any], Mapping[str, Any], str | None, str], list[Row]]


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp as TTS writes it, as an aware UTC datetime.

    TTS writes 0, 3, 6 or 9 fractional digits and ``Z``; other offsets are converted to
    UTC. Nanoseconds are truncated to microseconds (Python's resolution). Other ISO 8601
    forms that Python reads are accepted too, as long as they carry an offset; a time
    without one, or anything unreadable, raises :class:`MalformedEvent`.
    """
    try:
        parsed = _fromisoformat(value)  # 3.11+: reads 'Z' and up to 9 fractional digits
    except (TypeError, ValueError):
        parsed = _parse_time_slow(value)
    tz = parsed.tzinfo
    if tz is UTC:
        return parsed
    if tz is None:
        raise MalformedEvent(f"timestamp {show(value)} has no UTC offset")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is past datetime.max in UTC
        raise MalformedEvent(f"timestamp {show(value)} is out of range in UTC") from None


def _parse_time_slow(value: Any) -> datetime:
    # RFC 3339 allows a lower-case 't' and 'z', which fromisoformat does not read.
    if type(value) is str and value.upper() != value:
        try:
            return _fromisoformat(value.upper())
        except ValueError:
            pass
    raise MalformedEvent(f"bad timestamp {show(value)}: expected RFC 3339") from None


def parse_duration_s(value: str) -> float:
    """A protobuf Duration as TTS writes it (``"0.061696s"``), in seconds."""
    if type(value) is str and value.endswith("s"):
        try:
            seconds = float(value[:-1])
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return seconds
    raise MalformedEvent(f"bad duration {show(value)}: expected seconds like '0.061696s'")


def event_row(event: Mapping[str, Any], *, stream: str) -> EventRow:
    """The ``events`` row of any event: identity, time, entity ids and the raw payload.

    ``data`` and ``correlation_ids`` are kept as received (no copy). ``application_id``,
    ``device_id`` and ``dev_eui`` come from ``identifiers[0]``; events about no device
    (``events.stream.start``, application-level events) have ``device_id`` None.
    ``ingested_at`` is left to the database default.
    """
    if type(event) is not dict and not isinstance(event, Mapping):
        raise MalformedEvent(f"event is not a JSON object: {show(event)}")
    unique_id = _unique_id_of(event)
    name = event.get("name")
    if type(name) is not str or not 0 < len(name) <= _NAME_MAX_CHARS or "\x00" in name:
        raise MalformedEvent(f"event {unique_id} has no valid name: {show(name)}")
    correlation_ids = event.get("correlation_ids")
    if correlation_ids is not None and type(correlation_ids) is not list:
        raise MalformedEvent(f"event {unique_id}: correlation_ids is not a list")
    data = event.get("data")
    if data is not None and type(data) is not dict:
        raise MalformedEvent(f"event {unique_id}: data is not an object: {show(data)}")
    application_id = device_id = dev_eui = None
    identifiers = event.get("identifiers")
    if identifiers:
        if type(identifiers) is not list or type(identifiers[0]) is not dict:
            raise MalformedEvent(f"event {unique_id}: identifiers is not a list of objects")
        first = identifiers[0]
        ids = first.get("device_ids")
        if ids is not None:
            if type(ids) is not dict:
                raise MalformedEvent(
                    f"event {unique_id}: identifiers[0].device_ids is not an object: {show(ids)}"
                )
            app = ids.get("application_ids")
            device_id = ids.get("device_id")
            dev_eui = ids.get("dev_eui")
        else:
            app = first.get("application_ids")
        if app:
            if type(app) is not dict:
                raise MalformedEvent(
                    f"event {unique_id}: identifiers[0]'s application_ids is not an object: "
                    f"{show(app)}"
                )
            application_id = app.get("application_id")
        # Strings within their column's width, or absent: anything else would make the
        # database refuse the row (PostgreSQL) or store a mistyped value (SQLite).
        if not (  # inline, not _fits(): this runs for every event
            (
                application_id is None
                or (type(application_id) is str and len(application_id) <= _ENTITY_ID_MAX_CHARS)
            )
            and (
                device_id is None
                or (type(device_id) is str and len(device_id) <= _ENTITY_ID_MAX_CHARS)
            )
            and (dev_eui is None or (type(dev_eui) is str and len(dev_eui) <= _EUI_MAX_CHARS))
        ):
            raise MalformedEvent(
                f"event {unique_id}: identifiers hold an application_id, device_id or dev_eui "
                f"that is not a short string: {show(first)}"
            )
    try:
        time = _time_of(event)
    except MalformedEvent as exc:
        raise MalformedEvent(f"event {unique_id}: {exc}") from None
    return {
        "unique_id": unique_id,
        "stream": stream,
        "name": name,
        "time": time,
        "application_id": application_id,
        "device_id": device_id,
        "dev_eui": dev_eui,
        "correlation_ids": correlation_ids,
        "data": data,
    }


def normalize(event: Mapping[str, Any], source: str = "stream") -> list[Row]:
    """The derived rows of one event; ``[]`` for unknown names and sparse replays.

    Row values are keyed exactly by the column names in :mod:`ingestd.schema`; ``source``
    (``stream`` or ``import``) goes into every row's ``source`` column.
    """
    if type(event) is not dict and not isinstance(event, Mapping):
        raise MalformedEvent(f"event is not a JSON object: {show(event)}")
    name = event.get("name")
    handler = _HANDLERS.get(name) if type(name) is str else None
    if handler is None:
        return []
    data = event.get("data")
    if data is None:  # sparse replay: nothing to derive, the events row says it happened
        return []
    unique_id = _unique_id_of(event)
    if type(data) is not dict:
        raise MalformedEvent(f"{name} {unique_id}: data is not an object: {show(data)}")
    return _derive(handler, event, data, unique_id, source, f"{name} {unique_id}")


def normalize_application_up(up: Mapping[str, Any], source: str = "storage") -> list[Row]:
    """The derived rows of a bare ApplicationUp (a Storage Integration result): no event.

    Reads ``uplink_message`` and ``join_accept``; other members give ``[]``. The rows have
    no ``event_unique_id``; their identity (:mod:`ingestd.identity`) is the one the same
    message gets when it arrives as an event.
    """
    if type(up) is not dict and not isinstance(up, Mapping):
        raise MalformedEvent(f"stored message is not a JSON object: {show(up)}")
    if "uplink_message" in up:
        handler, name = _uplink, "uplink_message"
    elif "join_accept" in up:
        handler, name = _join, "join_accept"
    else:
        return []
    ids = up.get("end_device_ids")
    # Stands in for the event the stream would have carried; its time (the fallback of
    # received_at) is the message's own received_at.
    pseudo = {
        "identifiers": [{"device_ids": ids}] if type(ids) is dict else [],
        "time": up.get("received_at"),
    }
    return _derive(handler, pseudo, up, None, source, f"stored {name}")


def _derive(
    handler: _Handler,
    event: Mapping[str, Any],
    data: Mapping[str, Any],
    unique_id: str | None,
    source: str,
    where: str,
) -> list[Row]:
    """``handler``'s rows; any failure is a :class:`MalformedEvent` prefixed with ``where``."""
    try:
        return handler(event, data, unique_id, source)
    except MalformedEvent as exc:
        raise MalformedEvent(f"{where}: {exc}") from None
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # A sub-object of the wrong JSON type somewhere the handlers do not check by hand.
        structure = f"unexpected structure ({type(exc).__name__}: {exc})"
        raise MalformedEvent(f"{where}: {structure}") from exc


def _fits(value: Any, max_chars: int) -> bool:
    return value is None or (type(value) is str and len(value) <= max_chars)


def _int32(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value <= _INT32_MAX)


def valid_unique_id(value: Any) -> TypeGuard[str]:
    """True for a ``unique_id`` the ``events`` table can key on on every dialect: a short
    string without U+0000 (which PostgreSQL text cannot hold)."""
    return type(value) is str and 0 < len(value) <= _UNIQUE_ID_MAX_CHARS and "\x00" not in value


def _unique_id_of(event: Mapping[str, Any]) -> str:
    unique_id = event.get("unique_id")
    if not (  # valid_unique_id, inline: this runs twice for every event
        type(unique_id) is str
        and 0 < len(unique_id) <= _UNIQUE_ID_MAX_CHARS
        and "\x00" not in unique_id
    ):
        raise MalformedEvent(f"event has no valid unique_id: {show(unique_id)}")
    return unique_id


def _time_of(event: Mapping[str, Any]) -> datetime:
    value = event.get("time")
    if value is None:
        raise MalformedEvent("event has no time")
    try:
        return parse_time(value)
    except MalformedEvent as exc:
        raise MalformedEvent(f"time: {exc}") from None


def _received_at(primary: Any, data: Mapping[str, Any], event: Mapping[str, Any]) -> datetime:
    """NS receive time, else AS receive time (``data.received_at``), else the event time."""
    value = primary if primary is not None else data.get("received_at")
    return parse_time(value) if value is not None else _time_of(event)


def _ids(event: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[Any, ...]:
    """(application_id, device_id, dev_eui, join_eui, dev_addr) of an ApplicationUp.

    From ``data.end_device_ids``, field by field falling back to ``identifiers[0]``.
    """
    ids = data.get("end_device_ids") or EMPTY
    application_id = (ids.get("application_ids") or EMPTY).get("application_id")
    device_id = ids.get("device_id")
    dev_eui = ids.get("dev_eui")
    join_eui = ids.get("join_eui")
    dev_addr = ids.get("dev_addr")
    if type(application_id) is str and type(device_id) is str and dev_eui and join_eui and dev_addr:
        return application_id, device_id, dev_eui, join_eui, dev_addr
    fallback = device_ids_of(event)  # rarely needed: ABP devices have no join_eui
    application_id, device_id = app_device_of(ids, fallback)
    return (
        application_id,
        device_id,
        dev_eui or fallback.get("dev_eui"),
        join_eui or fallback.get("join_eui"),
        dev_addr or fallback.get("dev_addr"),
    )


def _member_object(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``data[key]``, which must be a JSON object (the ApplicationUp oneof of this event)."""
    value = data.get(key)
    if type(value) is not dict:
        raise MalformedEvent(
            f"data has no {key} object"
            if value is None
            else f"{key} is not an object: {show(value)}"
        )
    return value


def _uplink(
    event: Mapping[str, Any], data: Mapping[str, Any], unique_id: str | None, source: str
) -> list[Row]:
    up = _member_object(data, "uplink_message")
    application_id, device_id, dev_eui, join_eui, dev_addr = _ids(event, data)
    received_at = _received_at(up.get("received_at"), data, event)
    f_cnt = uint_of(up, "f_cnt", "uplink_message")
    uid = uplink_id(application_id, device_id, received_at, f_cnt)

    settings = up.get("settings") or EMPTY
    frequency = settings.get("frequency")  # uint64: a quoted decimal string
    if frequency is not None:
        if type(frequency) is str and frequency.isascii() and frequency.isdigit():
            frequency = int(frequency)
        elif type(frequency) is not int or frequency < 0:
            raise MalformedEvent(f"settings.frequency is not a uint64: {show(frequency)}")
        if frequency > _INT64_MAX:
            # A valid uint64 that the signed BIGINT column cannot hold: no radio uses such a
            # frequency, so the column says "unknown" (None) rather than a clamped lie; the
            # value as received stays in events.data.
            frequency = None
    data_rate = settings.get("data_rate") or EMPTY
    modulation = spreading_factor = bandwidth = coding_rate = bit_rate = None
    if (lora := data_rate.get("lora")) is not None:
        modulation = "lora"
        spreading_factor = lora.get("spreading_factor")
        bandwidth = lora.get("bandwidth")
        coding_rate = lora.get("coding_rate")
    elif (fsk := data_rate.get("fsk")) is not None:
        modulation = "fsk"
        bit_rate = fsk.get("bit_rate")
    elif (lrfhss := data_rate.get("lrfhss")) is not None:
        modulation = "lrfhss"
        coding_rate = lrfhss.get("coding_rate")
        # The operating channel width (Hz) is LR-FHSS's counterpart of LoRa's bandwidth.
        bandwidth = lrfhss.get("operating_channel_width")
    if modulation is not None and not (
        # LoRa's usual shape first, inline; _int32/_fits() for the rest.
        (
            type(spreading_factor) is int
            and type(bandwidth) is int
            and bit_rate is None
            and type(coding_rate) is str
            and 0 <= spreading_factor <= _INT32_MAX
            and 0 <= bandwidth <= _INT32_MAX
            and len(coding_rate) <= _CODING_RATE_MAX_CHARS
        )
        or (
            _int32(spreading_factor)
            and _int32(bandwidth)
            and _int32(bit_rate)
            and _fits(coding_rate, _CODING_RATE_MAX_CHARS)
        )
    ):
        raise MalformedEvent(
            f"settings.data_rate.{modulation} has a mistyped or out of range "
            f"value: {show(data_rate)}"
        )

    rx = up.get("rx_metadata")
    if rx is None:
        rx = ()  # e.g. simulated uplinks carry no gateway metadata
    elif type(rx) is not list:
        raise MalformedEvent(f"uplink_message.rx_metadata is not a list: {show(rx)}")
    # TTS omits a zero snr like any other zero, so a LoRa/LR-FHSS gateway without "snr"
    # measured 0 dB. FSK has no SNR at all: there a missing snr stays None.
    snr_default = None if modulation == "fsk" else 0.0
    rows: list[Row] = [_NO_ROW]  # the uplinks row goes first, once the best values are known
    # Best signal = max rssi and max snr over the gateways, each taken independently (the
    # gateway with the best rssi is not always the one with the best snr), so ties do not
    # matter. A gateway entry without rssi/channel_rssi/snr/channel_index read as 0, since
    # TTS omits zeros; only a missing entry (no gateway) gives None.
    best_rssi = best_snr = None
    for index, meta in enumerate(rx):
        if type(meta) is not dict:
            raise MalformedEvent(f"rx_metadata[{index}] is not an object: {show(meta)}")
        rssi = meta.get("rssi", 0.0)
        channel_rssi = meta.get("channel_rssi", 0.0)
        snr = meta.get("snr", snr_default)
        channel_index = meta.get("channel_index", 0)
        if (
            type(rssi) not in _NUMBER
            or type(channel_rssi) not in _NUMBER
            or (snr is not None and type(snr) not in _NUMBER)
            or type(channel_index) is not int
        ):
            raise MalformedEvent(
                f"rx_metadata[{index}] has a non-numeric rssi, channel_rssi, snr or channel_index"
            )
        gateway = meta.get("gateway_ids") or EMPTY
        location = meta.get("location")
        if location is None:
            latitude = longitude = altitude = None
        else:
            latitude = location.get("latitude", 0.0)
            longitude = location.get("longitude", 0.0)
            altitude = location.get("altitude", 0.0)
        time = meta.get("time")
        rows.append(
            Row(
                "uplink_receptions",
                {
                    "uplink_id": uid,
                    "received_at": received_at,
                    "reception_index": index,
                    "gateway_id": gateway.get("gateway_id"),
                    "gateway_eui": gateway.get("eui"),
                    "rssi": rssi,
                    "channel_rssi": channel_rssi,
                    "snr": snr,
                    "time": None if time is None else parse_time(time),
                    "channel_index": channel_index,
                    "latitude": latitude,
                    "longitude": longitude,
                    "altitude": altitude,
                    "source": source,
                },
            )
        )
        if best_rssi is None or rssi > best_rssi:
            best_rssi = rssi
        if snr is not None and (best_snr is None or snr > best_snr):
            best_snr = snr

    confirmed = up.get("confirmed", False)
    if type(confirmed) is not bool:
        raise MalformedEvent(f"uplink_message.confirmed is not a boolean: {show(confirmed)}")
    airtime = up.get("consumed_airtime")
    packet_error_rate = up.get("packet_error_rate")  # None when absent: new in v3.34
    if packet_error_rate is not None and type(packet_error_rate) not in _NUMBER:
        raise MalformedEvent(
            f"uplink_message.packet_error_rate is not a number: {show(packet_error_rate)}"
        )
    rows[0] = Row(
        "uplinks",
        {
            "uplink_id": uid,
            "event_unique_id": unique_id,
            "application_id": application_id,
            "device_id": device_id,
            "dev_eui": dev_eui,
            "join_eui": join_eui,
            "dev_addr": dev_addr,
            "session_key_id": up.get("session_key_id"),  # opaque; kept as TTS's base64
            "f_port": uint_of(up, "f_port", "uplink_message", FPORT_MAX),
            "f_cnt": f_cnt,
            "frm_payload": bytes_of(up.get("frm_payload"), "uplink_message.frm_payload"),
            "decoded_payload": up.get("decoded_payload"),
            "confirmed": confirmed,
            "received_at": received_at,
            "rssi": best_rssi,
            "snr": best_snr,
            "gateway_count": len(rx),
            "frequency": frequency,
            "modulation": modulation,
            "spreading_factor": spreading_factor,
            "bandwidth": bandwidth,
            "coding_rate": coding_rate,
            "bit_rate": bit_rate,
            "consumed_airtime_s": None if airtime is None else parse_duration_s(airtime),
            "packet_error_rate": packet_error_rate,
            "source": source,
            "simulated": data.get("simulated") is True,  # Console/API "simulate uplink"
        },
    )
    return rows


def _join(
    event: Mapping[str, Any], data: Mapping[str, Any], unique_id: str | None, source: str
) -> list[Row]:
    accept = _member_object(data, "join_accept")
    application_id, device_id, dev_eui, join_eui, dev_addr = _ids(event, data)
    return [
        Row(
            "joins",
            {
                "event_unique_id": unique_id,
                "application_id": application_id,
                "device_id": device_id,
                "dev_eui": dev_eui,
                "join_eui": join_eui,
                "dev_addr": dev_addr,
                "session_key_id": accept.get("session_key_id"),
                "received_at": _received_at(accept.get("received_at"), data, event),
                "source": source,
            },
        )
    ]


def _downlink(
    event: Mapping[str, Any], data: Mapping[str, Any], unique_id: str | None, source: str
) -> list[Row]:
    kind = DOWNLINK_KINDS[event["name"]]
    time = _time_of(event)
    assert unique_id is not None  # downlink rows only come from events
    return [downlink_row(event, data, kind=kind, unique_id=unique_id, time=time, source=source)]


_HANDLERS: dict[str, _Handler] = {
    "as.up.data.forward": _uplink,
    "as.up.join.forward": _join,
    **dict.fromkeys(DOWNLINK_KINDS, _downlink),
}
