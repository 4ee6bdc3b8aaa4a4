"""The batching core, driven by explicit `now` values: no clock, no sleeping, no loop."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.server.batching import Batch, BatchPolicy, BatchQueue, PendingRequest
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.padding import LengthBuckets

LONG = 100.0  # a queue delay no test reaches unless it means to


def req(
    name: str,
    at: float = 0.0,
    *,
    rows: int = 1,
    shape: Hashable = "s",
    deadline: float | None = None,
    priority: int = 1,
) -> PendingRequest[str]:
    return PendingRequest(
        payload=name, rows=rows, shape_key=shape, arrival_s=at, deadline_s=deadline,
        priority=priority,
    )


def queue(**policy: object) -> BatchQueue[str]:
    policy.setdefault("max_batch_size", 4)
    return BatchQueue(BatchPolicy(**policy))  # type: ignore[arg-type]


def submit(q: BatchQueue[str], *requests: PendingRequest[str]) -> None:
    for request in requests:
        q.submit(request)


def names(batch: Batch[str] | None) -> list[str]:
    assert batch is not None, "expected a batch, got None (wait)"
    return [r.payload for r in batch.requests]


# -- policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1, got 0"),
        ({"max_batch_size": 4, "max_queue_delay_s": -0.1}, "max_queue_delay_s must be >= 0"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (0,)}, "preferred batch size 0"),
        (
            {"max_batch_size": 4, "preferred_batch_sizes": (2, 5)},
            "preferred batch size 5 is outside 1..4",
        ),
        ({"max_batch_size": 4, "max_queue_size": -1}, "max_queue_size must be >= 0"),
        ({"max_batch_size": 4, "priority_levels": 0}, "priority_levels must be at least 1"),
        ({"max_batch_size": 4, "priority_aging_s": -1.0}, "priority_aging_s must be >= 0"),
        ({"max_batch_size": 4, "adaptive_delay_s": -0.001}, "adaptive_delay_s must be >= 0"),
    ],
)
def test_policy_rejects_impossible_settings(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchPolicy(**fields)  # type: ignore[arg-type]


def test_empty_queue_has_nothing_to_do() -> None:
    q = queue()
    assert len(q) == 0
    assert q.take_batch(0.0) is None
    assert q.next_wakeup(0.0) is None
    assert q.next_deadline() is None
    assert q.expire(0.0) == []


# -- size limit -------------------------------------------------------------------------


def test_full_batch_dispatches_at_once_and_never_exceeds_the_limit() -> None:
    q = queue(max_batch_size=4, max_queue_delay_s=LONG)
    submit(q, req("a"), req("b"), req("c"))
    assert q.take_batch(0.0) is None  # not full, the delay has not passed
    submit(q, req("d"))
    batch = q.take_batch(0.0)
    assert names(batch) == ["a", "b", "c", "d"]
    assert batch is not None and batch.rows == 4 and batch.formed_s == 0.0
    assert len(q) == 0 and q.queued_rows == 0


def test_a_long_queue_is_cut_into_full_batches_in_arrival_order() -> None:
    q = queue(max_batch_size=4, max_queue_delay_s=LONG)
    submit(q, *(req(str(i), at=i * 0.01) for i in range(10)))
    assert q.queued_rows == 10
    assert names(q.take_batch(0.1)) == ["0", "1", "2", "3"]
    assert names(q.take_batch(0.1)) == ["4", "5", "6", "7"]
    assert q.take_batch(0.1) is None  # two left: they wait for the delay
    assert names(q.take_batch(0.08 + LONG)) == ["8", "9"]


# -- time limit -------------------------------------------------------------------------


def test_batch_waits_until_its_oldest_request_has_waited_the_delay() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=0.5)
    submit(q, req("a", at=1.0))
    assert q.take_batch(1.0) is None
    assert q.next_wakeup(1.0) == pytest.approx(1.5)
    submit(q, req("b", at=1.3))
    assert q.take_batch(1.3) is None
    assert q.next_wakeup(1.3) == pytest.approx(1.5)  # the oldest decides, not the newest
    assert q.take_batch(1.49) is None
    assert names(q.take_batch(1.5)) == ["a", "b"]
    assert q.next_wakeup(1.5) is None


def test_next_wakeup_follows_the_new_oldest_request() -> None:
    q = queue(max_batch_size=2, max_queue_delay_s=0.5)
    submit(q, req("a", at=0.0), req("b", at=0.1), req("c", at=0.2))
    assert names(q.take_batch(0.2)) == ["a", "b"]  # full
    assert q.take_batch(0.2) is None
    assert q.next_wakeup(0.2) == pytest.approx(0.7)
    assert names(q.take_batch(0.7)) == ["c"]


def test_zero_delay_dispatches_a_single_request_immediately() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=0.0)
    submit(q, req("a", at=3.0))
    assert names(q.take_batch(3.0)) == ["a"]


def test_zero_delay_takes_everything_queued_while_the_executor_was_busy() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=0.0)
    submit(q, *(req(str(i)) for i in range(5)))
    assert names(q.take_batch(0.0)) == ["0", "1", "2", "3", "4"]


# -- gathering (delay 0 with an adaptive delay) --------------------------------------


def gathering(**policy: object) -> BatchQueue[str]:
    policy.setdefault("max_batch_size", 8)
    return queue(max_queue_delay_s=0.0, adaptive_delay_s=0.001, **policy)


def test_a_lone_request_is_never_held() -> None:
    q = gathering()
    for i in range(20):
        submit(q, req(str(i), at=float(i)))
        assert names(q.take_batch(float(i), gather=True)) == [str(i)]
    assert q.gather_target == 1


def test_after_a_burst_a_batch_waits_for_the_requests_the_queue_expects() -> None:
    q = gathering()
    submit(q, req("a"), req("b"), req("c"))
    assert names(q.take_batch(0.0, gather=True)) == ["a", "b", "c"]
    assert q.gather_target == 3
    submit(q, req("d", at=1.0))
    assert q.take_batch(1.0, gather=True) is None
    assert q.next_wakeup(1.0) == pytest.approx(1.001)  # never later than the delay
    submit(q, req("e", at=1.0002))
    assert q.take_batch(1.0002, gather=True) is None
    submit(q, req("f", at=1.0003))
    assert names(q.take_batch(1.0003, gather=True)) == ["d", "e", "f"]
    assert q.gather_target == 4  # held and reached: it asks for one more next time


def test_a_held_batch_goes_at_the_delay_with_what_came_and_the_target_falls() -> None:
    q = gathering()
    submit(q, req("a"), req("b"), req("c"), req("d"))
    q.take_batch(0.0, gather=True)
    submit(q, req("e", at=1.0))
    assert q.take_batch(1.0009, gather=True) is None
    assert names(q.take_batch(q.next_wakeup(1.0009) or 0.0, gather=True)) == ["e"]
    assert q.gather_target == 1
    submit(q, req("f", at=2.0))
    assert names(q.take_batch(2.0, gather=True)) == ["f"]  # the lone caller: no wait


def test_a_full_batch_never_waits_for_the_target() -> None:
    q = gathering(max_batch_size=2)
    submit(q, req("a", rows=2))
    assert names(q.take_batch(0.0, gather=True)) == ["a"]


def test_without_gather_the_queue_never_holds() -> None:
    """The scheduler lets a batch gather only for a model whose batches run on the
    event loop: one on a thread gathers while the previous batch runs."""
    q = gathering()
    submit(q, req("a"), req("b"), req("c"))
    q.take_batch(0.0, gather=True)
    submit(q, req("d", at=1.0))
    assert names(q.take_batch(1.0)) == ["d"]


def test_a_queue_delay_keeps_its_meaning_and_the_adaptive_delay_is_unused() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=0.5, adaptive_delay_s=0.001)
    submit(q, req("a", at=1.0))
    assert q.take_batch(1.0, gather=True) is None
    assert q.next_wakeup(1.0) == pytest.approx(1.5)
    assert names(q.take_batch(1.5, gather=True)) == ["a"]



def teach(q: BatchQueue[str], requests: int, at: float = 0.0) -> None:
    """A burst of `requests` one-row requests arriving together: the target rises to it."""
    submit(q, *(req(f"burst{i}", at) for i in range(requests)))
    assert len(names(q.take_batch(at, gather=True))) == requests
    assert q.gather_target == requests


def test_a_lone_caller_whose_requests_change_size_is_never_held() -> None:
    """The target counts requests, not rows: one caller alternating 2-row and 1-row
    requests is alone, and a lone caller never waits."""
    q = gathering()
    for turn in range(20):
        now = 1.0 + turn * 0.01
        submit(q, req(str(turn), now, rows=2 if turn % 2 == 0 else 1))
        assert names(q.take_batch(now, gather=True)) == [str(turn)]
    assert q.gather_target == 1


def test_one_callers_many_rows_do_not_make_another_lone_caller_wait() -> None:
    q = gathering()
    for turn in range(10):
        now = 1.0 + turn * 0.01
        submit(q, req(f"a{turn}", now, rows=7))
        assert names(q.take_batch(now, gather=True)) == [f"a{turn}"]
        submit(q, req(f"b{turn}", now + 0.005))
        assert names(q.take_batch(now + 0.005, gather=True)) == [f"b{turn}"]


def test_requests_of_another_shape_never_hold_a_batch_back() -> None:
    """They can never join it: the target counts the requests that could."""
    q = gathering()
    submit(q, req("x1", shape="x"), req("y1", shape="y"), req("x2", shape="x"))
    submit(q, req("y2", shape="y"))
    assert names(q.take_batch(0.0, gather=True)) == ["x1", "x2"]
    assert names(q.take_batch(0.0, gather=True)) == ["y1", "y2"]


def test_padded_requests_that_cannot_share_a_batch_never_hold_each_other_back() -> None:
    q = gathering(padding=LengthBuckets(max_padding_ratio=1.5))
    for name, length in (("s1", 2), ("l1", 64), ("s2", 2), ("l2", 64)):
        request = req(name)
        request.length = length
        submit(q, request)
    assert names(q.take_batch(0.0, gather=True)) == ["s1", "s2"]
    assert names(q.take_batch(0.0, gather=True)) == ["l1", "l2"]


def test_the_target_never_exceeds_what_the_queue_can_hold() -> None:
    """With room for 2 requests a target of 3 would hold a full queue with the instance
    free, and refuse the next caller QUEUE_FULL."""
    q = gathering(max_queue_size=2)
    teach(q, 2)
    submit(q, req("c", 1.0))
    assert q.take_batch(1.0, gather=True) is None  # held for a second request
    submit(q, req("d", 1.0001))
    assert names(q.take_batch(1.0001, gather=True)) == ["c", "d"]
    submit(q, req("e", 2.0), req("f", 2.0))
    assert names(q.take_batch(2.0, gather=True)) == ["e", "f"]
    assert q.gather_target == 2


def test_a_held_batch_waits_the_delay_from_its_oldest_request_whatever_its_priority() -> None:
    """A higher-priority arrival becomes the head; it must not restart the hold of the
    lower-priority request that came first."""
    q = gathering(priority_levels=2)
    teach(q, 4)
    submit(q, req("low", 1.0, priority=2))
    assert q.take_batch(1.0, gather=True) is None
    submit(q, req("high", 1.0009, priority=1))
    assert q.take_batch(1.0009, gather=True) is None
    assert q.next_wakeup(1.0009) == pytest.approx(1.001)
    assert names(q.take_batch(1.001, gather=True)) == ["high", "low"]


def test_a_request_whose_deadline_comes_before_the_hold_ends_is_not_held() -> None:
    """An instance is free: holding it would fail it for company that may not come. The
    margin covers a timer that fires up to a millisecond late."""
    q = gathering()
    teach(q, 4)
    submit(q, req("short", 1.0, deadline=1.0015))
    assert names(q.take_batch(1.0, gather=True)) == ["short"]
    submit(q, req("patient", 2.0, deadline=2.0025))
    assert q.take_batch(2.0, gather=True) is None


def test_a_held_request_that_leaves_lowers_the_target_and_ends_the_hold() -> None:
    """Its caller cancelled (or it expired) while held: the next batch, which formed at
    once, must not be booked as held, and the next lone request must not wait."""
    q = gathering()
    teach(q, 4)
    lone = req("lone", 1.0)
    submit(q, lone)
    assert q.take_batch(1.0, gather=True) is None
    assert q.discard(lone)
    assert q.gather_target == 1
    submit(q, req("next", 2.0))
    assert names(q.take_batch(2.0, gather=True)) == ["next"]
    submit(q, *(req(name, 3.0) for name in "abcd"))
    assert len(names(q.take_batch(3.0, gather=True))) == 4
    assert q.gather_target == 4  # risen to what came, not booked as held and reached


def test_a_held_request_that_expires_lowers_the_target() -> None:
    q = gathering()
    teach(q, 4)
    submit(q, req("lone", 1.0, deadline=5.0))
    assert q.take_batch(1.0, gather=True) is None
    assert [r.payload for r in q.expire(6.0)] == ["lone"]
    assert q.gather_target == 1

# -- preferred sizes --------------------------------------------------------------------


def test_largest_reachable_preferred_size_dispatches_at_once() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG, preferred_batch_sizes=(2, 4))
    submit(q, req("a"))
    assert q.take_batch(0.0) is None  # no preferred size reachable: wait
    submit(q, req("b"), req("c"))
    assert names(q.take_batch(0.0)) == ["a", "b"]  # 3 queued: 2 is the largest reachable
    submit(q, req("d"), req("e"), req("f"), req("g"))
    assert names(q.take_batch(0.0)) == ["c", "d", "e", "f"]  # 5 queued: 4 wins over 2
    assert q.take_batch(0.0) is None
    assert names(q.take_batch(LONG)) == ["g"]


def test_preferred_size_counts_rows_not_requests() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG, preferred_batch_sizes=(4,))
    submit(q, req("a", rows=3), req("b", rows=2))
    assert q.take_batch(0.0) is None  # 3 then 5 rows: 4 cannot be formed
    assert names(q.take_batch(LONG)) == ["a", "b"]
    submit(q, req("c", rows=3, at=LONG), req("d", rows=1, at=LONG), req("e", at=LONG))
    batch = q.take_batch(LONG)
    assert names(batch) == ["c", "d"] and batch is not None and batch.rows == 4


# -- shape grouping ---------------------------------------------------------------------


def test_different_shapes_are_never_merged_and_the_oldest_group_goes_first() -> None:
    q = queue(max_batch_size=8)
    submit(
        q,
        req("a1", at=0.0, shape=(3,)),
        req("b1", at=0.1, shape=(5,)),
        req("a2", at=0.2, shape=(3,)),
        req("b2", at=0.3, shape=(5,)),
        req("a3", at=0.4, shape=(3,)),
    )
    assert names(q.take_batch(0.5)) == ["a1", "a2", "a3"]
    assert names(q.take_batch(0.5)) == ["b1", "b2"]


def test_other_groups_keep_their_place_in_line() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=1.0)
    submit(q, req("a1", at=0.0, shape="a"), req("b1", at=0.2, shape="b"))
    assert q.take_batch(0.5) is None
    assert q.next_wakeup(0.5) == pytest.approx(1.0)
    assert names(q.take_batch(1.0)) == ["a1"]
    submit(q, req("a2", at=1.1, shape="a"))
    # b1 is now the oldest: its group goes next, and it has waited its delay at 1.2.
    assert q.next_wakeup(1.1) == pytest.approx(1.2)
    assert q.take_batch(1.1) is None
    assert names(q.take_batch(1.2)) == ["b1"]
    assert names(q.take_batch(2.1)) == ["a2"]


def test_a_full_group_is_sent_even_when_other_shapes_wait() -> None:
    q = queue(max_batch_size=2, max_queue_delay_s=LONG)
    submit(q, req("a1", shape="a"), req("b1", shape="b"), req("a2", shape="a"))
    assert names(q.take_batch(0.0)) == ["a1", "a2"]
    assert q.take_batch(0.0) is None
    assert names(q.take_batch(LONG)) == ["b1"]


# -- multi-row requests -----------------------------------------------------------------


def test_multi_row_requests_count_by_rows() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG)
    submit(q, req("a", rows=3), req("b", rows=5))
    assert q.queued_rows == 8 and len(q) == 2
    batch = q.take_batch(0.0)
    assert names(batch) == ["a", "b"] and batch is not None and batch.rows == 8


def test_a_request_that_does_not_fit_waits_for_the_next_batch_and_keeps_its_place() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG)
    submit(q, req("a", rows=5), req("b", rows=4), req("c", rows=1))
    # b does not fit beside a: the batch cannot grow, so it goes now; c does not jump b.
    batch = q.take_batch(0.0)
    assert names(batch) == ["a"] and batch is not None and batch.rows == 5
    assert q.take_batch(0.0) is None
    batch = q.take_batch(LONG)
    assert names(batch) == ["b", "c"] and batch is not None and batch.rows == 5


def test_multi_row_batches_never_exceed_max_batch_size() -> None:
    q = queue(max_batch_size=8)
    for i, rows in enumerate([3, 4, 2, 8, 1, 7, 5, 5]):
        q.submit(req(str(i), rows=rows))
    seen = []
    while (batch := q.take_batch(0.0)) is not None:
        assert batch.rows == sum(r.rows for r in batch.requests) <= 8
        seen.extend(names(batch))
    assert seen == [str(i) for i in range(8)]


@pytest.mark.parametrize("rows", [0, -1, 9])
def test_request_that_can_never_run_is_rejected(rows: int) -> None:
    q = queue(max_batch_size=8)
    with pytest.raises(FerryError) as caught:
        q.submit(req("a", rows=rows))
    assert caught.value.kind is ErrorKind.INVALID_INPUT
    assert f"{rows} rows" in caught.value.message and "1 to 8" in caught.value.message
    assert len(q) == 0 and q.queued_rows == 0


def test_out_of_range_priority_is_rejected() -> None:
    q = queue(priority_levels=2)
    for priority in (0, 3):
        with pytest.raises(FerryError) as caught:
            q.submit(req("a", priority=priority))
        assert caught.value.kind is ErrorKind.INVALID_INPUT
        assert "outside 1..2" in caught.value.message
    assert len(q) == 0


# -- queue bound ------------------------------------------------------------------------


def test_full_queue_rejects_at_once_and_takes_requests_again_when_room_frees() -> None:
    q = queue(max_batch_size=4, max_queue_size=2, max_queue_delay_s=LONG)
    submit(q, req("a"), req("b"))
    with pytest.raises(FerryError) as caught:
        q.submit(req("c"))
    assert caught.value.kind is ErrorKind.QUEUE_FULL
    assert "2 requests" in caught.value.message
    assert len(q) == 2
    assert names(q.take_batch(LONG)) == ["a", "b"]
    q.submit(req("c"))
    assert len(q) == 1


def test_queue_size_zero_means_unbounded() -> None:
    q = queue(max_batch_size=1, max_queue_size=0)
    submit(q, *(req(str(i)) for i in range(2000)))
    assert len(q) == 2000


# -- cancellation and deadlines ---------------------------------------------------------


def test_discard_removes_a_request_and_it_never_runs() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG)
    a, b, c = req("a", rows=2), req("b", rows=3), req("c")
    submit(q, a, b, c)
    assert q.discard(b) is True
    assert len(q) == 2 and q.queued_rows == 3
    assert q.discard(b) is False  # already gone
    assert names(q.take_batch(LONG)) == ["a", "c"]
    assert q.discard(a) is False  # already taken
    assert len(q) == 0 and q.queued_rows == 0


def test_discard_of_a_request_never_queued_is_false() -> None:
    q = queue()
    q.submit(req("a"))
    assert q.discard(req("a")) is False  # an equal-looking but different request
    assert len(q) == 1


def test_expire_returns_expired_requests_and_they_never_appear_in_a_batch() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG, priority_levels=2)
    a = req("a", deadline=1.0)
    b = req("b", deadline=3.0, rows=2)
    c = req("c")
    d = req("d", deadline=0.5, priority=2)
    submit(q, a, b, c, d)
    assert q.next_deadline() == 0.5
    assert q.next_wakeup(0.0) == 0.5
    assert q.expire(0.4) == []
    assert {r.payload for r in q.expire(1.0)} == {"a", "d"}  # a deadline is inclusive
    assert len(q) == 2 and q.queued_rows == 3
    assert q.next_deadline() == 3.0
    assert q.expire(1.0) == []
    assert names(q.take_batch(LONG)) == ["b", "c"]
    assert q.next_deadline() is None


def test_deadline_bookkeeping_survives_discard_and_take() -> None:
    q = queue(max_batch_size=1)
    a, b = req("a", deadline=5.0), req("b", deadline=6.0)
    submit(q, a, b)
    q.discard(a)
    assert q.next_deadline() == 6.0
    assert names(q.take_batch(0.0)) == ["b"]
    assert q.next_deadline() is None
    assert q.expire(10.0) == []


# -- priority ---------------------------------------------------------------------------


def test_priority_level_one_goes_first() -> None:
    q = queue(max_batch_size=1, priority_levels=3)
    submit(
        q,
        req("low", at=0.0, priority=3),
        req("mid", at=0.1, priority=2),
        req("high", at=0.2, priority=1),
        req("high2", at=0.3, priority=1),
    )
    order = [names(q.take_batch(0.4))[0] for _ in range(4)]
    assert order == ["high", "high2", "mid", "low"]


def test_priority_orders_requests_inside_a_batch() -> None:
    q = queue(max_batch_size=2, priority_levels=2)
    submit(q, req("low", priority=2), req("high1", at=0.1), req("high2", at=0.2))
    assert names(q.take_batch(0.3)) == ["high1", "high2"]
    assert names(q.take_batch(0.3)) == ["low"]


def test_an_old_low_priority_request_ages_ahead_of_every_level() -> None:
    q = queue(max_batch_size=1, priority_levels=2, priority_aging_s=1.0)
    submit(q, req("low", at=0.0, priority=2), req("h1", at=0.5), req("h2", at=0.6))
    assert names(q.take_batch(0.7)) == ["h1"]  # not aged yet: level 1 first
    assert names(q.take_batch(1.0)) == ["low"]  # waited 1.0 s: it goes before h2
    assert names(q.take_batch(1.0)) == ["h2"]


def test_aged_requests_go_oldest_first_whatever_their_level() -> None:
    q = queue(max_batch_size=1, priority_levels=2, priority_aging_s=1.0)
    submit(q, req("high", at=0.0), req("low", at=0.5, priority=2))
    # Both have waited longer than the aging time: the older one goes first.
    assert names(q.take_batch(2.0)) == ["high"]
    assert names(q.take_batch(2.0)) == ["low"]


def test_without_aging_low_priority_waits_behind_every_higher_request() -> None:
    q = queue(max_batch_size=1, priority_levels=2)
    q.submit(req("low", at=0.0, priority=2))
    for i in range(5):
        q.submit(req(f"h{i}", at=100.0 + i))
    order = [names(q.take_batch(1000.0))[0] for _ in range(6)]
    assert order[-1] == "low"


def test_next_wakeup_includes_the_moment_a_low_priority_request_ages() -> None:
    q = queue(max_batch_size=4, max_queue_delay_s=5.0, priority_levels=2, priority_aging_s=1.0)
    submit(q, req("low", at=0.0, priority=2, shape="x"), req("high", at=0.5, shape="y"))
    assert q.take_batch(0.6) is None
    assert q.next_wakeup(0.6) == pytest.approx(1.0)  # low ages at 1.0 and becomes the head
    assert q.take_batch(1.0) is None
    # Once aged, the wakeup is the new head's delay, never a time already past
    # (a past time would make the dispatcher spin).
    assert q.next_wakeup(1.0) == pytest.approx(5.0)
    assert names(q.take_batch(5.0)) == ["low"]
    assert names(q.take_batch(5.5)) == ["high"]


# -- drain ------------------------------------------------------------------------------


def test_drain_returns_everything_and_empties_the_queue() -> None:
    q = queue(max_batch_size=8, max_queue_delay_s=LONG, priority_levels=2)
    submit(
        q,
        req("a", priority=2, deadline=9.0),
        req("b", rows=3),
        req("c", shape="other"),
    )
    drained = q.drain()
    assert sorted(r.payload for r in drained) == ["a", "b", "c"]
    assert len(q) == 0 and q.queued_rows == 0
    assert q.next_deadline() is None and q.next_wakeup(0.0) is None
    assert q.take_batch(LONG) is None and q.expire(LONG) == []
    q.submit(req("d"))  # still usable
    assert names(q.take_batch(LONG)) == ["d"]


# -- invariants under random traffic ----------------------------------------------------

_events = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.integers(1, 4),  # rows
            st.sampled_from(["x", "y"]),  # shape
            st.integers(1, 2),  # priority
            st.one_of(st.none(), st.floats(0.0, 3.0)),  # deadline offset
        ),
        st.tuples(st.just("advance"), st.floats(0.0, 1.0)),
        st.tuples(st.just("take")),
        st.tuples(st.just("discard"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    events=_events,
    max_batch_size=st.integers(4, 6),
    delay=st.sampled_from([0.0, 0.3, 1.0]),
    preferred=st.sampled_from([(), (2,), (2, 4)]),
    aging=st.sampled_from([None, 0.5]),
    adaptive=st.sampled_from([0.0, 0.4]),
    gather=st.booleans(),
)
def test_invariants_under_random_traffic(
    events: list[tuple[object, ...]],
    max_batch_size: int,
    delay: float,
    preferred: tuple[int, ...],
    aging: float | None,
    adaptive: float,
    gather: bool,
) -> None:
    q: BatchQueue[int] = BatchQueue(
        BatchPolicy(
            max_batch_size=max_batch_size,
            max_queue_delay_s=delay,
            preferred_batch_sizes=preferred,
            priority_levels=2,
            priority_aging_s=aging,
            adaptive_delay_s=adaptive,
        )
    )
    now = 0.0
    submitted: list[PendingRequest[int]] = []
    outcome: dict[int, str] = {}

    def step() -> None:
        for r in q.expire(now):
            assert r.deadline_s is not None and r.deadline_s <= now
            assert r.payload not in outcome
            outcome[r.payload] = "expired"
        while (batch := q.take_batch(now, gather)) is not None:
            assert batch.requests
            assert batch.rows == sum(r.rows for r in batch.requests) <= max_batch_size
            assert len({r.shape_key for r in batch.requests}) == 1
            for r in batch.requests:
                assert r.payload not in outcome
                outcome[r.payload] = "ran"
        wakeup = q.next_wakeup(now)
        if len(q):
            # Waiting must end by itself, and never in the past (that would spin).
            assert wakeup is not None and wakeup > now
        else:
            assert wakeup is None

    for event in events:
        kind = event[0]
        if kind == "submit":
            _, rows, shape, priority, offset = event
            r: PendingRequest[int] = PendingRequest(
                payload=len(submitted), rows=rows, shape_key=shape, arrival_s=now,  # type: ignore[arg-type]
                deadline_s=None if offset is None else now + offset,  # type: ignore[operator]
                priority=priority,  # type: ignore[arg-type]
            )
            submitted.append(r)
            q.submit(r)
        elif kind == "advance":
            now += event[1]  # type: ignore[operator]
        elif kind == "take":
            step()
        elif kind == "discard" and submitted:
            r = submitted[event[1] % len(submitted)]  # type: ignore[operator]
            if q.discard(r):
                assert r.payload not in outcome
                outcome[r.payload] = "discarded"
        assert len(q) == len(submitted) - len(outcome)
        assert q.queued_rows == sum(r.rows for r in submitted if r.payload not in outcome)

    # Waking when asked lets everything finish: nothing is stranded.
    for _ in range(1000):
        step()
        wakeup = q.next_wakeup(now)
        if wakeup is None:
            break
        now = wakeup
    assert len(q) == 0
    assert set(outcome) == {r.payload for r in submitted}
