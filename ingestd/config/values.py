"""What configured values mean: ``Raw`` values, field parsers and validators.

A field parser takes a ``Raw`` and returns the typed value or raises ``Invalid`` with the
problem text. Values that arrive as text (environment overrides, ``${VAR}`` expansions) are
parsed into the field's type; TOML values must already have it. Problem texts pass through
``redact``, and the parsers of secret fields never echo the value.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from ingestd.errors import EventNamesRejected
from ingestd.eventnames import INVALID_REGEXP, defined_names, expand_names
from ingestd.secrets import redact
from ingestd.tts import TTS_ID_MAX_CHARS, is_tts_id

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
_SHOWN_CHARS_MAX = 60
# Both matched with fullmatch: `$` also matches before a trailing newline ("app\n").
# The size of every `stream` column (events, stream_cursors, stream_gaps, rejected_events):
# a longer name made PostgreSQL refuse every batch of the stream.
STREAM_NAME_MAX_CHARS = 200
_PORT_MAX = 65535


class Invalid(ValueError):
    """Raised by a field parser; the message is the problem text without its location."""


@dataclass(frozen=True, slots=True)
class Raw:
    """One configured value, before type conversion.

    ``where`` is the location prefix of any problem with it (``ingestd.toml: tts.tail`` or
    ``env INGESTD_TTS__TAIL``). ``text`` is true for values that arrive as text and may be
    parsed into the field's type: environment overrides and ``${VAR}`` expansions.
    ``base_dir`` anchors relative paths (the config file's directory).
    """

    value: object
    where: str
    text: bool = False
    base_dir: Path | None = None
    # Problems expanding ${VAR}s, reported only if nothing overrides this entry (so an
    # INGESTD_TTS__API_KEY_FILE can stand in for an unset ${TTS_API_KEY}).
    unresolved: tuple[str, ...] = ()


class Problems:
    """Collects problem lines (``<where>: <what>``), masking anything that looks secret."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(redact(f"{where}: {what}"))

    def __bool__(self) -> bool:
        return bool(self.lines)


def suggestion(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a likely typo, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def show(value: object) -> str:
    """A short, TOML-flavoured rendering of a (non-secret) value for a problem text."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = redact(repr(value))  # before truncating, which could cut a key past matching
    return text if len(text) <= _SHOWN_CHARS_MAX else text[: _SHOWN_CHARS_MAX - 3] + "..."


Parser = Callable[[Raw], object]


def parse_entries(
    entries: Mapping[str, Raw],
    spec: Mapping[str, Parser],
    *,
    section: str,
    problems: Problems,
) -> dict[str, object]:
    """Parse every entry with its field parser; unknown keys and bad values become problems."""
    values: dict[str, object] = {}
    for key, raw in entries.items():
        parser = spec.get(key)
        if parser is None:
            problems.add(raw.where, f"unknown key '{key}' in [{section}]{suggestion(key, spec)}")
            continue
        try:
            values[key] = parser(raw)
        except Invalid as exc:
            problems.add(raw.where, str(exc))
    return values


def checked(parser: Parser, *checks: Callable[[Any], str | None]) -> Parser:
    """``parser`` followed by checks that return a problem text or ``None``."""

    def parse(raw: Raw) -> object:
        value = parser(raw)
        for check in checks:
            problem = check(value)
            if problem is not None:
                raise Invalid(problem)
        return value

    return parse


def as_str(raw: Raw) -> str:
    if not isinstance(raw.value, str):
        raise Invalid(f"expected a string, got {show(raw.value)}")
    return raw.value


def as_secret_text(raw: Raw) -> str:
    """Like ``as_str`` but never shows the value (it may be a key pasted in the wrong type)."""
    if not isinstance(raw.value, str):
        raise Invalid(f"expected a string, got {_toml_type(raw.value)}")
    return raw.value.strip()


def as_int(raw: Raw) -> int:
    value = raw.value
    if raw.text and isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            raise Invalid(f"expected an integer, got {show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {show(value)}")
    return value


def as_float(raw: Raw) -> float:
    value = raw.value
    if raw.text and isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise Invalid(f"expected a number, got {show(value)}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"expected a number, got {show(value)}")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise Invalid(f"expected a finite number, got {show(value)}")
    return number


def as_bool(raw: Raw) -> bool:
    value = raw.value
    if isinstance(value, bool):
        return value
    if raw.text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise Invalid(f"expected true or false, got {show(value)}")


def as_str_tuple(raw: Raw) -> tuple[str, ...]:
    """A list of strings; from text either ``a,b,c`` or a TOML array ``["a", "b"]``."""
    value = raw.value
    if raw.text and isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise Invalid(f"expected a TOML array of strings: {exc}") from None
        else:
            return tuple(item.strip() for item in stripped.split(",") if item.strip())
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid(f"expected a list of strings, got {show(value)}")
    return tuple(value)


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def read_secret_file(raw: Raw) -> str:
    """The stripped content of the file named by ``raw`` (relative to the config file)."""
    path = Path(as_str(raw)).expanduser()
    if not path.is_absolute() and raw.base_dir is not None:
        path = raw.base_dir / path
    try:
        content = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise Invalid(f"cannot read {str(path)!r}: {reason}") from None
    if not content:
        raise Invalid(f"{str(path)!r} is empty")
    return content


def check_order(
    values: Mapping[str, object],
    entries: Mapping[str, Raw],
    keys: tuple[str, str],
    problems: Problems,
) -> None:
    """``low <= high`` (e.g. reconnect_min_s <= reconnect_max_s), reported where one is set."""
    low_key, high_key = keys
    low, high = values.get(low_key), values.get(high_key)
    if not isinstance(low, float) or not isinstance(high, float) or low <= high:
        return
    raw = entries.get(high_key) or entries.get(low_key)
    if raw is not None:
        problems.add(raw.where, f"{low_key} ({low!r}) must not exceed {high_key} ({high!r})")


# --- validators ---------------------------------------------------------------------


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value!r}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value!r}"


def tts_id_problem(value: str) -> str | None:
    if is_tts_id(value):
        return None
    return (
        f"{value!r} is not a valid TTS id (lowercase a-z0-9 and single dashes, "
        f"3-{TTS_ID_MAX_CHARS} chars)"
    )


def tts_ids(values: tuple[str, ...]) -> str | None:
    bad = [p for p in map(tts_id_problem, values) if p is not None]
    return "; ".join(bad) if bad else None


def event_names(values: tuple[str, ...]) -> str | None:
    """Each ``names`` entry as TTS judges it (:func:`ingestd.eventnames.expand_names`: its
    v3.32 catalogue, RE2 regexps), so a filter TTS would answer with a 400 (and the stream
    would retry forever) is a config error naming TTS's error instead."""
    bad: list[str] = []
    for entry in values:
        try:
            expand_names([entry])
        except EventNamesRejected as exc:
            detail = str(exc).partition(": ")[2]
            if exc.error_name == INVALID_REGEXP and exc.__cause__ is not None:
                detail += f": {_re2_reason(exc.__cause__)} (TTS uses Go RE2 syntax)"
            elif exc.error_name != INVALID_REGEXP:
                detail += f" among the {len(defined_names())} event names of TTS v3.32"
            bad.append(f"{entry!r} would be refused by TTS with {exc.error_name} ({detail})")
    return "; ".join(bad) if bad else None


def _re2_reason(error: BaseException) -> str:
    arg = error.args[0] if error.args else error
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def base_url(raw: Raw) -> str:
    """The server's root URL; ingestd appends ``/api/v3/...`` itself, so no path, query or
    fragment (a trailing ``/`` is dropped)."""
    text = as_str(raw).strip()
    example = "e.g. https://eu1.cloud.thethings.network"
    if _has_control_or_space(text):
        raise Invalid(f"must not contain spaces or control characters, got {show(text)}")
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not contain credentials; use api_key or api_key_file")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"expected an http(s) URL ({example}), got {text!r}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise Invalid(f"has an invalid port, got {text!r}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise Invalid(
            f"must be the server's root URL without a path, query or fragment ({example}; "
            f"ingestd adds /api/v3/...), got {text!r}"
        )
    return text.rstrip("/")


def _has_control_or_space(text: str) -> bool:
    return any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def stream_name(raw: Raw) -> str:
    """A cursor key: stored in every row of the stream, shown by ``status``."""
    text = as_str(raw).strip()
    problem = stream_name_problem(text)
    if problem is not None:
        raise Invalid(problem)
    return text


def stream_name_problem(name: str) -> str | None:
    """Why ``name`` cannot key a stream (empty, too long for the columns, control
    characters); None when it can."""
    if not name:
        return "must not be empty"
    if len(name) > STREAM_NAME_MAX_CHARS:
        return (
            f"is {len(name)} characters long; at most {STREAM_NAME_MAX_CHARS} fit the "
            "database's stream columns"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        return f"must not contain control characters, got {show(name)}"
    return None


def database_url(raw: Raw) -> str:
    """A URL SQLAlchemy can parse, for SQLite or PostgreSQL; never echoed (password)."""
    try:
        url = sa.make_url(as_str(raw).strip())
    except ArgumentError:
        raise Invalid(
            "is not a valid database URL (e.g. sqlite:///ingestd.db or "
            "postgresql+psycopg://user:pass@host/db)"
        ) from None
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise Invalid(f"unsupported database {backend!r} (expected sqlite or postgresql)")
    return url.render_as_string(hide_password=False)


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as ``(host, port)`` without brackets; ValueError
    when ``text`` is not one."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") == host.endswith("]")
    if not sep or not host or not bracketed or not port.isdigit() or int(port) > _PORT_MAX:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464), got {text!r}")
    return host.strip("[]"), int(port)


def listen(raw: Raw) -> str:
    text = as_str(raw).strip()
    if not text:
        return ""
    try:
        split_host_port(text)
    except ValueError:
        raise Invalid(
            f'expected host:port (e.g. 127.0.0.1:9464) or "" to disable, got {text!r}'
        ) from None
    return text


def choice(options: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Parser:
    def parse(raw: Raw) -> str:
        word = as_str(raw).strip().lower()
        word = (aliases or {}).get(word, word)
        if word not in options:
            raise Invalid(f"expected one of {', '.join(options)}, got {raw.value!r}")
        return word

    return parse


_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_AGE_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` as a positive ``timedelta``.

    Raises ``Invalid`` otherwise. One reading for ``[retention] max_age``, ``prune
    --older-than`` and ``report --since``.
    """
    match = _AGE_RE.match(text)
    if match is None or float(match[1]) <= 0:
        raise Invalid(
            f"expected a positive duration like 90d, 12h, 30m, 45s or 2w, got {show(text)}"
        )
    return timedelta(seconds=float(match[1]) * _AGE_UNIT_S[match[2]])


def age(raw: Raw) -> timedelta | None:
    """A duration text (see :func:`parse_age`); ``""`` means unset."""
    text = as_str(raw)
    return parse_age(text) if text.strip() else None
