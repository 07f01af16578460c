"""What ships: the Dockerfile, the systemd unit and the compose example, read and checked.

There is no Docker engine here, so the Dockerfile is parsed and each promise checked: non-root,
exec-form entrypoint, a HEALTHCHECK that compiles, and COPY sources inside the build context.
Building the wheel and running the HEALTHCHECK and systemd-analyze is in
tests/acceptance/test_packaging_builds.py.
"""

from __future__ import annotations

import re

import pytest
from packaging_files import (
    COMPOSE,
    DOCKERFILE,
    ROOT,
    Instruction,
    copy_sources,
    dockerignore,
    exec_form,
    final,
    healthcheck_argv,
    ignored,
    image_env,
    parse_dockerfile,
    unit_entries,
)

from ingestd.config import CREDENTIAL_NAME


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_image_is_multi_stage_on_slim_python(dockerfile: list[Instruction]) -> None:
    args = {
        i.args.partition("=")[0]: i.args.partition("=")[2] for i in dockerfile if i.keyword == "ARG"
    }
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    froms = [i.args for i in dockerfile if i.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]


def test_runs_as_a_fixed_non_root_user(dockerfile: list[Instruction]) -> None:
    (user,) = final(dockerfile, "USER")
    uid, _, gid = user.args.partition(":")
    assert uid not in ("root", "0")
    assert gid not in ("root", "0")
    assert uid == "10001"
    runs = " ".join(i.args for i in final(dockerfile, "RUN"))
    assert "--uid 10001" in runs
    assert "--gid 10001" in runs
    assert re.search(r"useradd .*\bingestd\b", runs)


def test_entrypoint_is_exec_form_so_ingestd_gets_sigterm(dockerfile: list[Instruction]) -> None:
    assert [exec_form(i.args) for i in final(dockerfile, "ENTRYPOINT")] == [["ingestd"]]
    assert [exec_form(i.args) for i in final(dockerfile, "CMD")] == [["run"]]
    assert [i.args for i in final(dockerfile, "STOPSIGNAL")] == ["SIGTERM"]


def test_environment_volumes_and_port(dockerfile: list[Instruction]) -> None:
    env = image_env(dockerfile)
    assert env["INGESTD_CONFIG"] == "/etc/ingestd/ingestd.toml"
    assert env["INGESTD_LOGGING__FORMAT"] == "json"
    assert env["INGESTD_METRICS__LISTEN"] == "0.0.0.0:9464"
    # The database path comes from WORKDIR, not from an ENV that would beat the mounted config.
    assert "INGESTD_DATABASE__URL" not in env
    assert [i.args for i in final(dockerfile, "WORKDIR")] == ["/var/lib/ingestd"]
    (volume,) = final(dockerfile, "VOLUME")
    assert set(exec_form(volume.args)) == {"/var/lib/ingestd", "/etc/ingestd"}
    assert [i.args for i in final(dockerfile, "EXPOSE")] == ["9464"]


def test_runtime_installs_offline_from_the_builders_wheels(dockerfile: list[Instruction]) -> None:
    installs = [i.args for i in final(dockerfile, "RUN") if "pip install" in i.args]
    assert len(installs) == 1
    assert "--no-index" in installs[0]
    assert "from=builder" in installs[0]


def test_every_copy_source_is_in_the_build_context(dockerfile: list[Instruction]) -> None:
    patterns = dockerignore()
    sources = copy_sources(dockerfile)
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"


def test_secrets_and_local_databases_stay_out_of_the_build_context() -> None:
    patterns = dockerignore()
    for path in ("ingestd.toml", "secrets/tts_api_key", ".env", "ingestd.db", ".venv/bin/python"):
        assert ignored(path, patterns), path
    assert not ignored("pyproject.toml", patterns)


def test_healthcheck_python_one_liner_compiles(dockerfile: list[Instruction]) -> None:
    argv = healthcheck_argv(dockerfile)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<HEALTHCHECK>", "exec")
    assert "/healthz" in argv[2]


def test_unit_is_a_notify_service_running_ingestd() -> None:
    unit = unit_entries()
    assert unit["Service.Type"] == ["notify"]
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start.endswith("/ingestd run")
    assert unit["Service.Environment"] == ["INGESTD_CONFIG=/etc/ingestd/ingestd.toml"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.TimeoutStopSec"] == ["10"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_unit_passes_the_api_key_as_the_credential_ingestd_reads() -> None:
    (credential,) = unit_entries()["Service.LoadCredential"]
    assert credential.split(":")[0] == CREDENTIAL_NAME


def test_unit_is_hardened() -> None:
    unit = unit_entries()
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


def test_the_image_lockfile_pins_every_runtime_dependency_within_its_range() -> None:
    """The Dockerfile builds with ``--constraint requirements.lock``: a dependency missing
    from it, or pinned outside pyproject's range, would make image builds drift or fail."""
    import tomllib

    from packaging.requirements import Requirement

    root = ROOT
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
