"""The simulated Things Stack's model: event definitions, errors, the event store and broker.

Mirrors TTS v3.32 (TTS_WIRE §1.6, §3, §5.4): the Redis store keeps a capped stream per
entity (device events flagged P are copied to the application's stream); a subscription
replays history per identifier (``after`` exclusive at ms, ``tail`` = last N, names filtered
after counting), then receives live events through a bounded buffer that drops when full.
Thread-safe: the test thread publishes while the server loop reads.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ingestd import eventnames
from ingestd.errors import EventNamesRejected
from ingestd.sim.events import parse_time_ns

# --- event definitions (TTS_WIRE §3): name → propagates to the application stream ---------


def _words(text: str) -> list[str]:
    return text.split()


_DEVICE_ONLY = _words(
    "as.up.data.receive as.up.join.receive as.down.data.forward ns.up.data.receive "
    "ns.up.data.process ns.up.data.forward ns.up.join.receive ns.up.join.accept.forward "
    "ns.down.data.schedule.attempt ns.down.data.schedule.success ns.down.transmission.success "
    "ns.down.join.schedule.attempt ns.down.join.schedule.success"
)
_PROPAGATED = _words(
    "as.up.data.forward as.up.data.drop as.up.data.decode.fail as.up.data.decode.warning "
    "as.up.data.normalize.warning as.up.normalized.forward as.up.join.forward as.up.join.drop "
    "as.up.location.forward as.up.service.forward as.down.data.receive as.down.data.drop "
    "as.down.data.encode.fail as.down.data.decode.fail as.down.data.encode.warning "
    "as.down.data.decode.warning as.down.data.sent.forward as.down.data.ack.forward "
    "as.down.data.nack.forward as.down.data.failed.forward as.down.data.queue.invalidated.forward "
    "ns.up.join.process ns.down.data.schedule.fail ns.down.transmission.fail "
    "ns.down.join.schedule.fail js.join.accept js.join.reject end_device.create "
    "end_device.update end_device.delete end_device.batch.delete "
    + " ".join(
        f"{c}.end_device.{op}" for c in ("as", "ns", "js") for op in ("create", "update", "delete")
    )
)
_ENTITY_LEVEL = _words(
    "application.create application.update application.delete application.api-key.create "
    "gs.up.receive gs.down.send gs.gateway.connect gs.gateway.disconnect gs.status.receive"
)
# Which defined names propagate to the application stream (flag P, TTS_WIRE §3); every other
# name of the catalogue (``eventnames.defined_names()``, the 248 of TTS v3.32) does not.
# ``events.stream.start`` is synthetic and deliberately not defined.
PROPAGATES: dict[str, bool] = {
    **{n: False for n in _DEVICE_ONLY + _ENTITY_LEVEL},
    **{n: True for n in _PROPAGATED},
}


# --- errors (TTS_WIRE §5.4) ---------------------------------------------------------------

HTTP_STATUS_FROM_CODE = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}

_EG = "pkg/events"
_IS = "pkg/identityserver"
_RIGHTS = "pkg/auth/rights"
_AS = "pkg/applicationserver"
_NS = "pkg/networkserver"
# name → (namespace, message_format, gRPC code), as defined in TTS v3.32.
TTS_ERRORS: dict[str, tuple[str, str, int]] = {
    "validation": ("pkg/errors", "invalid `{field}`: {reason}", 3),
    "no_identifiers": ("pkg/events/grpc", "no identifiers", 3),
    "unknown_event_name": (_EG, "unknown event `{name}`", 3),
    "no_matching_events": (_EG, "no matching events for regexp `{regexp}`", 3),
    "invalid_regexp": (_EG, "invalid regexp", 3),
    "token": ("pkg/auth", "invalid token", 3),
    "unsupported_authorization": (_IS, "unsupported authorization method", 16),
    "api_key_not_found": (_IS, "API key not found", 16),
    "invalid_authorization": (_IS, "invalid authorization", 16),
    "token_not_found": (_IS, "token not found", 16),
    "api_key_expired": (_IS, "API key expired", 16),
    "no_application_rights": (_RIGHTS, "no rights for application `{uid}`", 7),
    "insufficient_application_rights": (_RIGHTS, "insufficient rights for application `{uid}`", 7),
    "no_gateway_rights": (_RIGHTS, "no rights for gateway `{uid}`", 7),
    "no_organization_rights": (_RIGHTS, "no rights for organization `{uid}`", 7),
    "no_user_rights": (_RIGHTS, "no rights for user `{uid}`", 7),
    "no_client_rights": (_RIGHTS, "no rights for client `{uid}`", 7),
    "rate_limit_exceeded": (
        "pkg/ratelimit",
        "rate limit of `{rate}` accesses per minute exceeded for resource `{key}`",
        8,
    ),
    "device_not_found": (_AS, "device `{device_uid}` not found", 5),
    "no_payload": (_AS, "no payload", 3),
    "no_f_port": (_AS, "no FPort", 3),
    "downlink_max_retries_invalid": (
        _AS,
        "confirmed retry max attempts must be lower than `{max}`",
        3,
    ),
    "downlink_queue_capacity": (_NS, "downlink queue capacity exceeded", 8),
    "application_downlink_too_long": (
        _NS,
        "application downlink payload length `{length}` exceeds maximum '{max}'",
        3,
    ),
    "transmission": (_NS, "downlink transmission failed with result `{result}`", 2),
    "peer_unavailable": ("pkg/cluster", "{cluster_role} cluster peer unavailable", 14),
    "internal": ("pkg/redis", "internal error", 13),
    "storage_disabled": ("pkg/events/grpc", "events storage is not not enabled", 9),
}
# HTTP status → the error the simulator answers with when told to fail with that status.
ERROR_FOR_STATUS = {
    400: "validation",
    401: "api_key_not_found",
    403: "no_application_rights",
    404: "device_not_found",
    429: "rate_limit_exceeded",
    500: "internal",
    503: "peer_unavailable",
}
_DEFAULT_ATTRS: dict[str, dict[str, Any]] = {
    "peer_unavailable": {"cluster_role": "network_server"},
    "validation": {"field": "identifiers", "reason": "invalid", "name": "ValidationError"},
}


def error_details(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    cause: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``ErrorDetails`` (no ``@type``), as nested in ``downlink_failed.error`` or a ``cause``."""
    namespace, fmt, code = TTS_ERRORS[name]
    out: dict[str, Any] = {"namespace": namespace, "name": name, "message_format": fmt}
    if attributes:
        out["attributes"] = dict(attributes)
    out["correlation_id"] = f"{random.getrandbits(128):032x}"
    if cause:
        out["cause"] = dict(cause)
    out["code"] = code
    return out


