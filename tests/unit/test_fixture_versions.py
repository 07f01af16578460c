"""Recorded events are v3.32 wire (what the simulator models); newer fields live apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from ingestd.normalize import normalize

DATA = Path(__file__).resolve().parents[1] / "data"
V3_34_UPLINK_FIELDS = {"last_battery_percentage", "attributes"}  # not in v3.32 ApplicationUplink


def _uplinks_in(doc: Any) -> list[dict[str, Any]]:
    data = doc.get("data") or {}
    return [data["uplink_message"]] if "uplink_message" in data else []


def test_v3_32_fixtures_and_the_capture_carry_no_v3_34_uplink_fields() -> None:
    docs = [orjson.loads(p.read_bytes()) for p in (DATA / "events").glob("*.json")]
    docs += [
        orjson.loads(line)["result"]
        for line in (DATA / "capture.txt").read_bytes().splitlines()
        if line.strip()
    ]
    uplinks = [up for doc in docs for up in _uplinks_in(doc)]
    assert len(uplinks) > 10
    assert all(not V3_34_UPLINK_FIELDS & up.keys() for up in uplinks)


def test_a_v3_34_uplink_is_stored_like_its_v3_32_twin() -> None:
    newer = orjson.loads((DATA / "newer" / "uplink_v3_34_fields.json").read_bytes())
    older = orjson.loads((DATA / "events" / "uplink_lora_2gw.json").read_bytes())
    assert newer["data"]["uplink_message"].keys() >= V3_34_UPLINK_FIELDS
    assert normalize(newer) == normalize(older)
