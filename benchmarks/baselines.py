"""Yardsticks for ``ingestd import``: hand-written loops that write the same rows, and no more.

``same_schema`` decodes the capture and writes the rows ``ingestd import`` writes (``events``,
``uplinks``, ``uplink_receptions``, column for column) into the same migrated tables with the
database's fastest bulk path: SQLite one ``executemany`` per table per batch (WAL,
``synchronous=NORMAL``, as ingestd opens it), PostgreSQL one ``COPY`` per table per batch.
It knows the capture holds only well-formed uplinks, so it validates nothing, keeps no
cursor and de-duplicates nothing: the floor of what the schema and database cost.
``minimal_schema`` writes the same rows into bare tables with one index each on ``events``
and ``uplinks`` (their keys): what the schema's other indexes and constraints cost.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from ingestd import migrate, schema
from ingestd.db import create_engine
from ingestd.framing import FrameDecoder
from ingestd.identity import uplink_id

READ_BYTES = 1 << 20
TABLES = ("events", "uplinks", "uplink_receptions")


def _sqlite_time(text: str) -> str:
    """TTS's RFC 3339 UTC text as the text ingestd stores on SQLite, without a datetime."""
    day, _, rest = text[:-1].partition("T")
    hms, _, frac = rest.partition(".")
    return f"{day} {hms}.{(frac + '000000')[:6]}"


def _pg_time(text: str) -> str:
    return text  # PostgreSQL reads RFC 3339 itself (and rounds nanoseconds the same way)


def rows_of(path: Path, batch: int, dialect: str) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """Per batch of ``batch`` events, the rows of each table as driver tuples."""
    conv = _sqlite_time if dialect == "sqlite" else _pg_time
    dumps = orjson.dumps
    decoder = FrameDecoder()
    out: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLES}
    events, uplinks, receptions = out["events"], out["uplinks"], out["uplink_receptions"]
    with path.open("rb") as f:
        while chunk := f.read(READ_BYTES):
            for frame in decoder.feed(chunk):
                ev = orjson.loads(frame)["result"]
                data = ev["data"]
                ids = data["end_device_ids"]
                app = ids["application_ids"]["application_id"]
                dev = ids["device_id"]
                now = datetime.now(UTC)
                events.append(
                    (
                        ev["unique_id"],
                        "bench",
                        ev["name"],
                        conv(ev["time"]),
                        app,
                        dev,
                        ids["dev_eui"],
                        dumps(ev["correlation_ids"]).decode(),
                        dumps(data).decode(),
                        conv(now.isoformat().replace("+00:00", "Z")),
                    )
                )
                up = data["uplink_message"]
                received = up["received_at"]
                f_cnt = up.get("f_cnt", 0)
                uid = uplink_id(app, dev, datetime.fromisoformat(received), f_cnt)
                rx = up["rx_metadata"]
                for i, m in enumerate(rx):
                    gw = m["gateway_ids"]
                    loc = m.get("location")
                    receptions.append(
                        (
                            uid,
                            conv(received),
                            i,
                            gw["gateway_id"],
                            gw.get("eui"),
                            m.get("rssi", 0.0),
                            m.get("channel_rssi", 0.0),
                            m.get("snr", 0.0),
                            conv(m["time"]),
                            m.get("channel_index", 0),
                            None if loc is None else loc.get("latitude", 0.0),
                            None if loc is None else loc.get("longitude", 0.0),
                            None if loc is None else loc.get("altitude", 0.0),
                            "import",
                        )
                    )
                settings = up["settings"]
                lora = settings["data_rate"]["lora"]
                uplinks.append(
                    (
                        uid,
                        ev["unique_id"],
                        app,
                        dev,
                        ids["dev_eui"],
                        ids["join_eui"],
                        ids["dev_addr"],
                        up["session_key_id"],
                        up["f_port"],
                        f_cnt,
                        base64.b64decode(up["frm_payload"]),
                        dumps(up["decoded_payload"]).decode(),
                        up.get("confirmed", False),
                        conv(received),
                        max(m.get("rssi", 0.0) for m in rx),
                        max(m.get("snr", 0.0) for m in rx),
                        len(rx),
                        int(settings["frequency"]),
                        "lora",
                        lora["spreading_factor"],
                        lora["bandwidth"],
                        lora["coding_rate"],
                        None,
                        float(up["consumed_airtime"][:-1]),
                        up.get("packet_error_rate"),
                        "import",
                        False,
                    )
                )
                if len(events) >= batch:
                    yield out
                    out = {t: [] for t in TABLES}
                    events, uplinks = out["events"], out["uplinks"]
                    receptions = out["uplink_receptions"]
    if events:
        yield out


def _columns(table: str) -> list[str]:
    return [c.name for c in schema.metadata.tables[table].columns]


def write(url: str, path: Path, *, batch: int = 1000) -> int:
    """Decode ``path`` and write its rows into the (already created) tables at ``url``."""
    engine = create_engine(url)
    n = 0
    try:
        raw = engine.raw_connection()
        conn: Any = raw.driver_connection
        dialect = engine.dialect.name
        if dialect == "sqlite":
            sql = {
                t: f"INSERT INTO {t} ({', '.join(_columns(t))}) "
                f"VALUES ({', '.join('?' for _ in _columns(t))})"
                for t in TABLES
            }
            for rows in rows_of(path, batch, dialect):
                conn.execute("BEGIN")
                for t in TABLES:
                    conn.executemany(sql[t], rows[t])
                conn.execute("COMMIT")
                n += len(rows["events"])
        else:
            copy = {t: f"COPY {t} ({', '.join(_columns(t))}) FROM STDIN" for t in TABLES}
            for rows in rows_of(path, batch, dialect):
                with conn.cursor() as cur:
                    for t in TABLES:
                        with cur.copy(copy[t]) as cp:
                            for row in rows[t]:
                                cp.write_row(row)
                conn.commit()
                n += len(rows["events"])
        raw.close()
    finally:
        engine.dispose()
    return n


def same_schema(url: str, path: Path, *, batch: int = 1000) -> int:
    """The same rows into the same migrated tables (migration not timed by the caller's
    choice: call :func:`prepare_same` first)."""
    return write(url, path, batch=batch)


def prepare_same(url: str) -> None:
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


def prepare_minimal(url: str) -> None:
    """Bare copies of the three tables: column types only, one key on events and uplinks."""
    meta = sa.MetaData()
    keys = {"events": ("unique_id",), "uplinks": ("uplink_id", "received_at")}
    for name in TABLES:
        src = schema.metadata.tables[name]
        sa.Table(
            name,
            meta,
            *[
                sa.Column(c.name, c.type, primary_key=c.name in keys.get(name, ()))
                for c in src.columns
            ],
        )
    engine = create_engine(url)
    try:
        meta.create_all(engine)
    finally:
        engine.dispose()
