"""The batching core: which queued requests run together, and when.

Pure Python over plain data. It imports neither grpc nor onnxruntime and owns no clock:
every call takes `now` (monotonic seconds), so each policy decision is a plain function
call in a test.

The event loop / executor boundary: batches are formed on the asyncio event loop by
`server.scheduler`, which asks this queue for a batch whenever an executor is free, and
hands only the model execution to that executor's worker thread (`server.executor`). A
batch is therefore not sealed until an executor is free, and keeps growing while the model
is busy.

Rules, in Triton's vocabulary:
- Size is counted in rows along axis 0, never in requests; a batch never exceeds
  `max_batch_size` rows. A request that does not fit waits for the next batch and keeps
  its place in line.
- Requests whose non-batch shapes differ (their `shape_key`) never share a batch. The
  oldest request in priority order decides the group of the next batch.
- A model that pads variable-length inputs (`BatchPolicy.padding`) leaves the padded
  axis out of its shape keys and gives each request its `length` along it: the batch is
  padded to the bucket of its longest request, and a request joins only if the batch's
  padded elements stay within `max_padding_ratio` times its real ones, or if it would be
  padded to the batch's length alone too (so short requests under the smallest bucket,
  and requests of length 0, share a batch). One that would not is passed over, keeps its
  place in line, and goes in a later batch.
- A batch is dispatched when it is full, when a preferred size can be formed (the
  largest one that can), when the oldest request has waited `max_queue_delay_s`, or at
  once when that delay is 0: an idle server adds no wait. With delay 0 and
  `adaptive_delay_s`, a batch the caller lets gather (`take_batch(gather=True)`) waits
  for the requests its `GatherTarget` expects, at most `adaptive_delay_s` after its
  oldest request arrived, and never past a queued request's deadline; the target starts
  at one request, so a lone caller never waits.
- Priority level 1 is the highest. A request that has waited `priority_aging_s` is
  served ahead of every level, oldest first, so low levels are never starved.
- Expired requests are removed before any batch forms and handed back to the caller.
- A full queue rejects a new request at once; nothing ever waits for room.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import ErrorKind, FerryError
from .gathering import GatherTarget
from .padding import LengthBuckets

P = TypeVar("P")

# How late a wake-up may come: the event loops count timers in whole milliseconds
# (server.event_loop.timer_delay rounds up). A held batch whose requests could expire
# within that of the end of the hold is not held.
HOLD_DEADLINE_MARGIN_S = 0.001


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's queue forms batches. Times are in seconds."""

    max_batch_size: int
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0  # requests; 0 means unbounded
    priority_levels: int = 1
    priority_aging_s: float | None = None
    padding: LengthBuckets | None = None  # None: only equal shapes share a batch
    # With max_queue_delay_s 0: the longest a batch may wait for the requests it expects
    # (server.gathering); 0 never waits.
    adaptive_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
        if self.adaptive_delay_s < 0:
            raise ValueError(f"adaptive_delay_s must be >= 0, got {self.adaptive_delay_s}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"preferred batch size {size} is outside 1..{self.max_batch_size}"
                )
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.priority_levels < 1:
            raise ValueError(f"priority_levels must be at least 1, got {self.priority_levels}")
        if self.priority_aging_s is not None and self.priority_aging_s < 0:
            raise ValueError(f"priority_aging_s must be >= 0, got {self.priority_aging_s}")


@dataclass(slots=True, eq=False)
class PendingRequest(Generic[P]):
    """One queued request. `payload` is opaque to the core."""

    payload: P
    rows: int
    shape_key: Hashable
    arrival_s: float
    deadline_s: float | None = None
    priority: int = 1
    length: int = 0  # along the padded axis, when the model pads
    sequence: int = field(default=0, init=False)
    queued: bool = field(default=False, init=False)


@dataclass(slots=True)
class Batch(Generic[P]):
    requests: list[PendingRequest[P]]
    rows: int
    formed_s: float


