"""What ships, built and run: the wheel from the Docker build context, the HEALTHCHECK against
a real /healthz, and systemd-analyze on the unit (subprocesses and sockets, hence not a unit test).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging_files import (
    DOCKERFILE,
    ROOT,
    UNIT,
    Instruction,
    copy_sources,
    dockerignore,
    healthcheck_argv,
    ignored,
    parse_dockerfile,
    unit_entries,
)

import ingestd
from ingestd.metrics import MetricsServer

VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


async def test_healthcheck_passes_only_while_healthz_says_ok(
    dockerfile: list[Instruction],
) -> None:
    """Run the HEALTHCHECK command itself against a real /healthz."""
    code = healthcheck_argv(dockerfile)[2]
    healthy = True

    async def health() -> tuple[bool, dict[str, Any]]:
        return healthy, {}

    async def check(port: int) -> int:
        env = {**os.environ, "INGESTD_METRICS__LISTEN": f"0.0.0.0:{port}"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), TIMEOUT_S)
        finally:
            if proc.returncode is None:  # timed out: it must not outlive the test
                proc.kill()
                await proc.wait()

    async with MetricsServer("127.0.0.1:0", health) as server:
        assert await check(server.port) == 0
        healthy = False
        assert await check(server.port) != 0
        port = server.port
    assert await check(port) != 0  # nothing listening


@pytest.fixture
def checkable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here, for systemd-analyze."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    (exec_start,) = unit_entries()["Service.ExecStart"]
    binary = exec_start.split()[0]
    copy = tmp_path / "ingestd.service"
    copy.write_text(UNIT.read_text().replace(binary, str(VENV_BIN / "ingestd")))
    return copy


def test_systemd_analyze_verify_accepts_the_unit(checkable_unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(checkable_unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "ingestd.service" in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not complaints


def test_systemd_analyze_security_rates_the_unit_ok(checkable_unit: Path) -> None:
    # --threshold is on systemd's 0..100 scale (the printed 0.0..10.0 times ten); 2.0 is "OK".
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(checkable_unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def _build_context(dest: Path, dockerfile: list[Instruction]) -> Path:
    """What `docker build` would see: the COPY sources, minus .dockerignore."""
    patterns = dockerignore()
    for src in copy_sources(dockerfile):
        path = ROOT / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if ignored(rel, patterns):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingestd's wheel, built from the Docker build context only (no network, no isolation)."""
    if not (VENV_BIN / "pip").exists():
        pytest.skip("no pip beside the test interpreter")
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    src = _build_context(tmp_path_factory.mktemp("context"), instructions)
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            str(VENV_BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            str(src),
            "--wheel-dir",
            str(out),
        ],
        check=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (built,) = out.glob("ingestd-*.whl")
    return built


def test_wheel_ships_migrations_version_and_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "ingestd/_migrations/env.py" in names
    assert "ingestd/data/tts_event_names.txt" in names  # the event-name catalogue
    shipped = {n for n in names if re.fullmatch(r"ingestd/_migrations/versions/\w+\.py", n)}
    in_repo = {
        f"ingestd/_migrations/versions/{p.name}"
        for p in (ROOT / "migrations" / "versions").glob("*.py")
    }
    assert shipped == in_repo
    assert "ingestd/__init__.py" in names
    assert {"ingestd/metrics.py", "ingestd/sdnotify.py", "ingestd/signals.py"} <= names
    assert "ingestd = ingestd.__main__:main" in scripts
    assert f"\nVersion: {ingestd.__version__}\n" in metadata
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


def test_unpacked_wheel_finds_and_runs_its_own_migrations(wheel: Path, tmp_path: Path) -> None:
    """From the wheel alone (not the checkout), migrations resolve to _migrations and apply."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    db = tmp_path / "wheel.db"
    code = (
        "import ingestd, ingestd.migrate as m\n"
        "from ingestd.db import create_engine\n"
        f"engine = create_engine('sqlite:///{db}')\n"
        "m.upgrade(engine)\n"
        "print(ingestd.__file__); print(m.migrations_dir()); print(m.is_up_to_date(engine))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the checkout, whose migrations/ must not be what is found
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    package_file, migrations, up_to_date = result.stdout.split()
    assert Path(package_file).is_relative_to(site)
    assert Path(migrations) == site / "ingestd" / "_migrations"
    assert up_to_date == "True"
