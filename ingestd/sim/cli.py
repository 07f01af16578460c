"""``ingestd simulate``: its options, and serving the simulator until a signal.

Setting up the options imports nothing of the server (uvicorn, the ASGI app), so every
``ingestd`` command parses its arguments without loading it; :func:`run` does.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

DEFAULT_PORT = 18850


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ingestd simulate``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=DEFAULT_PORT, help="port, 0 = any free (default: %(default)s)")
    add("--application-id", default="sim-app", help="application id (default: %(default)s)")
    add("--devices", type=int, default=10, help="number of devices (default: %(default)s)")
    add("--rate", type=float, default=1.0, help="uplinks per second in total, 0 = none")
    add("--gateways", type=int, default=2, help="gateways receiving each uplink")
    add("--api-key", default=None, help="API key to accept (default: generate and print one)")
    add("--no-store", action="store_true", help="no event store: no after/tail replay")
    add("--store-entity-count", type=int, default=100, help="events kept per entity")
    add("--payload-ttl", type=float, default=600.0, help="seconds until replays turn sparse")
    add("--drop-every", type=int, default=None, help="close each stream after N events")
    add("--out-of-order", type=int, default=0, help="shuffle events within windows of N")
    add("--rate-limit", type=int, default=None, help="requests per minute per key (429 beyond)")
    add("--seed", type=int, default=None, help="seed for reproducible keys and events")
    add(
        "--key-rights",
        default=None,
        metavar="RIGHT[,RIGHT…]",
        help="rights of the API key (default: RIGHT_APPLICATION_ALL), e.g. "
        "RIGHT_APPLICATION_INFO to see a stream that stays empty",
    )
    add(
        "--simulated-fraction",
        type=float,
        default=0.0,
        help="share of generated uplinks published as Console-simulated (data.simulated)",
    )
    add(
        "--entity-ttl",
        type=float,
        default=86400.0,
        help="seconds an entity's history is kept after its last event (TTS entity-ttl)",
    )
    add("--gzip", action="store_true", help="gzip streams for clients that accept it")
    add("--h2c", action="store_true", help="serve HTTP/2 with prior knowledge (needs hypercorn)")
    add(
        "--storage",
        action="store_true",
        help="serve the Storage Integration API (TTS Cloud/Enterprise; off = open source)",
    )
    add(
        "--storage-retention",
        type=float,
        default=30 * 86400.0,
        help="seconds the storage keeps messages (default: 30 days)",
    )
    add(
        "--storage-write-delay",
        type=float,
        default=0.0,
        help="seconds until a message appears in storage (writes are batched)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; print the base URL, application id and (fake) API key."""
    from ingestd.sim import fidelity as sim_fidelity
    from ingestd.sim.server import Simulator

    sim = Simulator(
        application_id=args.application_id,
        devices=args.devices,
        api_key=args.api_key or "",
        store=not args.no_store,
        store_entity_count=args.store_entity_count,
        payload_ttl_s=args.payload_ttl,
        gateways=args.gateways,
        uplink_rate=args.rate,
        rate_limit_per_min=args.rate_limit,
        seed=args.seed,
        host=args.host,
        port=args.port,
        drop_every_n_frames=args.drop_every,
        out_of_order_window=args.out_of_order,
        max_recorded_events=10_000,
        simulated_uplink_fraction=args.simulated_fraction,
        entity_ttl_s=args.entity_ttl,
        gzip_stream=args.gzip,
        h2c=args.h2c,
        api_key_rights=(
            tuple(r.strip() for r in args.key_rights.split(",") if r.strip())
            if args.key_rights
            else sim_fidelity.DEFAULT_KEY_RIGHTS
        ),
        storage_enabled=args.storage,
        storage_retention_s=args.storage_retention,
        storage_write_delay_s=args.storage_write_delay,
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            sim.start()
        except OSError as exc:
            print(f"ingestd simulate: {exc} (is the port in use? try --port 0)", file=sys.stderr)
            return 1
        # A local fake key: printing it is the point, so a user can configure the daemon.
        print(
            f"base_url        {sim.base_url}\napplication_id  {sim.application_id}\n"
            f"api_key         {sim.api_key}\ndevices         {', '.join(sim.device_ids[:3])}"
            f"{' …' if len(sim.device_ids) > 3 else ''}",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
