"""Logging: JSON/console rendering, stdlib routing, and secrets masked everywhere."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import structlog

from ingestd.config import LoggingSettings
from ingestd.logs import ROUTED_LOGGERS, configure_logging, redact_processor
from ingestd.secrets import redact

KEY = "NNSXS." + "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG" + "." + "Z" * 52
SECRET_PART = KEY[6:]
Format = Literal["auto", "json", "console"]
DB_PASSWORD = "hunter2-db-pass"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _ours(handler: logging.Handler) -> bool:
    # pytest adds and removes its capture handlers around each test phase; leave those be.
    # Its session handlers (live logging, log file) are restored like any other.
    return type(handler).__name__ != "LogCaptureHandler"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Give structlog, the root logger and the library loggers back as they were."""
    root = logging.getLogger()
    saved_root = ([h for h in root.handlers if _ours(h)], root.level)
    saved = {}
    for name in ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(handler)
    for handler in saved_root[0]:
        root.addHandler(handler)
    root.setLevel(saved_root[1])
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def configure(
    level: str = "info", fmt: Format = "json", out: io.StringIO | None = None
) -> io.StringIO:
    stream = io.StringIO() if out is None else out
    configure_logging(LoggingSettings(level=level, format=fmt), stream=stream)
    return stream


def test_json_lines_carry_level_timestamp_and_event() -> None:
    out = configure()
    structlog.get_logger().info("batch_committed", events=3, stream="water")
    [line] = json_lines(out)
    assert line["event"] == "batch_committed"
    assert line["level"] == "info"
    assert line["events"] == 3
    assert line["stream"] == "water"
    assert line["timestamp"].endswith("Z")
    assert line["timestamp"][:2] == "20"


def test_level_filters_structlog_and_stdlib_alike() -> None:
    out = configure(level="warning")
    log = structlog.get_logger()
    log.info("hidden_event")
    logging.getLogger("ingestd.some").info("hidden stdlib")
    log.warning("shown_event")
    logging.getLogger("alembic").error("shown stdlib")
    assert [line["event"] for line in json_lines(out)] == ["shown_event", "shown stdlib"]


def test_context_vars_reach_our_events_and_stdlib_records() -> None:
    out = configure()
    with structlog.contextvars.bound_contextvars(application_id="acme-water"):
        structlog.get_logger().info("stream_connected")
        logging.getLogger("alembic").info("Running upgrade")
    first, second = json_lines(out)
    assert first["application_id"] == second["application_id"] == "acme-water"
    assert second["logger"] == "alembic"
    assert second["level"] == "info"


def test_key_in_event_kwargs_never_reaches_the_output() -> None:
    out = configure()
    structlog.get_logger().warning(
        "stream_failed",
        api_key=KEY,
        headers={"Authorization": f"Bearer {KEY}", "nested": [f"token {KEY}"]},
        url=f"postgresql+psycopg://ingestd:{DB_PASSWORD}@db/ingestd",
    )
    text = out.getvalue()
    assert SECRET_PART not in text
    assert DB_PASSWORD not in text
    [line] = json_lines(out)
    assert line["api_key"] == "NNSXS.***"
    assert line["headers"] == {"Authorization": "Bearer ***", "nested": ["token NNSXS.***"]}
    assert line["url"] == "postgresql+psycopg://ingestd:***@db/ingestd"


def test_key_in_an_exception_message_never_reaches_the_output() -> None:
    out = configure()
    try:
        raise ValueError(f"TTS rejected key {KEY}")
    except ValueError:
        structlog.get_logger().exception("task_failed", task="stream:acme")
    text = out.getvalue()
    assert SECRET_PART not in text
    [line] = json_lines(out)
    assert line["level"] == "error"
    [exc] = line["exception"]  # dict_tracebacks: structured, not a text blob
    assert exc["exc_type"] == "ValueError"
    assert exc["exc_value"] == "TTS rejected key NNSXS.***"


def test_key_in_a_stdlib_logger_message_never_reaches_the_output() -> None:
    out = configure()
    logging.getLogger("httpx").warning("HTTP Request: %s (Bearer %s)", "POST /api/v3/events", KEY)
    try:
        raise RuntimeError(f"connect to https://u:{DB_PASSWORD}@db failed")
    except RuntimeError:
        logging.getLogger("sqlalchemy.pool").exception("pool error with %s", KEY)
    text = out.getvalue()
    assert SECRET_PART not in text
    assert DB_PASSWORD not in text
    first, second = json_lines(out)
    assert first["event"] == "HTTP Request: POST /api/v3/events (Bearer ***)"
    assert first["level"] == "warning"
    assert first["logger"] == "httpx"
    assert second["exception"][0]["exc_value"] == "connect to https://u:***@db failed"


