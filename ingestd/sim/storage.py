"""The simulated Storage Integration: ``ApplicationUpStorage`` over HTTP, as TTS serves it.

Routes (the HTTP annotations of lorawan-stack
``api/ttn/lorawan/v3/applicationserver_integrations_storage.proto``, under ``/api/v3``)::

    GET /as/applications/{app}/packages/storage/{type}
    GET /as/applications/{app}/devices/{dev}/packages/storage/{type}
    GET …/packages/storage/{type}/count

Query parameters as ``GetStoredApplicationUpRequest`` has them: ``limit``, ``after``,
``before``, ``f_port``, ``order`` (``received_at`` | ``-received_at``), ``field_mask``
(comma-separated paths such as ``up.uplink_message.f_cnt``; ``end_device_ids`` and
``received_at`` always come back). The answer of ``GetStoredApplicationUp`` is a server
stream through grpc-gateway, so it has the framing of ``/api/v3/events``: ``{"result":
ApplicationUp}`` frames separated by a blank line with ``Accept: text/event-stream``, by one
newline otherwise. ``…/count`` answers ``{"count": {device_id: n}}``. It needs "read
application traffic" (403 ``no_application_rights`` otherwise).

Modelled behaviour of the real thing:

- Open-source TTS has no storage package: the route is not registered and grpc-gateway
  answers a bare 404 ``Not Found`` (``enabled = False``).
- Writes are batched: a message becomes visible ``write_delay_s`` after it was published.
- Retention: messages older than ``retention_s`` (by ``received_at``) are gone.
- Only the types in ``types`` are stored (TTS Cloud keeps only ``uplink_message``).
- Whether ``after``/``before`` are inclusive is not documented; ``inclusive_edges`` picks
  one so that clients can be tested against both.
- ``limit`` is capped at ``max_limit`` (TTN answers at most 1 000 messages per request).
- Faults: ``fail_next`` (HTTP statuses for the next requests, 429 with
  ``X-Rate-Limit-Retry``), ``error_frame_after_n`` (end the body with an error frame),
  ``forbidden`` (403 as for a key without traffic rights).
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from ingestd import rights
from ingestd.sim.events import parse_time_ns
from ingestd.sim.store import ERROR_FOR_STATUS, RateLimiter, SimError

STORAGE_RE = re.compile(
    r"^/api/v3/as/applications/([^/]+)(?:/devices/([^/]+))?/packages/storage(?:/([a-z_]*))?"
    r"(/count)?$"
)
UP_TYPES = (
    "uplink_message",
    "uplink_normalized",
    "join_accept",
    "downlink_ack",
    "downlink_nack",
    "downlink_sent",
    "downlink_failed",
    "downlink_queued",
    "downlink_queue_invalidated",
    "location_solved",
    "service_data",
)
# Event name -> the ApplicationUp member its data carries (what the storage package sees).
_STORED_FROM_EVENT = {
    "as.up.data.forward": "uplink_message",
    "as.up.normalized.forward": "uplink_normalized",
    "as.up.join.forward": "join_accept",
    "as.up.location.forward": "location_solved",
    "as.up.service.forward": "service_data",
    "as.down.data.ack.forward": "downlink_ack",
    "as.down.data.nack.forward": "downlink_nack",
    "as.down.data.sent.forward": "downlink_sent",
    "as.down.data.failed.forward": "downlink_failed",
    "as.down.data.queue.invalidated.forward": "downlink_queue_invalidated",
}
ALWAYS_RETURNED = ("end_device_ids", "received_at")


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """One request the simulated storage answered (for tests to inspect)."""

    path: str
    query: dict[str, str]
    status: int
    results: int


@dataclass(slots=True)
class _Stored:
    received_ns: int
    device_id: str
    up_type: str
    up: dict[str, Any]
    visible_at: float  # monotonic


@dataclass(kw_only=True)
class StorageApi:
    """The storage package of one simulated application. Thread-safe."""

    application_id: str
    enabled: bool = False
    retention_s: float = 30 * 86400.0
    write_delay_s: float = 0.0
    types: tuple[str, ...] = ("uplink_message",)
    inclusive_edges: bool = False
    max_limit: int = 1000
    forbidden: bool = False
    fail_next: list[int] = field(default_factory=list)
    error_frame_after_n: int | None = None
    delay_s: float = 0.0  # answer each request this much later (a slow storage backend)
    rate_limiter: RateLimiter | None = None
    clock: Callable[[], float] = time.monotonic
    wall_ns: Callable[[], int] = time.time_ns
    requests: list[StorageRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[_Stored] = []  # sorted by received_ns
        self._keys: list[int] = []

    # --- writes (from the simulator's publish) --------------------------------------------

    def record(self, event: Mapping[str, Any]) -> None:
        """Keep the ApplicationUp an AS event carries, as the storage package would."""
        if not self.enabled:  # the package is not there: nothing is stored
            return
        up_type = _STORED_FROM_EVENT.get(str(event.get("name")))
        data = event.get("data")
        if up_type is None or up_type not in self.types or not isinstance(data, dict):
            return
        ids = data.get("end_device_ids") or {}
        app = (ids.get("application_ids") or {}).get("application_id")
        if app != self.application_id or "received_at" not in data:
            return
        up = {k: v for k, v in data.items() if k != "@type"}
        row = _Stored(
            received_ns=parse_time_ns(data["received_at"]),
            device_id=str(ids.get("device_id")),
            up_type=up_type,
            up=up,
            visible_at=self.clock() + self.write_delay_s,
        )
        with self._lock:
            i = bisect.bisect_right(self._keys, row.received_ns)
            self._keys.insert(i, row.received_ns)
            self._rows.insert(i, row)

    @property
    def stored(self) -> int:
        """Messages held (visible or not yet), within retention or not."""
        with self._lock:
            return len(self._rows)

    # --- reads (HTTP) ------------------------------------------------------------------------

    def handle(
        self,
        *,
        match: re.Match[str],
        query_string: bytes,
        headers: Mapping[str, str],
        authorize: Callable[[str | None, list[tuple[str, ...]], tuple[str, ...]], str],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Answer one storage request: (status, extra headers, body)."""
        app, device, up_type, count = match.group(1), match.group(2), match.group(3), match.group(4)
        query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        status, extra, body, n = self._answer(
            app, device, up_type or "", bool(count), query, headers, authorize
        )
        self.requests.append(StorageRequest(match.group(0), query, status, n))
        return status, extra, body

    def _answer(
        self,
        app: str,
        device: str | None,
        up_type: str,
        count: bool,
        query: dict[str, str],
        headers: Mapping[str, str],
        authorize: Callable[[str | None, list[tuple[str, ...]], tuple[str, ...]], str],
    ) -> tuple[int, list[tuple[str, str]], bytes, int]:
        try:
            # Reading storage needs "read application traffic" (the proto's RPC options).
            key_id = authorize(
                headers.get("authorization"), [("application", app)], (rights.TRAFFIC_READ,)
            )
            if self.forbidden:
                raise SimError("no_application_rights", {"uid": app})
            if self.rate_limiter is not None:
                rate = self.rate_limiter.check(f"storage:{key_id}")
                if not rate.allowed:
                    raise SimError(
                        "rate_limit_exceeded",
                        {"key": f"storage:{key_id}", "rate": self.rate_limiter.per_min},
                        headers=rate.headers,
                    )
            if self.fail_next:
                status = self.fail_next.pop(0)
                retry = [("x-rate-limit-retry", "1")] if status == 429 else []
                raise SimError(ERROR_FOR_STATUS.get(status, "internal"), headers=retry)
            if up_type not in ("", *UP_TYPES):
                raise SimError("validation", {"field": "type", "reason": "invalid", "name": "in"})
            rows = self._select(device, up_type, query, capped=not count)
        except SimError as exc:
            return exc.status, exc.headers, orjson.dumps(exc.body), 0
        if count:
            counts: dict[str, int] = {}
            for row in rows:
                counts[row.device_id] = counts.get(row.device_id, 0) + 1
            return 200, [], orjson.dumps({"count": counts}), 0
        mask = [p for p in query.get("field_mask", "").split(",") if p]
        sep = b"\n\n" if headers.get("accept", "").startswith("text/event-stream") else b"\n"
        parts = []
        for i, row in enumerate(rows):
            if self.error_frame_after_n is not None and i >= self.error_frame_after_n:
                err = SimError("internal")
                parts.append(orjson.dumps({"error": err.body}) + sep)
                break
            up = _masked(row.up, mask) if mask else row.up
            parts.append(orjson.dumps({"result": up}) + sep)
        ctype = "text/event-stream" if sep == b"\n\n" else "application/json"
        return 200, [("content-type", ctype)], b"".join(parts), len(rows)

    def _select(
        self, device: str | None, up_type: str, query: dict[str, str], *, capped: bool = True
    ) -> list[_Stored]:
        after = _time_param(query, "after")
        before = _time_param(query, "before")
        limit = _uint_param(query, "limit")
        f_port = _uint_param(query, "f_port")
        order = query.get("order", "")
        if order not in ("", "received_at", "-received_at"):
            raise SimError("validation", {"field": "order", "reason": "invalid", "name": "in"})
        now, oldest = self.clock(), self.wall_ns() - int(self.retention_s * 1e9)
        with self._lock:
            if after is None or after < oldest or self.inclusive_edges:
                i = bisect.bisect_left(self._keys, max(after or oldest, oldest))
            else:
                i = bisect.bisect_right(self._keys, after)
            if before is None:
                j = len(self._keys)
            elif self.inclusive_edges:
                j = bisect.bisect_right(self._keys, before)
            else:
                j = bisect.bisect_left(self._keys, before)
            window = self._rows[i:j]
        rows = [
            r
            for r in window
            if r.visible_at <= now
            and (device is None or r.device_id == device)
            and (not up_type or r.up_type == up_type)
            and (f_port is None or r.up.get(r.up_type, {}).get("f_port", 0) == f_port)
        ]
        if order == "-received_at":
            rows.reverse()
        if not capped:
            return rows
        cap = min(limit, self.max_limit) if limit else self.max_limit
        return rows[:cap]


def _time_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if not value:
        return None
    try:
        return parse_time_ns(value)
    except ValueError:
        raise SimError(
            "validation", {"field": name, "reason": "invalid timestamp", "name": "timestamp"}
        ) from None


def _uint_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if not value:
        return None
    if not value.isdigit():
        raise SimError("validation", {"field": name, "reason": "not a uint32", "name": "uint32"})
    return int(value)


def _masked(up: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
    """``up`` reduced to ``paths`` (``up.<member>.<field>…`` or top-level names)."""
    out: dict[str, Any] = {k: up[k] for k in ALWAYS_RETURNED if k in up}
    for path in paths:
        parts = path.split(".")
        if parts[0] == "up":  # the ApplicationUp oneof is named "up"; JSON has no such level
            parts = parts[1:]
        src: Any = up
        dst = out
        for k, part in enumerate(parts):
            if not isinstance(src, dict) or part not in src:
                break
            if k == len(parts) - 1:
                dst[part] = src[part]
            else:
                dst = dst.setdefault(part, {})
                src = src[part]
    return out
