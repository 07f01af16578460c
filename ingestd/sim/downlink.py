"""The simulated Application Server downlink API: push/replace/list, queues and lifecycle events.

Follows TTS v3.32 (TTS_WIRE §4, §5): validation in TTS order with TTS error bodies,
correlation ids merged as the AS does, ``as.down.data.receive``/``.forward`` at push, then
one item per simulated class-A uplink (every ``ack_delay_s``): ``.sent.forward``, and
``.ack.forward``/``.nack.forward`` for confirmed items or ``.failed.forward`` for devices told
to fail. Runs on the server's event loop; the queue itself is guarded by the store lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from ingestd.sim import events as eventgen
from ingestd.sim.store import ERROR_FOR_STATUS, EventStore, RateLimiter, SimError, error_details

MAX_FRM_PAYLOAD_B = 255
NS_MAX_PAYLOAD_B = 242  # EU868: 250 - 8 over all data rates
AS_MAX_RETRIES = 32
_CAMEL = {
    "fPort": "f_port",
    "frmPayload": "frm_payload",
    "decodedPayload": "decoded_payload",
    "correlationIds": "correlation_ids",
    "confirmedRetry": "confirmed_retry",
    "classBC": "class_b_c",
    "sessionKeyId": "session_key_id",
    "fCnt": "f_cnt",
    "maxAttempts": "max_attempts",
}
_DOWNLINK_CLASS_PREFIXES = ("as:downlink:", "ns:downlink:", "pba:downlink:")
# RequireApplication rights per call (LS pkg/applicationserver/io/grpc/grpc.go).
LIST_RIGHTS = ("RIGHT_APPLICATION_TRAFFIC_READ",)
PUSH_RIGHTS = ("RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE",)


class DecodeError(Exception):
    """The body could not be unmarshaled: grpc-gateway answers 400 ``{"code":3,"message":…}``."""


@dataclass(kw_only=True)
class SimDevice:
    """A registered, activated end device."""

    application_id: str
    device_id: str
    dev_eui: str
    join_eui: str
    dev_addr: str
    session_key_id: bytes
    f_cnt_up: int = 0
    last_f_cnt_down: int = 0

    def ids(self) -> dict[str, Any]:
        return eventgen.device_ids(
            self.application_id,
            self.device_id,
            dev_eui=self.dev_eui,
            join_eui=self.join_eui,
            dev_addr=self.dev_addr,
        )


@dataclass(frozen=True, kw_only=True)
class DownlinkRequest:
    """One recorded push/replace/list request and how the simulator answered it."""

    time: float
    method: str
    path: str
    op: str
    application_id: str
    device_id: str
    body: Any
    headers: dict[str, str]
    request_id: str
    status: int
    error_name: str | None = None


def _snake(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_CAMEL.get(k, k): v for k, v in obj.items()}
    return obj


def decode_request(body: bytes) -> list[dict[str, Any]]:
    """Unmarshal a ``DownlinkQueueRequest`` body into plain items (unknown keys ignored)."""
    try:
        req = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid character in JSON: {exc}") from exc
    if not isinstance(req, dict) or not isinstance(req.get("downlinks", []), list):
        raise DecodeError("proto: syntax error (line 1:1): unexpected token")
    items = []
    for raw in req.get("downlinks", []):
        if not isinstance(raw, dict):
            raise DecodeError("proto: syntax error: unexpected token, expected object")
        item = _snake(raw)
        for key, kind in (("f_port", int), ("f_cnt", int), ("confirmed", bool)):
            if key in item and (
                not isinstance(item[key], kind) or (kind is int and isinstance(item[key], bool))
            ):
                raise DecodeError(f"invalid value for {key}: {item[key]!r}")
        for key in ("frm_payload", "session_key_id"):
            if item.get(key) is not None:
                try:
                    item[key] = base64.b64decode(str(item[key]), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise DecodeError(f"illegal base64 data in {key}") from exc
        prio = item.get("priority")
        if isinstance(prio, str):
            if prio not in eventgen.PRIORITIES:
                raise DecodeError(f"invalid value for enum type: {prio!r}")
            item["priority"] = eventgen.PRIORITIES.index(prio)
        if not isinstance(item.get("correlation_ids", []), list):
            raise DecodeError("invalid value for correlation_ids")
        if isinstance(item.get("confirmed_retry"), dict):
            item["confirmed_retry"] = _snake(item["confirmed_retry"])
        items.append(item)
    return items


def _invalid(index: int, field_name: str, reason: str) -> SimError:
    cause = error_details(
        "validation",
        {"field": field_name, "name": "ApplicationDownlinkValidationError", "reason": reason},
    )
    return SimError(
        "validation",
        {
            "field": f"downlinks[{index}]",
            "name": "DownlinkQueueRequestValidationError",
            "reason": "embedded message failed validation",
        },
        cause=cause,
    )


def validate_items(items: list[dict[str, Any]]) -> None:
    """Proto validation (``messages.pb.validate.go``), first failure wins."""
    for i, item in enumerate(items):
        if len(item.get("session_key_id") or b"") > 2048:
            raise _invalid(i, "session_key_id", "value length must be at most 2048 bytes")
        f_port = item.get("f_port", 0)
        if f_port > 255:
            raise _invalid(i, "f_port", "value must be less than or equal to 255")
        if f_port == 224:
            raise _invalid(i, "f_port", "value must not be in list [224]")
        if len(item.get("frm_payload") or b"") > MAX_FRM_PAYLOAD_B:
            raise _invalid(i, "frm_payload", "value length must be at most 255 bytes")
        prio = item.get("priority", 0)
        if not isinstance(prio, int) or not 0 <= prio < len(eventgen.PRIORITIES):
            raise _invalid(i, "priority", "value must be one of the defined enum values")
        for j, cid in enumerate(item.get("correlation_ids") or []):
            if not isinstance(cid, str) or len(cid) > 100:
                raise _invalid(i, f"correlation_ids[{j}]", "value length must be at most 100 runes")
        retry = item.get("confirmed_retry") or {}
        max_attempts = retry.get("max_attempts")
        if max_attempts is not None and not (
            isinstance(max_attempts, int) and 0 < max_attempts <= 100
        ):
            raise _invalid(i, "confirmed_retry", "embedded message failed validation")


@dataclass(kw_only=True)
class DownlinkApi:
    """Downlink queues of the simulated devices, with fault switches for tests."""

    store: EventStore
    devices: dict[str, SimDevice]
    application_id: str
    # (authorization header, app id, rights required) → token id, or raise the TTS error
    authorize: Callable[[str | None, str, tuple[str, ...]], str]
    capacity: int = 10000
    ack_delay_s: float = 0.05
    rate_limiter: RateLimiter | None = None
    rng: random.Random = field(default_factory=random.Random)
    # Fault switches (mutate freely from tests):
    fail_next_pushes: dict[str, list[int]] = field(default_factory=dict)  # device → statuses
    failing_devices: set[str] = field(default_factory=set)  # end in as.down.data.failed.forward
    nacking_devices: set[str] = field(default_factory=set)  # confirmed items get nack.forward
    queues: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[DownlinkRequest] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    _timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)

    def queue(self, device_id: str) -> list[dict[str, Any]]:
        """The current queue of ``device_id`` as ``GET …/down`` lists it."""
        with self.store.lock:
            return [eventgen.downlink_item(_wire(it)) for it in self.queues.get(device_id, [])]

    def handle(
        self,
        *,
        op: str,
        application_id: str,
        device_id: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        """Answer one request: (status, extra headers, JSON body). Raises nothing."""
        extra: list[tuple[str, str]] = []
        try:
            if op == "list":
                self.authorize(headers.get("authorization"), application_id, LIST_RIGHTS)
                self._device(application_id, device_id)
                queued = self.queue(device_id)  # an empty list is omitted: ``{}`` on the wire
                return 200, extra, {"downlinks": queued} if queued else {}
            items = decode_request(body)
            validate_items(items)
            if self.rate_limiter is not None:
                method = "DownlinkQueuePush" if op == "push" else "DownlinkQueueReplace"
                token = (headers.get("authorization") or "").rpartition(".")[0].partition(".")[2]
                key = (
                    f"grpc:method:/ttn.lorawan.v3.AppAs/{method}:end device:"
                    f"{application_id}.{device_id}:token:{token}"
                )
                result = self.rate_limiter.check(key)
                extra = result.headers
                if not result.allowed:
                    raise SimError(
                        "rate_limit_exceeded", {"key": key, "rate": self.rate_limiter.per_min}
                    )
            token_id = self.authorize(headers.get("authorization"), application_id, PUSH_RIGHTS)
            forced = self.fail_next_pushes.get(device_id)
            if forced:
                status = forced.pop(0)
                raise SimError(ERROR_FOR_STATUS.get(status, "internal"), headers=_retry(status))
            dev = self._device(application_id, device_id)
            self._queue_op(op, dev, items, headers, token_id)
            return 200, extra, {}
        except DecodeError as exc:
            return 400, extra, {"code": 3, "message": str(exc)}
        except SimError as exc:
            return exc.status, extra + exc.headers, exc.body

    def _device(self, application_id: str, device_id: str) -> SimDevice:
        dev = self.devices.get(device_id)
        if dev is None or application_id != self.application_id:
            raise SimError("device_not_found", {"device_uid": f"{application_id}.{device_id}"})
        return dev

    def _queue_op(
        self,
        op: str,
        dev: SimDevice,
        items: list[dict[str, Any]],
        headers: Mapping[str, str],
        token_id: str,
    ) -> None:
        for item in items:
            if not item.get("frm_payload") and item.get("decoded_payload") is None:
                raise SimError("no_payload")
            if not item.get("frm_payload"):  # the simulated device's formatter: compact JSON
                item["frm_payload"] = orjson.dumps(
                    item["decoded_payload"], option=orjson.OPT_SORT_KEYS
                )
            max_attempts = (item.get("confirmed_retry") or {}).get("max_attempts") or 0
            if max_attempts > AS_MAX_RETRIES:
                raise SimError("downlink_max_retries_invalid", {"max": AS_MAX_RETRIES})
        method = "DownlinkQueuePush" if op == "push" else "DownlinkQueueReplace"
        rpc_id = f"rpc:/ttn.lorawan.v3.AppAs/{method}:{headers.get('x-request-id', '')}"
        now = datetime.now(UTC)
        path_ids = eventgen.device_ids(dev.application_id, dev.device_id)  # as in the request
        ctx_ids: list[list[str]] = []
        for item in items:
            client = [str(c) for c in item.get("correlation_ids") or []]
            own = len(items) > 1 and any(c.startswith(_DOWNLINK_CLASS_PREFIXES) for c in client)
            ids = [rpc_id] + ([] if own else [f"as:downlink:{eventgen.new_ulid(now)}"])
            ctx_ids.append(ids)
            item["correlation_ids"] = eventgen.merge_correlation_ids(ids, client)
            self.store.publish(
                eventgen.downlink_as_event(
                    "receive",
                    ids=path_ids,
                    item=_wire(item),
                    context_ids=ids,
                    time=now,
                    unique_id=eventgen.new_ulid(now),
                    token_id=token_id,
                    user_agent=headers.get("user-agent"),
                )
            )
        with self.store.lock:
            queue = self.queues.setdefault(dev.device_id, [])
            error = None
            if any(not item.get("f_port") for item in items):
                error = SimError("no_f_port")
            elif len(items) + (len(queue) if op == "push" else 0) > self.capacity:
                error = SimError("downlink_queue_capacity")
            elif (
                long := max((len(it["frm_payload"]) for it in items), default=0)
            ) > NS_MAX_PAYLOAD_B:
                error = SimError(
                    "application_downlink_too_long", {"length": long, "max": NS_MAX_PAYLOAD_B}
                )
            if error is None:
                if op == "replace":  # replaced items give their unsent FCnts back
                    dev.last_f_cnt_down = min(
                        [dev.last_f_cnt_down] + [it["f_cnt"] - 1 for it in queue]
                    )
                    queue.clear()
                for item in items:  # the AS encrypts with the session key and next FCnt
                    dev.last_f_cnt_down += 1
                    item["f_cnt"] = dev.last_f_cnt_down
                    item["session_key_id"] = dev.session_key_id
                    queue.append(item)
        for item, ids in zip(items, ctx_ids, strict=True):
            if error is not None:
                self.store.publish(
                    eventgen.event(
                        name="as.down.data.drop",
                        time=eventgen.format_time(now),
                        identifiers=[{"device_ids": path_ids}],
                        data=dict(error.body["details"][0]),
                        correlation_ids=sorted(ids),
                        unique_id=eventgen.new_ulid(now),
                    )
                )
                continue
            encrypted = _wire({**item, "frm_payload": _encrypt(item["frm_payload"], item["f_cnt"])})
            self.store.publish(
                eventgen.downlink_as_event(
                    "forward",
                    ids=path_ids,
                    item=encrypted,
                    context_ids=ids,
                    time=now,
                    unique_id=eventgen.new_ulid(now),
                    token_id=token_id,
                    user_agent=headers.get("user-agent"),
                )
            )
        if error is not None:
            raise error
        self._schedule(dev.device_id)

    # --- lifecycle (runs on the server loop) -------------------------------------------

    def _schedule(self, device_id: str, delay_s: float | None = None) -> None:
        if self.loop is None or device_id in self._timers:
            return
        self._timers[device_id] = self.loop.call_later(
            self.ack_delay_s if delay_s is None else delay_s, self._transmit, device_id
        )

    def _transmit(self, device_id: str) -> None:
        """The next class-A uplink arrived: the head of the queue goes out."""
        self._timers.pop(device_id, None)
        dev = self.devices[device_id]
        with self.store.lock:
            queue = self.queues.get(device_id, [])
            if not queue:
                return
            item = queue.pop(0)
            more = bool(queue)
        now = datetime.now(UTC)
        up_ids = [
            f"gs:uplink:{eventgen.new_ulid(now)}",
            f"rpc:/ttn.lorawan.v3.GsNs/HandleUplink:{eventgen.new_ulid(now)}",
        ]
        tx_ids = [
            f"ns:transmission:{eventgen.new_ulid(now)}",
            f"rpc:/ttn.lorawan.v3.NsGs/ScheduleDownlink:{eventgen.new_ulid(now)}",
            f"gs:tx_ack:{eventgen.new_ulid(now)}",
            f"rpc:/ttn.lorawan.v3.GsNs/ReportTxAcknowledgment:{eventgen.new_ulid(now)}",
        ]
        if device_id in self.failing_devices:
            error = error_details("transmission", {"result": "TOO_LATE"})
            self._publish_up("failed", dev, item, item["correlation_ids"], error=error)
        else:
            merged = eventgen.merge_correlation_ids(item["correlation_ids"], up_ids, tx_ids)
            sent = {**item, "correlation_ids": merged}
            as_id = f"rpc:/ttn.lorawan.v3.NsAs/HandleUplink:{eventgen.new_ulid(now)}"
            self._publish_up("sent", dev, sent, [*merged, as_id])
            if item.get("confirmed") and self.loop is not None:
                kind = "nack" if device_id in self.nacking_devices else "ack"
                acked = {
                    **item,
                    "confirmed_retry": {**(item.get("confirmed_retry") or {}), "attempt": 1},
                }
                self.loop.call_later(
                    self.ack_delay_s,
                    self._publish_up,
                    kind,
                    dev,
                    acked,
                    item["correlation_ids"] + up_ids,
                )
        if more:
            self._schedule(device_id)

    def _publish_up(
        self,
        kind: str,
        dev: SimDevice,
        item: dict[str, Any],
        cids: list[str],
        *,
        error: dict[str, Any] | None = None,
    ) -> None:
        now = datetime.now(UTC)
        self.store.publish(
            eventgen.downlink_up_event(
                kind,
                ids=dev.ids(),
                item=_wire(item),
                correlation_ids=cids,
                time=now,
                unique_id=eventgen.new_ulid(now),
                error=error,
            )
        )

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


def _wire(item: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded item back in wire form (bytes → base64)."""
    out = dict(item)
    for key in ("frm_payload", "session_key_id"):
        if isinstance(out.get(key), bytes):
            out[key] = eventgen.b64(out[key])
    return out


def _encrypt(payload: bytes, f_cnt: int) -> bytes:
    """A stand-in for AES-CTR with AppSKey: same length, not the plaintext."""
    keystream = random.Random(f_cnt).randbytes(len(payload))
    return bytes(a ^ b for a, b in zip(payload, keystream, strict=True))


def _retry(status: int) -> list[tuple[str, str]]:
    return [("x-rate-limit-retry", "1")] if status == 429 else []
