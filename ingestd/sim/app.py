"""The HTTP side of the simulated Things Stack: routing, the events stream, small endpoints.

``POST /api/v3/events`` (TTS_WIRE §1) checks in TTS order (decode → validate → rate limit →
identifiers → names → rights), then writes the start frame, history and live events framed
as grpc-gateway does: bare ``{"result":…}`` objects followed by ``\\n\\n`` for an exact
``Accept: text/event-stream``, else ``\\n``. No heartbeats. Stream faults (drop, stall,
error frame, shuffle, fragmenting) apply here. Downlink requests go to :mod:`ingestd.sim.downlink`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ingestd.sim import events as eventgen
from ingestd.sim import fidelity as sim_fidelity
from ingestd.sim.downlink import DownlinkRequest
from ingestd.sim.storage import STORAGE_RE
from ingestd.sim.store import (
    ERROR_FOR_STATUS,
    SimError,
    Subscription,
    entity_key,
    error_details,
    expand_names,
)

if TYPE_CHECKING:
    from ingestd.sim.server import Simulator

CHUNK_FRAMES = 256  # frames joined into one write when a reader lags
OUT_OF_ORDER_WAIT_S = 0.02  # how long to gather a window before shuffling it
PAUSE_POLL_S = 0.05  # a stalled stream re-checks its stall deadline this often
MIN_BUFFER, MAX_BUFFER = 8, 1024  # TTS: clamp(tail, 8, 1024)
_ID_KINDS = ("application", "client", "device", "gateway", "organization", "user")
_ID_PATTERN = r"^[a-z0-9](?:[-]?[a-z0-9]){2,}$"  # Go RE2: `$` is the end of text
_RIGHTS_RE = re.compile(r"^/api/v3/applications/([^/]+)/rights$")
_DOWN_RE = re.compile(r"^/api/v3/as/applications/([^/]+)/devices/([^/]+)/down(/push|/replace)?$")
_SECURITY_HEADERS = [
    ("referrer-policy", "strict-origin-when-cross-origin"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-xss-protection", "1; mode=block"),
]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, kw_only=True)
class StreamRequest:
    """One recorded ``POST /api/v3/events`` and how the simulator answered it."""

    time: float
    request_id: str
    headers: dict[str, str]
    body: Any
    identifiers: list[dict[str, Any]]
    after: str | None
    tail: int
    names: list[str]
    status: int
    error_name: str | None = None

    @property
    def user_agent(self) -> str | None:
        return self.headers.get("user-agent")

    @property
    def accept(self) -> str | None:
        return self.headers.get("accept")

    @property
    def authorization_present(self) -> bool:
        return "authorization" in self.headers


class StreamConn:
    """An open stream's handle: the server loop wakes it, ``close()`` ends it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wake = asyncio.Event()
        self.done = asyncio.Event()
        self.closing = False
        self._pending = False
        self.transport: Any = None  # uvicorn's, when reachable; only used by abort()
        self.aborted = False  # dropped without the final chunk (abrupt close fault)

    def notify_threadsafe(self) -> None:
        """Called under the store lock from any thread; coalesces wakeups."""
        if not self._pending:
            self._pending = True
            self.loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        self._pending = False
        self.wake.set()

    def close(self) -> None:
        """End the stream (on the server loop)."""
        self.closing = True
        self.wake.set()

    def abort(self) -> None:
        """Drop the connection: for a client that stopped reading (``send`` is blocked)."""
        if self.transport is not None:
            self.transport.abort()


