"""Interpreter settings for ingest, applied once per process by the CLI.

The cyclic garbage collector. Every event decodes into a few dozen dicts and lists that die
with its batch, and none of them form cycles, so reference counting frees them; the cyclic
collector only has to find the rare cycle. With CPython's default thresholds (700, 10, 10)
it ran a young collection every ~15 events and a full one every few batches, walking every
live batch each time: a third of ``ingestd import``'s CPU time (benchmarks/, 2026-12-02:
175 -> 130 µs of CPU per uplink on SQLite, 139 -> 106 on PostgreSQL). Young collections now
come every :data:`GEN0_THRESHOLD` allocations, and the objects alive after the imports
(modules, SQLAlchemy's metadata) are moved out of the collector's sight with
:func:`gc.freeze`. Cyclic garbage waits longer to be freed: at most a few MiB.

The GIL switch interval, on PostgreSQL. The commit thread there only sends COPY text that
the parsing thread prepared (``Store.prepare``) and waits for the server; after each
socket wait it needs the GIL back, and with the default interval the busy parser keeps it
up to 5 ms each time, some 40 times per 2,000-event batch. At 1 ms, ``import`` ran
4-17 % faster (3 of 3 interleaved rounds). On SQLite the commit thread binds every
parameter holding the GIL, and more switching was no better, so the default stays.
"""

from __future__ import annotations

import gc
import sys

GEN0_THRESHOLD = 50_000  # container allocations between young collections (CPython: 700)
OLDER_THRESHOLDS = (20, 20)  # young collections per middle one, middle ones per full one
POSTGRESQL_SWITCH_INTERVAL_S = 0.001
DEFAULT_SWITCH_INTERVAL_S = 0.005  # CPython's


def tune_gc() -> None:
    """Rarer cyclic collections, startup objects frozen (the CLI does this at start)."""
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *OLDER_THRESHOLDS)


def tune_for_database(dialect: str) -> None:
    """The settings that depend on the database (``sqlite``, ``postgresql``) written to."""
    pg = dialect == "postgresql"
    sys.setswitchinterval(POSTGRESQL_SWITCH_INTERVAL_S if pg else DEFAULT_SWITCH_INTERVAL_S)
