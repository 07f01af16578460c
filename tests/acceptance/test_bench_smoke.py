"""The live-daemon benchmark still runs end to end: tiny sizes, SQLite only, no figures judged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_run.py"
RUN_TIMEOUT_S = 60.0  # the run itself takes ~10 s; this only stops a hang
STOP_TIMEOUT_S = 15.0


def test_quick_run_exits_0_and_prints_the_table() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--quick", "--pg", ""],
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
    for header in ("target", "events/s", "x base", "p50 ms", "p99 ms", "RSS MiB", "missing"):
        assert header in text, text[-3000:]
    rows = [
        line.split()[:2] for line in text.splitlines() if line.startswith(("baseline", "sqlite"))
    ]
    assert ["baseline", "flat-out"] in rows and ["sqlite", "flat-out"] in rows, text[-3000:]
    assert ["sqlite", "100/s"] in rows, text[-3000:]
    assert any(line.startswith("sqlite") and "(RSS)" in line for line in text.splitlines())
    assert "postgresql" not in text
