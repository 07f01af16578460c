"""The store on real databases: idempotent, atomic with its cursor, bad input kept aside."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingestd import schema
from ingestd.batch import BatchBuilder
from ingestd.errors import StoreUnavailable
from ingestd.importer import import_stream
from ingestd.models import Cursor
from ingestd.sim import events as eventgen
from ingestd.store import Store, _BulkInsert

DATA = Path(__file__).parent.parent / "data" / "events"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _uplinks(n: int, *, start: datetime = T0, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    ulids = eventgen.UlidFactory(rng)
    events = []
    for i in range(n):
        t = start + timedelta(milliseconds=250 * i)
        events.append(
            eventgen.uplink_event(
                application_id="acme-app",
                device_id=f"dev-{i % 5:03d}",
                dev_eui=f"70B3D57ED000{i % 5:04X}",
                f_cnt=i,
                f_port=2,
                payload=bytes([i % 256, 1, 2]),
                gateways=2,
                time=t,
                unique_id=ulids(t),
                rng=rng,
            )
        )
    return events


def _body(events: list[dict[str, object]], delim: bytes = b"\n\n") -> bytes:
    return b"".join(orjson.dumps({"result": e}) + delim for e in events)


def _count(engine: Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_import_stores_every_family_and_reimport_stores_nothing_twice(engine: Engine) -> None:
    files = sorted(DATA.glob("*.json"))
    body = b"".join(orjson.dumps({"result": orjson.loads(f.read_bytes())}) + b"\n" for f in files)
    body += _body(_uplinks(30))
    store = Store(engine)

    first = import_stream(store, io.BytesIO(body), stream="cap", batch_max_events=7)
    second = import_stream(store, io.BytesIO(body), stream="cap", batch_max_events=7)

    stored = _count(engine, schema.events)
    assert first.result.events == stored
    assert second.result.events == 0
    assert second.result.duplicates == first.result.events
    assert _count(engine, schema.uplinks) == 30 + 5  # 30 generated + 5 uplink fixtures
    assert _count(engine, schema.joins) == 1
    assert _count(engine, schema.downlink_events) == 8  # one per lifecycle kind
    with engine.connect() as conn:
        kinds = set(conn.execute(sa.select(schema.downlink_events.c.kind)).scalars())
        sparse = (
            conn.execute(
                sa.select(schema.events.c.data).where(schema.events.c.name == "as.up.data.forward")
            )
            .scalars()
            .all()
        )
    assert kinds == {
        "receive",
        "forward",
        "sent",
        "ack",
        "nack",
        "failed",
        "queue_invalidated",
        "drop",
    }
    assert None in sparse  # the sparse replay is kept in events, not counted as an uplink
    assert _count(engine, schema.uplink_receptions) == first.result.rows["uplink_receptions"]


def test_rows_and_cursor_commit_together_or_not_at_all(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _uplinks(20)
    store = Store(engine)
    builder = BatchBuilder("s1", Cursor())
    for ev in events[:10]:
        builder.add_event(ev)
    store.commit_batch(builder.take())
    cursor_before = store.load_cursor("s1")

    for ev in events[10:]:
        builder.add_event(ev)
    batch = builder.take()
    # Inject an outage half-way through the batch: after events and uplinks are written,
    # the receptions insert loses the database (as a dropped connection or a lock would).
    calls = {"n": 0}
    insert = _BulkInsert.insert

    def _fail(self: _BulkInsert, conn: sa.Connection, payload: object, count: int) -> int:
        if self.table == "uplink_receptions":
            calls["n"] += 1
            orig = conn.dialect.loaded_dbapi.OperationalError("injected outage mid-batch")
            raise sa.exc.OperationalError("INSERT INTO uplink_receptions", None, orig)
        return insert(self, conn, payload, count)

    with monkeypatch.context() as patch:
        patch.setattr(_BulkInsert, "insert", _fail)
        with pytest.raises(StoreUnavailable):
            store.commit_batch(batch)

    assert calls["n"] == 1
    assert _count(engine, schema.events) == 10
    assert _count(engine, schema.uplinks) == 10
    assert store.load_cursor("s1") == cursor_before

    store.commit_batch(batch)  # the same batch again, now without the fault
    assert _count(engine, schema.events) == 20
    assert _count(engine, schema.uplink_receptions) == 40
    assert store.load_cursor("s1").last_time == max(
        datetime.fromisoformat(str(e["time"])) for e in events
    )


def test_an_uplink_stored_under_another_event_id_is_one_row_and_the_batch_lands(
    engine: Engine,
) -> None:
    # The same ApplicationUp under a second event id (an overlapping stream, an AS that
    # published it twice): its uplinks row conflicts. On PostgreSQL that fails the fast
    # COPY and the batch is written again through staging; later batches still land.
    events = _uplinks(12)
    store = Store(engine)
    builder = BatchBuilder("s1", Cursor())
    for ev in events[:4]:
        builder.add_event(ev)
    store.commit_batch(builder.take())

    twin = dict(events[0], unique_id="01TWINTWINTWINTWINTWINTWIN")
    for ev in [twin, *events[4:8]]:
        builder.add_event(ev)
    second = store.commit_batch(builder.take())
    for ev in events[8:]:
        builder.add_event(ev)
    third = store.commit_batch(builder.take())

    assert (second.events, third.events) == (5, 4)
    assert _count(engine, schema.events) == 13  # every event, the twin too
    assert _count(engine, schema.uplinks) == 12  # one row per message
    assert _count(engine, schema.uplink_receptions) == 24
    with engine.connect() as conn:
        owner = conn.execute(
            sa.select(schema.uplinks.c.event_unique_id).where(
                schema.uplinks.c.f_cnt == 0, schema.uplinks.c.device_id == "dev-000"
            )
        ).scalar_one()
    assert owner == events[0]["unique_id"]  # the first to arrive keeps the row


def test_bad_frames_go_to_rejected_events_and_the_rest_is_stored(engine: Engine) -> None:
    good = _uplinks(3)
    broken = dict(good[1])
    broken["unique_id"] = "01HBROKENBROKENBROKENBROKE"
    broken["data"] = {**broken["data"], "uplink_message": {"settings": {"frequency": "lots"}}}  # type: ignore[dict-item]
    body = (
        orjson.dumps({"result": good[0]})
        + b"\n\n"
        + b"this is not json\n\n"
        + orjson.dumps({"result": broken})
        + b"\n\n"
        + b'{"result": 42}\n\n'
        + orjson.dumps({"result": good[2]})
        + b"\n\n"
    )
    summary = import_stream(Store(engine), io.BytesIO(body), stream="bad")

    assert summary.result.events == 2
    assert summary.result.rejected == 3
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.rejected_events.c.raw, schema.rejected_events.c.error).order_by(
                schema.rejected_events.c.id
            )
        ).all()
    assert rows[0].raw == "this is not json"
    assert "not valid JSON" in rows[0].error
    assert "01HBROKENBROKENBROKENBROKE" in rows[1].raw
    assert "frequency" in rows[1].error
    assert _count(engine, schema.uplinks) == 2


def test_error_frame_keeps_everything_before_it(engine: Engine) -> None:
    events = _uplinks(5)
    err = (
        b'{"error":{"code":16,"message":"error:pkg/identityserver:api_key_expired (expired)",'
        b'"details":[{"namespace":"pkg/identityserver","name":"api_key_expired","code":16}]}}'
    )
    body = _body(events[:3]) + err + b"\n\n" + _body(events[3:])
    summary = import_stream(Store(engine), io.BytesIO(body), stream="err")
    assert summary.error is not None
    assert summary.error.name == "api_key_expired"
    assert summary.result.events == 3
    assert _count(engine, schema.events) == 3


def test_out_of_order_events_never_move_the_cursor_backwards(engine: Engine) -> None:
    events = _uplinks(6)
    shuffled = [events[i] for i in (0, 3, 1, 5, 2, 4)]
    store = Store(engine)
    import_stream(store, io.BytesIO(_body(shuffled)), stream="ooo", batch_max_events=2)
    cursor = store.load_cursor("ooo")
    assert cursor.last_time == datetime.fromisoformat(str(events[5]["time"]))
    assert cursor.unique_ids_at_last_time == {events[5]["unique_id"]}
    assert _count(engine, schema.events) == 6


def test_a_row_the_database_refuses_is_rejected_and_the_batch_still_lands(engine: Engine) -> None:
    events = _uplinks(4)
    store = Store(engine)
    builder = BatchBuilder("refuse", Cursor())
    for ev in events:
        builder.add_event(ev)
    batch = builder.take()
    # A row that passes normalization but violates the schema (NOT NULL application_id).
    batch.items[1][1][0].values["application_id"] = None
    result = store.commit_batch(batch)
    assert result.events == 3
    assert result.rejected == 1
    assert _count(engine, schema.uplinks) == 3
    assert store.load_cursor("refuse").last_time is not None
    # The reject holds the event's row as JSON, its payload as the object TTS sent: enough
    # to reprocess it.
    with engine.connect() as conn:
        raw = conn.execute(sa.select(schema.rejected_events.c.raw)).scalar_one()
    kept = orjson.loads(raw)
    assert kept["unique_id"] == events[1]["unique_id"]
    assert kept["data"] == events[1]["data"]
    assert kept["correlation_ids"] == events[1]["correlation_ids"]


def test_a_console_style_json_array_export_imports_like_a_stream(engine: Engine) -> None:
    events = _uplinks(6)
    # Pretty-printed, bare events and {"result": …} frames mixed, as exports and hand edits are.
    doc = [events[0], {"result": events[1]}, *events[2:]]
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    store = Store(engine)
    first = import_stream(store, io.BytesIO(b"\n  " + body), stream="export", batch_max_events=4)
    again = import_stream(store, io.BytesIO(body), stream="export")
    assert first.result.events == 6
    assert first.bytes_read == len(body) + 3
    assert again.result.duplicates == 6
    assert _count(engine, schema.uplinks) == 6


def test_a_reject_replayed_is_one_row_per_stream(engine: Engine) -> None:
    """The same bad frames again (a resume replays them) add no rejected_events rows; the
    same frames on another stream are that stream's own rows."""
    good = _uplinks(2)
    body = b"this is not json\n\n" + b'{"result": 42}\n\n' + _body(good)
    store = Store(engine)
    first = import_stream(store, io.BytesIO(body), stream="bad")
    again = import_stream(store, io.BytesIO(body + body), stream="bad")
    other = import_stream(store, io.BytesIO(body), stream="other")
    assert (first.result.rejected, again.result.rejected, other.result.rejected) == (2, 0, 2)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.rejected_events.c.stream, schema.rejected_events.c.digest)
        ).all()
    assert sorted(r.stream for r in rows) == ["bad", "bad", "other", "other"]
    assert all(r.digest for r in rows)


