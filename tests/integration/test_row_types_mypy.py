"""mypy --strict catches a mistyped column in a pipeline row (the point of the row TypedDicts).

mypy runs in-process on a small snippet that builds rows the way ingestd.normalize does.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

SNIPPET = textwrap.dedent(
    """
    from datetime import UTC, datetime

    from ingestd.models import EventRow, Row

    now = datetime.now(UTC)
    join = Row(
        "joins",
        {{
            "event_unique_id": None,
            "application_id": "app",
            "device_id": "dev",
            "dev_eui": None,
            "join_eui": None,
            "{column}": None,
            "session_key_id": None,
            "received_at": now,
            "source": "stream",
        }},
    )
    event: EventRow = {{
        "unique_id": "01J",
        "stream": "s",
        "name": "as.up.join.forward",
        "time": now,
        "application_id": "app",
        "device_id": "dev",
        "dev_eui": None,
        "correlation_ids": None,
        "{data}": None,
    }}
    """
)


def _mypy(tmp_path: Path, **columns: str) -> tuple[str, int]:
    path = tmp_path / "snippet.py"
    path.write_text(SNIPPET.format(**columns))
    limit = sys.getrecursionlimit()
    try:
        out, err, status = api.run(
            ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(path)]
        )
    finally:  # mypy raises it for the whole process, which other tests' outcomes depend on
        sys.setrecursionlimit(limit)
    return out + err, status


def test_rows_spelled_like_their_columns_pass(tmp_path: Path) -> None:
    out, status = _mypy(tmp_path, column="dev_addr", data="data")
    assert status == 0, out


@pytest.mark.parametrize(
    ("column", "data"), [("dev_adr", "data"), ("dev_addr", "payload")], ids=["derived", "events"]
)
def test_a_mistyped_column_is_a_type_error(tmp_path: Path, column: str, data: str) -> None:
    out, status = _mypy(tmp_path, column=column, data=data)
    assert status == 1, out
    errors = {line.split(": error:")[0] for line in out.splitlines() if ": error:" in line}
    assert len(errors) == 1, out  # all on the one misspelt row, nothing else
    expected = 'Argument 2 to "Row"' if data == "data" else 'Extra key "payload" for TypedDict'
    assert expected in out
