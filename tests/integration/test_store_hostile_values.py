"""Values a database refuses never cost a batch: on SQLite and PostgreSQL, the good events
of a batch are stored, the bad ones land in rejected_events, and the cursor moves.

The landed store dropped whole batches for an f_cnt in 2^63..2^64-1 (SQLite's OverflowError
is no SQLAlchemy error), for U+0000 in a unique_id (PostgreSQL: the per-event retry failed
again in its pre-select) and for U+0000 in a raw rejected frame (the reject insert itself).
"""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import hostile
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingestd import schema
from ingestd.batch import BatchBuilder
from ingestd.errors import StoreUnavailable
from ingestd.importer import import_stream
from ingestd.models import CURSOR_IDS_MAX, Batch, Cursor
from ingestd.sim import events as eventgen
from ingestd.store import Store

NUL = "\x00"
REPLACEMENT = "\ufffd"


def _uplinks(n: int, *, seed: int = 5, **kwargs: Any) -> list[dict[str, Any]]:
    """``n`` uplinks stamped over the last minutes (the cursor never passes the clock)."""
    rng = random.Random(seed)
    ulids = eventgen.UlidFactory(rng)
    start = datetime.now(UTC) - timedelta(minutes=10)
    out = []
    for i in range(n):
        t = start + timedelta(seconds=i)
        out.append(
            eventgen.uplink_event(
                application_id="acme-app",
                device_id=f"dev-{i % 3}",
                dev_eui=f"70B3D57ED000{i % 3:04X}",
                f_cnt=i,
                f_port=2,
                payload=bytes([i % 256]),
                gateways=2,
                time=t,
                unique_id=ulids(t),
                rng=rng,
                **kwargs,
            )
        )
    return out


def _batch(events: list[dict[str, Any]], stream: str = "s") -> Batch:
    builder = BatchBuilder(stream, Cursor())
    for ev in events:
        builder.add_event(ev)
    return builder.take()


def _time(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["time"]))


def _stored_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(schema.events.c.unique_id)).scalars())


def _rejected(engine: Engine) -> list[sa.Row[Any]]:
    t = schema.rejected_events
    with engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.raw, t.c.error).order_by(t.c.id)))


