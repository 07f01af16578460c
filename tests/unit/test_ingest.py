"""BatchBuilder: cursor bookkeeping and the replay-reach check, without a database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from ingestd import eventgen
from ingestd.ingest import BatchBuilder
from ingestd.models import Cursor

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
_rng = random.Random(4)
_ulids = eventgen.UlidFactory(_rng)


def _uplink(seconds: float) -> dict[str, object]:
    t = T0 + timedelta(seconds=seconds)
    return eventgen.uplink_event(
        application_id="app-1",
        device_id="dev-1",
        dev_eui="70B3D57ED0000001",
        f_cnt=1,
        f_port=1,
        payload=b"\x01",
        gateways=1,
        time=t,
        unique_id=_ulids(t),
        rng=_rng,
    )


def _resumed(cursor_event: dict[str, object]) -> tuple[BatchBuilder, Cursor]:
    t = datetime.fromisoformat(str(cursor_event["time"]))
    cursor = Cursor(
        last_time=t, unique_ids_at_last_time=frozenset({str(cursor_event["unique_id"])})
    )
    builder = BatchBuilder("s", cursor)
    builder.expect_replay_from(cursor)
    return builder, cursor


def test_a_replay_that_reaches_the_cursor_records_no_gap_even_out_of_order() -> None:
    at_cursor, later = _uplink(10), _uplink(11)
    builder, _ = _resumed(at_cursor)
    builder.add_event(later)  # out of order: a later event arrives first
    builder.add_event(at_cursor)
    assert builder.take().gaps == []


def test_a_replay_that_starts_after_the_cursor_records_the_window_between() -> None:
    at_cursor = _uplink(10)
    builder, cursor = _resumed(at_cursor)
    builder.add_event(_uplink(15))
    builder.add_event(_uplink(12))
    (gap,) = builder.take().gaps
    assert gap.reason == "replay_truncated"
    assert gap.gap_start == cursor.last_time
    assert gap.gap_end == T0 + timedelta(seconds=12)


def test_the_cursor_moves_only_forward_and_keeps_every_id_at_its_time() -> None:
    builder = BatchBuilder("s", Cursor())
    a, b, c = _uplink(5), _uplink(3), _uplink(5)
    c["time"] = a["time"]  # two events in the same microsecond
    for ev in (a, b, c):
        builder.add_event(ev)
    cursor = builder.take().cursor
    assert cursor is not None
    assert cursor.last_time == T0 + timedelta(seconds=5)
    assert cursor.unique_ids_at_last_time == {a["unique_id"], c["unique_id"]}


def test_the_same_event_twice_in_a_batch_is_kept_once() -> None:
    builder = BatchBuilder("s", Cursor())
    ev = _uplink(1)
    builder.add_event(ev)
    builder.add_event(dict(ev))
    batch = builder.take()
    assert len(batch.items) == 1
    assert batch.duplicates_in_batch == 1
