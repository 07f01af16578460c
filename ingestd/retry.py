"""The retry policy shared by stream reconnects and downlink pushes: pure, no clock."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    ``delay_s(attempt)`` is the wait before retry number ``attempt`` (1-based);
    ``gives_up(attempt)`` says whether that attempt is past ``max_attempts``
    (``None`` retries forever, as streams do).
    """

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    max_attempts: int | None = None
    jitter: float = 0.5  # fraction of the delay that is randomised

    def ceiling_s(self, attempt: int) -> float:
        """The un-jittered delay for ``attempt``."""
        exponent = max(attempt - 1, 0)
        # Cap the exponent so huge attempt numbers do not overflow a float.
        return min(self.max_s, self.base_s * self.factor ** min(exponent, 64))

    def delay_s(self, attempt: int, *, rand: float | None = None) -> float:
        """The jittered delay for ``attempt``; ``rand`` in [0, 1) makes it deterministic."""
        ceiling = self.ceiling_s(attempt)
        r = random.random() if rand is None else rand
        return ceiling * (1.0 - self.jitter) + ceiling * self.jitter * r

    def gives_up(self, attempt: int) -> bool:
        """True when ``attempt`` exceeds ``max_attempts``."""
        return self.max_attempts is not None and attempt > self.max_attempts
