"""A pure, incremental decoder for the three framings of a TTS event stream.

TTS does not speak spec SSE (lorawan-stack#5529). With ``Accept: text/event-stream`` it
writes ``{"result":…}\\n\\n``; with any other Accept it writes NDJSON ``{"result":…}\\n``.
A proxy, or a future TTS, may re-frame as spec SSE ``data:`` lines. TTS writes compact,
single-line JSON (newlines inside strings are escaped), so every line that is not an
SSE field is one whole frame. :class:`FrameDecoder` accepts all three, on arbitrary
chunk boundaries, with LF or CRLF line ends.

:func:`parse_frame` turns one frame's bytes into an event or a TTS error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ingestd.errors import MalformedEvent

MAX_FRAME_BYTES = 16 * 1024 * 1024  # TTS events are a few KB; this only stops runaway input
OVERSIZED_FRAME = f"<frame longer than {MAX_FRAME_BYTES} bytes: skipped>".encode()


class FrameDecoder:
    """Split a byte stream into frame payloads (bytes of one JSON document each).

    Memory and work are bounded by the input, whatever it is: a partial line is kept as a
    list of chunks and only each new chunk is searched for a line end (httpx's
    ``LineDecoder``), so a long line costs linear time, not quadratic; and the partial line
    plus an SSE event's ``data:`` lines so far count together toward
    :data:`MAX_FRAME_BYTES`. Past it, the frame is skipped to its end and a marker
    (:data:`OVERSIZED_FRAME`) is passed on in its place, which lands in ``rejected_events``.
    """

    __slots__ = (
        "_data_bytes",
        "_data_lines",
        "_discard_event",
        "_parts",
        "_parts_len",
        "_skipping",
    )

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the current partial line, in the chunks it came in
        self._parts_len = 0
        self._data_lines: list[bytes] = []  # an SSE event's ``data:`` lines so far
        self._data_bytes = 0  # their length, with the newlines that will join them
        self._skipping = False  # inside a line that went past MAX_FRAME_BYTES
        self._discard_event = False  # inside an SSE event that went past MAX_FRAME_BYTES

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decode ``chunk`` and return the frames it completed."""
        frames: list[bytes] = []
        if not chunk:
            return frames
        if self._skipping:
            end = chunk.find(b"\n")
            if end < 0:
                return frames
            self._skipping = False
            chunk = chunk[end + 1 :]
        if self._parts:
            # Finish the partial line first, searching only the new chunk for its end.
            end = chunk.find(b"\n")
            if end < 0:
                self._parts.append(chunk)
                self._parts_len += len(chunk)
                self._check_bound(frames)
                return frames
            if self._parts_len + end + self._data_bytes > MAX_FRAME_BYTES:
                self._oversized(frames, line_done=True)
            else:
                self._parts.append(chunk[:end])
                line = b"".join(self._parts)
                self._parts = []
                self._parts_len = 0
                self._line(line, frames)
            chunk = chunk[end + 1 :]
        if chunk[:1] == b"\n" and chunk.count(b"\n") == len(chunk) and not self._data_lines:
            self._discard_event = False  # only blank lines (a flood of them is no work)
            return frames
        lines = chunk.split(b"\n")
        tail = lines.pop()
        max_bytes = MAX_FRAME_BYTES
        for line in lines:
            if line[:1] == b"{" and line[-1:] != b"\r" and len(line) <= max_bytes:
                frames.append(line)  # fast path: TTS's own framing
            elif line or self._data_lines or self._discard_event:
                self._line(line, frames)
            # else a blank line with no SSE event open: the "\n\n" framing's second newline
        if tail:
            self._parts.append(tail)
            self._parts_len = len(tail)
        self._check_bound(frames)
        return frames

    def flush(self) -> list[bytes]:
        """End of stream: return whatever complete frame is left (an unterminated last line)."""
        frames: list[bytes] = []
        tail = b"".join(self._parts)
        self._parts = []
        self._parts_len = 0
        self._skipping = False
        if tail.endswith(b"\r"):
            tail = tail[:-1]
        if tail:
            if tail[:1] == b"{":
                frames.append(tail)
            else:
                self._sse_line(tail, frames)
        if self._data_lines:
            frames.append(b"\n".join(self._data_lines))
        self._end_event()
        return frames

    @property
    def pending_bytes(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return self._parts_len + self._data_bytes

    def _line(self, line: bytes, frames: list[bytes]) -> None:
        if len(line) > MAX_FRAME_BYTES:  # only when one chunk holds a whole runaway line
            self._oversized(frames, line_done=True)
            return
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] == b"{":  # fast path: TTS's own framing
            frames.append(line)
        elif not line:  # a blank line ends an SSE event
            if self._data_lines:
                frames.append(b"\n".join(self._data_lines))
            self._end_event()
        else:
            self._sse_line(line, frames)

    def _end_event(self) -> None:
        if self._data_lines:
            self._data_lines = []
        self._data_bytes = 0
        self._discard_event = False

    def _check_bound(self, frames: list[bytes]) -> None:
        if self._parts_len + self._data_bytes > MAX_FRAME_BYTES:
            self._oversized(frames, line_done=False)

    def _oversized(self, frames: list[bytes], *, line_done: bool) -> None:
        # A server (or proxy) gone wrong must not grow our memory without bound: drop the
        # frame so far, skip the rest of its line and of its SSE event (the data: lines up to
        # the next blank line), and pass on a marker in its place.
        self._parts = []
        self._parts_len = 0
        self._skipping = not line_done
        self._data_lines = []
        self._data_bytes = 0
        self._discard_event = True
        frames.append(OVERSIZED_FRAME)

    def _sse_line(self, line: bytes, frames: list[bytes]) -> None:
        if line[:1] == b":":
            return  # SSE comment (a keep-alive from a proxy)
        field, sep, value = line.partition(b":")
        if not sep:
            # Not an SSE field and not JSON: pass it on so the caller can reject it.
            frames.append(line)
            return
        if field == b"data" and not self._discard_event:
            if value[:1] == b" ":
                value = value[1:]
            self._data_lines.append(value)
            self._data_bytes += len(value) + 1
            if self._data_bytes > MAX_FRAME_BYTES:
                self._oversized(frames, line_done=True)
        # event:, id:, retry: and unknown fields carry nothing we use.


