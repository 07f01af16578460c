"""What ships, read as data: the Dockerfile's instructions, .dockerignore, the systemd unit.

Shared by tests/unit/test_packaging.py (the promises in the files) and
tests/acceptance/test_packaging_builds.py (building and running what they describe).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "config" / "ingestd.service"
COMPOSE = ROOT / "config" / "docker-compose.example.yml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this belongs to (-1: before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
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


def final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last_stage = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last_stage and i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    (check,) = final(instructions, "HEALTHCHECK")
    _options, _, command = check.args.partition("CMD ")
    return exec_form(command)


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in final(instructions, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", inst.args):
            env[key] = value
    return env


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
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


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for inst in instructions:
        if inst.keyword != "COPY" or "--from" in inst.args:
            continue
        *srcs, _dest = inst.args.split()
        sources += srcs
    return sources


def unit_entries() -> dict[str, list[str]]:
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
