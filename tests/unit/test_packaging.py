"""What ships: the Dockerfile, the systemd unit, the compose example and the wheel.

There is no Docker engine here, so the Dockerfile is parsed and each promise checked: non-root,
exec-form entrypoint, a HEALTHCHECK that really works against /healthz, and a build context
(its COPY sources minus .dockerignore) from which the wheel builds with its migrations.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ingestd
from ingestd.config import CREDENTIAL_NAME
from ingestd.metrics import MetricsServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "config" / "ingestd.service"
COMPOSE = ROOT / "config" / "docker-compose.example.yml"
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this belongs to (-1: before the first FROM)


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside continuations, as Docker does
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    result: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, args.strip(), stage))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text())


def _final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last_stage = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last_stage and i.keyword == keyword]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def _healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    (check,) = _final(instructions, "HEALTHCHECK")
    _options, _, command = check.args.partition("CMD ")
    return _exec_form(command)


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in _final(instructions, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", inst.args):
            env[key] = value
    return env


def test_image_is_multi_stage_on_slim_python(dockerfile: list[Instruction]) -> None:
    args = {
        i.args.partition("=")[0]: i.args.partition("=")[2] for i in dockerfile if i.keyword == "ARG"
    }
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    froms = [i.args for i in dockerfile if i.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]


def test_runs_as_a_fixed_non_root_user(dockerfile: list[Instruction]) -> None:
    (user,) = _final(dockerfile, "USER")
    uid, _, gid = user.args.partition(":")
    assert uid not in ("root", "0")
    assert gid not in ("root", "0")
    assert uid == "10001"
    runs = " ".join(i.args for i in _final(dockerfile, "RUN"))
    assert "--uid 10001" in runs
    assert "--gid 10001" in runs
    assert re.search(r"useradd .*\bingestd\b", runs)


def test_entrypoint_is_exec_form_so_ingestd_gets_sigterm(dockerfile: list[Instruction]) -> None:
    assert [_exec_form(i.args) for i in _final(dockerfile, "ENTRYPOINT")] == [["ingestd"]]
    assert [_exec_form(i.args) for i in _final(dockerfile, "CMD")] == [["run"]]
    assert [i.args for i in _final(dockerfile, "STOPSIGNAL")] == ["SIGTERM"]


def test_environment_volumes_and_port(dockerfile: list[Instruction]) -> None:
    env = _env(dockerfile)
    assert env["INGESTD_CONFIG"] == "/etc/ingestd/ingestd.toml"
    assert env["INGESTD_LOGGING__FORMAT"] == "json"
    assert env["INGESTD_METRICS__LISTEN"] == "0.0.0.0:9464"
    # The database path comes from WORKDIR, not from an ENV that would beat the mounted config.
    assert "INGESTD_DATABASE__URL" not in env
    assert [i.args for i in _final(dockerfile, "WORKDIR")] == ["/var/lib/ingestd"]
    (volume,) = _final(dockerfile, "VOLUME")
    assert set(_exec_form(volume.args)) == {"/var/lib/ingestd", "/etc/ingestd"}
    assert [i.args for i in _final(dockerfile, "EXPOSE")] == ["9464"]


def test_runtime_installs_offline_from_the_builders_wheels(dockerfile: list[Instruction]) -> None:
    installs = [i.args for i in _final(dockerfile, "RUN") if "pip install" in i.args]
    assert len(installs) == 1
    assert "--no-index" in installs[0]
    assert "from=builder" in installs[0]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        bare = pat.removeprefix("**/")
        matched = any(fnmatch.fnmatch(p, pat) for p in prefixes) or (
            pat.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts)
        )
        if matched:
            ignored = not negate
    return ignored


def _copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for inst in instructions:
        if inst.keyword != "COPY" or "--from" in inst.args:
            continue
        *srcs, _dest = inst.args.split()
        sources += srcs
    return sources


def test_every_copy_source_is_in_the_build_context(dockerfile: list[Instruction]) -> None:
    patterns = _dockerignore()
    sources = _copy_sources(dockerfile)
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"


def test_secrets_and_local_databases_stay_out_of_the_build_context() -> None:
    patterns = _dockerignore()
    for path in ("ingestd.toml", "secrets/tts_api_key", ".env", "ingestd.db", ".venv/bin/python"):
        assert _ignored(path, patterns), path
    assert not _ignored("pyproject.toml", patterns)


def test_healthcheck_python_one_liner_compiles(dockerfile: list[Instruction]) -> None:
    argv = _healthcheck_argv(dockerfile)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<HEALTHCHECK>", "exec")
    assert "/healthz" in argv[2]


async def test_healthcheck_passes_only_while_healthz_says_ok(
    dockerfile: list[Instruction],
) -> None:
    """Run the HEALTHCHECK command itself against a real /healthz."""
    code = _healthcheck_argv(dockerfile)[2]
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


# --- systemd unit ---------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def test_unit_is_a_notify_service_running_ingestd() -> None:
    unit = _unit()
    assert unit["Service.Type"] == ["notify"]
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start.endswith("/ingestd run")
    assert unit["Service.Environment"] == ["INGESTD_CONFIG=/etc/ingestd/ingestd.toml"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.TimeoutStopSec"] == ["10"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_unit_passes_the_api_key_as_the_credential_ingestd_reads() -> None:
    (credential,) = _unit()["Service.LoadCredential"]
    assert credential.split(":")[0] == CREDENTIAL_NAME


def test_unit_is_hardened() -> None:
    unit = _unit()
    assert unit["Service.DynamicUser"] == ["yes"]
    assert unit["Service.StateDirectory"] == ["ingestd"]
    assert unit["Service.CapabilityBoundingSet"] == [""]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "MemoryDenyWriteExecute",
        "LockPersonality",
        "RestrictNamespaces",
    ):
        assert unit[f"Service.{key}"] == ["yes"], key
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in unit["Service.SystemCallFilter"]


@pytest.fixture
def checkable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here, for systemd-analyze."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    (exec_start,) = _unit()["Service.ExecStart"]
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


# --- docker compose example -----------------------------------------------------------------


def test_compose_example_waits_for_postgres_and_reads_the_key_from_a_secret() -> None:
    text = COMPOSE.read_text()
    assert "image: postgres:16" in text
    assert "pg_isready" in text
    assert re.search(r"postgres:\s*\n\s*condition: service_healthy", text)
    key_file = re.search(r"INGESTD_TTS__API_KEY_FILE:\s*(\S+)", text)
    assert key_file is not None
    assert key_file.group(1) == f"/run/secrets/{CREDENTIAL_NAME}"
    assert re.search(rf"secrets:\s*\n\s*- {CREDENTIAL_NAME}\b", text)
    assert re.search(r"INGESTD_DATABASE__URL:\s*postgresql\+psycopg://ingestd@postgres", text)
    assert not re.search(r"NNSXS\.[A-Z2-7]{39}", text), "a real-looking API key in the example"


# --- the wheel ------------------------------------------------------------------------------


def _build_context(dest: Path, dockerfile: list[Instruction]) -> Path:
    """What `docker build` would see: the COPY sources, minus .dockerignore."""
    patterns = _dockerignore()
    for src in _copy_sources(dockerfile):
        path = ROOT / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if _ignored(rel, patterns):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingestd's wheel, built from the Docker build context only (no network, no isolation)."""
    if not (VENV_BIN / "pip").exists():
        pytest.skip("no pip beside the test interpreter")
    instructions = _instructions(DOCKERFILE.read_text())
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


def test_the_image_lockfile_pins_every_runtime_dependency_within_its_range() -> None:
    """The Dockerfile builds with ``--constraint requirements.lock``: a dependency missing
    from it, or pinned outside pyproject's range, would make image builds drift or fail."""
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[2]
    pins = {}
    for line in (root / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in deps:
        req = Requirement(spec.split("#")[0])
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements.lock"
        assert req.specifier.contains(pins[name]), (
            f"{name}=={pins[name]} is outside {req.specifier}"
        )
    assert "--constraint requirements.lock" in (root / "Dockerfile").read_text()
