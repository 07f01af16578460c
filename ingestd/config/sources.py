"""Where configuration values come from: the TOML file, ``${VAR}`` and ``INGESTD_*`` overrides.

Loading runs in three steps, each of which collects problems instead of raising, so that
one ``ConfigError`` can name every bad key at once (HOUSE_STYLE 21):

1. ``raw_from_toml`` (here) turns the parsed TOML into ``RawConfig``: every value a ``Raw``
   that remembers its source, with ``${VAR}`` already expanded;
2. ``apply_env_overrides`` (here) replaces entries with ``INGESTD_<SECTION>__<KEY>`` values;
3. ``values.parse_entries`` converts each ``Raw`` with its field parser.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingestd.config.values import Problems, Raw, show, suggestion

ENV_PREFIX = "INGESTD_"
_ENV_SEPARATOR = "__"
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class RawConfig:
    """Raw entries per section (``database``, ``tts``, ...) plus one dict per stream."""

    sections: dict[str, dict[str, Raw]] = field(default_factory=dict)
    streams: list[dict[str, Raw]] = field(default_factory=list)
    stream_where: list[str] = field(default_factory=list)  # "ingestd.toml: streams[0]"
    env_used: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Step 1: TOML document -> RawConfig
# ---------------------------------------------------------------------------------------


def load_toml(path: Path, label: str, problems: Problems) -> dict[str, Any] | None:
    """The parsed document, or ``None`` after recording why it could not be read."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        problems.add(label, f"TOML syntax error: {exc}")
    except OSError as exc:
        problems.add(label, f"cannot read config file: {exc.strerror or exc}")
    return None


def raw_from_toml(
    doc: Mapping[str, Any],
    *,
    label: str,
    sections: Iterable[str],
    environ: Mapping[str, str],
    base_dir: Path,
    problems: Problems,
) -> RawConfig:
    """Wrap every value of ``doc`` in a ``Raw`` labelled ``<label>: <key path>``."""
    known = list(sections)
    raw = RawConfig(sections={name: {} for name in known})
    for name, value in doc.items():
        if name == "streams":
            if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
                problems.add(
                    f"{label}: streams", "expected an array of tables ([[streams]] blocks)"
                )
                continue
            for index, table in enumerate(value):
                path = f"streams[{index}]"
                raw.streams.append(
                    _wrap_table(table, f"{label}: {path}", environ, base_dir, problems)
                )
                raw.stream_where.append(f"{label}: {path}")
        elif name in known:
            if not isinstance(value, dict):
                problems.add(f"{label}: {name}", f"expected a [{name}] table, got {show(value)}")
                continue
            raw.sections[name] = _wrap_table(value, f"{label}: {name}", environ, base_dir, problems)
        else:
            hint = suggestion(name, [*known, "streams"])
            problems.add(f"{label}: {name}", f"unknown section{hint}")
    return raw


def _wrap_table(
    table: Mapping[str, Any],
    prefix: str,
    environ: Mapping[str, str],
    base_dir: Path,
    problems: Problems,
) -> dict[str, Raw]:
    entries: dict[str, Raw] = {}
    for key, value in table.items():
        where = f"{prefix}.{key}"
        pending = Problems()
        expanded, text = _expand(value, where, environ, pending)
        entries[key] = Raw(
            expanded, where, text=text, base_dir=base_dir, unresolved=tuple(pending.lines)
        )
    return entries


def report_unresolved(
    raw: RawConfig, problems: Problems, *, defer: Iterable[str] = ()
) -> list[str]:
    """Report ``${VAR}`` problems of the entries that no override replaced.

    Problems of the keys in ``defer`` (the API key: ``migrate``, ``status`` and ``import``
    need none) are returned instead, and their entries read as unset.
    """
    deferred_keys = set(defer)
    deferred: list[str] = []
    for entries in [*raw.sections.values(), *raw.streams]:
        for key, entry in list(entries.items()):
            if not entry.unresolved:
                continue
            if key in deferred_keys:
                deferred.extend(entry.unresolved)
                del entries[key]
            else:
                problems.lines.extend(entry.unresolved)
    return deferred


def _expand(
    value: object, where: str, environ: Mapping[str, str], problems: Problems
) -> tuple[object, bool]:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in strings (also inside lists)."""
    if isinstance(value, list):
        items = [_expand(item, f"{where}[{i}]", environ, problems) for i, item in enumerate(value)]
        return [item for item, _ in items], False
    if not isinstance(value, str) or "${" not in value:
        return value, False

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.add(where, f"environment variable {name} is not set")
        return ""

    result = _VAR_RE.sub(substitute, value)
    if "${" in _VAR_RE.sub("", value):
        problems.add(where, "malformed ${...} reference (expected ${NAME} or ${NAME:-default})")
    return result, True


# ---------------------------------------------------------------------------------------
# Step 2: INGESTD_<SECTION>__<KEY> and INGESTD_STREAMS__<index>__<KEY>
# ---------------------------------------------------------------------------------------


def apply_env_overrides(
    raw: RawConfig,
    environ: Mapping[str, str],
    *,
    exclusive: Mapping[str, str],
    problems: Problems,
) -> None:
    """Overlay environment overrides onto ``raw``.

    Only names with a ``__`` after the prefix are overrides, so ``INGESTD_CONFIG`` and
    ``INGESTD_TEST_PG_URL`` are left alone. ``exclusive`` maps a key to the one it replaces
    (``api_key`` <-> ``api_key_file``): an override of one drops the file's other.
    """
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or _ENV_SEPARATOR not in name:
            continue
        where = f"env {name}"
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split(_ENV_SEPARATOR)]
        entries = _env_target(raw, parts, where, problems)
        if entries is None:
            continue
        key = parts[-1]
        entries[key] = Raw(environ[name], where, text=True, base_dir=None)
        other = exclusive.get(key)
        if other is not None and other in entries and not entries[other].where.startswith("env "):
            del entries[other]
        raw.env_used.append(name)


def _env_target(
    raw: RawConfig, parts: list[str], where: str, problems: Problems
) -> dict[str, Raw] | None:
    section = parts[0]
    if section == "streams":
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            problems.add(where, "expected INGESTD_STREAMS__<index>__<KEY>")
            return None
        index = int(parts[1])
        if index >= len(raw.streams):
            problems.add(
                where,
                f"there is no streams[{index}] to override "
                f"({len(raw.streams)} stream(s) configured; streams come from the file)",
            )
            return None
        return raw.streams[index]
    if section not in raw.sections:
        hint = suggestion(section, [*raw.sections, "streams"])
        problems.add(where, f"unknown section '{section}'{hint}")
        return None
    if len(parts) != 2 or not parts[1]:
        problems.add(where, f"expected INGESTD_{section.upper()}__<KEY>")
        return None
    return raw.sections[section]
