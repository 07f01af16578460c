"""``ingestd check``: prove the config, the database, the schema and every stream's key.

One line per check, ``ok``/``FAIL`` first so scripts and eyes can scan it; ``warn`` and
``note`` lines add what an operator should know without failing; ``skip`` marks a check
that could not run because an earlier one failed. Exit 0 only when nothing failed.

A stream is proven by opening it exactly as the daemon does and waiting for TTS's first
frame, ``events.stream.start``: TTS sends it only after the key, its rights on every
identifier and the ``names`` filter were accepted (TTS_WIRE §1.3, §1.5). Every line goes
through :func:`ingestd.secrets.redact`, so no key or password is ever printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import sqlalchemy as sa

from ingestd import migrate, rights, tts
from ingestd.cli.status import (
    db_error_text,
    missing_sqlite_file,
    open_engine,
)
from ingestd.config import Settings, StreamSettings
from ingestd.errors import ConfigError, IngestdError, MalformedEvent, StreamDisconnected
from ingestd.framing import ErrorFrame, parse_frame
from ingestd.models import Cursor
from ingestd.secrets import redact, register_secrets
from ingestd.stream import EventStream
from ingestd.tts import STORE_DISABLED_WARNING

# The check reads one frame: ask for the smallest history that still makes a server
# without an event store say so (it warns only when ``tail`` or ``after`` is sent).
CHECK_TAIL = 1
FIRST_FRAME_EXTRA_S = 5.0  # beyond the stream's connect timeout, for TLS and TTS's setup
STREAM_START = "events.stream.start"

# What to do about the TTS errors a stream check meets most (names from TTS_WIRE §5).
_UNKNOWN_KEY = "this server does not know the key (deleted, mistyped, or another cluster's?)"
HINTS = {
    "api_key_not_found": _UNKNOWN_KEY,
    "api_key_expired": "the key has expired: create a new one",
    "token_not_found": _UNKNOWN_KEY,
    "invalid_authorization": "the key's secret part is wrong",
    "token": "this is not a TTS API key",
    "no_application_rights": "the key has no rights here: it needs 'read application traffic'",
    "unknown_event_name": "a `names` entry is not an event this server defines",
    "no_matching_events": "a `names` regexp matches no event this server defines",
    "invalid_regexp": "a `names` regexp does not compile",
    "rate_limit_exceeded": "rate limited: try again later",
}
_TTS_MESSAGE = re.compile(r"^error:(?P<label>\S+) \((?P<text>.*)\)$", re.DOTALL)

Word = Literal["ok", "FAIL", "warn", "note", "skip"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckLine:
    """One printed line: the verdict, what was checked, and what was found."""

    word: Word
    subject: str
    detail: str


def run_checks(settings: Settings) -> int:
    """Run every check, print one line each as it completes; 0 only when none failed."""
    register_secrets(settings.secret_values())  # every line goes through redact
    subjects = ["config", "database", "schema", "downlinks"]
    subjects += [_subject(s) for s in settings.streams]
    width = max(len(s) for s in subjects)
    failed = False

    def emit(lines: list[CheckLine]) -> None:
        nonlocal failed
        for line in lines:
            failed = failed or line.word == "FAIL"
            text = f"{line.word:<5} {line.subject:<{width}}  {line.detail}"
            print(redact(text), flush=True)

    emit(check_config(settings))
    emit(check_database(settings))
    for lines in asyncio.run(check_streams(settings)):
        emit(lines)
    if settings.downlinks.enabled:
        emit([_downlinks_note(settings)])
    return 1 if failed else 0


def _subject(stream: StreamSettings) -> str:
    return f"stream {stream.name}"


# -- config and database --------------------------------------------------------------------


def check_config(settings: Settings) -> list[CheckLine]:
    """Valid (or we would not be here: ``load_settings`` raised) and with every key present."""
    try:
        settings.require_credentials()
    except ConfigError as exc:
        return [CheckLine(word="FAIL", subject="config", detail=p) for p in exc.problems]
    n = len(settings.streams)
    downlinks = "on" if settings.downlinks.enabled else "off"
    lines = [
        CheckLine(
            word="ok",
            subject="config",
            detail=f"{settings.source} ({n} stream{'' if n == 1 else 's'}, downlinks {downlinks})",
        )
    ]
    lines += [CheckLine(word="warn", subject="config", detail=w) for w in settings.warnings]
    if not settings.streams:
        lines.append(
            CheckLine(word="note", subject="config", detail="no [[streams]]: nothing to ingest")
        )
    return lines


def check_database(settings: Settings) -> list[CheckLine]:
    """Connect (``SELECT 1``) and compare the schema revision with this ingestd's head."""
    url = settings.database.safe_url
    missing = missing_sqlite_file(settings.database.url)
    if missing is not None:
        return [
            CheckLine(
                word="FAIL",
                subject="database",
                detail=f"{url}: the file {missing} does not exist: run `ingestd migrate`",
            ),
            CheckLine(word="skip", subject="schema", detail="no database"),
        ]
    try:
        engine = open_engine(settings.database.url)
    except Exception as exc:  # a missing driver, an unusable URL: report, do not crash
        return [
            CheckLine(word="FAIL", subject="database", detail=f"{url}: {db_error_text(exc)}"),
            CheckLine(word="skip", subject="schema", detail="no database"),
        ]
    try:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            return [
                CheckLine(word="FAIL", subject="database", detail=f"{url}: {db_error_text(exc)}"),
                CheckLine(word="skip", subject="schema", detail="no database connection"),
            ]
        lines = [CheckLine(word="ok", subject="database", detail=f"{url} ({engine.dialect.name})")]
        try:
            revision, problem = migrate.schema_problem(engine)
        except sa.exc.SQLAlchemyError as exc:
            problem, revision = f"cannot read the revision: {db_error_text(exc)}", None
        if problem is None:
            lines.append(CheckLine(word="ok", subject="schema", detail=f"at head ({revision})"))
        else:
            lines.append(CheckLine(word="FAIL", subject="schema", detail=problem))
        return lines
    finally:
        engine.dispose()