@dataclass(frozen=True, kw_only=True, slots=True)
class TtsErrorInfo:
    """A ``google.rpc.Status`` from TTS, reduced to what we act on and report."""

    code: int | None
    name: str | None  # details[0].name, e.g. "api_key_expired"; compare by name, never text
    namespace: str | None
    message: str
    # ``insufficient_application_rights`` names the rights the key lacks in
    # ``attributes.missing`` (TTS_WIRE §5.3), e.g. RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE.
    missing_rights: tuple[str, ...] = ()

    def describe(self) -> str:
        """``namespace:name (message)`` for logs and ``last_error`` columns."""
        label = f"{self.namespace}:{self.name}" if self.namespace and self.name else self.name
        text = f"{label}: {self.message}" if label else self.message
        if self.missing_rights:
            text += f" (missing {', '.join(self.missing_rights)})"
        return text


def parse_tts_error(body: Any) -> TtsErrorInfo:
    """Read either TTS error shape: ``{"error": Status}`` or a bare ``Status``."""
    status = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(status, dict):
        status = {}
    details = status.get("details")
    first = details[0] if isinstance(details, list) and details else {}
    if not isinstance(first, dict):
        first = {}
    code = status.get("code")
    name = first.get("name")
    namespace = first.get("namespace")
    attributes = first.get("attributes")
    missing = attributes.get("missing") if isinstance(attributes, dict) else None
    return TtsErrorInfo(  # a hostile frame's mistyped fields are dropped, never passed on
        code=code if type(code) is int else None,
        name=name if type(name) is str else None,
        namespace=namespace if type(namespace) is str else None,
        message=str(status.get("message") or body)[:1000],
        missing_rights=tuple(m for m in missing if type(m) is str) if type(missing) is list else (),
    )


@dataclass(frozen=True, slots=True)
class EventFrame:
    """A frame carrying one event."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """A frame carrying an error that ends the stream."""

    error: TtsErrorInfo


def parse_frame(payload: bytes) -> EventFrame | ErrorFrame:
    """Decode one frame: ``{"result": Event}``, ``{"error": Status}``, a bare ``Status``
    (``{"code": …}``, from the gateway before the stream starts) or a bare Event (captures).

    Raises :class:`MalformedEvent` for anything else; the caller rejects it and goes on.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"frame is not valid JSON: {exc}") from exc
    if isinstance(doc, dict):
        result = doc.get("result")
        if isinstance(result, dict):
            return EventFrame(result)
        if "error" in doc or ("code" in doc and "message" in doc):
            return ErrorFrame(parse_tts_error(doc))
        if "name" in doc and "unique_id" in doc:
            return EventFrame(doc)
    raise MalformedEvent('frame is neither {"result": …} nor {"error": …}')