def test_httpx_info_lines_only_at_debug_level() -> None:
    out = configure(level="info")
    logging.getLogger("httpx").info("HTTP Request: GET https://x/api/v3/events")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("sqlalchemy.engine.Engine").info("INSERT INTO events ...")
    assert out.getvalue() == ""

    out = configure(level="debug")
    logging.getLogger("httpx").info("HTTP Request: GET https://x/api/v3/events")
    logging.getLogger("sqlalchemy.engine.Engine").info("INSERT INTO events ...")
    logging.getLogger("hpack.hpack").debug("Encoding headers (b'authorization', ...)")
    assert [line["event"] for line in json_lines(out)] == [
        "HTTP Request: GET https://x/api/v3/events"
    ]


def test_configuring_twice_keeps_one_handler() -> None:
    configure()
    out = configure()
    structlog.get_logger().info("once")
    logging.getLogger("alembic").info("once too")
    assert len(json_lines(out)) == 2
    assert len([h for h in logging.getLogger().handlers if _ours(h)]) == 1


def test_auto_format_is_console_with_colors_on_a_tty() -> None:
    out = configure(fmt="auto", out=FakeTty())
    structlog.get_logger().info("stream_connected", api_key=KEY)
    text = out.getvalue()
    assert "stream_connected" in text
    assert "\x1b[" in text  # ANSI colors
    assert SECRET_PART not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_exception_output_is_masked_too() -> None:
    out = configure(fmt="console")
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        structlog.get_logger().exception("task_failed")
    text = out.getvalue()
    assert "Traceback" in text
    assert "bad key NNSXS.***" in text
    assert SECRET_PART not in text
    assert "\x1b[" not in text  # forced console on a non-TTY: no colors


def test_auto_format_is_json_when_not_a_tty_and_json_wins_on_a_tty() -> None:
    out = configure(fmt="auto")
    structlog.get_logger().info("plain")
    assert json_lines(out)[0]["event"] == "plain"
    tty = configure(fmt="json", out=FakeTty())
    structlog.get_logger().info("forced")
    assert json_lines(tty)[0]["event"] == "forced"


def test_capture_logs_still_works_after_configure() -> None:
    """Tests elsewhere use capture_logs; a configured (uncached) chain must not bypass it."""
    out = configure()
    log = structlog.get_logger()
    log.info("before")
    with structlog.testing.capture_logs() as captured:
        log.info("captured_event", n=1)
    assert captured == [{"event": "captured_event", "n": 1, "log_level": "info"}]
    assert [line["event"] for line in json_lines(out)] == ["before"]


@pytest.mark.parametrize("prefix", ["NNSXS", "MFRWG", "OJSWM", "MF2XI", "ONZW4"])
def test_redact_masks_every_tts_token_kind(prefix: str) -> None:
    token = f"{prefix}.{'A' * 39}.{'B' * 52}"
    assert redact(f"key={token};") == f"key={prefix}.***;"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer ***"),
        ("authorization: bearer abc123, next", "authorization: bearer ***, next"),
        ("postgresql+psycopg://ingestd:s3cr%40t@db:5432/x", "postgresql+psycopg://ingestd:***@db:5432/x"),
        ("see https://u:p@host/a and redis://:pw@r/0", "see https://u:***@host/a and redis://:***@r/0"),
        ("http://host:8080/path@x", "http://host:8080/path@x"),
        ("NNSXS.TOOSHORT.ALSO", "NNSXS.TOOSHORT.ALSO"),
        ("no secrets here", "no secrets here"),
    ],
)  # fmt: skip
def test_redact_masks_bearer_tokens_and_url_passwords_only(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


def test_redact_processor_walks_nested_values_and_keeps_other_types() -> None:
    event = {
        "event": f"got {KEY}",
        "n": 5,
        "ok": True,
        "data": {"a": [KEY, ("Bearer x", 1)], "b": None},
    }
    result = redact_processor(None, "info", event)
    assert result == {
        "event": "got NNSXS.***",
        "n": 5,
        "ok": True,
        "data": {"a": ["NNSXS.***", ("Bearer ***", 1)], "b": None},
    }


def test_registered_secrets_are_masked_by_value_whatever_their_shape() -> None:
    """Only TTS-shaped keys were masked: another key echoed in a 401 reached the log."""
    from ingestd.secrets import register_secrets

    odd_key = 'proxy-token"with\\quotes'
    register_secrets([odd_key, "abc"])  # too short to mask by value: ignored
    out = configure()
    log = structlog.get_logger()
    log.error("stream_auth_rejected", error=f"token {odd_key} is not valid")
    log.error("stream_auth_rejected", body={"echo": [odd_key]})
    try:
        raise RuntimeError(f"refused {odd_key!r}")
    except RuntimeError:
        log.exception("task_failed")
    logging.getLogger("httpx").warning("sent %s", odd_key)
    text = out.getvalue()
    # JSON escapes the quote and backslash, repr() escapes the backslash: all masked.
    assert "proxy-token" not in text
    assert text.count("***") >= 5
    assert redact("abc and abcd") == "abc and abcd"
    assert redact(f"key={odd_key}&x=1") == "key=***&x=1"
