"""Retention: prune deletes exactly the old rows, keeps what must stay, and never races ingest."""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa
from analytics_traffic import D1, NOW, fill
from sqlalchemy.engine import Engine
from support import make_settings, running, wait_for

from ingestd import schema
from ingestd.__main__ import main
from ingestd.config import RetentionSettings
from ingestd.db import create_engine
from ingestd.prune import TABLES, prune
from ingestd.sim.server import Simulator

CUTOFF = D1 + timedelta(hours=9)  # after the downlinks (D1 08:00), before dev-a's S2 uplinks


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
            for t in (*TABLES, "stream_cursors")
        }


def _fill_more(engine: Engine) -> None:
    """Raw events and joins on both sides of the cutoff; an old outbox row still in flight."""
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.events),
            [
                {
                    "unique_id": f"e{i}",
                    "stream": "s1",
                    "name": "as.up.data.forward",
                    "time": t,
                    "ingested_at": t,
                }
                for i, t in enumerate(
                    [CUTOFF - timedelta(days=3), CUTOFF - timedelta(seconds=1), CUTOFF, NOW]
                )
            ],
        )
        conn.execute(
            sa.insert(schema.joins),
            [
                {
                    "application_id": "app",
                    "device_id": "dev-a",
                    "received_at": t,
                    "session_key_id": k,
                }
                for t, k in (
                    (CUTOFF - timedelta(hours=1), "S1"),
                    (CUTOFF + timedelta(hours=1), "S2"),
                )
            ],
        )
        conn.execute(
            sa.insert(schema.downlink_outbox),
            {
                "id": 4,
                "application_id": "app",
                "device_id": "dev-a",
                "f_port": 1,
                "frm_payload": b"\x04",
                "status": "sent",
                "created_at": D1 - timedelta(days=1),
                "updated_at": D1 - timedelta(days=1),
            },
        )


def test_prune_deletes_exactly_the_old_rows_and_keeps_what_must_stay(engine: Engine) -> None:
    fill(engine)
    _fill_more(engine)
    before = _counts(engine)
    dry = prune(engine, older_than=NOW - CUTOFF, now=NOW, dry_run=True)
    assert _counts(engine) == before  # a dry run deletes nothing
    done = prune(engine, older_than=NOW - CUTOFF, now=NOW, batch_rows=2)  # several batches
    expected = {
        "uplink_receptions": 5,  # dev-a's S1 uplinks, heard by gw-1 only
        "uplinks": 5,
        "joins": 1,
        "downlink_events": 6,  # all of outbox 1's, at D1 08:00:00..20
        "events": 2,  # strictly older than the cutoff: the one at the cutoff stays
        "rejected_events": 1,  # the one from two days ago
        "stream_gaps": 1,  # the healed one; the open and the failed-backfill ones stay
        "downlink_outbox": 2,  # acked and failed; pending (3) and sent (4) stay however old
    }
    assert done.deleted == expected
    assert dry.deleted == expected
    after = _counts(engine)
    assert after == {t: before[t] - expected.get(t, 0) for t in before}
    assert after["stream_cursors"] == 1
    with engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT id FROM downlink_outbox ORDER BY id")
        ).scalars().all() == [3, 4]
        assert (
            conn.execute(
                sa.text("SELECT COUNT(*) FROM stream_gaps WHERE backfill_passes = 0")
            ).scalar_one()
            == 1
        )
        # What is left is still whole: every reception has its uplink.
        assert (
            conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM uplink_receptions r LEFT JOIN uplinks u"
                    " ON u.uplink_id = r.uplink_id AND u.received_at = r.received_at"
                    " WHERE u.uplink_id IS NULL"
                )
            ).scalar_one()
            == 0
        )
    again = prune(engine, older_than=NOW - CUTOFF, now=NOW)
    assert again.total == 0


def _old_rows(engine: Engine, n: int) -> None:
    old = NOW - timedelta(days=200)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.events),
            [
                {
                    "unique_id": f"old-{i:05d}",
                    "stream": "app",
                    "name": "as.up.data.forward",
                    "time": old + timedelta(seconds=i),
                    "ingested_at": old,
                }
                for i in range(n)
            ],
        )


async def test_prune_while_the_daemon_ingests_loses_nothing_new(db_url: str) -> None:
    """The daemon streams live uplinks while prune deletes 3,000 old events in small batches."""
    sim = Simulator(devices=5, seed=5, uplink_rate=100.0).start()
    engine = create_engine(db_url)
    try:
        _old_rows(engine, 3000)
        settings = make_settings(sim, db_url)
        async with running(settings):
            await wait_for(lambda: _live(engine) >= 50, what="live events stored")
            stop = threading.Event()
            result = await asyncio.to_thread(
                prune,
                engine,
                older_than=timedelta(days=90),
                batch_rows=100,
                should_stop=stop.is_set,
            )
            await wait_for(lambda: _live(engine) >= 250, what="more live events")
            sim.uplink_rate = 0.0
            published = {e["unique_id"] for e in sim.events}
            await wait_for(
                lambda: _live(engine) >= len(published) or sim.dropped_events > 0,
                what="every event stored",
            )
        # A full stream buffer would drop events on the server's side (as TTS does): then the
        # comparison below would prove nothing about prune.
        assert sim.dropped_events == 0
        assert result.deleted["events"] == 3000
        with engine.connect() as conn:
            stored = set(conn.execute(sa.text("SELECT unique_id FROM events")).scalars())
        assert published <= stored  # every live event is there
        assert not {u for u in stored if u.startswith("old-")}
    finally:
        engine.dispose()
        sim.stop()


def _live(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT COUNT(*) FROM events WHERE unique_id NOT LIKE 'old-%'")
        ).scalar_one()


async def test_the_daemon_prunes_when_retention_max_age_is_set(db_url: str) -> None:
    sim = Simulator(devices=2, seed=6).start()
    engine = create_engine(db_url)
    try:
        _old_rows(engine, 10)
        settings = replace(
            make_settings(sim, db_url), retention=RetentionSettings(max_age=timedelta(days=90))
        )
        async with running(settings):
            await wait_for(lambda: _counts(engine)["events"] == 0, what="old events pruned")
    finally:
        engine.dispose()
        sim.stop()


def test_prune_command_prints_rows_per_table(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_engine(db_url)
    try:
        _old_rows(engine, 7)
    finally:
        engine.dispose()
    monkeypatch.setenv("INGESTD_DATABASE__URL", db_url)
    assert main(["prune", "--older-than", "90d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"would delete", out) and re.search(r"^\s+events\s+7$", out, re.M)
    assert main(["prune", "--older-than", "90d"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+events\s+7$", out, re.M) and re.search(r"^\s+total\s+7 ", out, re.M)
    assert main(["prune", "--older-than", "90 days"]) == 2
    assert "--older-than: expected a positive duration" in capsys.readouterr().err
