"""The analytics views give exact numbers on known traffic, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from analytics_traffic import (
    D0,
    D1,
    GW1_NEW,
    NEWEST_A,
    NOW,
    T_DL,
    as_day,
    as_time,
    at,
    fill,
)
from sqlalchemy.engine import Engine

from ingestd import views


def _rows(engine: Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql))]


@pytest.fixture
def filled(engine: Engine) -> Engine:
    fill(engine)
    return engine


def test_views_have_the_contract_columns(engine: Engine) -> None:
    """DESIGN §8 names and columns, identical on both dialects (extra columns allowed)."""
    contract = {
        "device_last_seen": "application_id device_id last_uplink_at last_f_cnt last_f_port "
        "last_rssi last_snr last_gateway_count last_spreading_factor uplinks_24h",
        "uplink_loss": "application_id device_id session_key_id first_f_cnt last_f_cnt received "
        "expected lost loss_ratio",
        "uplink_loss_daily": "application_id device_id day received expected lost loss_ratio",
        "gateway_stats": "gateway_id receptions devices rssi_min rssi_avg rssi_max snr_min "
        "snr_avg snr_max last_seen_at latitude longitude altitude",
        "downlink_status": "outbox_id application_id device_id status attempts created_at "
        "queued_at sent_at acked_at last_error",
        "stream_health": "stream cursor_at gaps_open gaps_healed gap_seconds rejected_24h",
        "uplink_fields": "uplink_id application_id device_id received_at key value_num value_text",
    }
    with engine.connect() as conn:
        for name, columns in contract.items():
            got = list(conn.execute(sa.text(f"SELECT * FROM {name} WHERE 1 = 0")).keys())
            assert set(columns.split()) <= set(got), name
    assert set(contract) == set(views.VIEW_NAMES)


def test_device_last_seen(filled: Engine) -> None:
    rows = {r["device_id"]: r for r in _rows(filled, "SELECT * FROM device_last_seen")}
    assert set(rows) == {"dev-a", "dev-b"}  # dev-c sent only a simulated uplink
    a, b = rows["dev-a"], rows["dev-b"]
    # dev-a's newest uplink is simulated (f_cnt 500): the newest real one is f_cnt 2.
    assert as_time(a["last_uplink_at"]) == NEWEST_A
    assert (a["last_f_cnt"], a["last_f_port"], a["last_rssi"], a["last_snr"]) == (2, 1, -80, 8)
    assert (a["last_gateway_count"], a["last_spreading_factor"]) == (1, 7)
    assert (a["uplinks_24h"], a["uplinks_total"]) == (1, 8)
    assert as_time(b["last_uplink_at"]) == at(D1, h=12, m=6)
    assert (b["last_f_cnt"], b["last_f_port"], b["last_gateway_count"]) == (3, 2, 2)
    assert (b["last_spreading_factor"], b["uplinks_24h"], b["uplinks_total"]) == (9, 0, 5)


def test_uplink_loss_per_session(filled: Engine) -> None:
    got = {
        (r["device_id"], r["session_key_id"]): (
            r["first_f_cnt"],
            r["last_f_cnt"],
            r["received"],
            r["expected"],
            r["lost"],
            r["loss_ratio"],
            r["rollovers"],
            r["resets"],
        )
        for r in _rows(filled, "SELECT * FROM uplink_loss")
    }
    assert got == {
        # 12 lost; the retry of 11 is not a second frame.
        ("dev-a", "S1"): (10, 14, 4, 5, 1, 0.2, 0, 0),
        # The rejoin reset the counter: a new session, no loss (the simulated 500 is ignored).
        ("dev-a", "S2"): (0, 2, 3, 3, 0, 0.0, 0, 0),
        # 65533, 65534, [65535], 0, 1, [2], 3: unwrapped to 65533..65539.
        ("dev-b", "S3"): (65533, 65539, 5, 7, 2, 2 / 7, 1, 0),
    }


def test_uplink_loss_daily_adds_up_to_the_sessions(filled: Engine) -> None:
    got = {
        (r["device_id"], as_day(r["day"])): (
            r["received"],
            r["expected"],
            r["lost"],
            r["loss_ratio"],
        )
        for r in _rows(filled, "SELECT * FROM uplink_loss_daily")
    }
    expected: dict[tuple[str, date], list[int]] = defaultdict(lambda: [0, 0])
    # (received, lost) booked on the day each frame arrived.
    for device, day, received, lost in (
        ("dev-a", D0.date(), 4, 1),
        ("dev-a", D1.date(), 2, 0),
        ("dev-a", NEWEST_A.date(), 1, 0),
        ("dev-b", D1.date(), 5, 2),
    ):
        expected[(device, day)][0] += received
        expected[(device, day)][1] += lost
    assert got == {
        key: (rec, rec + lost, lost, lost / (rec + lost)) for key, (rec, lost) in expected.items()
    }


def test_gateway_stats(filled: Engine) -> None:
    rows = {r["gateway_id"]: r for r in _rows(filled, "SELECT * FROM gateway_stats")}
    assert set(rows) == {"gw-1", "gw-2"}
    g1, g2 = rows["gw-1"], rows["gw-2"]
    assert (g1["receptions"], g1["devices"]) == (13, 2)  # 8 of dev-a, 5 of dev-b
    assert (g1["rssi_min"], g1["rssi_max"], g1["snr_min"], g1["snr_max"]) == (-100, -80, 0, 8)
    assert g1["rssi_avg"] == pytest.approx((8 * -80 + 5 * -100) / 13)
    assert g1["snr_avg"] == pytest.approx(8 * 8 / 13)
    assert as_time(g1["last_seen_at"]) == NEWEST_A
    assert (g1["latitude"], g1["longitude"], g1["altitude"]) == GW1_NEW  # the latest position
    # gw-2 also heard the simulated uplink (rssi -1): not counted.
    assert (g2["receptions"], g2["devices"], g2["rssi_min"], g2["rssi_max"]) == (5, 1, -110, -110)
    assert (g2["snr_avg"], g2["latitude"], g2["longitude"]) == (-5, None, None)
    assert as_time(g2["last_seen_at"]) == at(D1, h=12, m=6)


def test_downlink_status(filled: Engine) -> None:
    rows = {r["outbox_id"]: r for r in _rows(filled, "SELECT * FROM downlink_status")}
    assert set(rows) == {1, 2, 3}
    acked = rows[1]
    assert (acked["status"], acked["attempts"], acked["nacks"], acked["events"]) == (
        "acked",
        1,
        1,
        6,
    )
    assert as_time(acked["created_at"]) == T_DL
    # queued: the push's HTTP answer (1 s) came before the forward event (2 s).
    assert as_time(acked["queued_at"]) == at(T_DL, s=1)
    assert as_time(acked["sent_at"]) == at(T_DL, s=3)  # the first transmission, not the retry
    assert as_time(acked["acked_at"]) == at(T_DL, s=20)
    assert (acked["queued_after_s"], acked["sent_after_s"], acked["acked_after_s"]) == (1, 2, 17)
    failed = rows[2]
    assert (failed["status"], failed["attempts"], failed["last_error"]) == (
        "failed",
        8,
        "f_port_invalid",
    )
    assert (failed["queued_at"], failed["sent_at"], failed["acked_at"], failed["events"]) == (
        None,
        None,
        None,
        0,
    )
    assert (rows[3]["status"], rows[3]["queued_at"], rows[3]["queued_after_s"]) == (
        "pending",
        None,
        None,
    )


def test_stream_health(filled: Engine) -> None:
    rows = {r["stream"]: r for r in _rows(filled, "SELECT * FROM stream_health")}
    assert set(rows) == {"s1", "s2"}
    s1, s2 = rows["s1"], rows["s2"]
    assert as_time(s1["cursor_at"]) == NOW - timedelta(seconds=10)
    lag = (datetime.now(UTC) - as_time(s1["cursor_at"])).total_seconds()
    assert lag - 5 <= s1["lag_s"] <= lag + 1  # now: the database's CURRENT_TIMESTAMP
    # The failed backfill leaves its gap open; only the backfilled one is healed.
    assert (s1["gaps_open"], s1["gaps_healed"], s1["recovered"]) == (2, 1, 5)
    assert (s1["gap_seconds"], s1["open_gap_seconds"], s1["rejected_24h"]) == (4500, 900, 2)
    assert (s2["cursor_at"], s2["gaps_open"], s2["gap_seconds"], s2["rejected_24h"]) == (
        None,
        0,
        0,
        1,
    )


def test_uplink_fields_flattens_decoded_payloads(filled: Engine) -> None:
    rows = _rows(
        filled,
        "SELECT device_id, received_at, key, value_num, value_text FROM uplink_fields"
        " WHERE device_id = 'dev-a' AND key NOT IN ('n')",
    )
    assert {r["device_id"] for r in rows} == {"dev-a"}
    assert {as_time(r["received_at"]) for r in rows} == {NEWEST_A}  # not the simulated one
    assert sorted((r["key"], r["value_num"], r["value_text"]) for r in rows) == [
        ("label", None, "x"),
        ("nested.deep.a.b", 1.0, None),
        ("nested.hum", 40.0, None),
        ("ok", 1.0, None),
        ("temp", 21.5, None),
    ]  # arrays, nulls and levels past UPLINK_FIELDS_DEPTH are not leaves here
    counts = _rows(filled, "SELECT COUNT(*) AS n FROM uplink_fields WHERE key = 'n'")
    assert counts[0]["n"] == 12  # every other real uplink's {"n": f_cnt}


def test_views_at_head_are_the_ones_in_ingestd_views(engine: Engine) -> None:
    """A migration carries a frozen copy of the view SQL; head must equal ingestd.views."""
    current = views.view_sql(engine.dialect.name)
    with engine.begin() as conn:
        for name, sql in current.items():
            if engine.dialect.name == "sqlite":
                stored = conn.execute(
                    sa.text("SELECT sql FROM sqlite_master WHERE type = 'view' AND name = :n"),
                    {"n": name},
                ).scalar_one()
                assert stored == f"CREATE VIEW {name} AS\n{sql}", name
            else:
                conn.exec_driver_sql(f"CREATE TEMP VIEW check_{name} AS {sql}")
                a, b = conn.execute(
                    sa.text(
                        "SELECT pg_get_viewdef(CAST(:a AS regclass)), pg_get_viewdef(CAST(:b AS regclass))"
                    ),
                    {"a": name, "b": f"check_{name}"},
                ).one()
                assert a == b, name
        conn.rollback()