def _parse(body: bytes) -> tuple[list[dict[str, Any]], int, int | None, str | None, list[str]]:
    """Decode a ``StreamEventsRequest``; raise ValueError as grpc-gateway's decoder would."""
    req = orjson.loads(body or b"{}")
    if not isinstance(req, dict):
        raise ValueError("proto: syntax error (line 1:1): unexpected token")
    idents, tail, after, names = (
        req.get("identifiers") or [],
        req.get("tail") or 0,
        req.get("after"),
        req.get("names") or [],
    )
    if not isinstance(idents, list) or not all(isinstance(i, dict) for i in idents):
        raise ValueError("invalid value for identifiers")
    idents = sim_fidelity.snake_identifiers(idents)  # TTS accepts lowerCamelCase keys too
    if isinstance(tail, str) and tail.isdigit():
        tail = int(tail)
    if not isinstance(tail, int) or isinstance(tail, bool) or not 0 <= tail < 2**32:
        raise ValueError(f"invalid value for uint32 field tail: {tail!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("invalid value for names")
    after_ns = None
    if after is not None:
        after_ns = eventgen.parse_time_ns(str(after))
    return idents, tail, after_ns, after, names


def _validate_identifiers(idents: list[dict[str, Any]]) -> None:
    for i, ids in enumerate(idents):
        kinds = [k for k in _ID_KINDS if f"{k}_ids" in ids]
        inner = ids.get(f"{kinds[0]}_ids") if kinds else None
        values = (
            []
            if not isinstance(inner, dict)
            else (
                [
                    str(inner.get("device_id", "")),
                    str(inner.get("application_ids", {}).get("application_id", "")),
                ]
                if kinds[0] == "device"
                else [str(inner.get(f"{kinds[0]}_id", ""))]
            )
        )
        bad = not values or any(not re.fullmatch(_ID_PATTERN, v) or len(v) > 36 for v in values)
        if bad:
            reason = f'value does not match regex pattern "{_ID_PATTERN}"'
            cause = error_details(
                "validation",
                {"field": "ids", "name": "EntityIdentifiersValidationError", "reason": reason},
            )
            raise SimError(
                "validation",
                {
                    "field": f"identifiers[{i}]",
                    "name": "StreamEventsRequestValidationError",
                    "reason": "embedded message failed validation",
                },
                cause=cause,
            )


async def serve_stream(
    sim: Simulator,
    receive: Callable[[], Any],
    send: Callable[[dict[str, Any]], Any],
    *,
    headers: dict[str, str],
    accepts: list[str],
    body: bytes,
    base_headers: list[tuple[str, str]],
    recorded_headers: dict[str, str],
) -> None:
    """Answer one events stream request until it ends, the client leaves or the sim stops."""
    sse = "text/event-stream" in accepts  # grpc-gateway: exact match of a whole value
    delim = b"\n\n" if sse else b"\n"
    ctype = b"text/event-stream" if sse else b"application/json"
    request_id = headers["x-request-id"]
    extra: list[tuple[str, str]] = []
    idents: list[dict[str, Any]] = []
    tail, after_ns, after = 0, None, None
    names: list[str] = []
    parsed: Any = None

    def record(status: int, error: str | None = None) -> None:
        sim.stream_requests.append(
            StreamRequest(
                time=time.time(),
                request_id=request_id,
                headers=recorded_headers,
                body=parsed,
                identifiers=idents,
                after=after,
                tail=tail,
                names=names,
                status=status,
                error_name=error,
            )
        )

    async def start(status: int, hdrs: list[tuple[str, str]]) -> None:
        raw = [(k.encode(), v.encode()) for k, v in base_headers + hdrs]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*raw, (b"content-type", ctype)],
            }
        )

    try:
        if sim.fail_next_requests:  # an outage in front of the handler
            status = sim.fail_next_requests.pop(0)
            retry = [("x-rate-limit-retry", "1")] if status == 429 else []
            raise SimError(ERROR_FOR_STATUS.get(status, "internal"), headers=retry)
        parsed = orjson.loads(body) if body else {}
        idents, tail, after_ns, after, names = _parse(body)
        _validate_identifiers(idents)
        if sim.stream_limiter is not None:
            token = (headers.get("authorization") or "").rpartition(".")[0].partition(".")[2]
            result = sim.stream_limiter.check(
                f"grpc:stream:accept:/ttn.lorawan.v3.Events/Stream:token:{token}"
            )
            extra = result.headers
            if not result.allowed:
                raise SimError(
                    "rate_limit_exceeded",
                    {
                        "key": f"grpc:stream:accept:/ttn.lorawan.v3.Events/Stream:token:{token}",
                        "rate": sim.stream_limiter.per_min,
                    },
                )
        if not idents:
            raise SimError("no_identifiers")
        expanded = expand_names(names)
        keys = [entity_key(ids) for ids in idents]
        token_id = sim.authorize(headers.get("authorization"), keys)
    except (ValueError, orjson.JSONDecodeError) as exc:
        record(400)
        await start(400, extra)
        await send(
            {"type": "http.response.body", "body": orjson.dumps({"code": 3, "message": str(exc)})}
        )
        return
    except SimError as exc:
        record(exc.status, exc.name)
        await start(exc.status, extra + exc.headers)
        await send(
            {"type": "http.response.body", "body": orjson.dumps({"error": exc.body}) + delim}
        )
        return

    record(200)
    conn = StreamConn(asyncio.get_running_loop())
    conn.transport = getattr(send, "transport", None) or getattr(
        getattr(send, "__self__", None), "transport", None
    )
    sub = Subscription(
        keys,
        frozenset(expanded) if expanded else None,
        min(max(tail, MIN_BUFFER), MAX_BUFFER),
        wake=conn.notify_threadsafe,
        visible=sim_fidelity.visibility_filter(sim.application_id, sim.key_rights(token_id)),
    )
    if not sim.store and (tail or after is not None):
        extra.append(("x-warning", "Events storage is not enabled"))
    sim.conns.add(conn)
    sim.event_store.subscribe(sub, after_ns=after_ns, tail=tail)
    disconnect = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        now_ns = time.time_ns()
        start_event: dict[str, Any] = {
            "name": "events.stream.start",
            "time": eventgen.format_time_ns(now_ns),
            "identifiers": idents,
        }
        if expanded:
            start_event["data"] = {
                "@type": "type.googleapis.com/google.protobuf.Value",
                "value": expanded,
            }
        start_event["correlation_ids"] = [f"rpc:/ttn.lorawan.v3.Events/Stream:{request_id}"]
        start_event["origin"] = socket.gethostname()
        start_event["unique_id"] = sim.ulids(datetime.fromtimestamp(now_ns / 1e9, UTC))
        await start(200, extra)
        await _write(sim, send, b'{"result":' + orjson.dumps(start_event) + b"}" + delim)
        await _pump(sim, send, conn, sub, disconnect, delim)
        if conn.aborted:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        sim.event_store.unsubscribe(sub)
        sim.conns.discard(conn)
        disconnect.cancel()
        conn.done.set()