class SimError(Exception):
    """A TTS error the simulator answers with; ``status``/``body`` are what goes on the wire."""

    def __init__(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        cause: Mapping[str, Any] | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        attrs = dict(attributes if attributes is not None else _DEFAULT_ATTRS.get(name, {}))
        namespace, fmt, code = TTS_ERRORS[name]
        text = re.sub(r"\{(\w+)\}", lambda m: str(attrs.get(m.group(1), m.group(0))), fmt)
        self.name = name
        self.status = HTTP_STATUS_FROM_CODE[code]
        self.headers = list(headers)
        self.body: dict[str, Any] = {
            "code": code,
            "message": f"error:{namespace}:{name} ({text})",
            "details": [
                {
                    "@type": "type.googleapis.com/ttn.lorawan.v3.ErrorDetails",
                    **error_details(name, attrs, cause=cause),
                }
            ],
        }
        super().__init__(self.body["message"])


def expand_names(patterns: Iterable[str]) -> list[str] | None:
    """Expand exact names and ``/regexp/`` patterns against TTS's defined names, with RE2
    (``eventnames.expand_names``); a bad filter is the SimError TTS answers with. The
    ``invalid_regexp`` details carry no cause: Go's regexp error is not a TTS error, and
    ``pkg/errors`` drops such causes from ``ErrorDetails``."""
    try:
        found = eventnames.expand_names(patterns)
    except EventNamesRejected as exc:
        raise SimError(exc.error_name, exc.attributes) from exc
    return list(found) or None


# --- entities -----------------------------------------------------------------------------

EntityKey = tuple[str, ...]  # ("application", app) | ("device", app, dev) | ("gateway", gw) ...


def entity_key(ids: Mapping[str, Any]) -> EntityKey:
    """The stream key of one ``EntityIdentifiers`` (``{"device_ids": {...}}`` etc.)."""
    if "device_ids" in ids:
        dev = ids["device_ids"]
        return (
            "device",
            dev.get("application_ids", {}).get("application_id", ""),
            dev.get("device_id", ""),
        )
    for kind in ("application", "gateway", "organization", "user", "client"):
        if f"{kind}_ids" in ids:
            return (kind, str(ids[f"{kind}_ids"].get(f"{kind}_id", "")))
    return ("unknown", orjson.dumps(ids).decode())


def _sparse_identifiers(key: EntityKey) -> list[dict[str, Any]]:
    if key[0] == "device":
        return [
            {"device_ids": {"device_id": key[2], "application_ids": {"application_id": key[1]}}}
        ]
    return [{f"{key[0]}_ids": {f"{key[0]}_id": key[1]}}]


@dataclass(slots=True)
class StoredEvent:
    """One entry of an entity stream: the Redis stream entry plus the payload key."""

    entry_ms: int  # Redis stream entry id (publish wall-clock ms)
    time_ms: int  # event time truncated to ms
    name: str
    unique_id: str
    event: dict[str, Any]
    full: bytes
    stored_at: float  # monotonic, for the payload TTL
    meta_key: EntityKey

    def sparse(self) -> bytes:
        """The event after its payload expired (LS ``decodeEventMeta``)."""
        ev: dict[str, Any] = {
            "name": self.name,
            "time": self.event.get("time"),
            "identifiers": _sparse_identifiers(self.meta_key),
        }
        for key in ("context", "visibility"):
            if key in self.event:
                ev[key] = self.event[key]
        ev["unique_id"] = self.unique_id
        return orjson.dumps(ev)


@dataclass(eq=False)
class Subscription:
    """One open stream: its identifiers, name filter and bounded buffer (TTS ``events.Channel``)."""

    entity_keys: list[EntityKey]
    names: frozenset[str] | None
    capacity: int
    wake: Callable[[], None] = lambda: None
    buffer: deque[tuple[str, bytes]] = field(default_factory=deque)
    dropped: int = 0
    # EventIsVisible for the stream's key. An event it may not see still takes its place in
    # the buffer (TTS checks after the channel) as an empty frame, which is never written.
    visible: Callable[[Mapping[str, Any]], bool] | None = None


class EventStore:
    """Per-entity capped event streams plus live fan-out, shared by all connections."""

    def __init__(
        self,
        *,
        enabled: bool,
        entity_count: int,
        payload_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_recorded: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.entity_count = entity_count
        self.payload_ttl_s = payload_ttl_s
        self.clock = clock
        self.lock = threading.RLock()
        self.streams: dict[EntityKey, deque[StoredEvent]] = {}
        self.subscriptions: list[Subscription] = []
        self.dropped_events = 0
        self.events: list[dict[str, Any]] = []  # everything published, for test assertions
        self.max_recorded = max_recorded  # keep memory flat in long `ingestd simulate` runs
        self._last_entry_ms = 0
        # Redis PEXPIREs an entity stream entity-ttl after each publish into it (LS
        # pkg/events/redis/store.go; default 24 h, cmd/internal/shared/config.go).
        self.entity_ttl_s = 86400.0
        self._last_publish: dict[EntityKey, float] = {}

    def publish(
        self,
        event: dict[str, Any],
        *,
        frame: bytes | None = None,
        keys: list[EntityKey] | None = None,
    ) -> None:
        """Store ``event`` in its entities' streams and notify matching subscriptions.

        ``frame`` replaces the bytes sent for it (a poison frame that is not the event's
        JSON); ``keys`` replaces the entity keys read from its identifiers (for identifiers
        too malformed to route).
        """
        name = str(event.get("name", ""))
        full = orjson.dumps(event) if frame is None else frame
        propagates = PROPAGATES.get(name, False)
        time_ms = _time_ms(event)
        with self.lock:
            self.events.append(event)
            if self.max_recorded is not None and len(self.events) > self.max_recorded:
                del self.events[: len(self.events) - self.max_recorded // 2]
            entry_ms = max(int(time.time() * 1000), self._last_entry_ms)
            self._last_entry_ms = entry_ms
            targets: list[EntityKey] = []
            routed = (
                keys
                if keys is not None
                else [entity_key(ids) for ids in event.get("identifiers") or []]
            )
            for key in routed:
                fanout = [key] + (
                    [("application", key[1])] if key[0] == "device" and propagates else []
                )
                for k in fanout:
                    targets.append(k)
                    if self.enabled:
                        self._last_publish[k] = self.clock()
                        stream = self.streams.setdefault(k, deque(maxlen=self.entity_count))
                        stream.append(
                            StoredEvent(
                                entry_ms,
                                time_ms,
                                name,
                                str(event.get("unique_id", "")),
                                event,
                                full,
                                self.clock(),
                                key,
                            )
                        )
            uid = str(event.get("unique_id", ""))
            for sub in self.subscriptions:
                hits = [k for k in targets if k in sub.entity_keys]
                # Redis XREAD reads each entity stream: one copy per matching stream.
                # The in-memory pubsub matches a subscription once.
                for _ in hits if self.enabled else hits[:1]:
                    self._notify(sub, name, uid, full, event)

    def _notify(
        self,
        sub: Subscription,
        name: str,
        uid: str,
        frame: bytes,
        event: Mapping[str, Any] | None = None,
    ) -> None:
        if sub.names is not None and name not in sub.names:
            return
        if len(sub.buffer) >= sub.capacity:
            sub.dropped += 1
            self.dropped_events += 1
            return
        if sub.visible is not None and event is not None and not sub.visible(event):
            frame = b""
        sub.buffer.append((uid, frame))
        sub.wake()

    def subscribe(self, sub: Subscription, *, after_ns: int | None, tail: int) -> None:
        """Replay history into ``sub`` (LS ``SubscribeWithHistory``), then attach it for live.

        Both happen under the lock, so no live event is lost or repeated at the handover.
        """
        with self.lock:
            if self.enabled:
                if after_ns is None and tail == 0:
                    after_ns = time.time_ns()
                after_ms = None if after_ns is None else after_ns // 1_000_000
                start_ms = None if after_ms is None else after_ms - 1000  # Redis clock skew
                now = self.clock()
                self._forget_expired(now)
                for key in sub.entity_keys:
                    entries = [
                        e
                        for e in self.streams.get(key, ())
                        if start_ms is None or e.entry_ms >= start_ms
                    ]
                    if tail > 0:
                        entries = entries[-tail:]
                    for e in entries:
                        if after_ms is not None and e.time_ms <= after_ms:
                            continue
                        expired = now - e.stored_at >= self.payload_ttl_s
                        self._notify(
                            sub, e.name, e.unique_id, e.sparse() if expired else e.full, e.event
                        )
            self.subscriptions.append(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            if sub in self.subscriptions:
                self.subscriptions.remove(sub)

    def take(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        """Pop up to ``limit`` buffered frames of ``sub``."""
        with self.lock:
            n = min(limit, len(sub.buffer))
            return [sub.buffer.popleft() for _ in range(n)]

    def _forget_expired(self, now: float) -> None:
        """Drop entity streams whose last publish is ``entity_ttl_s`` old (under the lock)."""
        for key, last in list(self._last_publish.items()):
            if now - last >= self.entity_ttl_s:
                del self._last_publish[key]
                self.streams.pop(key, None)

    def expire_entities(self) -> None:
        """Forget every entity stream, as once the entity TTL has passed."""
        with self.lock:
            self._last_publish.clear()
            self.streams.clear()

    def expire_payloads(self) -> None:
        """Make every stored event replay sparse, as after the payload TTL."""
        with self.lock:
            for stream in self.streams.values():
                for e in stream:
                    e.stored_at = float("-inf")

    def find_related(self, correlation_id: str) -> list[dict[str, Any]]:
        """Stored events carrying ``correlation_id`` (``GET /api/v3/events/related``)."""
        with self.lock:
            self._forget_expired(self.clock())
            seen: dict[str, dict[str, Any]] = {}
            for stream in self.streams.values():
                for e in stream:
                    if correlation_id in e.event.get("correlation_ids", ()):
                        seen.setdefault(e.unique_id, e.event)
            return list(seen.values())


def _time_ms(event: Mapping[str, Any]) -> int:
    try:
        return parse_time_ns(str(event.get("time", ""))) // 1_000_000
    except ValueError:
        return 0


# --- rate limiting (TTS_WIRE §7) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    headers: list[tuple[str, str]]


class RateLimiter:
    """GCRA like throttled v2: a burst of ``per_min``, refilled evenly over a minute."""

    def __init__(self, per_min: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> RateResult:
        """Count one request against ``key``; headers are ``X-Rate-Limit-*`` (whole seconds)."""
        interval = 60.0 / self.per_min
        with self._lock:
            now = self.clock()
            tat = max(self._tat.get(key, now), now)
            new_tat = tat + interval
            allow_at = new_tat - self.per_min * interval
            if now < allow_at:
                allowed, available, reset, retry = False, 0, tat - now, allow_at - now
            else:
                self._tat[key] = new_tat
                available = int((now - allow_at) / interval + 1e-9)
                allowed, reset, retry = True, new_tat - now, 0.0
        headers = [
            ("x-rate-limit-limit", str(self.per_min)),
            ("x-rate-limit-available", str(available)),
            ("x-rate-limit-reset", str(int(reset))),
            ("x-rate-limit-retry", str(int(retry))),
        ]
        return RateResult(allowed, headers)
