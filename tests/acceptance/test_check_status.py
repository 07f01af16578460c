"""``ingestd check`` and ``ingestd status`` as an operator runs them: real processes against the
loopback simulator and real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from support import Db

from ingestd import migrate, schema
from ingestd.db import create_engine
from ingestd.sim import events as eventgen
from ingestd.sim.server import Simulator, fake_api_key
from ingestd.store import Store

DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
_LINE = re.compile(r"^(ok|FAIL|warn|note|skip)\s+(\S+(?: \S+)?)\s{2,}(.*)$")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(devices=5, seed=7).start()
    yield simulator
    simulator.stop()


def _write_config(
    tmp_path: Path,
    *,
    db_url: str,
    base_url: str,
    api_key: str | None,
    streams: list[dict[str, Any]] | None = None,
    downlinks: bool = False,
) -> Path:
    """An ingestd.toml; strings are written as JSON strings, which TOML reads alike."""
    q = json.dumps
    lines = [
        "[database]",
        f"url = {q(db_url)}",
        "[tts]",
        f"base_url = {q(base_url)}",
        "connect_timeout_s = 2.0",
    ]
    if api_key is not None:
        lines.append(f"api_key = {q(api_key)}")
    for spec in streams or [{"name": "water-meters", "application_id": "sim-app"}]:
        lines.append("[[streams]]")
        lines += [f"{k} = {q(v)}" for k, v in spec.items()]
    lines += ["[downlinks]", f"enabled = {q(downlinks)}", "[metrics]", 'listen = ""']
    path = tmp_path / "ingestd.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the key literally: check warns about a world-readable one
    return path


def _ingestd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "--config", str(config), *args],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _verdicts(stdout: str) -> dict[str, list[tuple[str, str]]]:
    """subject -> [(word, detail), ...] for every check line."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in stdout.splitlines():
        m = _LINE.match(line)
        assert m, f"not a check line: {line!r}"
        found.setdefault(m[2], []).append((m[1], m[3]))
    return found


def _migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ingestd.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", DIALECTS, indirect=True)
def test_check_passes_against_the_simulator(db_url: str, tmp_path: Path, sim: Simulator) -> None:
    streams = [
        {"name": "water-meters", "application_id": "sim-app"},
        {
            "name": "meter-1",
            "application_id": "sim-app",
            "device_ids": ["dev-0001"],
            "names": ["as.up.data.forward", "/^as\\.down\\./"],
        },
    ]
    cfg = _write_config(
        tmp_path,
        db_url=db_url,
        base_url=sim.base_url,
        api_key=sim.api_key,
        streams=streams,
        downlinks=True,
    )

    res = _ingestd(cfg, "check")

    assert res.returncode == 0, res.stdout + res.stderr
    verdicts = _verdicts(res.stdout)
    assert list(verdicts) == [
        "config",
        "database",
        "schema",
        "stream water-meters",
        "stream meter-1",
        "downlinks",
    ]
    for subject in ("config", "database", "schema"):
        assert [w for w, _ in verdicts[subject]] == ["ok"], verdicts[subject]
    for subject in ("stream water-meters", "stream meter-1"):
        # This simulator has no Storage Integration, like open-source TTS: a warning only.
        assert [w for w, _ in verdicts[subject]] == ["ok", "ok", "warn"], verdicts[subject]
        assert verdicts[subject][1][1] == "rights: the key may read traffic and push downlinks"
        assert "storage: not enabled (404" in verdicts[subject][2][1]
    assert verdicts["downlinks"][0][0] == "note"
    assert "2 streams, downlinks on" in verdicts["config"][0][1]
    assert "sim-app" in verdicts["stream water-meters"][0][1]
    assert "names match" in verdicts["stream meter-1"][0][1]
    # One real stream request per configured stream, as the daemon would send it.
    assert sorted(r.status for r in sim.stream_requests) == [200, 200]
    assert all(r.headers.get("user-agent", "").startswith("ingestd/") for r in sim.stream_requests)
    assert sim.api_key not in res.stdout + res.stderr


def test_check_shows_the_no_event_store_warning(tmp_path: Path) -> None:
    with Simulator(devices=2, store=False, seed=3) as nostore:
        cfg = _write_config(
            tmp_path,
            db_url=_migrated_sqlite(tmp_path),
            base_url=nostore.base_url,
            api_key=nostore.api_key,
        )
        res = _ingestd(cfg, "check")
    assert res.returncode == 0, res.stdout
    words = _verdicts(res.stdout)["stream water-meters"]
    assert words[0][0] == "ok"
    assert words[1][0] == "warn"
    assert "Events storage is not enabled" in words[1][1]
    assert "resumes cannot replay" in words[1][1]


