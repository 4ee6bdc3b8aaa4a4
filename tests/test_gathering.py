"""The gather target of a model with no queue delay: plain calls, no clock, no loop."""

from __future__ import annotations

import pytest

from ferry.server.gathering import PROBE_EVERY, GatherTarget


def test_a_lone_caller_keeps_the_target_at_one_request() -> None:
    target = GatherTarget(limit=32)
    for _ in range(100):
        assert not target.wants_more(1)
        target.batch_formed(1, held=False)
    assert target.requests == 1


def test_more_requests_than_asked_for_raise_the_target_to_them() -> None:
    target = GatherTarget(limit=32)
    target.batch_formed(5, held=False)
    assert target.requests == 5
    assert target.wants_more(4) and not target.wants_more(5)


def test_the_target_never_exceeds_the_limit() -> None:
    target = GatherTarget(limit=8)
    target.batch_formed(40, held=False)
    assert target.requests == 8
    target.batch_formed(8, held=True)
    assert target.requests == 8


def test_a_held_batch_that_reached_its_target_asks_for_one_request_more() -> None:
    target = GatherTarget(limit=32)
    target.batch_formed(3, held=False)
    target.batch_formed(3, held=True)
    assert target.requests == 4
    # Reached without being held: nothing says more would have come.
    target.batch_formed(4, held=False)
    assert target.requests == 4


def test_a_batch_that_waited_the_whole_delay_lowers_the_target_to_what_came() -> None:
    target = GatherTarget(limit=32)
    target.batch_formed(8, held=False)
    target.batch_formed(3, held=True)  # 8 wanted, the delay ran out with 3
    assert target.requests == 3


def test_the_last_timed_out_level_is_probed_only_once_in_so_many_batches() -> None:
    """Eight steady callers: the target settles at 8 and tries 9 (one held delay) only
    once every PROBE_EVERY batches, instead of every other batch."""
    target = GatherTarget(limit=32)
    target.batch_formed(9, held=False)
    target.batch_formed(8, held=True)  # asked for 9, only 8 callers
    assert target.requests == 8
    for _ in range(PROBE_EVERY - 1):
        target.batch_formed(8, held=True)
        assert target.requests == 8
    target.batch_formed(8, held=True)
    assert target.requests == 9


def test_more_load_lifts_the_ceiling_at_once() -> None:
    target = GatherTarget(limit=32)
    target.batch_formed(4, held=False)
    target.batch_formed(2, held=True)  # timed out: ceiling 2
    target.batch_formed(6, held=False)  # six queued: the load is back
    assert target.requests == 6
    target.batch_formed(6, held=True)
    assert target.requests == 7


def test_a_lull_after_load_costs_one_delay_and_the_target_is_back_at_one() -> None:
    target = GatherTarget(limit=32)
    target.batch_formed(20, held=False)
    target.batch_formed(1, held=True)  # the lone caller waited the delay once
    assert target.requests == 1
    assert not target.wants_more(1)


def test_a_held_batch_whose_requests_left_brings_the_target_down() -> None:
    """Its callers cancelled, or their requests expired, while it was held: the requests
    it waited for are not coming, and the next lone request must not wait for them."""
    target = GatherTarget(limit=32)
    target.batch_formed(6, held=False)
    target.abandoned()
    assert target.requests == 1
    assert not target.wants_more(1)


def test_the_limit_must_allow_a_request() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        GatherTarget(limit=0)