def _pg(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def test_an_f_cnt_past_int64_costs_only_its_own_event(engine: Engine) -> None:
    events = _uplinks(6)
    batch = _batch(events)
    # Rows built past normalize (which rejects an f_cnt past uint32): the store's own guard.
    batch.items[1][1][0].values["f_cnt"] = 2**63
    batch.items[4][1][0].values["f_cnt"] = 2**64 - 1
    store = Store(engine)

    result = store.commit_batch(batch)

    bad = {events[1]["unique_id"], events[4]["unique_id"]}
    assert (result.events, result.rejected) == (4, 2)
    assert _stored_ids(engine) == {e["unique_id"] for e in events} - bad
    rejected = _rejected(engine)
    assert [r.raw for r in rejected if any(b in r.raw for b in bad)] == [r.raw for r in rejected]
    assert all(r.error.startswith("database refused the event") for r in rejected)
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_an_f_cnt_past_uint32_on_the_wire_is_rejected_before_the_database(engine: Engine) -> None:
    events = _uplinks(4)
    events[2]["data"]["uplink_message"]["f_cnt"] = 2**63 + 5
    body = b"".join(orjson.dumps({"result": e}) + b"\n" for e in events)
    store = Store(engine)
    summary = import_stream(store, io.BytesIO(body), stream="s")
    assert (summary.result.events, summary.result.rejected) == (3, 1)
    (row,) = _rejected(engine)
    assert "9223372036854775813" in row.raw  # the value as received, to reprocess
    assert "f_cnt is not an integer" in row.error
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_a_nul_in_a_unique_id_costs_only_its_own_event(engine: Engine) -> None:
    events = _uplinks(5)
    batch = _batch(events)
    # Past normalize (which rejects unprintable ids): the event row and its derived rows.
    ev_row, rows = batch.items[2]
    bad_id = ev_row["unique_id"][:10] + NUL + ev_row["unique_id"][11:]
    ev_row["unique_id"] = bad_id
    for row in rows:
        for key in ("event_unique_id", "uplink_id"):
            if key in row.values:
                row.values[key] = bad_id
    store = Store(engine)

    result = store.commit_batch(batch)

    good = {e["unique_id"] for i, e in enumerate(events) if i != 2}
    if _pg(engine):  # PostgreSQL text cannot hold U+0000: the event is refused, kept aside
        assert (result.events, result.rejected) == (4, 1)
        assert _stored_ids(engine) == good
        (row,) = _rejected(engine)
        assert "\\u0000" in row.raw  # its row as JSON, the id escaped
    else:  # SQLite stores it as received
        assert (result.events, result.rejected) == (5, 0)
        assert _stored_ids(engine) == good | {bad_id}
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_a_nul_in_a_unique_id_on_the_wire_is_rejected_on_both_databases(engine: Engine) -> None:
    events = _uplinks(3)
    events[1]["unique_id"] = "01NUL" + NUL + "ID"
    body = b"".join(orjson.dumps({"result": e}) + b"\n" for e in events)
    summary = import_stream(Store(engine), io.BytesIO(body), stream="s")
    assert (summary.result.events, summary.result.rejected) == (2, 1)
    assert "01NUL\\u0000ID" in _rejected(engine)[0].raw


def test_a_nul_in_decoded_payload_and_gateway_id_is_stored(engine: Engine) -> None:
    decoded = {"label": f"a{NUL}b", f"key{NUL}": [f"{NUL}", {"deep": f"x{NUL}"}], "n": 1}
    events = _uplinks(4, decoded_payload=decoded)
    meta = events[1]["data"]["uplink_message"]["rx_metadata"][0]
    meta["gateway_ids"]["gateway_id"] = f"gw{NUL}1"
    store = Store(engine)

    result = store.commit_batch(_batch(events))

    assert (result.events, result.rejected) == (4, 0)
    with engine.connect() as conn:
        payloads = conn.execute(sa.select(schema.uplinks.c.decoded_payload)).scalars().all()
        gateways = set(conn.execute(sa.select(schema.uplink_receptions.c.gateway_id)).scalars())
        raw = conn.execute(sa.select(schema.events.c.data).limit(1)).scalar_one()
    # PostgreSQL (text, jsonb) cannot hold U+0000: it becomes U+FFFD, the rest intact.
    mark = REPLACEMENT if _pg(engine) else NUL
    expected = {"label": f"a{mark}b", f"key{mark}": [mark, {"deep": f"x{mark}"}], "n": 1}
    assert payloads == [expected] * 4
    assert f"gw{mark}1" in gateways
    assert raw["uplink_message"]["decoded_payload"] == expected
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_a_nul_in_a_raw_rejected_frame_is_kept_with_the_batch(engine: Engine) -> None:
    events = _uplinks(4)
    junk = b"garbage \x00 with a NUL byte"
    body = b"".join(orjson.dumps({"result": e}) + b"\n" for e in events[:2])
    body += junk + b"\n" + b"".join(orjson.dumps({"result": e}) + b"\n" for e in events[2:])
    store = Store(engine)

    summary = import_stream(store, io.BytesIO(body), stream="s")

    assert (summary.result.events, summary.result.rejected) == (4, 1)
    (row,) = _rejected(engine)
    assert row.raw == "garbage " + (REPLACEMENT if _pg(engine) else NUL) + " with a NUL byte"
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_a_reject_row_the_database_refuses_is_rewritten_as_ascii(engine: Engine) -> None:
    events = _uplinks(3)
    batch = _batch(events)
    # A lone surrogate cannot be encoded for either driver: no cleaning makes it storable.
    batch.rejected.append({"stream": "s", "raw": "bad \ud800 text", "error": "test"})
    batch.items[1][1][0].values["application_id"] = None  # and one event refused as well
    store = Store(engine)

    result = store.commit_batch(batch)

    assert (result.events, result.rejected) == (2, 2)
    raws = [r.raw for r in _rejected(engine)]
    assert "bad \\ud800 text" in raws
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_an_outage_during_the_per_event_pass_writes_nothing(engine: Engine) -> None:
    events = _uplinks(4)
    batch = _batch(events)
    batch.items[1][1][0].values["application_id"] = None  # refused: the per-event pass runs
    store = Store(engine)
    fail = {"on": True, "refused": False}

    @sa.event.listens_for(engine, "rollback")
    def _refused(conn):  # type: ignore[no-untyped-def]
        fail["refused"] = True  # the whole batch was refused: the per-event pass follows

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _outage(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if fail["on"] and fail["refused"] and statement.startswith("SAVEPOINT"):
            raise conn.dialect.loaded_dbapi.OperationalError("injected outage")

    try:
        with pytest.raises(StoreUnavailable):
            store.commit_batch(batch)
        assert _stored_ids(engine) == set()
        assert store.load_cursor("s") == Cursor()
        fail["on"] = False
        result = store.commit_batch(batch)  # the caller's retry
    finally:
        sa.event.remove(engine, "before_cursor_execute", _outage)
        sa.event.remove(engine, "rollback", _refused)
    assert fail["refused"]
    assert (result.events, result.rejected) == (3, 1)


def test_every_hostile_mutant_is_stored_or_rejected_and_later_events_land(engine: Engine) -> None:
    # Mutants pass normalize with values one database or the other refuses (a 300-character
    # gateway id, a latitude that is text, an index past int32, ...): each costs only itself.
    mutants = random.Random(8).sample(hostile.mutants(), 3000)
    later = _uplinks(5, seed=9)
    frames = [*hostile.frames(mutants), *hostile.JUNK_FRAMES, *hostile.frames(later)]
    body = b"".join(f + b"\n" for f in frames)
    store = Store(engine)

    summary = import_stream(store, io.BytesIO(body), stream="fuzz", batch_max_events=400)

    non_empty = sum(1 for f in frames if f)
    # Every frame is an event (new or a duplicate id) or a reject; junk stream starts
    # are rejects too.
    assert summary.result.events + summary.result.duplicates + summary.result.rejected == non_empty
    stored = _stored_ids(engine)
    assert {e["unique_id"] for e in later} <= stored
    assert len(stored) == summary.result.events
    assert len(_rejected(engine)) == summary.result.rejected
    assert store.load_cursor("fuzz").last_time == _time(later[-1])


def test_a_far_future_event_is_stored_and_the_saved_cursor_stays_at_the_clock(
    engine: Engine,
) -> None:
    events = _uplinks(4)
    events[1]["time"] = "9999-12-31T23:59:59Z"
    store = Store(engine)
    store.commit_batch(_batch(events))
    assert _stored_ids(engine) == {e["unique_id"] for e in events}
    assert store.load_cursor("s").last_time == _time(events[-1])


def test_a_cursor_saved_in_the_future_resumes_from_the_newest_stored_event(
    engine: Engine,
) -> None:
    events = _uplinks(5)
    store = Store(engine)
    store.commit_batch(_batch(events))
    # As an older ingestd left it: the cursor at a far-future event's time.
    poisoned = Batch(
        stream="s",
        cursor=Cursor(
            last_time=datetime(9999, 12, 31, tzinfo=UTC), unique_ids_at_last_time=frozenset({"x"})
        ),
    )
    store.commit_batch(poisoned)

    cursor = store.load_cursor("s")

    assert cursor.last_time == _time(events[-1])
    assert cursor.unique_ids_at_last_time == {events[-1]["unique_id"]}
    assert store.load_cursor("other") == Cursor()


def test_the_saved_cursor_keeps_a_bounded_number_of_ids(engine: Engine) -> None:
    (template,) = _uplinks(1)
    ulids = eventgen.UlidFactory(random.Random(2))
    events = [dict(template, unique_id=ulids()) for _ in range(CURSOR_IDS_MAX + 200)]
    store = Store(engine)
    result = store.commit_batch(_batch(events))
    assert result.events == len(events)
    with engine.connect() as conn:
        saved = conn.execute(sa.select(schema.stream_cursors.c.last_unique_ids)).scalar_one()
    assert len(saved) == CURSOR_IDS_MAX
    assert set(saved) <= {e["unique_id"] for e in events}


@pytest.mark.parametrize("depth", [300, 1000])
def test_a_payload_nested_deeper_than_orjson_writes_costs_at_most_its_own_event(
    engine: Engine, depth: int
) -> None:
    # orjson reads 1024 levels but writes only 254: 300 is written by the stdlib instead;
    # 1000 is past what Python recurses, so that event is kept aside with its identity.
    events = _uplinks(3)
    nested: Any = "bottom"
    for _ in range(depth):
        nested = [nested]
    events[1]["data"]["uplink_message"]["decoded_payload"] = {"deep": nested}
    store = Store(engine)
    result = store.commit_batch(_batch(events))
    if depth == 300:
        assert (result.events, result.rejected) == (3, 0)
        with engine.connect() as conn:
            stored = conn.execute(sa.select(schema.uplinks.c.decoded_payload)).scalars().all()
        assert {"deep": nested} in stored
    else:
        assert (result.events, result.rejected) == (2, 1)
        (row,) = _rejected(engine)
        assert events[1]["unique_id"] in row.raw
    assert store.load_cursor("s").last_time == _time(events[-1])