async def _pump(
    sim: Simulator,
    send: Callable[[dict[str, Any]], Any],
    conn: StreamConn,
    sub: Subscription,
    disconnect: asyncio.Future[None],
    delim: bytes,
) -> None:
    """Write buffered events until the stream must end; apply the stream faults."""
    sent = 0
    while not conn.closing and not disconnect.done():
        fault = _fault_due(sim, sent)
        if fault == "drop":
            return
        if fault == "abort":  # no final chunk: the client sees a truncated body
            conn.aborted = True
            await sim_fidelity.flushed(conn.transport)  # what was sent arrives, then the drop
            conn.abort()
            return
        if fault == "error":
            err = SimError(sim.error_frame_name)
            await _write(sim, send, orjson.dumps({"error": err.body}) + delim)
            return
        if fault == "stall":
            await _wait(conn, disconnect)
            continue
        if sim.stall_until > time.monotonic():
            await _pause(sim, conn, disconnect)
            continue
        batch = sim.event_store.take(sub, CHUNK_FRAMES)
        if not batch:
            conn.wake.clear()
            if not sub.buffer:
                await _wait(conn, disconnect)
            continue
        window = sim.out_of_order_window
        if window > 1:
            deadline = time.monotonic() + OUT_OF_ORDER_WAIT_S
            while len(batch) < window and time.monotonic() < deadline and not conn.closing:
                await asyncio.sleep(0.002)
                batch += sim.event_store.take(sub, window - len(batch))
            for i in range(0, len(batch), window):
                part = batch[i : i + window]
                sim.rng.shuffle(part)
                batch[i : i + window] = part
        chunk = bytearray()
        for _uid, frame in batch:
            if not frame:
                continue  # an event the stream's key may not see (EventIsVisible)
            if _fault_due(sim, sent):
                break  # the rest of the batch is lost, as in a crash
            chunk += b'{"result":' + frame + b"}" + delim
            sent += 1
        await _write(sim, send, bytes(chunk))


