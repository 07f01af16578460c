"""Cyclic garbage collection tuned for ingest: rarer collections, startup objects frozen.

Every event decodes into a few dozen dicts and lists that die with its batch, and none of
them form cycles, so reference counting frees them; the cyclic collector only has to find
the rare cycle. With CPython's default thresholds (700, 10, 10) it ran a young collection
every ~15 events and a full one every few batches, walking every live batch each time:
a third of ``ingestd import``'s CPU time (benchmarks/: 175 -> 130 µs of CPU per uplink on
SQLite, 139 -> 106 on PostgreSQL). Young collections now come every
:data:`GEN0_THRESHOLD` allocations, and the objects alive after the imports (modules,
SQLAlchemy's metadata) are moved out of the collector's sight with :func:`gc.freeze`.
Cyclic garbage waits longer to be freed: at most a few MiB.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # container allocations between young collections (CPython: 700)
OLDER_THRESHOLDS = (20, 20)  # young collections per middle one, middle ones per full one


def tune_gc() -> None:
    """Apply the ingest settings to this process (the CLI does, once, at start)."""
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *OLDER_THRESHOLDS)
