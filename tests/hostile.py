"""Hostile input for the ingest path: recorded events with one value replaced, and junk frames.

Each mutant is a copy of a real event with the value at one path (every object member and
list element, at any depth) replaced by one value of a wrong type or range. Each gets its
own fresh ``unique_id`` unless the mutation is of the id itself, so every mutant stands for
one distinct event: stored, or one ``rejected_events`` row, never both, never neither.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from ingestd.sim import events as eventgen

DATA = Path(__file__).parent / "data" / "events"

HOSTILE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**31,
    2**63,
    2**64 - 1,
    1.5,
    -1e308,
    "",
    "x" * 300,
    "nul\x00inside",
    "9999-12-31T23:59:59Z",
    [],
    [None, 1],
    {},
    {"device_ids": "x", "application_ids": 7},
]

JUNK_FRAMES: list[bytes] = [
    b"",
    b"null",
    b"42",
    b'"text"',
    b"[]",
    b"[1, 2",
    b"not json at all",
    b'{"result": 42}',
    b'{"result": []}',
    b'{"result": "x"}',
    b'{"result": null}',
    b'{"result": {}}',
    b'{"result": {"name": "as.up.data.forward"}}',
    b'{"result": {"unique_id": 5, "name": 5}}',
    b'{"unique_id": "x\\u0000y", "name": "as.up.data.forward"}',
    b"\xff\xfe\x00garbage\x00",
    b"[" * 5000,
    b'{"result": {"name": "events.stream.start", "time": 5}}',
    b'{"result": {"name": "events.stream.start"}}',
    b'{"result": {"name": "events.stream.start", "time": "0001-01-01T00:00:00+05:00"}}',
    b'{"result": ' + b"1" * 400 + b"}",
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield (*prefix, i)
            yield from _paths(child, (*prefix, i))


def _replaced(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    mutant = copy.deepcopy(event)
    parent: Any = mutant
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = copy.deepcopy(value)
    return mutant


def base_events() -> list[dict[str, Any]]:
    """A generated two-gateway uplink and every recorded event family that is stored."""
    rng = random.Random(11)
    t = datetime.now(UTC) - timedelta(hours=1)
    uplink = eventgen.uplink_event(
        application_id="acme-app",
        device_id="dev-1",
        dev_eui="70B3D57ED0000001",
        f_cnt=7,
        f_port=2,
        payload=b"\x01\x02",
        gateways=2,
        time=t,
        unique_id=eventgen.UlidFactory(rng)(t),
        rng=rng,
        decoded_payload={"temp": 21.5, "label": "ok"},
    )
    recorded = [orjson.loads(f.read_bytes()) for f in sorted(DATA.glob("*.json"))]
    # events.stream.start is consumed for the cursor, not stored: JUNK_FRAMES covers it.
    return [uplink, *(e for e in recorded if e["name"] != "events.stream.start")]


def mutants(seed: int = 3) -> list[dict[str, Any]]:
    """Every base event with each path set to each hostile value, fresh ids."""
    rng = random.Random(seed)
    ulids = eventgen.UlidFactory(rng)
    t = datetime.now(UTC) - timedelta(minutes=30)
    out = []
    for event in base_events():
        for path in _paths(event):
            for value in HOSTILE_VALUES:
                mutant = _replaced(event, path, value)
                if path != ("unique_id",):
                    mutant["unique_id"] = ulids(t)
                out.append(mutant)
    return out


def frames(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps({"result": e}) for e in events]
