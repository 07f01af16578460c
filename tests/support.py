"""Helpers for tests that run the daemon's Service in-process against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from ingestd.config import (
    DatabaseSettings,
    DownlinkSettings,
    MetricsSettings,
    Secret,
    Settings,
    SpoolSettings,
    StreamSettings,
)
from ingestd.db import create_engine
from ingestd.service import Service
from ingestd.simulator import Simulator

FAST_STREAM = {
    "reconnect_min_s": 0.05,
    "reconnect_max_s": 0.3,
    "auth_retry_s": 30.0,
    "idle_timeout_s": 30.0,
    "overlap_s": 2.0,
    "connect_timeout_s": 5.0,
}


_spool_dirs = itertools.count()


def fresh_spool_dir() -> str:
    """A spool directory of one test's own (created only if a test spools; removed when
    drained), so that tests running in parallel never share a stream's spool."""
    name = f"ingestd-test-spool-{os.getpid()}-{next(_spool_dirs)}"
    return os.path.join(tempfile.gettempdir(), name)


def make_settings(
    sim: Simulator,
    db_url: str,
    *,
    streams: list[dict[str, Any]] | None = None,
    downlinks: DownlinkSettings | None = None,
    spool: SpoolSettings | None = None,
    **db: Any,
) -> Settings:
    """Settings for a daemon on ``db_url`` following ``sim``: one app stream by default."""
    specs = streams or [{"name": "app", "application_id": sim.application_id}]
    stream_settings = tuple(
        StreamSettings(
            **{
                "base_url": sim.base_url,
                "api_key": Secret(sim.api_key),
                **FAST_STREAM,
                **spec,
            }
        )
        for spec in specs
    )
    return Settings(
        database=DatabaseSettings(url=db_url, **{"batch_max_delay_s": 0.05, **db}),
        streams=stream_settings,
        downlinks=downlinks or DownlinkSettings(),
        metrics=MetricsSettings(listen=""),
        spool=spool or SpoolSettings(dir=fresh_spool_dir()),
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """A Service running in this loop; stopped (and awaited) on exit."""
    stop = asyncio.Event()
    async with Service(settings) as service:
        task = asyncio.create_task(service.run(stop))
        try:
            yield service
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)


async def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float = 20.0, what: str = ""
) -> None:
    """Poll ``predicate`` (in a thread: it may query the database) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await asyncio.to_thread(predicate):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)


async def connected(service: Service, *, timeout_s: float = 10.0) -> None:
    await wait_for(
        lambda: all(c.state.connected for c in service.consumers),
        timeout_s=timeout_s,
        what="streams connected",
    )


class Db:
    """Tiny query helper over a test database."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def column(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).scalars())


def with_stream(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with every stream changed by ``changes``."""
    return replace(settings, streams=tuple(replace(s, **changes) for s in settings.streams))