def test_check_fails_naming_the_right_a_traffic_less_key_lacks(tmp_path: Path) -> None:
    """TTS opens the stream for a key with any right, then sends none of its traffic: the
    stream line alone would say ok (issue 11)."""
    with Simulator(devices=2, seed=5, api_key_rights=("RIGHT_APPLICATION_INFO",)) as info_only:
        cfg = _write_config(
            tmp_path,
            db_url=_migrated_sqlite(tmp_path),
            base_url=info_only.base_url,
            api_key=info_only.api_key,
        )
        res = _ingestd(cfg, "check")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = _verdicts(res.stdout)["stream water-meters"]
    assert lines[0][0] == "ok"  # the stream opened: events.stream.start came
    failed = [detail for word, detail in lines if word == "FAIL"]
    assert len(failed) == 1
    assert failed[0].startswith(
        "rights: the key lacks rights on sim-app: RIGHT_APPLICATION_TRAFFIC_READ "
    )
    assert "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE" not in failed[0]  # downlinks are off


@pytest.mark.parametrize("downlinks", [True, False])
def test_check_fails_naming_the_downlink_right_only_when_downlinks_are_on(
    tmp_path: Path, sim: Simulator, downlinks: bool
) -> None:
    read_only = sim.add_api_key(["RIGHT_APPLICATION_TRAFFIC_READ"])
    cfg = _write_config(
        tmp_path,
        db_url=_migrated_sqlite(tmp_path),
        base_url=sim.base_url,
        api_key=read_only,
        downlinks=downlinks,
    )
    res = _ingestd(cfg, "check")
    lines = _verdicts(res.stdout)["stream water-meters"]
    rights_line = next(line for line in lines if line[1].startswith("rights: "))
    if downlinks:
        assert res.returncode == 1
        assert rights_line[0] == "FAIL"
        assert "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE" in rights_line[1]
        assert "insufficient_application_rights" in rights_line[1]
        assert "RIGHT_APPLICATION_TRAFFIC_READ " not in rights_line[1]
    else:
        assert res.returncode == 0, res.stdout
        assert rights_line == ("ok", "rights: the key may read traffic")
    assert read_only not in res.stdout + res.stderr


def test_check_fails_on_a_wrong_api_key_naming_the_tts_error(
    tmp_path: Path, sim: Simulator
) -> None:
    wrong = fake_api_key(random.Random(99))
    cfg = _write_config(
        tmp_path, db_url=_migrated_sqlite(tmp_path), base_url=sim.base_url, api_key=wrong
    )

    res = _ingestd(cfg, "check")

    assert res.returncode == 1
    verdicts = _verdicts(res.stdout)
    assert verdicts["database"][0][0] == "ok" and verdicts["schema"][0][0] == "ok"
    word, detail = verdicts["stream water-meters"][0]
    assert word == "FAIL"
    assert detail.startswith("401 ")
    assert "api_key_not_found" in detail
    output = res.stdout + res.stderr
    assert wrong not in output
    assert wrong.rpartition(".")[2] not in output  # nor the key's secret part


def test_check_fails_on_an_unreachable_host_and_database_without_showing_the_password(
    tmp_path: Path,
) -> None:
    port = _closed_port()
    password = "pw-Zq8s4Hunter2"
    db_url = f"postgresql+psycopg://ingestd:{password}@127.0.0.1:{port}/ingestd"
    cfg = _write_config(
        tmp_path,
        db_url=db_url,
        base_url=f"http://127.0.0.1:{port}",
        api_key=fake_api_key(random.Random(1)),
    )

    res = _ingestd(cfg, "check")

    assert res.returncode == 1
    verdicts = _verdicts(res.stdout)
    db_word, db_detail = verdicts["database"][0]
    assert db_word == "FAIL"
    assert f"ingestd:***@127.0.0.1:{port}" in db_detail
    assert verdicts["schema"][0][0] == "skip"
    word, detail = verdicts["stream water-meters"][0]
    assert word == "FAIL"
    assert f"cannot reach http://127.0.0.1:{port}" in detail
    assert password not in res.stdout + res.stderr


