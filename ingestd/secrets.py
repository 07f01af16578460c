"""Secrets: the :class:`Secret` holder, and the one masking function, :func:`redact`.

A leaf module (it imports nothing of ingestd), so configuration, logging, the store and the
command line all mask the same way without importing each other. Whatever leaves the
process as text goes through :func:`redact`: log lines, ``last_error`` columns, and the
output of ``ingestd check``/``status``/error messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

import orjson

MASK = "***"
# TTS API keys and OAuth tokens: <prefix>.<39 base32>.<52 base32> (TTS_WIRE 6).
_TTS_TOKEN_RE = re.compile(r"(NNSXS|MFRWG|OJSWM|MF2XI|ONZW4)\.[A-Z2-7]{39}\.[A-Z2-7]{52}")
# RFC 6750 b64token characters, plus "*" so an already masked key is consumed whole.
_BEARER_RE = re.compile(r"\b(Bearer)\s+[A-Za-z0-9\-._~+/*]+=*", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/?#@]*):[^\s@/]*@")


class Secret:
    """A string that does not show itself: ``repr``/``str`` give ``Secret('***')``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it (an HTTP header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


# Secrets shorter than this are not masked by value: "abc" would garble every log line.
SECRET_MIN_CHARS = 4
_secrets: tuple[str, ...] = ()  # longest first, so a secret's prefix never masks it half


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values wherever :func:`redact` runs (logs, ``last_error`` columns,
    ``status``/``check`` output), whatever their shape.

    The patterns above only know TTS-shaped keys; a key of another shape (a proxy's
    token, a test key) echoed in a 401 body went to the log and to ``last_error``. Called
    with every configured API key and the database password when settings are loaded;
    values accumulate for the life of the process. Their JSON-, URL- and repr-escaped
    forms are masked too.
    """
    global _secrets
    found = set(_secrets)
    for value in values:
        if len(value) < SECRET_MIN_CHARS:
            continue
        found |= {
            value,
            orjson.dumps(value).decode()[1:-1],
            quote(value, safe=""),
            repr(value)[1:-1],
        }
    _secrets = tuple(
        sorted((v for v in found if len(v) >= SECRET_MIN_CHARS), key=len, reverse=True)
    )


def forget_secrets() -> None:
    """Drop every registered secret (for tests, which load many settings in one process)."""
    global _secrets
    _secrets = ()


def redact(text: str) -> str:
    """``text`` with TTS keys/tokens, ``Bearer`` tokens, URL passwords and the registered
    secrets masked (the patterns first, so a TTS key keeps its telling ``NNSXS.***``)."""
    text = _TTS_TOKEN_RE.sub(lambda m: f"{m.group(1)}.{MASK}", text)
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