def _fault_due(sim: Simulator, sent: int) -> str | None:
    if sim.abrupt_close_after_n_frames is not None and sent >= sim.abrupt_close_after_n_frames:
        return "abort"
    if sim.drop_every_n_frames and sent >= sim.drop_every_n_frames:
        return "drop"
    if sim.error_frame_after_n is not None and sent >= sim.error_frame_after_n:
        return "error"
    if sim.stall_after_n_frames is not None and sent >= sim.stall_after_n_frames:
        return "stall"
    return None


async def _write(sim: Simulator, send: Callable[[dict[str, Any]], Any], data: bytes) -> None:
    if not data:
        return
    if sim.fragment_frames and len(data) > 1:
        cut = sim.rng.randrange(1, len(data))
        await send({"type": "http.response.body", "body": data[:cut], "more_body": True})
        data = data[cut:]
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _wait(conn: StreamConn, disconnect: asyncio.Future[None]) -> None:
    waiter: asyncio.Future[Any] = asyncio.ensure_future(conn.wake.wait())
    try:
        await asyncio.wait([waiter, disconnect], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _pause(sim: Simulator, conn: StreamConn, disconnect: asyncio.Future[None]) -> None:
    """Send nothing until ``sim.stall_until`` (a mid-stream stall; the socket stays open)."""
    while not conn.closing and not disconnect.done():
        left = sim.stall_until - time.monotonic()
        if left <= 0:
            return
        await asyncio.wait([disconnect], timeout=min(left, PAUSE_POLL_S))


async def _wait_disconnect(receive: Callable[[], Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def app(
    sim: Simulator, scope: dict[str, Any], receive: Callable[[], Any], send: Send
) -> None:
    """The ASGI entry point: one HTTP request."""
    if scope["type"] != "http":
        return
    headers: dict[str, str] = {}
    accepts: list[str] = []
    for raw_key, raw_value in scope["headers"]:
        key, value = raw_key.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[key] = value
        if key == "accept":
            accepts.append(value)
    request_id = headers.get("x-request-id") or sim.ulids()
    headers["x-request-id"] = request_id
    # Records keep the scheme and key id, never the secret part.
    recorded = {
        k: (v.rpartition(".")[0] + ".…" if k == "authorization" and "." in v else v)
        for k, v in headers.items()
    }
    base = [("x-request-id", request_id), *_SECURITY_HEADERS]
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path, method = scope["path"], scope["method"]
    if path == "/api/v3/events" and method == "POST":
        if sim.gzip_stream and sim_fidelity.accepts_gzip(headers.get("accept-encoding")):
            send = sim_fidelity.GzipSend(send)
        if sim.h2c:  # hypercorn hides its transport; the abrupt-close fault needs it
            peer = sim_fidelity.peer_transport(scope.get("client"))
            send = sim_fidelity.TransportSend(send, peer)
        await serve_stream(
            sim,
            receive,
            send,
            headers=headers,
            accepts=accepts,
            body=body,
            base_headers=base,
            recorded_headers=recorded,
        )
        return
    match = _DOWN_RE.match(path)
    if match and method == ("GET" if match.group(3) is None else "POST"):
        op = (match.group(3) or "/list")[1:]
        status, extra, answer = sim.downlinks.handle(
            op=op,
            application_id=match.group(1),
            device_id=match.group(2),
            body=body,
            headers=headers,
        )
        sim.downlink_requests.append(
            DownlinkRequest(
                time=time.time(),
                method=method,
                path=path,
                op=op,
                application_id=match.group(1),
                device_id=match.group(2),
                body=_json_or_none(body),
                headers=recorded,
                request_id=request_id,
                status=status,
                error_name=_error_name(answer),
            )
        )
        await _respond(send, status, base + extra, answer)
    elif (rights_match := _RIGHTS_RE.match(path)) and method == "GET":
        status, answer = _list_rights(sim, rights_match.group(1), headers)
        await _respond(send, status, base, answer)
    elif (storage := STORAGE_RE.match(path)) and method == "GET" and sim.storage.enabled:
        if sim.storage.delay_s:
            await asyncio.sleep(sim.storage.delay_s)
        status, extra, data = sim.storage.handle(
            match=storage,
            query_string=scope["query_string"],
            headers=headers,
            authorize=sim.authorize,
        )
        await _respond_raw(send, status, base + extra, data)
    elif path == "/api/v3/events/related" and method == "GET":
        status, answer = _related(sim, scope, headers)
        await _respond(send, status, base, answer)
    elif path.startswith("/_sim/"):
        await _respond(send, 200, base, _control(sim, path, body))
    else:
        await _respond(
            send,
            404 if not match else 405,
            base,
            {
                "code": 5 if not match else 12,
                "message": "Not Found" if not match else "Method Not Allowed",
            },
        )


def _related(
    sim: Simulator, scope: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    query = dict(p.partition("=")[::2] for p in scope["query_string"].decode().split("&"))
    try:
        sim._token_id(headers.get("authorization"))
        if not sim.store:
            raise SimError("storage_disabled")
    except SimError as exc:
        return exc.status, exc.body
    return 200, {"events": sim.event_store.find_related(query.get("correlation_id", ""))}


def _list_rights(
    sim: Simulator, application_id: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """``ApplicationAccess.ListRights``: no right needed; ``{}`` for none or another app."""
    try:
        token_id = sim._token_id(headers.get("authorization"))
    except SimError as exc:
        return exc.status, exc.body
    granted = sim.key_rights(token_id) if application_id == sim.application_id else frozenset()
    return 200, sim_fidelity.list_rights_body(granted, sim.rng)


def _control(sim: Simulator, path: str, body: bytes) -> dict[str, Any]:
    """The HTTP control API for an out-of-process simulator (``ingestd simulate``)."""
    args = _json_or_none(body) or {}
    if path == "/_sim/uplinks" and args.get("simulated"):
        devs = args.get("device_ids") or sim.device_ids
        evs = [sim.simulated_uplink(devs[i % len(devs)]) for i in range(int(args.get("count", 1)))]
        return {"unique_ids": [e["unique_id"] for e in evs]}
    if path == "/_sim/uplinks":
        evs = sim.uplinks(int(args.get("count", 1)), devices=args.get("device_ids"))
        return {"unique_ids": [e["unique_id"] for e in evs]}
    if path == "/_sim/restart":
        for conn in list(sim.conns):
            conn.close()
    elif path == "/_sim/faults":
        for key, value in args.items():
            if key.startswith("storage_") and hasattr(sim.storage, key[8:]):
                setattr(sim.storage, key[8:], value)  # e.g. storage_enabled, storage_forbidden
            elif hasattr(sim, key) and not key.startswith("_"):
                setattr(sim, key, value)
    return {
        "streams": len(sim.conns),
        "events": len(sim.events),
        "dropped_events": sim.dropped_events,
        "queues": {d: len(q) for d, q in sim.downlinks.queues.items()},
    }


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: Any) -> None:
    data = orjson.dumps(body)
    raw = [(k.encode(), v.encode()) for k, v in headers]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:  # grpc-gateway copies the status message here
        raw.append((b"www-authenticate", str(body.get("message", "")).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _respond_raw(
    send: Send, status: int, headers: list[tuple[str, str]], data: bytes
) -> None:
    raw = [(k.encode(), v.encode()) for k, v in headers]
    if not any(k == "content-type" for k, _ in headers):
        raw.append((b"content-type", b"application/json"))
    raw.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _error_name(answer: dict[str, Any]) -> str | None:
    details = answer.get("details") or [{}]
    return str(details[0].get("name")) if details[0].get("name") else None
