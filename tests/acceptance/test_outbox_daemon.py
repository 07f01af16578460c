"""The outbox end to end: rows inserted by SQL, two ``ingestd run`` processes pushing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import sqlalchemy as sa

from ingestd.sim.server import Simulator

ROWS = 1000
DEVICES = 20


def _config(path: Path, sim: Simulator, db_url: str, *, require_stream: bool) -> Path:
    path.write_text(
        f"""
[database]
url = "{db_url}"
batch_max_delay_s = 0.05
[tts]
base_url = "{sim.base_url}"
api_key = "${{SIM_KEY}}"
reconnect_min_s = 0.05
[[streams]]
name = "app"
application_id = "{sim.application_id}"
[downlinks]
enabled = true
poll_interval_s = 0.1
workers = 2
require_stream = {"true" if require_stream else "false"}
[metrics]
listen = ""
[logging]
level = "info"
format = "json"
"""
    )
    return path


def _count_pushed(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM downlink_outbox WHERE status <> 'pending'")
            ).scalar_one()
        )


def _insert(engine: sa.Engine, sim: Simulator, first: int, count: int) -> None:
    rows = [
        {
            "app": sim.application_id,
            "dev": sim.device_ids[i % DEVICES],
            "payload": i.to_bytes(4, "big"),
            "confirmed": i % 2 == 0,
        }
        for i in range(first, first + count)
    ]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO downlink_outbox (application_id, device_id, f_port, frm_payload, "
                "confirmed) VALUES (:app, :dev, 10, :payload, :confirmed)"
            ),
            rows,
        )


def test_a_thousand_rows_two_processes_each_pushed_once_in_device_order(
    db_url: str, tmp_path: Path
) -> None:
    sim = Simulator(devices=DEVICES, downlink_ack_delay_s=0.01, seed=8).start()
    engine = sa.create_engine(db_url)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env["SIM_KEY"] = sim.api_key
        _insert(engine, sim, 0, ROWS // 2)  # a backlog before the workers start
        # The same configuration twice, as a real deployment would run it: on PostgreSQL one
        # process leads the stream and the other stands by, yet both push.
        for name in ("a", "b"):
            cfg = _config(tmp_path / f"{name}.toml", sim, db_url, require_stream=True)
            log = (tmp_path / f"{name}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ingestd", "--config", str(cfg), "run"],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
        running = list(procs)
        if engine.dialect.name == "sqlite":
            # One `run` per SQLite file: whichever of the two comes second is refused, and
            # the other's two worker slots push everything.
            deadline = time.monotonic() + 20
            while all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "the second run on one SQLite file ran"
                time.sleep(0.05)
            (refused,) = [p for p in procs if p.poll() is not None]
            assert refused.returncode == 1
            running.remove(refused)
        deadline = time.monotonic() + 20
        while not _count_pushed(engine):  # the workers are at work: add more while they run
            assert time.monotonic() < deadline, "no row was pushed"
            time.sleep(0.05)
        _insert(engine, sim, ROWS // 2, ROWS // 2)

        final = {"acked", "sent"}
        deadline = time.monotonic() + 120
        while True:
            with engine.connect() as conn:
                done = conn.execute(
                    sa.text("SELECT count(*) FROM downlink_outbox WHERE status IN ('acked','sent')")
                ).scalar_one()
            if done == ROWS:
                break
            for p in running:
                assert p.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"only {done} of {ROWS} rows finished"
            time.sleep(0.2)
        for p in running:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=10) for p in running] == [0] * len(running)

        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, device_id, confirmed, status, claimed_by FROM downlink_outbox")
            ).all()
        pushes: dict[int, int] = defaultdict(int)
        order: dict[str, list[int]] = defaultdict(list)
        for req in sim.downlink_requests:
            if req.op != "push" or req.status != 200:
                continue
            for item in req.body["downlinks"]:
                cids = [c for c in item["correlation_ids"] if c.startswith("ingestd:outbox:")]
                outbox_id = int(cids[0].rsplit(":", 1)[1])
                pushes[outbox_id] += 1
                order[req.device_id].append(outbox_id)
        assert len(rows) == ROWS
        assert all(pushes[r.id] == 1 for r in rows), "a row was pushed twice or never"
        for device, ids in order.items():
            assert ids == sorted(ids), f"{device}: pushed out of insertion order"
        for r in rows:
            assert r.status == ("acked" if r.confirmed else "sent"), r
        pids = {str(p.pid) for p in running}
        claimers = {r.claimed_by.split(":")[1] for r in rows}  # worker id: host:pid[:slot]
        assert claimers == pids, _log_summary(tmp_path)  # every running process worked
        assert all(s in final for s in {r.status for r in rows})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for f in logs:
            f.close()
        engine.dispose()
        sim.stop()


def _log_summary(tmp_path: Path) -> str:
    import json

    out = []
    for name in ("a", "b"):
        for line in (tmp_path / f"{name}.log").read_text().splitlines():
            try:
                ev = json.loads(line)["event"]
            except (ValueError, KeyError):
                continue
            if ev not in ("batch_committed", "downlink_queued"):
                out.append(f"{name}: {line[:200]}")
    return "\n".join(out[-60:])
