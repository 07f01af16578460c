"""No test leaves a process behind (issue 8 item 14): the ``procs`` fixture and the session check.

Each case runs a small pytest session in a subprocess with this suite's conftest, so the
inner session's own end-of-run check is what is tested.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import SETPRIV

TESTS = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _session(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    for name in ("conftest.py", "support.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_process_left_by_a_passing_test_is_killed_and_fails_it(tmp_path: Path) -> None:
    res = _session(
        tmp_path,
        f"""
        from pathlib import Path

        def test_forgets(procs):
            p = procs.popen({SLEEPER!r})
            Path("pid").write_text(str(p.pid))
        """,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "1 passed, 1 error" in out, out
    assert "the test left running" in out, out
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_a_process_of_a_failing_test_is_killed_without_a_second_error(tmp_path: Path) -> None:
    res = _session(
        tmp_path,
        f"""
        from pathlib import Path

        def test_fails(procs):
            p = procs.popen({SLEEPER!r})
            Path("pid").write_text(str(p.pid))
            assert False, "boom"
        """,
    )
    out = res.stdout + res.stderr
    assert "1 failed" in out and "error" not in out.splitlines()[-1], out
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_the_session_fails_when_a_child_outlives_it_even_an_orphan(tmp_path: Path) -> None:
    # A grandchild whose parent exited at once: without the subreaper it would belong to init.
    res = _session(
        tmp_path,
        f"""
        import subprocess, sys
        from pathlib import Path

        def test_leaks_outside_the_fixture():
            code = (
                "import subprocess; "
                "p = subprocess.Popen({SLEEPER!r}, stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL); print(p.pid)"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            Path("pid").write_text(out.stdout.strip())
        """,
    )
    out = res.stdout + res.stderr
    assert "1 passed" in out, out
    assert res.returncode == 1, out
    assert "processes still running at the end of the test session" in out, out
    pid = int((tmp_path / "pid").read_text())
    assert f"pid {pid}:" in out, out
    assert not _alive(pid)


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv --pdeathsig (Linux util-linux)")
def test_a_process_started_through_procs_dies_with_a_killed_test_run(tmp_path: Path) -> None:
    res = _session(
        tmp_path,
        f"""
        import os, signal
        from pathlib import Path

        def test_then_pytest_is_killed(procs):
            p = procs.popen({SLEEPER!r})
            Path("pid").write_text(str(p.pid))
            os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no session end
        """,
    )
    assert res.returncode == -9, res.stdout + res.stderr
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid)


def test_a_clean_session_passes(tmp_path: Path) -> None:
    res = _session(
        tmp_path,
        f"""
        def test_cleans_up(procs):
            p = procs.popen({SLEEPER!r})
            p.kill()
            p.wait()
        """,
    )
    assert res.returncode == 0, res.stdout + res.stderr
