"""How many requests the next batch of a model with no queue delay waits for.

A model configured with `max_queue_delay_microseconds: 0` sends a batch as soon as an
instance is free. When its batches take microseconds and run on the event loop, that is a
batch of whatever arrived in one turn of the loop: one to three requests under load, each
paying the per-batch work and its share of the loop's wake-ups. Yet a busy server's callers
are waiting for answers and send their next requests when answered, so requests come back
together, and a batch that waits for the requests it can expect costs them little latency
and the server much less CPU per request (benchmarks/README.md, "Gathering").

The target counts requests, not rows: what is coming is callers, and one caller's request
of many rows must not make the next lone request wait for company. It starts at one
request, so a lone caller never waits. It rises to the requests that could join the batch
when more are there than it asked for (the load is there), and by one when a held batch
reached it (they came). When a held batch waited the whole adaptive delay without reaching
it, or its requests left while it was held, the target falls to what was there and rises
past that level again only once in `PROBE_EVERY` batches: callers that stop or slow down
cost at most one delay, and a steady set of callers one delay every `PROBE_EVERY` batches.

Pure bookkeeping over request counts: the batching core (`server.batching`) decides with it.
"""

from __future__ import annotations

# Batches that reach a target at its ceiling before the target tries one request more.
PROBE_EVERY = 16


class GatherTarget:
    """The requests the next batch waits for, learned from the batches before it."""

    __slots__ = ("_at_ceiling", "_ceiling", "limit", "requests")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        # The most requests one batch can hold: max_batch_size, and no more than the
        # queue may hold (a target above that would hold a full queue for ever).
        self.limit = limit
        self.requests = 1
        # The target that timed out last; None once more requests came than asked for.
        self._ceiling: int | None = None
        self._at_ceiling = 0

    def wants_more(self, joining: int) -> bool:
        """Whether a batch that `joining` queued requests could form now should wait."""
        return joining < self.requests

    def batch_formed(self, joining: int, held: bool) -> None:
        """A batch leaves that `joining` queued requests could join (it takes them, or as
        many as fit); `held`: its first request was held for this target before."""
        if joining < self.requests:  # it waited the whole delay for requests that did not come
            self.requests = self._ceiling = max(1, joining)
            self._at_ceiling = 0
        elif joining > self.requests:
            self.requests = min(self.limit, joining)
            self._ceiling = None
        elif held:  # exactly the requests it waited for came: try one more
            if self._ceiling is None:
                self.requests = min(self.limit, self.requests + 1)
                return
            self._at_ceiling += 1
            if self._at_ceiling >= PROBE_EVERY:
                self._at_ceiling = 0
                self.requests = min(self.limit, self.requests + 1)

    def abandoned(self) -> None:
        """A held batch's requests all left before it formed (cancelled or expired): the
        requests it waited for did not come."""
        self.batch_formed(0, held=True)
