"""``ingestd demo``: the newcomer's first command works and shows what it promises."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path


def test_demo_streams_uplinks_and_follows_a_downlink_to_acked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    res = subprocess.run(
        [sys.executable, "-m", "ingestd", "demo", "--seconds", "2", "--database", "demo.db"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "uplinks per device" in out
    assert "downlink: acked" in out
    # "pushing" (claimed, TTS's answer not yet recorded) shows when a poll falls inside it.
    assert re.search(r"pending -> (pushing -> )?queued -> sent -> acked", out), out
    db = sqlite3.connect(tmp_path / "demo.db")
    uplinks = db.execute("SELECT count(*) FROM uplinks").fetchone()[0]
    status = db.execute("SELECT status FROM downlink_outbox").fetchone()[0]
    db.close()
    assert uplinks > 0
    assert status == "acked"
