"""The live daemon against the simulator, fed events no database or normalizer can take as
they are, on both databases: the stream never stops, nothing after them is lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from support import Db, connected, make_settings, running, wait_for

import ingestd.batch
from ingestd.normalize import parse_time
from ingestd.sim import events as eventgen
from ingestd.sim.server import Simulator


async def test_poison_events_cost_only_themselves_and_the_cursor_stays_at_the_clock(
    sim: Simulator, db_url: str, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_ids: set[str] = set()
    real_normalize = ingestd.batch.normalize

    def normalize_with_a_bug(event: dict[str, Any], source: str = "stream") -> Any:
        if event.get("unique_id") in crash_ids:
            raise AttributeError("'str' object has no attribute 'get'")  # as issue 8 saw
        return real_normalize(event, source)

    monkeypatch.setattr(ingestd.batch, "normalize", normalize_with_a_bug)
    devices = sim.device_ids
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        good = sim.uplinks(20)
        crash = sim.uplink(devices[0])  # stored by the simulator first, then marked
        crash_ids.add(str(crash["unique_id"]))
        huge = _variant(sim, good[0], f_cnt=2**63 + 1)
        nul = _variant(sim, good[1], decoded_payload={"text": "a\x00b"})
        future = sim.uplink(devices[3], time=datetime(9999, 12, 31, tzinfo=UTC))
        good += sim.uplinks(50)
        await wait_for(
            lambda: db.scalar("SELECT count(*) FROM uplinks") == len(good) + 2,
            timeout_s=20,
            what="every good uplink, the NUL one and the future one",
        )
        await wait_for(lambda: db.scalar("SELECT count(*) FROM rejected_events") == 2)
        last_good = parse_time(str(good[-1]["time"]))
        await wait_for(
            lambda: _aware(db.scalar("SELECT last_event_time FROM stream_cursors")) >= last_good,
            what="the cursor at the last good uplink",
        )
    stored = set(db.column("SELECT event_unique_id FROM uplinks"))
    assert {e["unique_id"] for e in good} | {nul["unique_id"], future["unique_id"]} == stored
    raws = db.column("SELECT raw FROM rejected_events")
    assert any(crash["unique_id"] in r for r in raws)
    assert any(huge["unique_id"] in r for r in raws)
    assert len(sim.stream_requests) == 1  # never reconnected: the stream just went on
    cursor = _aware(db.scalar("SELECT last_event_time FROM stream_cursors"))
    assert cursor < datetime.now(UTC) + timedelta(minutes=1)

    # Down and back: the resume asks for what came after the real cursor, not after 9999,
    # so what was published meanwhile arrives.
    missed = sim.uplinks(30)
    async with running(make_settings(sim, db_url)) as service:
        await connected(service)
        await wait_for(
            lambda: db.scalar("SELECT count(*) FROM uplinks") == len(stored) + len(missed),
            timeout_s=20,
            what="the uplinks published while down",
        )
    after = sim.stream_requests[-1].after
    assert after is not None and abs(parse_time(after) - cursor) < timedelta(minutes=5)


def _variant(sim: Simulator, event: dict[str, Any], **uplink_message: Any) -> dict[str, Any]:
    """A copy of ``event`` as a new event with ``uplink_message`` fields changed, published."""
    copy = orjson.loads(orjson.dumps(event))
    t = sim.next_time()
    copy["time"] = eventgen.format_time(t)
    copy["unique_id"] = sim.ulids(t)
    # A new message, not a second copy of the first: its own received_at (the identity).
    copy["data"]["received_at"] = copy["time"]
    copy["data"]["uplink_message"]["received_at"] = copy["time"]
    copy["data"]["uplink_message"].update(uplink_message)
    sim.publish(copy)
    return copy  # type: ignore[no-any-return]


def _aware(v: object) -> datetime:
    t = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    return t if t.tzinfo else t.replace(tzinfo=UTC)