def test_an_event_the_database_refuses_again_is_not_rejected_twice(engine: Engine) -> None:
    store = Store(engine)
    events = _uplinks(3)
    for _ in range(2):  # its raw text differs each time (ingested_at); its id does not
        builder = BatchBuilder("refuse", Cursor())
        for ev in events:
            builder.add_event(ev)
        batch = builder.take()
        batch.items[1][1][0].values["application_id"] = None
        store.commit_batch(batch)
    assert _count(engine, schema.rejected_events) == 1
    assert _count(engine, schema.uplinks) == 2


def test_times_are_stored_as_sqlalchemy_writes_them_whatever_their_form(engine: Engine) -> None:
    # A whole second written with an offset, and nanoseconds: the bulk path formats times
    # itself, and a query binding the same instant through SQLAlchemy must find the row.
    event = _uplinks(1)[0]
    up = event["data"]["uplink_message"]  # type: ignore[index]
    up["received_at"] = "2026-11-01T14:00:00+02:00"
    up["rx_metadata"][0]["time"] = "2026-11-01T11:59:59.000000999Z"
    import_stream(Store(engine), io.BytesIO(_body([event])), stream="times")
    whole = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    u, r = schema.uplinks.c, schema.uplink_receptions.c
    with engine.connect() as conn:
        assert conn.execute(sa.select(u.received_at).where(u.received_at == whole)).all() == [
            (whole,)
        ]
        first = sa.select(r.time).where(r.reception_index == 0, r.time < whole)
        assert conn.execute(first).scalar_one() == whole - timedelta(seconds=1)
        if engine.dialect.name == "sqlite":  # the text SQLAlchemy's DateTime writes
            text = conn.exec_driver_sql("SELECT received_at FROM uplinks").scalar_one()
            assert text == "2026-11-01 12:00:00.000000"
