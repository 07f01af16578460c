"""Downlink half of :mod:`ingestd.normalize`: lifecycle rows.

Pure like its parent: no clock, log or database. It also holds the small value readers
that both halves share (it is the lower module, so :mod:`ingestd.normalize` imports from
it and not the other way round).

Every ``as.down.data.*`` lifecycle event becomes one ``downlink_events`` row. The outbox
row an event belongs to is found through the ids ingestd sets when it pushes
(:mod:`ingestd.outbox.ids`). Where ``ingestd:outbox:<id>`` shows up differs per event
(TTS_WIRE §4): for ``receive``/``forward`` only in ``data.correlation_ids``, for
``sent``/``ack``/``nack``/``failed`` in both the event and the item, and never in ``drop``
(the AS publishes it with the request context's ids only).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ingestd.errors import MalformedEvent
from ingestd.models import TX_PRIORITIES, DownlinkEventRow, DownlinkKind, Row
from ingestd.outbox.ids import outbox_id_from

_SHOW_MAX_CHARS = 60
UINT32_MAX = 2**32 - 1  # f_cnt (a uint32 in TTS's messages)
FPORT_MAX = 255  # LoRaWAN FPort is one byte; TTS validates f_port <= 255

EMPTY: Mapping[str, Any] = {}
"""Stands in for an omitted sub-object so that chained ``.get`` calls stay flat."""

# Event name -> downlink_events.kind (DESIGN §4). These names exist from TTS v3.32.1 on.
DOWNLINK_KINDS: dict[str, DownlinkKind] = {
    "as.down.data.receive": DownlinkKind.RECEIVE,
    "as.down.data.forward": DownlinkKind.FORWARD,
    "as.down.data.sent.forward": DownlinkKind.SENT,
    "as.down.data.ack.forward": DownlinkKind.ACK,
    "as.down.data.nack.forward": DownlinkKind.NACK,
    "as.down.data.failed.forward": DownlinkKind.FAILED,
    "as.down.data.queue.invalidated.forward": DownlinkKind.QUEUE_INVALIDATED,
    "as.down.data.drop": DownlinkKind.DROP,
}
_PRIORITY_MAX_CHARS = 16  # downlink_events.priority


# --- value readers shared with ingestd.normalize -------------------------------------


def show(value: Any) -> str:
    """A short repr of a bad value for an error message (events can be large)."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX_CHARS else text[: _SHOW_MAX_CHARS - 3] + "..."


def bytes_of(value: Any, what: str) -> bytes:
    """Decode a protobuf ``bytes`` field (standard base64 with padding); missing is b""."""
    if value is None:
        return b""
    if type(value) is str:
        try:
            # strict_mode rejects junk characters and bad padding without the regex
            # that base64.b64decode(validate=True) runs on every call.
            return binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            pass
    raise MalformedEvent(f"{what} is not base64: {show(value)}")


def uint_of(obj: Mapping[str, Any], key: str, what: str, maximum: int = UINT32_MAX) -> int:
    """A uint32 field (at most ``maximum``); TTS omits 0, so a missing key reads as 0.

    A value past the field's range is malformed (TTS cannot send it) and raises: it is
    never clamped, and it cannot reach a column too narrow for it.
    """
    value = obj.get(key, 0)
    if type(value) is int and 0 <= value <= maximum:
        return value
    raise MalformedEvent(f"{what}.{key} is not an integer from 0 to {maximum}: {show(value)}")


def device_ids_of(event: Mapping[str, Any]) -> Mapping[str, Any]:
    """``identifiers[0].device_ids`` of an event, or an empty mapping."""
    identifiers = event.get("identifiers")
    if not identifiers:
        return EMPTY
    if type(identifiers) is not list or type(identifiers[0]) is not dict:
        raise MalformedEvent(f"identifiers is not a list of objects: {show(identifiers)}")
    ids = identifiers[0].get("device_ids")
    if ids is None:
        return EMPTY
    if type(ids) is not dict:
        raise MalformedEvent(f"identifiers[0].device_ids is not an object: {show(ids)}")
    return ids


def app_device_of(ids: Mapping[str, Any], fallback: Mapping[str, Any]) -> tuple[str, str]:
    """(application_id, device_id) from EndDeviceIdentifiers, else from ``fallback``."""
    for source in (ids, fallback):
        app = source.get("application_ids") or EMPTY
        application_id = app.get("application_id")
        device_id = source.get("device_id")
        if type(application_id) is str and type(device_id) is str:
            return application_id, device_id
    raise MalformedEvent("no end device identifiers (application_id and device_id)")


# --- downlink rows ---------------------------------------------------------------------


