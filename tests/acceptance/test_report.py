"""``ingestd report``: the numbers behind the charts, and the page in a real headless Chromium."""

from __future__ import annotations

import io
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from analytics_traffic import NOW, fill
from browser import Browser, find_chromium
from sqlalchemy.engine import Engine

from ingestd import migrate, schema
from ingestd.__main__ import main
from ingestd.db import create_engine
from ingestd.identity import uplink_id
from ingestd.report import write_report
from ingestd.report.data import load_report_data

RENDER_BUDGET_MS = 2000  # from navigation start to every plot drawn
RENDER_TRIES = 5
RENDERED = "document.body && document.body.dataset.renderMs"  # set by the page's marker script
DEVICES, DAYS = 100, 7
# The known traffic starts at D0, midnight three days back: four days cover all of it at any
# time of day (three lost D0's 10:00 uplinks once the clock passed 10:00 UTC).
FIXTURE_SPAN = timedelta(days=4)


def test_report_data_on_known_traffic(engine: Engine) -> None:
    fill(engine)
    data = load_report_data(engine, since=FIXTURE_SPAN, application_id="app", now=NOW)
    assert data.totals["uplinks"] == 13  # the real ones; 2 simulated left out
    loss = {r[1]: r[2:] for r in data.loss.rows}
    assert loss == {"dev-a": (7, 8, 1, 1 / 8), "dev-b": (5, 7, 2, 2 / 7)}
    assert [(r[0], r[1], r[2]) for r in data.gateways.rows] == [("gw-1", 13, 2), ("gw-2", 5, 1)]
    assert {r[0]: r[1] for r in data.downlinks.rows} == {"acked": 1, "failed": 1, "pending": 1}
    assert sorted(r[4] for r in data.gaps.rows) == ["healed", "open", "open"]
    assert (
        load_report_data(engine, since=FIXTURE_SPAN, application_id="other").totals["uplinks"] == 0
    )


def _fleet(engine: Engine) -> None:
    """100 devices x 7 days, one uplink an hour each (a few lost), over 4 gateways."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ups, rxs = [], []
    for d in range(DEVICES):
        app, dev = ("app-1" if d < 60 else "app-2"), f"dev-{d:03d}"
        for h in range(DAYS * 24):
            if (h * 7 + d) % 23 == 0:
                continue
            t = now - timedelta(hours=h, minutes=d % 60)
            uid = uplink_id(app, dev, t, DAYS * 24 - h)
            ups.append(
                {
                    "uplink_id": uid,
                    "application_id": app,
                    "device_id": dev,
                    "session_key_id": "k",
                    "f_port": 1,
                    "f_cnt": DAYS * 24 - h,
                    "confirmed": False,
                    "received_at": t,
                    "rssi": -70.0 - d % 40 - h % 5,
                    "snr": 5.0 - d % 10,
                    "gateway_count": 1,
                }
            )
            rxs.append(
                {
                    "uplink_id": uid,
                    "received_at": t,
                    "reception_index": 0,
                    "gateway_id": f"gw-{d % 4}",
                    "rssi": -70.0 - d % 40,
                    "snr": 5.0,
                    "latitude": 52 + d % 4 * 0.01,
                    "longitude": 4 + d % 4 * 0.02,
                }
            )
    outbox = [
        {
            "application_id": "app-1",
            "device_id": f"dev-{i % DEVICES:03d}",
            "f_port": 1,
            "frm_payload": b"\x01",
            "status": status,
            "created_at": now - timedelta(hours=i),
            "updated_at": now - timedelta(hours=i),
        }
        for i, status in enumerate(["acked"] * 30 + ["failed"] * 3 + ["sent"] * 5 + ["pending"])
    ]
    gaps = [
        {
            "stream": f"s{i % 2}",
            "gap_start": now - timedelta(hours=10 * i + 2),
            "gap_end": now - timedelta(hours=10 * i),
            "reason": "reconnect",
            "backfilled_at": now if i % 3 else None,
            "backfill_passes": 1 if i % 3 else 0,
        }
        for i in range(10)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(schema.uplinks), ups)
        conn.execute(sa.insert(schema.uplink_receptions), rxs)
        conn.execute(sa.insert(schema.downlink_outbox), outbox)
        conn.execute(sa.insert(schema.stream_gaps), gaps)


@pytest.fixture(scope="module")
def fleet_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of the fleet, written by the real CLI."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp / 'fleet.db'}"
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        _fleet(engine)
    finally:
        engine.dispose()
    out = tmp / "report.html"
    os.environ["INGESTD_DATABASE__URL"] = url
    try:
        assert main(["report", "--since", "7d", "-o", str(out)]) == 0
    finally:
        del os.environ["INGESTD_DATABASE__URL"]
    return out


def test_report_is_one_file_that_references_nothing_outside(fleet_report: Path) -> None:
    page = fleet_report.read_text(encoding="utf-8")
    # What the browser would fetch by itself: attributes and CSS outside the scripts (the
    # inlined BokehJS mentions URLs in strings; what scripts request is the browser test's).
    page = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S | re.I)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<link" not in page
    assert len(fleet_report.read_bytes()) < 3 * 2**20  # BokehJS inline is ~1.3 MiB


def _chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    return path


def test_report_renders_in_headless_chromium_offline_and_fast(
    fleet_report: Path, tmp_path: Path
) -> None:
    """Charts drawn (canvases in the DOM, a screenshot that is not blank), no request, < 2 s."""
    from PIL import Image, ImageStat  # Pillow comes with Bokeh

    with Browser(_chromium(), tmp_path / "profile") as browser:
        timings = []
        for _ in range(RENDER_TRIES):  # the best of a few loads: the machine may be busy
            browser.open(fleet_report.as_uri())
            timings.append(int(browser.wait_for(RENDERED)))
            if timings[-1] < RENDER_BUDGET_MS:
                break
        plots = browser.evaluate("document.body.dataset.renderedPlots")
        canvases = int(browser.evaluate("document.body.dataset.canvases"))
        png = browser.screenshot()
        requests = list(browser.requests)
    assert int(plots) == 6  # uplinks/hour, loss, signal, gateways, downlinks, gaps
    assert canvases >= int(plots)
    assert min(timings) < RENDER_BUDGET_MS, f"rendered in {timings} ms"
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width >= 1000 and image.height > 2000
    stat = ImageStat.Stat(image)
    assert min(stat.stddev) > 10  # not a blank page
    colors = image.resize((400, 800)).getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 200  # lines, bars, text: many distinct colours
    if os.environ.get("INGESTD_REPORT_SCREENSHOT"):  # refresh docs/report.png
        Path(os.environ["INGESTD_REPORT_SCREENSHOT"]).write_bytes(png)


def test_report_command_on_known_traffic(engine: Engine, tmp_path: Path) -> None:
    fill(engine)
    out = tmp_path / "r.html"
    summary = write_report(engine, out, since=FIXTURE_SPAN, application_id="app")
    assert "13 uplinks, 2 devices, 2 gateways, 3 downlinks, 2 open gaps" in summary
    page = out.read_text(encoding="utf-8")
    assert "dev-a" in page and "gw-1" in page and "healed" in page