def test_check_fails_when_a_stream_has_no_key(tmp_path: Path, sim: Simulator) -> None:
    cfg = _write_config(
        tmp_path, db_url=_migrated_sqlite(tmp_path), base_url=sim.base_url, api_key=None
    )
    res = _ingestd(cfg, "check")
    assert res.returncode == 1
    verdicts = _verdicts(res.stdout)
    assert verdicts["config"][0][0] == "FAIL"
    assert "streams[0]" in verdicts["config"][0][1] and "api_key" in verdicts["config"][0][1]
    assert verdicts["stream water-meters"][0][0] == "skip"
    assert sim.stream_requests == []


@pytest.mark.parametrize("blank_db_url", DIALECTS, indirect=True)
def test_check_and_status_fail_on_an_unmigrated_database(
    blank_db_url: str, tmp_path: Path, sim: Simulator
) -> None:
    if blank_db_url.startswith("sqlite"):
        Path(sa.make_url(blank_db_url).database or "").touch()  # an empty SQLite database
    cfg = _write_config(tmp_path, db_url=blank_db_url, base_url=sim.base_url, api_key=sim.api_key)

    res = _ingestd(cfg, "check")

    assert res.returncode == 1
    verdicts = _verdicts(res.stdout)
    assert verdicts["database"][0][0] == "ok"
    assert verdicts["schema"][0] == ("FAIL", "not migrated: run `ingestd migrate`")
    assert verdicts["stream water-meters"][0][0] == "ok"  # the other checks still run

    status = _ingestd(cfg, "status", "--json")
    assert status.returncode == 1
    assert status.stdout == ""
    assert "run `ingestd migrate`" in status.stderr


def test_check_does_not_create_a_missing_sqlite_file(tmp_path: Path, sim: Simulator) -> None:
    path = tmp_path / "nowhere.db"
    cfg = _write_config(
        tmp_path, db_url=f"sqlite:///{path}", base_url=sim.base_url, api_key=sim.api_key
    )
    res = _ingestd(cfg, "check")
    assert res.returncode == 1
    verdicts = _verdicts(res.stdout)
    assert verdicts["database"][0][0] == "FAIL"
    assert "does not exist: run `ingestd migrate`" in verdicts["database"][0][1]
    assert verdicts["schema"][0][0] == "skip"
    assert not path.exists()


# -- status -----------------------------------------------------------------------------------


def _capture(path: Path, now: datetime) -> Path:
    """6 uplinks two hours old, then 10 uplinks and 2 joins within the last hour."""
    rng = random.Random(5)
    ulids = eventgen.UlidFactory(rng)
    old = [now - timedelta(hours=2, seconds=-i) for i in range(6)]
    recent = [now - timedelta(minutes=30, seconds=-i) for i in range(10)]
    with path.open("wb") as out:
        for i, t in enumerate(old + recent):
            ev = eventgen.uplink_event(
                application_id="sim-app",
                device_id=f"dev-{i % 2}",
                dev_eui=f"70B3D57ED00000{i % 2:02X}",
                f_cnt=i,
                f_port=1,
                payload=b"\x01",
                gateways=1,
                time=t,
                unique_id=ulids(t),
                rng=rng,
            )
            out.write(orjson.dumps({"result": ev}) + b"\n\n")
        for i in range(2):
            t = now - timedelta(minutes=20, seconds=-i)
            ev = eventgen.join_event(
                application_id="sim-app",
                device_id=f"dev-{i}",
                dev_eui=f"70B3D57ED00000{i:02X}",
                dev_addr="260B0001",
                time=t,
                unique_id=ulids(t),
                rng=rng,
            )
            out.write(orjson.dumps({"result": ev}) + b"\n\n")
    return path


def _seed_outbox_gaps_and_state(db_url: str, now: datetime) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        user_insert = sa.text(
            "INSERT INTO downlink_outbox (application_id, device_id, f_port, frm_payload, status) "
            "VALUES ('sim-app', 'dev-0001', 1, :p, :status)"
        )
        for status in ("pending", "pending", "failed", "acked"):
            conn.execute(user_insert, {"p": b"\x01", "status": status})
        conn.execute(
            sa.insert(schema.downlink_outbox).values(
                application_id="sim-app",
                device_id="dev-0002",
                f_port=1,
                frm_payload=b"\x02",
                created_at=now - timedelta(minutes=5),
            )
        )
        conn.execute(
            sa.insert(schema.stream_gaps),
            [
                {
                    "stream": "cap",
                    "gap_start": now - timedelta(days=2, minutes=1),
                    "gap_end": now - timedelta(days=2),
                    "reason": "reconnect",
                    "detected_at": now - timedelta(days=2),
                },
                {
                    "stream": "cap",
                    "gap_start": now - timedelta(hours=1, minutes=5),
                    "gap_end": now - timedelta(hours=1),
                    "reason": "store_disabled",
                    "detected_at": now - timedelta(hours=1),
                },
            ],
        )
    Store(engine).set_stream_state(
        "water-meters", connected_since=None, last_error="HTTP 401: api_key_expired"
    )
    engine.dispose()


