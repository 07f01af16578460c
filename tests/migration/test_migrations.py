"""The Alembic history produces exactly ``schema.metadata``, on both dialects."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ingestd import migrate
from ingestd.db import create_engine
from ingestd.schema import metadata

DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


@pytest.mark.parametrize("blank_db_url", DIALECTS, indirect=True)
def test_upgrade_head_matches_schema_metadata(blank_db_url: str) -> None:
    engine = create_engine(blank_db_url)
    migrate.upgrade(engine)
    assert migrate.is_up_to_date(engine)
    engine.dispose()
    assert _diff(blank_db_url) == []


@pytest.mark.parametrize("blank_db_url", DIALECTS, indirect=True)
def test_upgrade_is_idempotent_and_round_trips(blank_db_url: str) -> None:
    engine = create_engine(blank_db_url)
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # a second run changes nothing and does not fail
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()
    assert _diff(blank_db_url) == []