class BatchQueue(Generic[P]):
    """The queue of one model, answering "send these rows now" or "wait until then"."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._levels: list[deque[PendingRequest[P]]] = [
            deque() for _ in range(policy.priority_levels)
        ]
        self._count = 0
        self._rows = 0
        self._with_deadline = 0
        self._sequence = itertools.count()
        # Deadlines of queued requests, earliest first. Entries of requests that have left
        # are dropped when they reach the top (or in a rebuild), so that neither expiry nor
        # the next wake-up scans the whole queue on every dispatch.
        self._deadlines: list[tuple[float, int, PendingRequest[P]]] = []
        gathers = policy.max_queue_delay_s == 0 and policy.adaptive_delay_s > 0
        most = policy.max_batch_size
        if policy.max_queue_size:
            most = min(most, policy.max_queue_size)
        self._gather = GatherTarget(most) if gathers else None
        self._holding = False  # the head was held for the gather target
        self._hold_until = 0.0  # while holding: when the held batch goes anyway

    def __len__(self) -> int:
        return self._count

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def gather_target(self) -> int:
        """The requests a batch that may gather waits for (1 when the policy never waits)."""
        return self._gather.requests if self._gather is not None else 1

    def submit(self, request: PendingRequest[P]) -> None:
        """Queue a request, or raise FerryError if it can never run or there is no room."""
        policy = self.policy
        if request.rows < 1 or request.rows > policy.max_batch_size:
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"request has {request.rows} rows; this model takes 1 to "
                f"{policy.max_batch_size} rows per request",
            )
        if policy.max_queue_size and self._count >= policy.max_queue_size:
            raise FerryError(
                ErrorKind.QUEUE_FULL,
                f"queue is full ({policy.max_queue_size} requests waiting); retry later",
            )
        if not 1 <= request.priority <= policy.priority_levels:
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"priority {request.priority} is outside 1..{policy.priority_levels}",
            )
        request.sequence = next(self._sequence)
        request.queued = True
        self._levels[request.priority - 1].append(request)
        self._count += 1
        self._rows += request.rows
        if request.deadline_s is not None:
            self._with_deadline += 1
            heapq.heappush(self._deadlines, (request.deadline_s, request.sequence, request))
            if len(self._deadlines) > 4 * self._with_deadline + 64:
                self._deadlines = [entry for entry in self._deadlines if entry[2].queued]
                heapq.heapify(self._deadlines)

    def discard(self, request: PendingRequest[P]) -> bool:
        """Remove a request nobody waits for any more; False if it was not queued."""
        try:
            self._levels[request.priority - 1].remove(request)
        except ValueError:
            return False
        self._forget(request)
        self._left_while_holding()
        return True

    def expire(self, now: float) -> list[PendingRequest[P]]:
        """Remove and return the requests whose deadline has passed."""
        earliest = self.next_deadline()
        if earliest is None or earliest > now:
            return []
        expired: list[PendingRequest[P]] = []
        for index, level in enumerate(self._levels):
            if not any(r.deadline_s is not None and r.deadline_s <= now for r in level):
                continue
            keep: deque[PendingRequest[P]] = deque()
            for request in level:
                if request.deadline_s is not None and request.deadline_s <= now:
                    expired.append(request)
                else:
                    keep.append(request)
            self._levels[index] = keep
        for request in expired:
            self._forget(request)
        if expired:
            self._left_while_holding()
        return expired

    def take_batch(self, now: float, gather: bool = False) -> Batch[P] | None:
        """The batch to run now that an executor is free, or None to wait.

        `gather`: the caller lets a batch with no queue delay wait for the requests its
        target expects (the policy's `adaptive_delay_s` at most). Call `expire(now)`
        first: this method does not look at deadlines.
        """
        if not self._count:
            return None
        policy = self.policy
        levels = self._levels
        # One level: its deque is the order, without a generator over it.
        ordered = iter(levels[0]) if len(levels) == 1 else self._in_order(now)
        head = next(ordered)
        candidate = [head]
        rows = head.rows
        blocked = False  # a same-shape request is waiting that does not fit
        if policy.padding is not None:
            rows, blocked = self._padded_candidate(policy.padding, candidate, ordered)
        else:
            for request in ordered:
                if request.shape_key != head.shape_key:
                    continue
                if rows + request.rows > policy.max_batch_size:
                    blocked = True
                    break
                candidate.append(request)
                rows += request.rows

        take = 0
        joining = len(candidate)
        target = self._gather if gather else None
        if rows == policy.max_batch_size or blocked:
            take = joining
        elif policy.max_queue_delay_s == 0:
            if target is not None and target.wants_more(joining):
                until = min(r.arrival_s for r in candidate) + policy.adaptive_delay_s
                if now >= until:
                    self._holding = True  # it waited the whole delay: what came is all
                elif self._deadline_before(until):
                    # A request would expire while held: the batch goes now, and says
                    # nothing about how many callers there are.
                    target = None
                else:
                    self._holding = True
                    self._hold_until = until
                    return None
            take = joining
        else:
            take = self._preferred_prefix(candidate)
            # Compared as next_wakeup computes it, so that waking at that time always
            # dispatches (now - arrival can round below the delay).
            if not take and now >= head.arrival_s + policy.max_queue_delay_s:
                take = len(candidate)
        if not take:
            return None
        if take == joining:
            chosen = candidate
        else:
            chosen = candidate[:take]
            rows = sum(r.rows for r in chosen)
        for request in chosen:
            levels[request.priority - 1].remove(request)
            self._forget(request)
        if target is not None:
            target.batch_formed(joining, self._holding)
        self._holding = False
        return Batch(chosen, rows, now)

    def next_wakeup(self, now: float) -> float | None:
        """When the answer of take_batch or expire may change without a new submit."""
        if not self._count:
            return None
        times: list[float] = []
        deadline = self.next_deadline()
        if deadline is not None:
            times.append(deadline)
        if self._holding:
            times.append(self._hold_until)
        else:
            head = next(self._in_order(now))
            times.append(head.arrival_s + self.policy.max_queue_delay_s)
        aging = self.policy.priority_aging_s
        if aging is not None and len(self._levels) > 1:
            # A lower-level request that ages into first place may change the next batch;
            # those already aged changed it before now (a past time would spin the caller).
            for level in self._levels[1:]:
                for request in level:
                    if request.arrival_s + aging > now:
                        times.append(request.arrival_s + aging)
                        break
        return min(times)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a queued request, if any has one."""
        deadlines = self._deadlines
        while deadlines and not deadlines[0][2].queued:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def drain(self) -> list[PendingRequest[P]]:
        """Remove and return every queued request, oldest first within each level."""
        everything = [r for level in self._levels for r in level]
        for level in self._levels:
            level.clear()
        for request in everything:
            request.queued = False
        self._deadlines.clear()
        self._count = self._rows = self._with_deadline = 0
        self._holding = False
        return everything

    def _deadline_before(self, until: float) -> bool:
        """Whether a queued request's deadline comes before a batch held until `until`
        would go (its timer may fire up to HOLD_DEADLINE_MARGIN_S late)."""
        deadline = self.next_deadline()
        return deadline is not None and deadline <= until + HOLD_DEADLINE_MARGIN_S

    def _left_while_holding(self) -> None:
        """Requests left the queue (cancelled or expired): if a batch was held and the
        queue is now empty, the requests it waited for are not coming."""
        if self._holding and not self._count:
            self._holding = False
            if self._gather is not None:
                self._gather.abandoned()

    def _forget(self, request: PendingRequest[P]) -> None:
        request.queued = False
        self._count -= 1
        self._rows -= request.rows
        if request.deadline_s is not None:
            self._with_deadline -= 1

    def _in_order(self, now: float) -> Iterator[PendingRequest[P]]:
        """Queued requests in service order: aged ones first, then by level and age."""
        levels = self._levels
        aging = self.policy.priority_aging_s
        if len(levels) == 1:
            yield from levels[0]
            return
        aged: list[PendingRequest[P]] = []
        if aging is not None:
            # Every level, the first included: an aged level-1 request is older than a
            # younger aged lower-level one and must not be passed by it.
            for level in levels:
                for request in level:
                    if request.arrival_s + aging > now:
                        break  # arrivals within a level are in order
                    aged.append(request)
            aged.sort(key=lambda r: r.sequence)
            yield from aged
        seen = {id(r) for r in aged}
        for level in levels:
            for request in level:
                if id(request) not in seen:
                    yield request

    def _padded_candidate(
        self,
        buckets: LengthBuckets,
        candidate: list[PendingRequest[P]],
        ordered: Iterator[PendingRequest[P]],
    ) -> tuple[int, bool]:
        """Grow `candidate` (the head alone) with the requests of its group, in order, that
        keep the batch's padding within bounds; returns its rows and whether a request of
        the group is waiting that does not fit in rows."""
        head = candidate[0]
        rows = head.rows
        longest = head.length
        target = buckets.padded_length(longest)
        real = head.rows * head.length
        limit = self.policy.max_batch_size
        for request in ordered:
            if request.shape_key != head.shape_key:
                continue
            if rows + request.rows > limit:
                return rows, True
            joined_real = real + request.rows * request.length
            joined_longest = max(longest, request.length)
            # A request padded to the batch's length alone too (lengths under the smallest
            # bucket, or 0) adds no padding that it would not run with anyway, and makes
            # no batch-mate longer: it joins whatever the ratio says.
            if buckets.padded_length(request.length) != target and not buckets.fits(
                rows + request.rows, joined_longest, joined_real
            ):
                continue  # too short or too long for this batch: it waits for its own
            candidate.append(request)
            rows += request.rows
            real = joined_real
            longest = joined_longest
            target = buckets.padded_length(longest)
        return rows, False

    def _preferred_prefix(self, candidate: list[PendingRequest[P]]) -> int:
        """Requests in the longest prefix whose rows make a preferred size, or 0."""
        preferred = self.policy.preferred_batch_sizes
        if not preferred:
            return 0
        best = 0
        rows = 0
        for count, request in enumerate(candidate, start=1):
            rows += request.rows
            if rows in preferred:
                best = count
        return best
