"""Operator commands: ``ingestd check`` (:mod:`ingestd.check`) and ``ingestd status``
(:mod:`ingestd.status`), re-exported here for ``commands.py``."""

from __future__ import annotations

from ingestd.check import run_checks
from ingestd.status import print_status

__all__ = ["print_status", "run_checks"]
