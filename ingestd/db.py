"""Engine creation: the one place that knows per-dialect connection settings."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import weakref
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long one transaction may wait for SQLite's write lock once the process is stopping:
# three commit attempts of a batch in flight times 30 s made a SIGTERM take ~120 s.
SQLITE_SHUTDOWN_BUSY_TIMEOUT_MS = 500
# BEGIN IMMEDIATE waits for the write lock in slices this long, re-reading the engine's
# current timeout between them, so a shutdown also shortens a wait already under way.
SQLITE_BUSY_SLICE_MS = 100


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for ``url`` with ingestd's settings.

    SQLite runs in WAL mode with ``synchronous=NORMAL`` (the daemon setting measured in
    PERF_NOTES: 5x commit rate, still crash-safe) and a generous busy timeout so that
    several processes (daemon, ``status``, a user's sqlite3 shell) can share the file.
    JSON is encoded with orjson on both dialects.
    """
    sa_url = sa.make_url(url)
    opts: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if sa_url.get_backend_name() == "sqlite":
        opts["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    else:
        opts["pool_pre_ping"] = True
    opts.update(kwargs)
    engine = sa.create_engine(sa_url, **opts)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


class _SqliteWait:
    """The write-lock wait of one SQLite engine's transactions (changeable while running)."""

    def __init__(self) -> None:
        self.timeout_ms = SQLITE_BUSY_TIMEOUT_MS


_SQLITE_WAITS: weakref.WeakKeyDictionary[Engine, _SqliteWait] = weakref.WeakKeyDictionary()


def shorten_waits(engine: Engine) -> None:
    """From now on, give up on SQLite's write lock after ``SQLITE_SHUTDOWN_BUSY_TIMEOUT_MS``.

    Called when the daemon stops: a commit that cannot get the lock quickly is left to the
    next start (its cursor did not move) instead of holding the shutdown for minutes.
    A no-op on PostgreSQL.
    """
    wait = _SQLITE_WAITS.get(engine)
    if wait is not None:
        wait.timeout_ms = SQLITE_SHUTDOWN_BUSY_TIMEOUT_MS


def _configure_sqlite(engine: Engine) -> None:
    wait = _SqliteWait()
    _SQLITE_WAITS[engine] = wait

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN; let SQLAlchemy emit it so that
        # a transaction takes the write lock up front (BEGIN IMMEDIATE) and never deadlocks
        # on an upgrade from a read lock.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={wait.timeout_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        _begin_immediate(conn, wait)


def _begin_immediate(conn: sa.Connection, wait: _SqliteWait) -> None:
    """``BEGIN IMMEDIATE``, waiting up to ``wait.timeout_ms`` (re-read every slice).

    The statements after it find the write lock held, so this is where a transaction
    waits for another writer; the connection's own busy timeout is set back to the
    current limit for them (COMMIT may still wait for a checkpoint or, without WAL,
    for readers).
    """
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    started = time.monotonic()
    dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SLICE_MS}")
    try:
        while (time.monotonic() - started) * 1000 < wait.timeout_ms - SQLITE_BUSY_SLICE_MS:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    break
        # The last try through SQLAlchemy, so that a timeout or another failure raises
        # its usual OperationalError ("database is locked", …) for map_db_errors.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        with contextlib.suppress(sqlite3.Error):
            dbapi_conn.execute(f"PRAGMA busy_timeout={wait.timeout_ms}")


def is_postgres(engine: Engine | sa.Connection) -> bool:
    """True on PostgreSQL (the dialect switch used by store and outbox)."""
    return engine.dialect.name == "postgresql"