def _downlinks_note(settings: Settings) -> CheckLine:
    d = settings.downlinks
    scope = (
        "applications with a configured stream, with that stream's key"
        if d.require_stream
        else "any application (the [tts] key unless a stream's matches)"
    )
    return CheckLine(
        word="note",
        subject="downlinks",
        detail=f"enabled: {d.workers} worker(s) push outbox rows for {scope}; check does not push",
    )


# -- streams ----------------------------------------------------------------------------------


async def check_streams(settings: Settings) -> list[list[CheckLine]]:
    """Every stream's lines, checked concurrently, in config order."""
    if not settings.streams:
        return []
    # One client per distinct http2_prior_knowledge, as the daemon has them.
    clients = {
        knows: tts.http_client(prior_knowledge=knows)
        for knows in {s.http2_prior_knowledge for s in settings.streams}
    }
    downlinks = settings.downlinks.enabled
    try:
        return list(
            await asyncio.gather(
                *(
                    check_stream(s, clients[s.http2_prior_knowledge], downlinks=downlinks)
                    for s in settings.streams
                )
            )
        )
    finally:
        for client in clients.values():
            await client.aclose()


async def check_stream(
    stream: StreamSettings, client: httpx.AsyncClient, *, downlinks: bool = False
) -> list[CheckLine]:
    """Open the stream as the daemon does and read its first frame; then ask TTS which
    rights the key has (a key without traffic rights opens a stream that stays empty)."""
    subject = _subject(stream)

    def fail(detail: str) -> list[CheckLine]:
        return [CheckLine(word="FAIL", subject=subject, detail=detail)]

    if stream.api_key is None:
        return [CheckLine(word="skip", subject=subject, detail="no API key (see config)")]
    probe = dataclasses.replace(stream, tail=min(stream.tail, CHECK_TAIL))
    where = _safe_base_url(stream.base_url)
    limit_s = stream.connect_timeout_s + FIRST_FRAME_EXTRA_S
    opened = False
    warnings: list[str] = []
    request_id: str | None = None
    try:
        async with asyncio.timeout(limit_s), EventStream(probe, client).open(Cursor()) as conn:
            opened = True
            warnings, request_id = conn.warnings, conn.request_id
            first = await _first(conn.frames)
    except TimeoutError:
        if opened:
            return fail(f"{where} accepted the stream but sent no first frame in {limit_s:g} s")
        return fail(f"no answer from {where} in {limit_s:g} s")
    except StreamDisconnected as exc:
        return fail(f"cannot reach {where}: {exc}")
    except IngestdError as exc:  # TTS answered no: AuthRejected, RequestRejected, RateLimited…
        return fail(describe_tts_error(exc, where=where))
    if first is None:
        return fail(f"{where} ended the stream before {STREAM_START}")
    try:
        frame = parse_frame(first)
    except MalformedEvent as exc:
        return fail(f"the first frame from {where} is not a TTS event ({exc})")
    if isinstance(frame, ErrorFrame):
        info = frame.error
        hint = HINTS.get(info.name or "")
        return fail(f"stream error {info.describe()}" + (f"; {hint}" if hint else ""))
    name = frame.event.get("name")
    target = stream.application_id
    if stream.device_ids:
        target += f" ({len(stream.device_ids)} device{'' if len(stream.device_ids) == 1 else 's'})"
    detail = f"{target} at {where}: key accepted"
    expanded = _expanded_names(frame.event)
    if expanded is not None:
        detail += f", names match {len(expanded)} event types"
    if request_id:
        detail += f" (request {request_id})"
    lines = [CheckLine(word="ok", subject=subject, detail=detail)]
    if name != STREAM_START:
        lines.append(
            CheckLine(
                word="warn",
                subject=subject,
                detail=f"first frame was {name!r}, "
                f"not {STREAM_START} (a proxy re-framing the stream?)",
            )
        )
    for warning in warnings:
        text = f"X-Warning: {warning}"
        if STORE_DISABLED_WARNING in warning:
            text += " (no event store: resumes cannot replay; outages become gaps)"
        lines.append(CheckLine(word="warn", subject=subject, detail=text))
    lines.append(await _check_rights(stream, client, subject, downlinks=downlinks))
    lines.append(await _check_storage(stream, client, subject))
    return lines