def downlink_row(
    event: Mapping[str, Any],
    data: Mapping[str, Any],
    *,
    kind: DownlinkKind,
    unique_id: str,
    time: datetime,
    source: str,
) -> Row:
    """The ``downlink_events`` row of one lifecycle event (``data`` is the event's data)."""
    item: Any = None  # the ApplicationDownlink the event is about, if it carries one
    error: Any = None
    item_cids: list[Any] = []
    if kind == "receive" or kind == "forward":
        item = data  # data *is* the ApplicationDownlink
    elif kind == "drop":
        error = data  # data is ErrorDetails (as received, with its "@type"); no payload
    elif kind == "failed":
        failed = _sub(data, "downlink_failed")
        item = _sub(failed, "downlink", "downlink_failed.downlink")
        error = failed.get("error")
    elif kind == "queue_invalidated":
        invalidated = _sub(data, "downlink_queue_invalidated")
        downlinks = invalidated.get("downlinks") or []
        if type(downlinks) is not list:
            raise MalformedEvent(
                f"downlink_queue_invalidated.downlinks is not a list: {show(downlinks)}"
            )
        # One row per event, keyed by its unique_id: the payload columns describe the
        # first invalidated item, while correlation_ids collects every item's ids so that
        # each invalidated outbox row can still be found from this one row.
        if downlinks:
            item = downlinks[0]
            for other in downlinks[1:]:
                if type(other) is not dict:
                    raise MalformedEvent(f"invalidated downlink is not an object: {show(other)}")
                item_cids.extend(_cids_of(other, "invalidated downlink"))
    else:  # sent | ack | nack
        item = _sub(data, "downlink_" + kind)
    if item is not None and type(item) is not dict:
        raise MalformedEvent(f"{kind} downlink is not an object: {show(item)}")

    event_cids = _cids_of(event, "event")
    if item is not None:
        item_cids.extend(_cids_of(item, "downlink"))
    # The client's ids are only on the item for receive/forward (TTS_WIRE §4), so take the
    # union; sorted, because TTS sorts its own lists too and it makes rows comparable.
    try:
        cids = sorted(set(event_cids).union(item_cids))
    except TypeError as exc:  # unhashable or mixed types
        raise MalformedEvent(f"correlation_ids are not strings: {exc}") from exc

    application_id, device_id = app_device_of(
        device_ids_of(event), data.get("end_device_ids") or EMPTY
    )
    values: DownlinkEventRow = {
        "event_unique_id": unique_id,
        "kind": kind,
        "application_id": application_id,
        "device_id": device_id,
        "f_port": None,
        "f_cnt": None,
        "frm_payload": None,
        "decoded_payload": None,
        "confirmed": None,
        "priority": None,
        "correlation_ids": cids,
        "outbox_id": outbox_id_from(cids),
        "error": error,
        "time": time,
        "source": source,
    }
    if item is not None:
        values["f_port"] = uint_of(item, "f_port", "downlink", FPORT_MAX)
        # receive is published before the AS assigns the session's FCntDown, so a missing
        # f_cnt there means "not assigned yet" (None). Once the item is queued (forward and
        # later), a missing f_cnt is TTS omitting a real 0: AFCntDown starts at 0.
        if kind == "receive":
            f_cnt = item.get("f_cnt")
            values["f_cnt"] = None if f_cnt is None else uint_of(item, "f_cnt", "downlink")
        else:
            values["f_cnt"] = uint_of(item, "f_cnt", "downlink")
        values["frm_payload"] = bytes_of(item.get("frm_payload"), "downlink.frm_payload")
        values["decoded_payload"] = item.get("decoded_payload")
        confirmed = item.get("confirmed", False)
        if type(confirmed) is not bool:
            raise MalformedEvent(f"downlink.confirmed is not a boolean: {show(confirmed)}")
        values["confirmed"] = confirmed
        values["priority"] = _priority(item.get("priority", "LOWEST"))
    return Row("downlink_events", values)


def _sub(obj: Mapping[str, Any], key: str, what: str | None = None) -> Mapping[str, Any]:
    value = obj.get(key)
    if type(value) is not dict:
        raise MalformedEvent(
            f"data has no {what or key} object"
            if value is None
            else f"{what or key} is not an object: {show(value)}"
        )
    return value


def _cids_of(obj: Mapping[str, Any], what: str) -> list[Any]:
    cids = obj.get("correlation_ids")
    if cids is None:
        return []
    if type(cids) is not list:
        raise MalformedEvent(f"{what} correlation_ids is not a list: {show(cids)}")
    return cids


def _priority(value: Any) -> str:
    if type(value) is str and len(value) <= _PRIORITY_MAX_CHARS:
        return value
    if type(value) is int and 0 <= value < len(TX_PRIORITIES):  # rendered as enum numbers
        return TX_PRIORITIES[value]
    raise MalformedEvent(f"downlink.priority is not a TxSchedulePriority: {show(value)}")
