"""``ingestd run``'s rights check: one task per stream, beside (not inside) its consumer.

TTS opens a stream for a key with any right on the application and then silently skips the
traffic events the key may not see (:mod:`ingestd.rights`), so a connected stream says
nothing about whether anything will arrive. At stream start this task asks TTS which rights
the key has; for each missing one it logs ``stream_rights_missing`` once and, for the
traffic right, sets ``StreamState.rights_missing`` so ``/healthz`` is not green for the
stream (:func:`ingestd.metrics.stream_health`). The stream keeps running: rights can be
granted to a key while it is in use, so the check repeats every :data:`RIGHTS_RECHECK_S`
and clears the flag (``stream_rights_ok``) once they are there. When the rights endpoint
itself fails (a 5xx, the network) that is a warning and changes nothing: the stream's own
errors say more about a key TTS rejects.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httpx
import structlog

from ingestd import rights
from ingestd.aio import sleep_or_stop
from ingestd.config import StreamSettings
from ingestd.errors import IngestdError

log = structlog.get_logger()

RIGHTS_RECHECK_S = 300.0
RIGHTS_TIMEOUT_S = 30.0  # one listing, beyond the client's own connect timeout


class RightsHolder(Protocol):
    """What the watch writes (``ingestd.consumer.StreamState``)."""

    rights_missing: tuple[str, ...]


async def watch_rights(
    stream: StreamSettings,
    state: RightsHolder,
    client: httpx.AsyncClient,
    stop: asyncio.Event,
    *,
    downlinks: bool,
    recheck_s: float | None = None,
) -> None:
    """Check ``stream``'s key now and every ``recheck_s`` (:data:`RIGHTS_RECHECK_S`) until
    ``stop``."""
    if stream.api_key is None:
        return
    recheck_s = RIGHTS_RECHECK_S if recheck_s is None else recheck_s
    needed = rights.needed_for(downlinks=downlinks)
    reported: list[str] | None = None  # the missing rights last logged (None: never checked)
    with structlog.contextvars.bound_contextvars(
        stream=stream.name, application_id=stream.application_id
    ):
        while True:
            try:
                async with asyncio.timeout(stream.connect_timeout_s + RIGHTS_TIMEOUT_S):
                    granted = await rights.fetch_rights(
                        client, stream.base_url, stream.api_key.reveal(), stream.application_id
                    )
            except (IngestdError, TimeoutError) as exc:
                log.warning(
                    "stream_rights_unknown",
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=recheck_s,
                )
            else:
                missing = rights.missing_rights(granted, needed)
                state.rights_missing = tuple(r for r in missing if r in rights.STREAM_TRAFFIC)
                if missing and missing != reported:
                    log.error(
                        "stream_rights_missing",
                        stream=stream.name,
                        missing=missing,
                        detail=rights.describe_missing(missing, stream.application_id),
                        recheck_in_s=recheck_s,
                    )
                elif not missing and reported:
                    log.info("stream_rights_ok")
                reported = missing
            if await sleep_or_stop(recheck_s, stop):
                return
