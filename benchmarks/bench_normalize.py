"""Benchmark the per-event hot path: ``normalize`` + ``event_row`` on one uplink.

Uses the 2-gateway ``as.up.data.forward`` of TTS_WIRE §2.1 (compact, as on the wire).
The events are decoded once with orjson before timing, so the figure is normalization
alone; ``orjson.loads`` of the same bytes is timed in the same run as a yardstick, since
this machine drifts ±20-30 % between runs (PERF_NOTES). Rounds are interleaved and the
median of each is printed.

    .venv/bin/python benchmarks/bench_normalize.py [--events 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import orjson

from ingestd.normalize import event_row, normalize

# TTS_WIRE §2.1, verbatim; re-encoded compact below.
_UPLINK_EXAMPLE = """
{"name":"as.up.data.forward","time":"2024-10-30T09:15:40.349611524Z",
 "identifiers":[{"device_ids":{"device_id":"wm-0001","application_ids":{"application_id":"acme-water-meters"},
   "dev_eui":"70B3D57ED005A1F2","join_eui":"70B3D57ED0000000","dev_addr":"260B4A7C"}}],
 "data":{"@type":"type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
  "end_device_ids":{"device_id":"wm-0001","application_ids":{"application_id":"acme-water-meters"},
   "dev_eui":"70B3D57ED005A1F2","join_eui":"70B3D57ED0000000","dev_addr":"260B4A7C"},
  "correlation_ids":["gs:uplink:01JBEBB4PPGSGH3Z3RFAHEC5H2",
   "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEBB4PQVVTVY4DDX4KR30FD",
   "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEBB4XBJ03P9RKHM7MKQZRY"],
  "received_at":"2024-10-30T09:15:40.331806702Z",
  "uplink_message":{"session_key_id":"AZLcO108b/O8hX5J9kmkOg==","f_port":2,"f_cnt":1842,
   "frm_payload":"AQAB4kAOEA==",
   "decoded_payload":{"battery_mv":3600,"leak_detected":false,"volume_liters":123456},
   "rx_metadata":[
    {"gateway_ids":{"gateway_id":"acme-gw-rooftop-01","eui":"B827EBFFFE61A2C3"},
     "time":"2024-10-30T09:15:40.091337Z","timestamp":2417733410,"rssi":-87,"channel_rssi":-87,"snr":9.25,
     "location":{"latitude":52.37403,"longitude":4.88969,"altitude":32,"source":"SOURCE_REGISTRY"},
     "uplink_token":"CiAKHgoSYWNtZS1ndy1yb29mdG9wLTAxEgi4J+v//mGiwxCi3u6ACRoLCLzyh7kGEI+r7TEgot7ugAk=",
     "channel_index":2,"received_at":"2024-10-30T09:15:40.104551823Z"},
    {"gateway_ids":{"gateway_id":"acme-gw-depot-02","eui":"7276FF00390301AB"},
     "time":"2024-10-30T09:15:40.091341Z","timestamp":1838271164,"rssi":-112,"channel_rssi":-112,"snr":-3.5,
     "frequency_offset":"-2741",
     "uplink_token":"Ch4KHAoQYWNtZS1ndy1kZXBvdC0wMhIIcnb/ADkDAasQvJXH7AYaCwi88oe5BhD44ak3ILyVx+wG",
     "channel_index":2,"received_at":"2024-10-30T09:15:40.116027640Z"}],
   "settings":{"data_rate":{"lora":{"bandwidth":125000,"spreading_factor":7,"coding_rate":"4/5"}},
     "frequency":"868500000","timestamp":2417733410,"time":"2024-10-30T09:15:40.091337Z"},
   "received_at":"2024-10-30T09:15:40.118402995Z","consumed_airtime":"0.061696s","packet_error_rate":0.0123,
   "locations":{"user":{"latitude":52.37158,"longitude":4.89615,"altitude":4,"source":"SOURCE_REGISTRY"}},
   "version_ids":{"brand_id":"acme-devices","model_id":"wm100","hardware_version":"1.0",
     "firmware_version":"2.1.0","band_id":"EU_863_870"},
   "network_ids":{"net_id":"000013","ns_id":"EC656E0000000182","tenant_id":"acme","cluster_id":"eu1",
     "cluster_address":"eu1.cloud.thethings.industries","tenant_address":"acme.eu1.cloud.thethings.industries"}}},
 "correlation_ids":["gs:uplink:01JBEBB4PPGSGH3Z3RFAHEC5H2",
   "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEBB4PQVVTVY4DDX4KR30FD",
   "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEBB4XBJ03P9RKHM7MKQZRY"],
 "origin":"ip-10-22-3-145.eu-west-1.compute.internal","context":{"tenant-id":"CgRhY21l"},
 "visibility":{"rights":["RIGHT_APPLICATION_TRAFFIC_READ"]},"unique_id":"01JBEBB4XXR5XFFNF94PCHW6BX"}
"""
UPLINK_BYTES = orjson.dumps(orjson.loads(_UPLINK_EXAMPLE))


def _time_loads(raw: bytes, count: int) -> float:
    loads = orjson.loads
    start = time.perf_counter()
    for _ in range(count):
        loads(raw)
    return time.perf_counter() - start


def _time_normalize(events: list[dict[str, object]]) -> float:
    start = time.perf_counter()
    for event in events:
        event_row(event, stream="bench")
        normalize(event)
    return time.perf_counter() - start


def main() -> None:
    """Print events/s of orjson.loads and of normalize + event_row, median of N rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    events = [orjson.loads(UPLINK_BYTES) for _ in range(args.events)]
    rows_per_event = 1 + len(normalize(events[0]))  # + the events row
    rounds: dict[str, list[float]] = {"orjson.loads": [], "normalize+event_row": []}
    stages: list[tuple[str, Callable[[], float]]] = [
        ("orjson.loads", lambda: _time_loads(UPLINK_BYTES, args.events)),
        ("normalize+event_row", lambda: _time_normalize(events)),
    ]
    for _ in range(args.rounds):
        for label, run in stages:
            gc.collect()
            rounds[label].append(args.events / run())

    print(
        f"{args.events} events of {len(UPLINK_BYTES)} B, {rows_per_event} rows/event, "
        f"median of {args.rounds} interleaved rounds"
    )
    baseline = statistics.median(rounds["orjson.loads"])
    for label, rates in rounds.items():
        median = statistics.median(rates)
        print(
            f"  {label:<20} {median:>10,.0f} events/s  ({median / baseline:.2f}x orjson.loads)"
            f"  rounds: {', '.join(f'{r:,.0f}' for r in rates)}"
        )


if __name__ == "__main__":
    main()
