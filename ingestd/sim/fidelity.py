"""The simulator's model of what a real TTS does beyond the wire format (issue 11).

- **API keys with rights** (:class:`KeyRing`): a key opens a stream with any right on the
  application (lorawan-stack ``pkg/events/grpc/grpc.go`` ``rights.RequireAny``), sees only the
  events its rights make visible (``pkg/auth/rights/rightsutil/rightsutil.go``
  ``EventIsVisible``), and pushes only with ``RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE``
  (``pkg/applicationserver/io/grpc/grpc.go``). ``GET /api/v3/applications/{id}/rights`` answers
  the key's rights (``pkg/identityserver/application_access.go`` ``ListRights``).
- **Simulated uplinks**: Console/API "simulate uplink" (``AppAs.SimulateUplink``) is published
  as ``as.up.data.forward`` with ``data.simulated: true`` (``pkg/applicationserver/io/grpc/
  grpc.go`` sets ``up.Simulated``; ``applicationserver.go`` publishes it like any uplink). The
  uplink is what the Console sends (``pkg/webui/console/components/uplink-form/index.js``):
  no FCnt, no session key, one ``test`` gateway.
- **Transport as TTS serves it**: gzip when the client accepts it (``pkg/web/web.go`` wraps
  every handler in klauspost ``gzhttp``), HTTP/2 with prior knowledge on plain TCP
  (``pkg/component/web.go`` ``h2c.NewHandler``: uvicorn cannot, hypercorn can), and an abrupt
  close without the final chunk, as servers and load balancers do.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingestd import rights
from ingestd.sim import events as eventgen

Send = Callable[[dict[str, Any]], Awaitable[None]]
DEFAULT_KEY_RIGHTS = (rights.APPLICATION_ALL,)
GZIP_LEVEL = 6
H2C_GRACEFUL_S = 1.0
FLUSH_TIMEOUT_S = 0.5


# --- API keys and rights ----------------------------------------------------------------------


@dataclass
class KeyRing:
    """API keys (``NNSXS.<id>.<secret>``) and the rights each was created with."""

    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # full key → rights

    def add(self, key: str, granted: Iterable[str]) -> None:
        self.keys[key] = tuple(granted)

    def find(self, key_id: str) -> tuple[str, tuple[str, ...]] | None:
        """(secret, rights) of the key with id ``key_id``, or None."""
        for key, granted in self.keys.items():
            _, kid, secret = key.split(".")
            if secrets.compare_digest(kid, key_id):
                return secret, granted
        return None

    def rights(self, key_id: str | None) -> frozenset[str]:
        """The implied rights of ``key_id`` on the simulated application (none for None)."""
        found = self.find(key_id) if key_id else None
        return rights.implied(found[1]) if found else frozenset()


def insufficient_attributes(application_id: str, missing: list[str]) -> dict[str, Any]:
    """``insufficient_application_rights`` attributes (``pkg/auth/rights/require.go``)."""
    return {"missing": missing, "uid": application_id}


def list_rights_body(granted: frozenset[str], rng: random.Random) -> dict[str, Any]:
    """``ListRights``: the application rights, in Go map order (random), ``{}`` when none."""
    out = sorted(granted & rights.APPLICATION_RIGHTS)
    rng.shuffle(out)
    return {"rights": out} if out else {}


def visibility_filter(
    application_id: str, granted: frozenset[str]
) -> Callable[[Mapping[str, Any]], bool] | None:
    """A per-event visibility check for a key, or None when it sees everything it can get."""
    table = {application_id: granted}

    def visible(event: Mapping[str, Any]) -> bool:
        idents = event.get("identifiers")
        if not isinstance(idents, list) or not all(
            isinstance(i, Mapping) and all(isinstance(v, Mapping) for v in i.values())
            for i in idents
        ):
            return True  # poison injected on purpose (Simulator.poison): deliver it as is
        return rights.event_visible(event, table)

    return None if granted >= rights.implied([rights.ALL]) else visible


# --- simulated uplinks ------------------------------------------------------------------------


def simulated_uplink_event(
    *,
    ids: dict[str, Any],
    f_port: int,
    payload: bytes,
    decoded_payload: Mapping[str, Any] | None,
    time: datetime,
    unique_id: str,
    request_id: str,
) -> dict[str, Any]:
    """The ``as.up.data.forward`` TTS publishes for ``SimulateUplink`` from the Console."""
    cids = [f"rpc:/ttn.lorawan.v3.AppAs/SimulateUplink:{request_id}"]
    up: dict[str, Any] = {"f_port": f_port, "frm_payload": eventgen.b64(payload)}
    if decoded_payload is not None:
        up["decoded_payload"] = dict(decoded_payload)
    up["rx_metadata"] = [
        {"gateway_ids": {"gateway_id": "test"}, "rssi": 42, "channel_rssi": 42, "snr": 4.2}
    ]
    up["settings"] = {
        "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
        "frequency": "868000000",
    }
    data = {
        "@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
        "end_device_ids": ids,
        "correlation_ids": cids,
        "received_at": eventgen.format_time(time - timedelta(milliseconds=2)),
        "uplink_message": up,
        "simulated": True,
    }
    return eventgen.event(
        name="as.up.data.forward",
        time=eventgen.format_time(time),
        identifiers=[{"device_ids": ids}],
        data=data,
        correlation_ids=cids,
        context=eventgen.TTN_CONTEXT,
        unique_id=unique_id,
    )


# --- identifiers in lowerCamelCase ------------------------------------------------------------

_CAMEL_IDS = {
    "applicationIds": "application_ids",
    "deviceIds": "device_ids",
    "gatewayIds": "gateway_ids",
    "organizationIds": "organization_ids",
    "userIds": "user_ids",
    "clientIds": "client_ids",
    "applicationId": "application_id",
    "deviceId": "device_id",
    "gatewayId": "gateway_id",
    "organizationId": "organization_id",
    "userId": "user_id",
    "clientId": "client_id",
    "devEui": "dev_eui",
    "joinEui": "join_eui",
    "devAddr": "dev_addr",
}


def snake_identifiers(value: Any) -> Any:
    """``EntityIdentifiers`` with lowerCamelCase keys renamed, as TTS's unmarshalers accept
    both (``pkg/ttnpb/identifiers_json.pb.go``; protojson for ``ApplicationIdentifiers``)."""
    if isinstance(value, dict):
        return {_CAMEL_IDS.get(k, k): snake_identifiers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_identifiers(v) for v in value]
    return value


# --- transport --------------------------------------------------------------------------------


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (a ``q=0`` refuses it)."""
    for part in (accept_encoding or "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if params.strip() else "1"
            try:
                return float(q) > 0
            except ValueError:
                return True
    return False


class GzipSend:
    """An ASGI ``send`` that gzips a 200 response, one sync-flushed member per write.

    Each write stays decodable on its own arrival (gzhttp flushes its writer on every
    ``Flush``, which grpc-gateway calls after each frame); the end writes the gzip trailer.
    Error answers pass through plain, as gzhttp leaves bodies under its 1 KiB minimum alone.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._z: Any = None
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 200:
            self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            headers = [
                (k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"
            ]
            headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and self._z is not None:
            more = bool(message.get("more_body", False))
            body = self._z.compress(message.get("body", b""))
            body += self._z.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            message = {**message, "body": body}
        await self._send(message)


class TransportSend:
    """An ASGI ``send`` carrying the connection's transport, for servers that hide it
    (hypercorn), so the abrupt-close fault can drop the TCP connection."""

    def __init__(self, send: Send, transport: Any) -> None:
        self._send = send
        self.transport = transport

    async def __call__(self, message: dict[str, Any]) -> None:
        await self._send(message)


async def flushed(transport: Any, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Let the server hand what it buffered to the socket (hypercorn writes HTTP/2 frames
    from its own task) and the socket send it, before the transport is aborted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for turn in range(1000):
        await asyncio.sleep(0.005)
        idle = transport is None or transport.get_write_buffer_size() == 0
        if (idle and turn >= 2) or loop.time() > deadline:
            return


def peer_transport(peer: Any) -> Any:
    """The running loop's transport connected to ``peer`` (scope ``client``), or None.

    Reads the selector loop's private table of transports: for the simulator only.
    """
    if not peer:
        return None
    loop = asyncio.get_running_loop()
    for transport in list(getattr(loop, "_transports", {}).values()):
        if transport is None or transport.is_closing():
            continue
        name = transport.get_extra_info("peername")
        if name and tuple(name[:2]) == tuple(peer[:2]):
            return transport
    return None


class H2cServer:
    """hypercorn serving the simulator with h2c (and HTTP/1.1) on a pre-bound loopback socket.

    Quacks like the bits of ``uvicorn.Server`` the simulator uses: ``started``,
    ``servers[0].sockets``, ``serve()``, ``should_exit`` and ``force_exit``.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], host: str, port: int) -> None:
        try:
            from hypercorn.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise OSError("h2c needs hypercorn: pip install 'ingestd[h2c]'") from exc
        self.app = app
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, port))
        sock.listen(128)
        self.address = sock.getsockname()
        # hypercorn takes the descriptor over (``socket.socket(fileno=…)``) and closes it.
        self._fd = sock.detach()
        self.config = Config()
        self.config.bind = [f"fd://{self._fd}"]
        self.config.graceful_timeout = H2C_GRACEFUL_S
        self.config.accesslog = None
        self.config.loglevel = "WARNING"
        self.config.keep_alive_timeout = 3600.0  # a stream with no events is not idle
        self.started = False
        self.servers = [_Listener([_Bound(self.address)])]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Event | None = None
        self._task: asyncio.Future[Any] | None = None

    @property
    def should_exit(self) -> bool:
        return self._exit is not None and self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:  # set from the caller's thread
        if value and self._loop is not None and self._exit is not None:
            self._loop.call_soon_threadsafe(self._exit.set)

    @property
    def force_exit(self) -> bool:
        return False

    @force_exit.setter
    def force_exit(self, value: bool) -> None:
        if value and self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    async def serve(self) -> None:
        from hypercorn.asyncio import serve

        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self._task = asyncio.ensure_future(
            serve(self.app, self.config, shutdown_trigger=self._exit.wait, mode="asgi")
        )
        self.started = True  # the socket listens already: early connections wait in its backlog
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class _Bound:
    address: Any

    def getsockname(self) -> Any:
        return self.address


@dataclass
class _Listener:
    sockets: list[_Bound]


def now_utc() -> datetime:
    return datetime.now(UTC)
