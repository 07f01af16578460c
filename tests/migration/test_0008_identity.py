"""0008 converts a database filled by the 0007 schema: nothing lost, nothing doubled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from ingestd import migrate
from ingestd.db import create_engine
from ingestd.identity import uplink_id

DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
BEFORE = "0007_outbox_pending_due_index"
T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _t(engine: sa.Engine, value: datetime) -> object:
    # What 0007 stored: naive UTC text on SQLite, timestamptz on PostgreSQL.
    return value.replace(tzinfo=None).isoformat(" ") if engine.dialect.name == "sqlite" else value


def _fill_0007(engine: sa.Engine) -> None:
    up_sql = sa.text(
        "INSERT INTO uplinks (event_unique_id, application_id, device_id, f_port, f_cnt,"
        " confirmed, received_at, gateway_count) VALUES (:e, 'app', :d, 1, :f, false, :r, 2)"
    )
    rx_sql = sa.text(
        "INSERT INTO uplink_receptions (uplink_id, reception_index, gateway_id, rssi)"
        " VALUES (:u, :i, :g, -80)"
    )
    join_sql = sa.text(
        "INSERT INTO joins (event_unique_id, application_id, device_id, received_at)"
        " VALUES (:e, 'app', :d, :r)"
    )
    with engine.begin() as conn:
        uplinks = [
            ("01A", "dev-1", 1, T0),
            ("01B", "dev-1", 2, T0 + timedelta(seconds=60)),
            ("01C", "dev-2", 1, T0),
            ("01D", "dev-1", 1, T0),  # the same message as 01A under a second event id
        ]
        for eid, dev, f_cnt, when in uplinks:
            conn.execute(up_sql, {"e": eid, "d": dev, "f": f_cnt, "r": _t(engine, when)})
            for i in range(2):
                conn.execute(rx_sql, {"u": eid, "i": i, "g": f"gw-{i}"})
        for eid, dev in (("02A", "dev-1"), ("02B", "dev-2"), ("02C", "dev-1")):
            conn.execute(join_sql, {"e": eid, "d": dev, "r": _t(engine, T0)})
        conn.execute(
            sa.text(
                "INSERT INTO downlink_events (event_unique_id, kind, application_id, device_id,"
                " time) VALUES ('03A', 'sent', 'app', 'dev-1', :t)"
            ),
            {"t": _t(engine, T0)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO stream_gaps (stream, gap_start, gap_end, reason)"
                " VALUES ('s', :a, :b, 'replay_truncated')"
            ),
            {"a": _t(engine, T0), "b": _t(engine, T0 + timedelta(hours=1))},
        )


@pytest.mark.parametrize("blank_db_url", DIALECTS, indirect=True)
def test_0008_converts_a_filled_0007_database(blank_db_url: str) -> None:
    engine = create_engine(blank_db_url)
    try:
        migrate.upgrade(engine, BEFORE)
        _fill_0007(engine)
        migrate.upgrade(engine)
        with engine.connect() as conn:
            ups = conn.execute(
                sa.text(
                    "SELECT event_unique_id, device_id, f_cnt, uplink_id, source FROM uplinks"
                    " ORDER BY event_unique_id"
                )
            ).all()
            rx = conn.execute(
                sa.text(
                    "SELECT r.uplink_id, r.reception_index, u.event_unique_id, r.source"
                    " FROM uplink_receptions r JOIN uplinks u"
                    " ON u.uplink_id = r.uplink_id AND u.received_at = r.received_at"
                    " ORDER BY u.event_unique_id, r.reception_index"
                )
            ).all()
            orphans = conn.execute(sa.text("SELECT count(*) FROM uplink_receptions")).scalar()
            joins = conn.execute(
                sa.text("SELECT event_unique_id, source FROM joins ORDER BY event_unique_id")
            ).all()
            down = conn.execute(sa.text("SELECT source FROM downlink_events")).scalars().all()
            gap = conn.execute(
                sa.text(
                    "SELECT backfilled_at, recovered, backfill_error, backfill_passes"
                    " FROM stream_gaps"
                )
            ).one()
        # 01D was 01A's message under a second event id: one row, the first id kept.
        assert [u.event_unique_id for u in ups] == ["01A", "01B", "01C"]
        expected = {
            "01A": uplink_id("app", "dev-1", T0, 1),
            "01B": uplink_id("app", "dev-1", T0 + timedelta(seconds=60), 2),
            "01C": uplink_id("app", "dev-2", T0, 1),
        }
        assert {u.event_unique_id: u.uplink_id for u in ups} == expected
        assert {u.source for u in ups} == {"stream"}
        assert [(r.event_unique_id, r.reception_index) for r in rx] == [
            (e, i) for e in ("01A", "01B", "01C") for i in (0, 1)
        ]
        assert orphans == len(rx) == 6
        assert {r.source for r in rx} == {"stream"}
        assert [j.event_unique_id for j in joins] == ["02A", "02B"]  # 02C = 02A's message
        assert down == ["stream"]
        assert tuple(gap) == (None, 0, None, 0)

        # The new keys hold: a storage row needs no event id, and the same message again
        # is refused by the database itself.
        with engine.begin() as conn:
            insert = sa.text(
                "INSERT INTO uplinks (uplink_id, application_id, device_id, f_port, f_cnt,"
                " confirmed, received_at, gateway_count, source)"
                " VALUES (:u, 'app', 'dev-3', 1, 1, false, :r, 0, 'storage')"
                " ON CONFLICT DO NOTHING"
            )
            args = {"u": uplink_id("app", "dev-3", T0, 1), "r": _t(engine, T0)}
            assert conn.execute(insert, args).rowcount == 1
            assert conn.execute(insert, args).rowcount == 0
        # Receptions still cascade with their uplink.
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM uplinks WHERE event_unique_id = '01B'"))
            left = conn.execute(sa.text("SELECT count(*) FROM uplink_receptions")).scalar()
        assert left == 4

        # Downgrade restores the event keys, dropping only the row that has no event id.
        migrate.downgrade(engine, BEFORE)
        with engine.connect() as conn:
            back = (
                conn.execute(
                    sa.text(
                        "SELECT r.uplink_id FROM uplink_receptions r JOIN uplinks u"
                        " ON u.event_unique_id = r.uplink_id ORDER BY 1"
                    )
                )
                .scalars()
                .all()
            )
            n_up = conn.execute(sa.text("SELECT count(*) FROM uplinks")).scalar()
        assert back == ["01A", "01A", "01C", "01C"]
        assert n_up == 2
        migrate.upgrade(engine)
        assert migrate.is_up_to_date(engine)
    finally:
        engine.dispose()
