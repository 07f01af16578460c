"""The shared retry policy, without a clock."""

from __future__ import annotations

from ingestd.retry import Backoff


def test_delays_grow_exponentially_and_are_capped() -> None:
    b = Backoff(base_s=1.0, factor=2.0, max_s=10.0, jitter=0.0)
    assert [b.delay_s(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_stays_within_the_upper_half_of_the_ceiling() -> None:
    b = Backoff(base_s=4.0, factor=2.0, max_s=60.0, jitter=0.5)
    assert b.delay_s(1, rand=0.0) == 2.0
    assert b.delay_s(1, rand=0.999) < 4.0
    assert b.delay_s(3, rand=0.5) == 12.0


def test_streams_retry_forever_and_downlinks_give_up_after_max_attempts() -> None:
    assert not Backoff(max_attempts=None).gives_up(10**9)
    b = Backoff(max_attempts=3)
    assert [b.gives_up(n) for n in (1, 3, 4)] == [False, False, True]


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert Backoff(base_s=1.0, max_s=60.0, jitter=0.0).delay_s(10_000) == 60.0
