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
    """Split a byte stream into frame payloads (bytes of one JSON document each)."""

    __slots__ = ("_data_lines", "_skipping", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._data_lines: list[bytes] = []  # an SSE event's ``data:`` lines so far
        self._skipping = False  # inside a line longer than MAX_FRAME_BYTES

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decode ``chunk`` and return the frames it completed."""
        if not chunk:
            return []
        frames: list[bytes] = []
        if self._skipping:
            end = chunk.find(b"\n")
            if end < 0:
                return frames
            self._skipping = False
            chunk = chunk[end + 1 :]
        data = self._tail + chunk if self._tail else chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if line[:1] == b"{":  # fast path: TTS's own framing
                frames.append(line)
            elif not line:
                if self._data_lines:
                    frames.append(b"\n".join(self._data_lines))
                    self._data_lines = []
            else:
                self._sse_line(line, frames)
        if len(self._tail) > MAX_FRAME_BYTES:
            # A server (or proxy) gone wrong must not grow our memory without bound: drop
            # the rest of this line and pass on a marker, which lands in rejected_events.
            self._tail = b""
            self._skipping = True
            frames.append(OVERSIZED_FRAME)
        return frames

    def flush(self) -> list[bytes]:
        """End of stream: return whatever complete frame is left (an unterminated last line)."""
        frames: list[bytes] = []
        tail, self._tail = self._tail, b""
        if tail.endswith(b"\r"):
            tail = tail[:-1]
        if tail:
            if tail[:1] == b"{":
                frames.append(tail)
            else:
                self._sse_line(tail, frames)
        if self._data_lines:
            frames.append(b"\n".join(self._data_lines))
            self._data_lines = []
        return frames

    @property
    def pending_bytes(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._tail) + sum(len(x) for x in self._data_lines)

    def _sse_line(self, line: bytes, frames: list[bytes]) -> None:
        if line[:1] == b":":
            return  # SSE comment (a keep-alive from a proxy)
        field, sep, value = line.partition(b":")
        if not sep:
            # Not an SSE field and not JSON: pass it on so the caller can reject it.
            frames.append(line)
            return
        if field == b"data":
            self._data_lines.append(value[1:] if value[:1] == b" " else value)
        # event:, id:, retry: and unknown fields carry nothing we use.


@dataclass(frozen=True, kw_only=True, slots=True)
class TtsErrorInfo:
    """A ``google.rpc.Status`` from TTS, reduced to what we act on and report."""

    code: int | None
    name: str | None  # details[0].name, e.g. "api_key_expired"; compare by name, never text
    namespace: str | None
    message: str

    def describe(self) -> str:
        """``namespace:name (message)`` for logs and ``last_error`` columns."""
        label = f"{self.namespace}:{self.name}" if self.namespace and self.name else self.name
        return f"{label}: {self.message}" if label else self.message


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
    return TtsErrorInfo(  # a hostile frame's mistyped fields are dropped, never passed on
        code=code if type(code) is int else None,
        name=name if type(name) is str else None,
        namespace=namespace if type(namespace) is str else None,
        message=str(status.get("message") or body)[:1000],
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
