"""One message, one identity: the event and the stored ApplicationUp give the same keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd.errors import MalformedEvent
from ingestd.identity import uplink_id
from ingestd.normalize import normalize, normalize_application_up, parse_time

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "events"


def load(stem: str) -> dict[str, Any]:
    return orjson.loads((DATA_DIR / f"{stem}.json").read_bytes())  # type: ignore[no-any-return]


def test_uplink_id_is_a_stable_hash_of_the_identity() -> None:
    when = datetime(2024, 10, 30, 9, 15, 40, 118402, tzinfo=UTC)
    assert uplink_id("acme-water-meters", "wm-0001", when, 1842) == (
        "c5061eb22563d353a59f6562ba71eb32"
    )
    # The key writes the time as isoformat() does, so ids stored by any version match:
    # no fraction at a whole second, four-digit years.
    assert uplink_id("acme-water-meters", "wm-0001", when.replace(microsecond=0), 1842) == (
        "84d550db8eaa5d5a76dabe2383e219e2"
    )
    early = datetime(812, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert uplink_id("a", "d", early, 0) == "06b2e9db77333965f0c8dedcc34a9a2d"
    # Any UTC offset, nanoseconds cut: one instant, one id.
    assert uplink_id("a", "d", parse_time("2024-10-30T09:15:40.118402999Z"), 1) == uplink_id(
        "a", "d", parse_time("2024-10-30T11:15:40.118402+02:00"), 1
    )
    others = {
        uplink_id("a", "d", when, 1),
        uplink_id("a", "d", when, 2),
        uplink_id("a", "e", when, 1),
        uplink_id("a", "d", when + timedelta(microseconds=1), 1),
    }
    assert len(others) == 4


@pytest.mark.parametrize(
    "stem",
    [
        "uplink_lora_2gw",
        "uplink_fsk",
        "uplink_lrfhss",
        "uplink_confirmed_1gw",
        "uplink_omitted_zeros",
        "join_forward",
    ],
)
def test_a_stored_message_gives_the_rows_of_its_event(stem: str) -> None:
    event = load(stem)
    from_stream = normalize(event)
    from_storage = normalize_application_up(event["data"])
    assert len(from_storage) == len(from_stream) > 0
    for a, b in zip(from_stream, from_storage, strict=True):
        assert a.table == b.table
        assert b.values["source"] == "storage"
        assert b.values.get("event_unique_id", None) is None
        same = {k: v for k, v in a.values.items() if k not in ("event_unique_id", "source")}
        assert same == {k: v for k, v in b.values.items() if k in same}


def test_stored_messages_of_other_kinds_give_no_rows_and_bad_ones_raise() -> None:
    assert normalize_application_up({"end_device_ids": {}, "downlink_ack": {}}) == []
    with pytest.raises(MalformedEvent, match="stored uplink_message"):
        normalize_application_up({"end_device_ids": {}, "uplink_message": {"f_cnt": 1}})
    with pytest.raises(MalformedEvent):
        normalize_application_up(["not", "an", "object"])  # type: ignore[arg-type]
