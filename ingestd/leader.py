"""Stream leadership: on PostgreSQL one process follows a stream, others stand by.

Several ingestd processes may run the same configuration against one PostgreSQL
database (for availability, or to share the outbox). Each stream is followed by the
process holding a session-level advisory lock keyed by the stream's name; the lock lives
as long as that process's dedicated connection, so a crashed leader's lock vanishes with
its connection and a standby takes over. SQLite is one machine's file: no lock needed.
"""

from __future__ import annotations

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

log = structlog.get_logger()

LOCK_NAMESPACE = "ingestd:stream:"


class StreamLeadership:
    """Holds (or tries to hold) the advisory lock for one stream. Synchronous; call it in a
    worker thread from async code."""

    def __init__(self, engine: Engine, stream: str) -> None:
        self._engine = engine
        self._key = LOCK_NAMESPACE + stream
        self._conn: Connection | None = None
        self.needed = engine.dialect.name == "postgresql"

    @property
    def held(self) -> bool:
        """True while this process is the stream's leader (always on SQLite)."""
        return not self.needed or self._conn is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process leads."""
        if self.held:
            return True
        conn = self._engine.connect()
        try:
            got = conn.execute(
                sa.text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                {"key": self._key},
            ).scalar_one()
            conn.commit()  # end the implicit transaction; the session lock stays
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
            return True
        conn.close()
        return False

    def still_held(self) -> bool:
        """Check the lock's connection is alive; a dead one means the lock is gone."""
        if not self.needed:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(sa.text("SELECT 1")).scalar_one()
            self._conn.commit()
            return True
        except sa.exc.DBAPIError:
            self._drop()
            return False

    def release(self) -> None:
        """Give the stream up (closing the session releases the lock)."""
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never return a lock-holding session to the pool
            finally:
                conn.close()