async def _check_rights(
    stream: StreamSettings, client: httpx.AsyncClient, subject: str, *, downlinks: bool
) -> CheckLine:
    """FAIL naming each right the key lacks: TTS opens a stream for a key with *any* right
    on the application and then silently skips the traffic events it may not see
    (lorawan-stack ``pkg/events/grpc/grpc.go``, ``rightsutil.EventIsVisible``)."""
    assert stream.api_key is not None
    try:
        async with asyncio.timeout(stream.connect_timeout_s + FIRST_FRAME_EXTRA_S):
            granted = await rights.fetch_rights(
                client, stream.base_url, stream.api_key.reveal(), stream.application_id
            )
    except TimeoutError:
        return CheckLine(word="warn", subject=subject, detail="rights: no answer in time")
    except IngestdError as exc:
        where = _safe_base_url(stream.base_url)
        return CheckLine(
            word="warn",
            subject=subject,
            detail=f"rights: cannot list them ({describe_tts_error(exc, where=where)})",
        )
    missing = rights.missing_rights(granted, rights.needed_for(downlinks=downlinks))
    if missing:
        return CheckLine(
            word="FAIL",
            subject=subject,
            detail="rights: " + rights.describe_missing(missing, stream.application_id),
        )
    what = "read traffic" + (" and push downlinks" if downlinks else "")
    return CheckLine(word="ok", subject=subject, detail=f"rights: the key may {what}")


async def _check_storage(
    stream: StreamSettings, client: httpx.AsyncClient, subject: str
) -> CheckLine:
    """Does the Storage Integration answer this key (the backfill's source)? Never a FAIL:
    the daemon runs without it, its gaps just stay open."""
    from ingestd.storage import StorageClient, StorageState

    assert stream.api_key is not None
    storage = StorageClient(
        client,
        base_url=stream.base_url,
        api_key=stream.api_key.reveal(),
        application_id=stream.application_id,
        attempts=1,
        timeout_s=stream.connect_timeout_s + FIRST_FRAME_EXTRA_S,
    )
    device = stream.device_ids[0] if stream.device_ids else None
    try:
        state = await storage.probe(device)
    except IngestdError as exc:
        return CheckLine(word="warn", subject=subject, detail=f"storage: no answer ({exc})")
    detail = {
        StorageState.OK: "storage: the Storage Integration answers; gaps can be healed",
        StorageState.NOT_ENABLED: "storage: not enabled (404; open-source TTS has none, on TTS "
        "Cloud/Enterprise enable the Storage Integration): gaps cannot be healed",
        StorageState.NO_RIGHTS: "storage: no rights (the key needs 'read application "
        "traffic'): gaps cannot be healed",
    }[state]
    return CheckLine(
        word="ok" if state is StorageState.OK else "warn", subject=subject, detail=detail
    )


async def _first(frames: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(frames, None)
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()


def describe_tts_error(exc: Exception, *, where: str) -> str:
    """``401 pkg/identityserver:api_key_not_found: API key not found; <hint>`` from a mapped
    TTS error's attributes (``status_code``, ``error_name``, ``tts_message``)."""
    code = getattr(exc, "status_code", None)
    name = getattr(exc, "error_name", None)
    message = getattr(exc, "tts_message", None) or ""
    match = _TTS_MESSAGE.match(message)
    if match:  # TTS's own "error:<namespace>:<name> (<text>)"
        text = f"{code} {match['label']}: {match['text']}"
    elif name:
        text = f"{code} {name}: {message}" if message else f"{code} {name}"
    elif code is not None and message in ("", f"HTTP {code}"):
        text = f"HTTP {code} from {where}, with no TTS error in the body"
    elif code is not None:
        text = f"{code} {message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    hint = HINTS.get(name or "")
    if hint is None and code == 404:
        hint = "is base_url the root of The Things Stack's API?"
    return text + (f"; {hint}" if hint else "")


def _expanded_names(event: dict[str, Any]) -> list[Any] | None:
    data = event.get("data")
    value = data.get("value") if isinstance(data, dict) else None
    return value if isinstance(value, list) else None


def _safe_base_url(url: str) -> str:
    """``url`` without any user:password part."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid base_url>"
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url
