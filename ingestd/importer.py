"""``ingestd import``: a recorded stream body (any framing, or a JSON array) into the store.

The same :class:`~ingestd.batch.BatchBuilder` as a live stream, so a capture is stored
exactly as if it had been streamed; on PostgreSQL commits run one batch behind the parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import orjson

from ingestd.batch import BatchBuilder
from ingestd.framing import FrameDecoder, TtsErrorInfo
from ingestd.models import CommitResult
from ingestd.store import Store

_T = TypeVar("_T")

IMPORT_READ_BYTES = 1 << 20
# Import's own batch size, not the daemon's (whose batches are small for latency): a capture
# has no latency to keep, and fewer, bigger commits cost less per event.
IMPORT_BATCH_MAX_EVENTS = 2000  # peak RSS ~125 MiB at 100k events (5000: ~190 MiB), no slower


@dataclass(kw_only=True)
class ImportSummary:
    """What ``ingestd import`` did."""

    result: CommitResult = field(default_factory=CommitResult)
    frames: int = 0
    bytes_read: int = 0
    error: TtsErrorInfo | None = None  # an {"error": …} frame that ended the capture


def import_stream(
    store: Store,
    source: IO[bytes],
    *,
    stream: str,
    batch_max_events: int = IMPORT_BATCH_MAX_EVENTS,
    progress: Callable[[ImportSummary], None] | None = None,
) -> ImportSummary:
    """Ingest a recorded stream body (any framing) as if it were streamed.

    Also accepts a JSON array of events (or of ``{"result": …}`` frames), the shape of an
    export saved from the Console. Everything before an ``{"error": …}`` frame is kept;
    the error ends the import and is reported. Re-importing the same capture stores
    nothing twice.
    """
    # A capture is finite and chosen by the user: every reject it holds is stored.
    builder = BatchBuilder(stream, store.load_cursor(stream), reject_rows_max=None, source="import")
    summary = ImportSummary()
    # On PostgreSQL, batch N is committed in a worker thread while batch N+1 is parsed: a
    # pipeline of depth one keeps commits in order (so the cursor only moves forward) and
    # lets the server work meanwhile; that thread only sends prepared COPY text. On SQLite
    # the commit binds every parameter holding the GIL, so a thread only contends with the
    # parser for it: committing in line was 5-8 % faster (benchmarks/, 2026-12-02).
    pool: Executor = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-commit")
        if store.engine.dialect.name == "postgresql"
        else _InLine()
    )
    with pool:
        pending: Future[CommitResult] | None = None

        def flush() -> None:
            nonlocal pending
            batch = builder.take()
            prepared = store.prepare(batch)  # while the previous batch is still committing
            if pending is not None:
                summary.result.add(pending.result())
                if progress is not None:
                    progress(summary)
            pending = pool.submit(store.commit_batch, batch, prepared)

        for payload in _frames(source, summary):
            summary.frames += 1
            error = builder.add_frame(payload)
            if error is not None:
                summary.error = error
                break
            if len(builder) >= batch_max_events:
                flush()
        flush()
        assert pending is not None
        summary.result.add(pending.result())
        if progress is not None:  # a capture smaller than a batch shows its figures too
            progress(summary)
    return summary


def _frames(source: IO[bytes], summary: ImportSummary) -> Iterator[bytes]:
    """Frame payloads of a capture: streamed framings incrementally, a JSON array whole."""
    chunk = source.read(IMPORT_READ_BYTES)
    summary.bytes_read += len(chunk)
    if chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
        body = chunk + source.read()
        summary.bytes_read = len(body)
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            yield body  # rejected as a whole, with the parser's message
            return
        for item in items:
            yield orjson.dumps(item)
        return
    decoder = FrameDecoder()
    while chunk:
        yield from decoder.feed(chunk)
        chunk = source.read(IMPORT_READ_BYTES)
        summary.bytes_read += len(chunk)
    yield from decoder.flush()


class _InLine(Executor):
    """An executor that runs each call at once, in the caller's thread."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # delivered by result(), as from a thread
            future.set_exception(exc)
        return future