@pytest.mark.parametrize("db_url", DIALECTS, indirect=True)
def test_status_matches_the_database_after_an_import(db_url: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    cfg = _write_config(
        tmp_path,
        db_url=db_url,
        base_url="http://127.0.0.1:9",
        api_key=fake_api_key(random.Random(2)),
    )
    imported = _ingestd(cfg, "import", str(_capture(tmp_path / "cap.txt", now)), "--stream", "cap")
    assert imported.returncode == 0, imported.stderr
    _seed_outbox_gaps_and_state(db_url, now)

    res = _ingestd(cfg, "status", "--json")

    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    streams = {s["name"]: s for s in report["streams"]}
    assert list(streams) == ["water-meters", "cap"]  # configured first, then recorded ones
    cap, wm = streams["cap"], streams["water-meters"]
    db = Db(db_url)
    try:
        hour_ago = now - timedelta(hours=1)
        assert cap["events_total"] == db.scalar("SELECT count(*) FROM events WHERE stream='cap'")
        assert cap["events_total"] == 18
        assert cap["events_last_hour"] == 12  # by event time: the two-hour-old ones are out
        assert cap["uplinks_last_hour"] == 10
        ev = schema.events
        recent = sa.select(sa.func.count()).where(ev.c.stream == "cap", ev.c.time > hour_ago)
        with db.engine.connect() as conn:
            assert cap["events_last_hour"] == conn.execute(recent).scalar_one()
        cursor = Store(db.engine).load_cursor("cap")
        outbox_rows = dict(db.rows("SELECT status, count(*) FROM downlink_outbox GROUP BY status"))
    finally:
        db.engine.dispose()
    assert datetime.fromisoformat(cap["cursor_time"]) == cursor.last_time
    assert 19 * 60 < cap["lag_s"] < 21 * 60  # the newest event is a join 20 minutes old
    assert cap["configured"] is False and cap["application_id"] is None
    assert cap["gaps_total"] == 2 and cap["gaps_last_24h"] == 1
    assert cap["latest_gap"]["reason"] == "store_disabled"
    assert datetime.fromisoformat(cap["latest_gap"]["gap_end"]) == now - timedelta(hours=1)

    assert wm["configured"] is True and wm["application_id"] == "sim-app"
    assert wm["cursor_time"] is None and wm["events_total"] == 0
    assert wm["last_error"] == "HTTP 401: api_key_expired"
    assert datetime.fromisoformat(wm["last_error_at"]) >= now

    box = report["outbox"]
    assert box["by_status"] == {s: outbox_rows.get(s, 0) for s in schema.OUTBOX_STATUSES}
    assert box["by_status"]["pending"] == 3 and box["total"] == 5
    assert 300 <= box["oldest_pending_age_s"] < 400
    assert report["database"]["schema_revision"] == migrate.head_revision()

    human = _ingestd(cfg, "status")
    assert human.returncode == 0, human.stderr
    rows = {line.split()[0]: line for line in human.stdout.splitlines() if line.strip()}
    assert rows["cap"].split()[-4:] == ["12", "10", "18", "1"]
    assert rows["water-meters"].split()[-4:] == ["0", "0", "0", "0"]
    assert "pending 3" in rows["outbox"] and "failed 1" in rows["outbox"]
    assert "oldest pending 5m" in rows["outbox"]
    assert "api_key_expired" in human.stdout


def test_check_reports_whether_the_storage_integration_answers(db_url: str, tmp_path: Path) -> None:
    sim = Simulator(storage_enabled=True, seed=2).start()
    try:
        streams = [{"name": "app", "application_id": "sim-app"}]
        cfg = _write_config(
            tmp_path, db_url=db_url, base_url=sim.base_url, api_key=sim.api_key, streams=streams
        )
        res = _ingestd(cfg, "check")
        assert res.returncode == 0, res.stdout + res.stderr
        lines = _verdicts(res.stdout)["stream app"]
        assert lines[-1][0] == "ok" and "Storage Integration answers" in lines[-1][1]
        sim.storage.forbidden = True
        res = _ingestd(cfg, "check")
        assert res.returncode == 0  # the daemon runs without storage: not a failure
        lines = _verdicts(res.stdout)["stream app"]
        assert lines[-1][0] == "warn" and "no rights" in lines[-1][1]
    finally:
        sim.stop()
