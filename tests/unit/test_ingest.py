"""BatchBuilder: cursor bookkeeping, the replay-reach check and hostile input, without a database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import hostile
import orjson
import pytest
from structlog.testing import capture_logs

import ingestd.batch
from ingestd.batch import (
    RAW_KEEP_CHARS_FLOOD,
    REJECT_FLOOD_FRAMES,
    REJECT_FULL_RAW_ROWS,
    REJECT_ROWS_MAX,
    REJECT_WINDOW_S,
    BatchBuilder,
)
from ingestd.config import StreamSettings
from ingestd.models import CURSOR_FUTURE_TOLERANCE_S, CURSOR_IDS_MAX, Cursor
from ingestd.sim import events as eventgen
from ingestd.stream import EventStream

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


# --- hostile input: nothing in a frame stops the stream -----------------------------------


def _frame(event: dict[str, object]) -> bytes:
    return orjson.dumps({"result": event})


def _now_uplink(offset_s: float = 0.0) -> dict[str, object]:
    """An uplink stamped relative to the real clock (the cursor's future bound reads it)."""
    return _uplink((datetime.now(UTC) - T0).total_seconds() + offset_s)


def test_an_event_whose_device_ids_is_not_an_object_is_rejected_and_later_events_are_kept() -> None:
    # The landed daemon's AttributeError here killed the reader; the replay served the
    # same event again, forever, and every later uplink was lost.
    builder = BatchBuilder("s", Cursor())
    poison = [_uplink(1), _uplink(2), _uplink(3)]
    poison[0]["identifiers"] = [{"device_ids": "dev-1"}]
    poison[1]["identifiers"] = [{"device_ids": {"device_id": "d", "application_ids": ["a"]}}]
    poison[2]["identifiers"] = [{"application_ids": 42}]
    good = [_uplink(4 + i) for i in range(5)]
    for ev in (*poison, *good):
        builder.add_frame(_frame(ev))
    batch = builder.take()
    assert [ev["unique_id"] for ev, _ in batch.items] == [g["unique_id"] for g in good]
    assert len(batch.rejected) == 3
    assert all("is not an object" in r["error"] for r in batch.rejected)
    assert all(str(p["unique_id"]) in r["raw"] for p, r in zip(poison, batch.rejected, strict=True))


def test_every_mutant_of_every_event_family_is_stored_or_rejected_exactly_once() -> None:
    mutants = hostile.mutants()
    builder = BatchBuilder("s", Cursor(), reject_rows_max=None)
    for payload in hostile.frames(mutants):
        builder.add_frame(payload)  # must never raise
    batch = builder.take()
    accounted = len(batch.items) + len(batch.rejected) + batch.duplicates_in_batch
    assert accounted == len(mutants)
    # Only unique_id mutations can collide (two mutants given the same valid id).
    assert batch.duplicates_in_batch < len(hostile.HOSTILE_VALUES) * len(hostile.base_events())
    assert len(batch.rejected) > len(mutants) // 4  # the corpus really is hostile
    for ev, _ in batch.items:  # what was accepted is well formed for the events table
        assert isinstance(ev["unique_id"], str) and "\x00" not in ev["unique_id"]
        assert isinstance(ev["time"], datetime) and ev["time"].tzinfo is UTC

    # The stream goes on: good events after all of it are stored.
    later = [_now_uplink(-i) for i in range(3, 0, -1)]
    for ev in later:
        builder.add_frame(_frame(ev))
    assert [ev["unique_id"] for ev, _ in builder.take().items] == [e["unique_id"] for e in later]


def test_junk_frames_each_become_one_rejected_row() -> None:
    builder = BatchBuilder("s", Cursor(), reject_rows_max=None)
    for payload in hostile.JUNK_FRAMES:
        assert builder.add_frame(payload) is None
    batch = builder.take()
    assert len(batch.rejected) == len(hostile.JUNK_FRAMES)
    assert batch.items == []
    assert builder.cursor.last_time is None  # not even the stream starts' bad times


def test_an_unexpected_exception_in_normalize_is_a_reject_logged_once_per_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(event: object, source: str = "stream") -> list[object]:
        raise ZeroDivisionError("a bug in a handler")

    monkeypatch.setattr(ingestd.batch, "normalize", broken)
    builder = BatchBuilder("s", Cursor())
    events = [_uplink(i) for i in range(4)]
    with capture_logs() as logs:
        for ev in events:
            builder.add_frame(_frame(ev))
    batch = builder.take()
    assert batch.items == []
    assert len(batch.rejected) == 4
    assert "ZeroDivisionError: a bug in a handler" in batch.rejected[0]["error"]
    assert [e["event"] for e in logs] == ["event_reject_unexpected_error"]


def test_a_time_past_utc_range_or_without_offset_is_rejected_not_raised() -> None:
    builder = BatchBuilder("s", Cursor())
    for bad in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00", "2026-11-01T12:00:00"):
        ev = _uplink(1)
        ev["time"] = bad
        builder.add_frame(_frame(ev))
    assert len(builder.take().rejected) == 3


# --- the cursor's bounds ------------------------------------------------------------------


def test_a_far_future_event_is_stored_but_never_becomes_the_cursor() -> None:
    builder = BatchBuilder("s", Cursor())
    before = _now_uplink(-60)
    future = _now_uplink(-30)
    future["time"] = "9999-12-31T23:59:59.999999Z"
    later = [_now_uplink(-20), _now_uplink(-10)]
    with capture_logs() as logs:
        for ev in (before, future, *later):
            builder.add_frame(_frame(ev))
        batch = builder.take()
    assert len(batch.items) == 4  # stored, all of them
    assert batch.future_events == 1
    assert batch.cursor is not None
    assert batch.cursor.last_time == datetime.fromisoformat(str(later[-1]["time"]))
    assert batch.cursor.unique_ids_at_last_time == {later[-1]["unique_id"]}
    (warning,) = [e for e in logs if e["event"] == "event_time_in_future"]
    assert warning["events"] == 1
    assert warning["latest"].year == 9999

    # A reconnect asks for what came after the real cursor, not after 9999.
    settings = StreamSettings(name="s", application_id="app-1", overlap_s=5.0)
    stream = EventStream(settings, None)  # type: ignore[arg-type]  # request_body sends nothing
    after = stream.request_body(builder.cursor)["after"]
    assert abs(datetime.fromisoformat(str(after)) - datetime.now(UTC)) < timedelta(minutes=1)


def test_an_event_within_the_tolerance_moves_the_cursor_and_the_bound_follows_the_clock() -> None:
    clock = {"now": datetime.now(UTC).timestamp()}
    builder = BatchBuilder("s", Cursor(), clock=lambda: clock["now"])
    soon = _now_uplink(CURSOR_FUTURE_TOLERANCE_S - 60)
    far = _now_uplink(CURSOR_FUTURE_TOLERANCE_S + 600)
    builder.add_event(soon)
    builder.add_event(far)
    assert builder.cursor.last_time == datetime.fromisoformat(str(soon["time"]))
    clock["now"] += 3600  # an hour later the same time is in the past: it may move the cursor
    again = dict(far, unique_id=_ulids(T0))
    builder.add_event(again)
    assert builder.cursor.last_time == datetime.fromisoformat(str(far["time"]))


def test_a_stream_start_in_the_far_future_or_before_1970_gives_no_cursor() -> None:
    for t in ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"):
        builder = BatchBuilder("s", Cursor())
        builder.add_event({"name": "events.stream.start", "time": t, "unique_id": "01X"})
        assert builder.cursor.last_time is None
        assert not builder.first_cursor_pending
    old = _uplink(0)
    old["time"] = "0001-01-01T00:00:00Z"
    builder.add_event(old)  # stored, but resuming from year 1 minus the overlap cannot work
    assert builder.cursor.last_time is None
    assert len(builder.take().items) == 1


def test_the_ids_at_the_cursors_time_are_bounded() -> None:
    builder = BatchBuilder("s", Cursor())
    same = _uplink(5)
    events = [dict(same, unique_id=f"01SAME{i:020d}") for i in range(CURSOR_IDS_MAX + 500)]
    for ev in events:
        builder.add_event(ev)
    batch = builder.take()
    assert len(batch.items) == len(events)  # every event stored
    assert batch.cursor is not None
    assert len(batch.cursor.unique_ids_at_last_time) == CURSOR_IDS_MAX
    # More events at the same time: stored, and the cursor (already full) is not rewritten.
    for i in range(10):
        builder.add_event(dict(same, unique_id=f"01MORE{i:020d}"))
    batch = builder.take()
    assert len(batch.items) == 10
    assert batch.cursor is None


def test_a_saved_cursor_with_too_many_ids_is_cut_and_still_checks_the_replay() -> None:
    at_cursor = _uplink(10)
    t = datetime.fromisoformat(str(at_cursor["time"]))
    ids = frozenset(f"01BIG{i:021d}" for i in range(CURSOR_IDS_MAX * 3))
    builder = BatchBuilder("s", Cursor(last_time=t, unique_ids_at_last_time=ids))
    assert len(builder.cursor.unique_ids_at_last_time) == CURSOR_IDS_MAX
    builder.expect_replay_from(builder.cursor)
    # The replay brings an event at the cursor's time whose id was cut: it still proves
    # the replay reached back, so no gap.
    builder.add_event(dict(at_cursor, unique_id=max(ids)))
    builder.add_event(_uplink(11))
    assert builder.take().gaps == []


# --- reject floods ------------------------------------------------------------------------


def test_a_flood_of_junk_stores_a_bounded_number_of_rows_and_one_summary_per_batch() -> None:
    builder = BatchBuilder("s", Cursor())
    with capture_logs() as logs:
        for i in range(REJECT_ROWS_MAX + 250):
            builder.add_frame(b"junk line %d " % i + b"x" * 10_000)
        batch = builder.take()
    assert batch.rejects_not_stored == 250
    assert len(batch.rejected) == REJECT_ROWS_MAX + 1  # the stored ones and the summary
    summary = batch.rejected[-1]
    assert summary["error"].startswith("250 more frames")
    assert summary["raw"].startswith("junk line")
    assert len(summary["raw"]) <= RAW_KEEP_CHARS_FLOOD
    assert all(len(r["raw"]) <= RAW_KEEP_CHARS_FLOOD for r in batch.rejected[REJECT_FULL_RAW_ROWS:])
    assert [e["frames"] for e in logs if e["event"] == "rejects_not_stored"] == [250]
    assert builder.reject_flood
    # The next batch of the same flood: counted again, with its own summary row.
    builder.add_frame(b"more junk")
    batch = builder.take()
    assert (batch.rejects_not_stored, len(batch.rejected)) == (1, 1)


def test_the_reject_limit_starts_again_on_a_new_connection_and_after_its_window() -> None:
    clock = {"now": 1000.0}
    builder = BatchBuilder("s", Cursor(), clock=lambda: clock["now"])
    for _ in range(REJECT_ROWS_MAX + 5):
        builder.add_frame(b"junk")
    assert builder.take().rejects_not_stored == 5
    builder.connection_started()
    assert not builder.reject_flood
    for _ in range(REJECT_ROWS_MAX):
        builder.add_frame(b"junk")
    assert builder.take().rejects_not_stored == 0
    clock["now"] += REJECT_WINDOW_S  # a long-lived connection: the budget refills
    builder.add_frame(b"junk")
    batch = builder.take()
    assert (batch.rejects_not_stored, len(batch.rejected)) == (0, 1)


def test_rejected_events_are_all_kept_once_each_and_never_call_for_a_reconnect() -> None:
    # E.g. TTS changed a field's type: every uplink is rejected. They are real events to
    # reprocess after a fix, so none is dropped by the limit; a replay does not repeat them.
    events = [_uplink(i) for i in range(REJECT_ROWS_MAX * 3)]
    for ev in events:
        ev["data"]["uplink_message"]["f_cnt"] = "7"  # type: ignore[index]
    builder = BatchBuilder("s", Cursor())
    for ev in events + events[:50]:  # the last 50 replayed after a reconnect
        builder.add_frame(_frame(ev))
    batch = builder.take()
    assert len(batch.rejected) == len(events)
    assert batch.rejects_not_stored == 0
    assert not builder.reject_flood


def test_junk_calls_for_a_reconnect_only_when_it_outnumbers_the_events() -> None:
    builder = BatchBuilder("s", Cursor())
    for i in range(REJECT_FLOOD_FRAMES * 2):
        builder.add_event(_uplink(i))
    for _ in range(REJECT_FLOOD_FRAMES + 1):
        builder.add_frame(b"junk")
    assert not builder.reject_flood  # a proxy's stray lines among plenty of events
    builder.connection_started()
    for _ in range(REJECT_FLOOD_FRAMES - 1):
        builder.add_frame(b"junk")
    assert not builder.reject_flood
    builder.add_frame(b"junk")
    assert builder.reject_flood


def test_import_keeps_every_reject() -> None:
    builder = BatchBuilder("s", Cursor(), reject_rows_max=None)
    for _ in range(REJECT_ROWS_MAX * 2):
        builder.add_frame(b"junk")
    assert len(builder.take().rejected) == REJECT_ROWS_MAX * 2
    assert not builder.reject_flood


def test_an_error_frame_with_mistyped_fields_gives_a_plain_error() -> None:
    builder = BatchBuilder("s", Cursor())
    frame = b'{"error": {"code": true, "message": 5, "details": [{"name": {"x": 1}, "namespace": [1]}]}}'
    error = builder.add_frame(frame)
    assert error is not None
    assert (error.code, error.name, error.namespace, error.message) == (None, None, None, "5")
    assert error.describe() == "5"
