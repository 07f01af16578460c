"""Small asyncio helpers: every wait in ingestd can be interrupted by a stop event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any


async def wait_any(*aws: Awaitable[Any], timeout_s: float | None = None) -> None:
    """Return when the first of ``aws`` completes (or ``timeout_s`` passes); cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        # Let cancellations settle so no "Task was destroyed but it is pending" warnings.
        await asyncio.gather(*tasks, return_exceptions=True)


async def sleep_or_stop(delay_s: float, stop: asyncio.Event) -> bool:
    """Sleep ``delay_s`` unless ``stop`` is set first; return True when stopping."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(delay_s, 0.0))
    return stop.is_set()


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException]:
    """Cancel ``tasks``, wait for them, and return the errors other than cancellation."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
