"""The benchmark table is still produced end to end: tiny sizes, SQLite only, no figures judged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0  # the quick table takes ~30 s; this only stops a hang
STOP_TIMEOUT_S = 15.0


def test_quick_table_exits_0_and_has_every_row() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--quick", "--pg", ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark then stops its daemon and simulator
        out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
        raise AssertionError(f"benchmark hung:\n{out.decode()[-3000:]}") from None
    finally:
        if proc.poll() is None:  # it did not stop on SIGTERM either
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "| path | db | ingestd | yardstick | ratio | target | note |" in text, text[-3000:]
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:2])
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| path")
    }
    for path in (
        "import",
        "same-rows loop",
        "import, one timestamp",
        "run flat-out",
        "steady 1000/s, event->commit p99",
        "backfill",
        "import peak RSS",
        "downlink pushes, 8 in flight",
    ):
        assert (path, "sqlite") in rows, text[-3000:]
    assert not any(db == "postgresql" for _, db in rows), text[-3000:]
