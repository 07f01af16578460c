"""Fixtures for integration tests: a simulator and a database query helper."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import Db

from ingestd.sim.server import Simulator


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    helper = Db(db_url)
    yield helper
    helper.engine.dispose()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(devices=50, store_entity_count=100_000, seed=11).start()
    yield simulator
    simulator.stop()
