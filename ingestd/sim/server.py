"""A simulated Things Stack on loopback, for tests, ``ingestd simulate``, the demo and benchmarks.

A raw ASGI app served by uvicorn in a background thread (own event loop), like httpx's
test server. It speaks TTS's wire formats (TTS_WIRE §1, §5, §7): ``POST /api/v3/events``
with the start frame, no heartbeats, ``after``/``tail`` replay from a Redis-like store, and
the downlink API with lifecycle events. Tests script it from their own thread (``publish``,
``uplink``, ``restart``) and inject faults through plain attributes.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
import uvicorn

from ingestd import rights
from ingestd.sim import app as sim_app
from ingestd.sim import events as eventgen
from ingestd.sim import fidelity as sim_fidelity
from ingestd.sim.app import StreamConn, StreamRequest
from ingestd.sim.downlink import DownlinkApi, DownlinkRequest, SimDevice
from ingestd.sim.storage import StorageApi
from ingestd.sim.store import EntityKey, EventStore, RateLimiter, SimError, entity_key

log = structlog.get_logger()

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 1.0
CLOSE_GRACE_S = 0.2  # a stream gets this long to end cleanly before its socket is dropped
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


# Malformed uplinks ``Simulator.poison`` can publish. The first two are refused per event
# by any parser; the last three are the inputs of issue 8 items 1 and 2: identifiers that
# are not objects, an f_cnt above 2^63 (SQLite cannot bind it), a NUL in the unique_id
# (PostgreSQL text cannot hold it). ``unique_id`` of a "nul" poison is its ULID prefix.
POISON_KINDS = ("bad_field", "truncated", "bad_identifiers", "huge_f_cnt", "nul")


@dataclass(frozen=True)
class Poison:
    """One poison event the simulator published."""

    kind: str
    unique_id: str  # without the NUL of a "nul" poison
    time: str


def fake_api_key(rng: random.Random | None = None) -> str:
    """A realistic but fake TTS API key: ``NNSXS.<39 base32>.<52 base32>``."""
    rng = rng or random.SystemRandom()
    enc = "".join(rng.choice(_B32) for _ in range(91))
    return f"NNSXS.{enc[:39]}.{enc[39:]}"


@dataclass(kw_only=True)
class Simulator:
    """The simulated Things Stack. ``start()`` serves it; every public method is thread-safe."""

    application_id: str = "sim-app"
    devices: int = 10
    api_key: str = ""
    store: bool = True
    store_entity_count: int = 100
    payload_ttl_s: float = 600.0
    gateways: int = 2
    uplink_rate: float = 0.0  # uplinks/s over all devices; 0 = only scripted ones
    rate_limit_per_min: int | None = None
    downlink_ack_delay_s: float = 0.05
    queue_capacity: int = 10000
    seed: int | None = None
    max_recorded_events: int | None = None  # cap on ``events`` (None: keep all, for tests)
    host: str = "127.0.0.1"
    port: int = 0
    # Stream faults (set any time; they apply to frames written afterwards):
    drop_every_n_frames: int | None = None  # end each stream after N event frames
    out_of_order_window: int = 0  # shuffle event frames within windows of this size
    stall_after_n_frames: int | None = None  # stop writing after N frames, keep the socket
    error_frame_after_n: int | None = None  # end each stream with an error frame after N
    error_frame_name: str = "api_key_expired"
    fragment_frames: bool = False  # split every write in two chunks at a random byte
    fail_next_requests: list[int] = field(default_factory=list)  # statuses for next streams
    stall_until: float = 0.0  # time.monotonic() deadline: until then no stream sends a frame
    api_key_expired: bool = False  # every request then gets 401 api_key_expired
    stream_requests: list[StreamRequest] = field(default_factory=list)
    # --- fidelity (issue 11; ingestd.sim.fidelity) ---
    api_key_rights: tuple[str, ...] = sim_fidelity.DEFAULT_KEY_RIGHTS  # rights of ``api_key``
    api_keys: dict[str, list[str]] = field(default_factory=dict)  # more keys → their rights
    simulated_uplink_fraction: float = 0.0  # share of generated uplinks sent as simulated
    entity_ttl_s: float = 86400.0  # an entity's history is forgotten this long after its last
    gzip_stream: bool = False  # gzip the stream when the client sends Accept-Encoding: gzip
    h2c: bool = False  # serve with hypercorn: HTTP/2 prior knowledge (and HTTP/1.1) on plain TCP
    abrupt_close_after_n_frames: int | None = None  # drop the socket, no final chunk, after N
    poisoned: list[Poison] = field(default_factory=list)  # every poison event published
    # Storage Integration (ingestd.sim.storage); off like open-source TTS unless enabled:
    storage_enabled: bool = False
    storage_retention_s: float = 30 * 86400.0
    storage_write_delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.api_key = self.api_key or fake_api_key(self.rng if self.seed is not None else None)
        self.ulids = eventgen.UlidFactory(
            random.Random(self.seed) if self.seed is not None else None
        )
        self.event_store = EventStore(
            enabled=self.store,
            entity_count=self.store_entity_count,
            payload_ttl_s=self.payload_ttl_s,
            max_recorded=self.max_recorded_events,
        )
        self.event_store.entity_ttl_s = self.entity_ttl_s
        self.keyring = sim_fidelity.KeyRing()
        self.keyring.add(self.api_key, self.api_key_rights)
        for key, granted in self.api_keys.items():
            self.keyring.add(key, granted)
        self.device_ids = [f"dev-{i + 1:04d}" for i in range(self.devices)]
        self._devices = {
            d: SimDevice(
                application_id=self.application_id,
                device_id=d,
                dev_eui=f"70B3D57ED005{i + 1:04X}",
                join_eui="70B3D57ED0000000",
                dev_addr=f"260B{self.rng.getrandbits(16):04X}",
                session_key_id=self.rng.randbytes(16),
            )
            for i, d in enumerate(self.device_ids)
        }
        self._gateways = eventgen.default_gateways(self.gateways)
        per_min = self.rate_limit_per_min
        self.stream_limiter = RateLimiter(per_min) if per_min else None
        self.downlinks = DownlinkApi(
            store=self.event_store,
            devices=self._devices,
            application_id=self.application_id,
            authorize=lambda auth, app, need: self.authorize(auth, [("application", app)], need),
            capacity=self.queue_capacity,
            ack_delay_s=self.downlink_ack_delay_s,
            rate_limiter=RateLimiter(per_min) if per_min else None,
            rng=random.Random(self.rng.random()),
        )
        self.downlink_requests: list[DownlinkRequest] = self.downlinks.requests
        self.storage = StorageApi(
            application_id=self.application_id,
            enabled=self.storage_enabled,
            retention_s=self.storage_retention_s,
            write_delay_s=self.storage_write_delay_s,
            rate_limiter=RateLimiter(per_min) if per_min else None,
        )
        self.fail_next_pushes = self.downlinks.fail_next_pushes  # device → statuses
        self.failing_devices = self.downlinks.failing_devices  # → as.down.data.failed.forward
        self.nacking_devices = self.downlinks.nacking_devices  # confirmed → nack.forward
        self.base_url = ""
        self.conns: set[StreamConn] = set()
        self._lock = threading.Lock()
        self._last_time = datetime.now(UTC) - timedelta(seconds=1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None  # uvicorn.Server, or sim_fidelity.H2cServer with h2c
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Simulator:
        """Serve on ``host:port`` (0 = a free port) and return once accepting connections."""
        if self.h2c:
            self._server = sim_fidelity.H2cServer(self._app, self.host, self.port)
            return self._start_thread()
        config = uvicorn.Config(
            self._app,
            host=self.host,
            port=self.port,
            log_config=None,
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=1,
            interface="asgi3",
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        return self._start_thread()

    def _start_thread(self) -> Simulator:
        self._thread = threading.Thread(target=self._run, name="tts-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"simulator could not listen on {self.host}:{self.port}")
            time.sleep(0.002)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{self.host}:{port}"
        log.info("simulator_started", base_url=self.base_url, application_id=self.application_id)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = self.downlinks.loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        assert self._server is not None
        gen = asyncio.create_task(self._generate()) if self.uplink_rate > 0 else None
        try:
            await self._server.serve()
        finally:
            if gen is not None:
                gen.cancel()
                await asyncio.gather(gen, return_exceptions=True)
            self.downlinks.cancel_timers()

    def stop(self) -> None:
        """Close every stream and stop serving, within about a second."""
        if self._server is None or self._thread is None:
            return
        if self._thread.is_alive():
            self.restart()
            self._server.should_exit = True
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self) -> None:
        """Drop every open stream (the store survives), like a TTS restart."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self.conns:
            return
        future = asyncio.run_coroutine_threadsafe(self._close_conns(), loop)
        future.result(timeout=STOP_TIMEOUT_S)

    async def _close_conns(self) -> None:
        conns = list(self.conns)  # may have emptied since restart() looked
        for conn in conns:
            conn.close()
        for grace_s in (CLOSE_GRACE_S, CLOSE_GRACE_S):
            waiters = [asyncio.create_task(c.done.wait()) for c in conns if not c.done.is_set()]
            if not waiters:
                return
            await asyncio.wait(waiters, timeout=grace_s)
            for waiter in waiters:
                waiter.cancel()
            for conn in conns:  # still writing into a full socket: the client stopped reading
                if not conn.done.is_set():
                    conn.abort()

    def reset_streams(self) -> None:
        """Cut every open stream's TCP connection at once (no clean end, frames in flight lost)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self.conns:
            return

        async def _reset() -> None:
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.abort()
                else:
                    conn.close()

        asyncio.run_coroutine_threadsafe(_reset(), loop).result(timeout=STOP_TIMEOUT_S)

    def stall_streams(self, seconds: float) -> None:
        """Stop writing frames on every stream (open or opened meanwhile) for ``seconds``.

        The connections stay open; events published meanwhile wait in each stream's bounded
        buffer, which drops what does not fit, as TTS's does.
        """
        self.stall_until = max(self.stall_until, time.monotonic() + seconds)

    # --- scripting ---------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """Store ``event`` and send it to every matching open stream (and to storage)."""
        self.event_store.publish(event)
        self.storage.record(event)

    def next_time(self) -> datetime:
        """Now, but strictly after the previous generated event (1 µs apart at least)."""
        with self._lock:
            now = max(datetime.now(UTC), self._last_time + timedelta(microseconds=1))
            self._last_time = now
            return now

    def uplink(self, device_id: str, **fields: Any) -> dict[str, Any]:
        """Build an ``as.up.data.forward`` for ``device_id`` (fields override), publish, return."""
        event = self._uplink_event(device_id, **fields)
        self.publish(event)
        return event

    def poison(self, kind: str, device_id: str | None = None) -> Poison:
        """Publish one malformed uplink of ``kind`` (see :data:`POISON_KINDS`) and return it.

        Each is stored and replayed like any event, so a daemon that cannot cope meets it
        again on every resume. Its ``unique_id`` appears in the frame, so a test can find
        it in ``rejected_events``.
        """
        device_id = device_id or self.device_ids[0]
        event = self._uplink_event(device_id)
        uid = str(event["unique_id"])
        frame: bytes | None = None
        keys: list[EntityKey] | None = None
        up = event["data"]["uplink_message"]
        if kind == "bad_field":
            up["f_port"] = "two"
        elif kind == "truncated":
            whole = orjson.dumps({"unique_id": uid, **event})
            frame = whole[: max(len(whole) * 2 // 3, 120)]
        elif kind == "bad_identifiers":
            keys = [entity_key(event["identifiers"][0])]
            event["identifiers"] = [{"device_ids": device_id}]
        elif kind == "huge_f_cnt":
            up["f_cnt"] = 2**63 + 7
        elif kind == "nul":
            event["unique_id"] = uid + "\x00"
        else:
            raise ValueError(f"unknown poison kind {kind!r}; known: {', '.join(POISON_KINDS)}")
        poison = Poison(kind=kind, unique_id=uid, time=str(event["time"]))
        with self._lock:
            self.poisoned.append(poison)
        self.event_store.publish(event, frame=frame, keys=keys)
        return poison

    def _uplink_event(self, device_id: str, **fields: Any) -> dict[str, Any]:
        dev = self._devices[device_id]
        with self._lock:
            dev.f_cnt_up += 1
            f_cnt = fields.pop("f_cnt", dev.f_cnt_up)
            volume = f_cnt * 37 + self.rng.randrange(30)
            battery = 3600 - f_cnt // 50
            payload = struct.pack(">IHBB", volume, battery, 0, 1)
            decoded = {"volume_liters": volume, "battery_mv": battery, "leak_detected": False}
            rng = random.Random(self.rng.getrandbits(64))
        when = fields.pop("time", None) or self.next_time()
        args: dict[str, Any] = {
            "application_id": self.application_id,
            "device_id": device_id,
            "dev_eui": dev.dev_eui,
            "join_eui": dev.join_eui,
            "dev_addr": dev.dev_addr,
            "session_key_id": dev.session_key_id,
            "f_cnt": f_cnt,
            "f_port": 2,
            "payload": payload,
            "decoded_payload": decoded,
            "gateways": self._gateways,
            "time": when,
            "unique_id": self.ulids(when),
            "rng": rng,
            "packet_error_rate": round(rng.random() * 0.05, 4),
            "version_ids": {
                "brand_id": "acme-devices",
                "model_id": "wm100",
                "hardware_version": "1.0",
                "firmware_version": "2.1.0",
                "band_id": "EU_863_870",
            },
        }
        args.update(fields)
        return eventgen.uplink_event(**args)

    def uplinks(self, n: int, *, devices: list[str] | None = None) -> list[dict[str, Any]]:
        """``n`` uplinks round-robin over ``devices`` (default all), strictly increasing times."""
        devs = devices or self.device_ids
        return [self.uplink(devs[i % len(devs)]) for i in range(n)]

    def join(self, device_id: str) -> dict[str, Any]:
        """Publish an ``as.up.join.forward`` for ``device_id`` and return it."""
        dev = self._devices[device_id]
        when = self.next_time()
        with self._lock:
            rng = random.Random(self.rng.getrandbits(64))
        event = eventgen.join_event(
            application_id=self.application_id,
            device_id=device_id,
            dev_eui=dev.dev_eui,
            dev_addr=dev.dev_addr,
            time=when,
            unique_id=self.ulids(when),
            rng=rng,
            session_key_id=dev.session_key_id,
        )
        self.publish(event)
        return event

    def queue(self, device_id: str) -> list[dict[str, Any]]:
        """The downlink queue of ``device_id`` as ``GET …/down`` lists it."""
        return self.downlinks.queue(device_id)

    def add_api_key(self, granted: list[str] | tuple[str, ...]) -> str:
        """A new API key for the application with ``granted`` rights (TTS names, e.g.
        ``RIGHT_APPLICATION_INFO``); returns the key."""
        key = fake_api_key(self.rng)
        self.api_keys[key] = list(granted)
        self.keyring.add(key, granted)
        return key

    def key_rights(self, key_id: str | None) -> frozenset[str]:
        """The implied rights of the key with id ``key_id`` on the application."""
        return self.keyring.rights(key_id)

    def simulated_uplink(
        self,
        device_id: str,
        *,
        f_port: int = 1,
        payload: bytes = b"\x01\x02",
        decoded: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Publish what TTS publishes for a Console "simulate uplink", and return it."""
        dev = self._devices[device_id]
        when = self.next_time()
        event = sim_fidelity.simulated_uplink_event(
            ids=dev.ids(),
            f_port=f_port,
            payload=payload,
            decoded_payload=decoded,
            time=when,
            unique_id=self.ulids(when),
            request_id=request_id or self.ulids(when),
        )
        self.publish(event)
        return event

    def expire_entities(self) -> None:
        """Forget every entity's history, as once ``entity_ttl_s`` has passed (Redis EXPIRE)."""
        self.event_store.expire_entities()

    def expire_payloads(self) -> None:
        """Make all stored events replay sparse, as once the payload TTL has passed."""
        self.event_store.expire_payloads()

    @property
    def dropped_events(self) -> int:
        """Events dropped because a stream's buffer was full (TTS ``channel_dropped``)."""
        return self.event_store.dropped_events

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event published so far, in order."""
        return self.event_store.events

    async def _generate(self) -> None:
        """Automatic uplinks at ``uplink_rate``/s, round-robin over the devices."""
        started, sent = time.monotonic(), 0
        while True:
            due = int((time.monotonic() - started) * self.uplink_rate)
            for _ in range(min(due - sent, 1000)):
                device_id = self.device_ids[sent % len(self.device_ids)]
                if (
                    self.simulated_uplink_fraction
                    and self.rng.random() < self.simulated_uplink_fraction
                ):
                    self.simulated_uplink(device_id)
                else:
                    self.uplink(device_id)
                sent += 1
            await asyncio.sleep(max(0.001, min(0.1, 1 / self.uplink_rate)))

    # --- auth --------------------------------------------------------------------------

    def _token_id(self, authorization: str | None) -> str | None:
        if not authorization:
            return None  # no credentials: no rights (403 below), not 401
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise SimError("unsupported_authorization")
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] not in ("NNSXS", "MFRWG", "OJSWM", "MF2XI", "ONZW4"):
            raise SimError("token")
        prefix, key_id, secret = parts
        if prefix != "NNSXS":
            raise SimError("token_not_found")
        found = self.keyring.find(key_id)
        if found is None:
            raise SimError("api_key_not_found")
        if not secrets.compare_digest(secret, found[0]):
            raise SimError("invalid_authorization")
        if self.api_key_expired:
            raise SimError("api_key_expired")
        return key_id

    def authorize(
        self,
        authorization: str | None,
        entities: list[tuple[str, ...]],
        required: tuple[str, ...] = (),
    ) -> str:
        """The API key's id if it has any right on every entity (``rights.RequireAny``) and
        the ``required`` ones (``RequireApplication``), else the TTS auth error."""
        token_id = self._token_id(authorization)
        granted = self.key_rights(token_id)
        for key in entities:
            kind = "application" if key[0] == "device" else key[0]
            if (
                token_id is None
                or kind != "application"
                or key[1] != self.application_id
                or not granted & rights.APPLICATION_RIGHTS
            ):
                raise SimError(
                    f"no_{kind}_rights"
                    if kind in ("application", "gateway", "organization", "user", "client")
                    else "no_application_rights",
                    {"uid": key[1]},
                )
            missing = rights.missing_rights(granted, required)
            if missing:
                raise SimError(
                    "insufficient_application_rights",
                    sim_fidelity.insufficient_attributes(key[1], missing),
                )
        assert token_id is not None
        return token_id

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await sim_app.app(self, scope, receive, send)
