"""The row TypedDicts in ingestd.models match the tables, and the rows normalize builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_type_hints

import orjson
import pytest

from ingestd import schema
from ingestd.models import (
    DownlinkEventRow,
    EventRow,
    JoinRow,
    UplinkReceptionRow,
    UplinkRow,
)
from ingestd.normalize import event_row, normalize

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "events"
ROW_TYPES: dict[str, Any] = {
    "events": EventRow,
    "uplinks": UplinkRow,
    "uplink_receptions": UplinkReceptionRow,
    "joins": JoinRow,
    "downlink_events": DownlinkEventRow,
}


@pytest.mark.parametrize("table", ROW_TYPES)
def test_each_row_type_has_exactly_its_tables_columns_in_order(table: str) -> None:
    columns = [c.name for c in schema.metadata.tables[table].columns]
    assert list(get_type_hints(ROW_TYPES[table])) == columns


def test_only_ingested_at_is_optional_it_is_the_stores_to_set() -> None:
    assert EventRow.__optional_keys__ == frozenset({"ingested_at"})
    for table in ("uplinks", "uplink_receptions", "joins", "downlink_events"):
        assert ROW_TYPES[table].__optional_keys__ == frozenset(), table


@pytest.mark.parametrize("path", sorted(DATA_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_the_rows_normalize_builds_have_exactly_their_types_keys(path: Path) -> None:
    event = orjson.loads(path.read_bytes())
    assert set(event_row(event, stream="s")) == EventRow.__required_keys__
    for table, values in normalize(event):
        assert set(values) == ROW_TYPES[table].__required_keys__, table
