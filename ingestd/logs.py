"""Logging: one structlog chain, one stdlib handler, secrets masked on the way out
(:func:`ingestd.secrets.redact`).

``configure_logging`` runs once in ``__main__``. Our own events (``log =
structlog.get_logger()`` per module) and foreign stdlib records (httpx, sqlalchemy, alembic,
uvicorn) both end in the same ``ProcessorFormatter`` on one handler, so they share level,
timestamp, rendering and redaction. JSON is for systemd and containers, console for a TTY.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import orjson
import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from ingestd.secrets import redact

if TYPE_CHECKING:
    from ingestd.config import LoggingSettings

# Chatty at INFO (httpx logs every request with its full URL); shown only at debug level.
_QUIET_UNLESS_DEBUG = ("httpx", "httpcore", "uvicorn.access")
# SQL echo at INFO would log every batch, and hpack/h2 debug lines dump request headers:
# keep them at WARNING even at debug level (use create_engine(echo=True) for SQL).
_ALWAYS_QUIET = ("sqlalchemy", "hpack", "h2")
# Library loggers whose own handlers are dropped so that they reach ours.
ROUTED_LOGGERS = (
    "httpx",
    "httpcore",
    "hpack",
    "h2",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "asyncio",
)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask secrets in every string value of the event, recursively in dicts and lists."""
    for key, value in event_dict.items():
        if key.startswith("_") or key in ("exc_info", "stack_info"):
            continue  # ProcessorFormatter's record/meta and raw exception tuples
        event_dict[key] = _redact_value(value)
    return event_dict


def _orjson_dumps(obj: Any, **kw: Any) -> str:
    default: Callable[[Any], Any] | None = kw.get("default")
    return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()


class _RedactingRenderer:
    """Wraps the final renderer: masks the rendered line too (tracebacks, reprs of objects)."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(
        self, logger: WrappedLogger, method: str, event_dict: MutableMapping[str, Any]
    ) -> str:
        rendered = self._renderer(logger, method, event_dict)
        return redact(rendered if isinstance(rendered, str) else str(rendered))


def _wants_console(settings: LoggingSettings, stream: TextIO) -> bool:
    if settings.format == "console":
        return True
    if settings.format == "json":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _drop_alembic_chatter(record: logging.LogRecord) -> bool:
    """Alembic says which DDL mode it assumes on every run; keep only its upgrade lines."""
    return not (
        record.name == "alembic.runtime.migration"
        and record.getMessage().startswith(("Context impl", "Will assume"))
    )


def configure_logging(settings: LoggingSettings, *, stream: TextIO | None = None) -> None:
    """Configure structlog and the root stdlib logger once, writing to ``stream`` (stderr)."""
    out = sys.stderr if stream is None else stream
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    console = _wants_console(settings, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    renderer: Processor
    if console:
        isatty = getattr(out, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))
        tail: list[Processor] = [renderer]
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        # Tracebacks as data, then masked again: exception messages may quote a key.
        tail = [structlog.processors.dict_tracebacks, redact_processor, renderer]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail[:-1],
            _RedactingRenderer(tail[-1]),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ROUTED_LOGGERS:
        # Drop handlers libraries installed themselves (uvicorn does) so all goes to ours.
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
        foreign.setLevel(logging.NOTSET)
    for name in _QUIET_UNLESS_DEBUG:
        quiet = logging.NOTSET if level <= logging.DEBUG else logging.WARNING
        logging.getLogger(name).setLevel(quiet)
    for name in _ALWAYS_QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    if level > logging.DEBUG:
        handler.addFilter(_drop_alembic_chatter)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Not cached: tests swap processors with capture_logs, and a cached logger would keep
        # this chain. Our log volume (about one line per batch) makes the cost irrelevant.
        cache_logger_on_first_use=False,
    )
