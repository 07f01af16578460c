"""Generate a realistic recorded stream body: N uplinks (2 gateways, ~2.6 KB each).

    python benchmarks/capture.py OUT [--events 100000] [--devices 200] [--framing blank|ndjson|sse]

Used by the import benchmark; also handy for trying ``ingestd import`` on real-sized data.
"""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from ingestd.sim import events as eventgen

DELIMITERS = {"blank": (b"", b"\n\n"), "ndjson": (b"", b"\n"), "sse": (b"data: ", b"\n\n")}


def write_capture(
    path: Path,
    *,
    events: int,
    devices: int = 200,
    framing: str = "blank",
    seed: int = 1,
    step_ms: int = 37,
) -> int:
    """Write ``events`` uplinks as TTS frames to ``path``; return the byte size.

    Events are ``step_ms`` apart; 0 gives them all one timestamp (an export, a synthetic
    capture).
    """
    rng = random.Random(seed)
    prefix, delim = DELIMITERS[framing]
    start = datetime(2026, 11, 1, tzinfo=UTC)
    ulids = eventgen.UlidFactory(rng)
    with path.open("wb") as out:
        for i in range(events):
            t = start + timedelta(milliseconds=step_ms * i)
            dev = i % devices
            uid = ulids(t)
            ev = eventgen.uplink_event(
                application_id="bench-app",
                device_id=f"dev-{dev:05d}",
                dev_eui=f"70B3D57ED0{dev:06X}",
                f_cnt=i // devices,
                f_port=2,
                payload=rng.randbytes(12),
                gateways=2,
                time=t,
                unique_id=uid,
                decoded_payload={"battery_mv": 3600, "leak_detected": False, "volume_liters": i},
                rng=rng,
            )
            out.write(prefix + orjson.dumps({"result": ev}) + delim)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--framing", choices=sorted(DELIMITERS), default="blank")
    args = ap.parse_args()
    size = write_capture(args.out, events=args.events, devices=args.devices, framing=args.framing)
    print(f"wrote {args.events:,} events, {size / 2**20:.1f} MiB, to {args.out}")


if __name__ == "__main__":
    main()
