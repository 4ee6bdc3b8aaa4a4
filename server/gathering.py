"""How many rows the next batch of a model with no queue delay waits for.

A model configured with `max_queue_delay_microseconds: 0` sends a batch as soon as an
instance is free. When its batches take microseconds and run on the event loop, that is a
batch of whatever arrived in one turn of the loop: one to three requests under load, each
paying the per-batch work and its share of the loop's wake-ups. Yet a busy server's callers
are waiting for answers and send their next requests when answered, so requests come back
together, and a batch that waits for the rows it can expect costs them little latency and
the server much less CPU per request (benchmarks/README.md, "Gathering").

The target starts at one row, so a lone caller never waits. It rises to the rows queued
when more are queued than it asked for (the load is there), and by one when a held batch
reached it (the rows came). When a held batch waited the whole adaptive delay without
reaching it, the target falls to what was queued and rises past that level again only once
in `PROBE_EVERY` batches: callers that stop or slow down cost at most one delay, and a
steady set of callers one delay every `PROBE_EVERY` batches.

Pure bookkeeping over row counts: the batching core (`server.batching`) decides with it.
"""

from __future__ import annotations

# Batches that reach a target at its ceiling before the target tries one row more.
PROBE_EVERY = 16


class GatherTarget:
    """The rows the next batch waits for, learned from the batches before it."""

    __slots__ = ("_at_ceiling", "_ceiling", "limit", "rows")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit  # the model's max_batch_size
        self.rows = 1
        # The target that timed out last; None once more rows were queued than asked for.
        self._ceiling: int | None = None
        self._at_ceiling = 0

    def wants_more(self, queued_rows: int) -> bool:
        return queued_rows < self.rows

    def batch_formed(self, queued_rows: int, held: bool) -> None:
        """A batch leaves while `queued_rows` rows are queued (its own and any others);
        `held`: its first request was held for this target before."""
        if queued_rows < self.rows:  # it waited the whole delay for rows that did not come
            self.rows = self._ceiling = max(1, queued_rows)
            self._at_ceiling = 0
        elif queued_rows > self.rows:
            self.rows = min(self.limit, queued_rows)
            self._ceiling = None
        elif held:  # exactly the rows it waited for came: try one more
            if self._ceiling is None:
                self.rows = min(self.limit, self.rows + 1)
                return
            self._at_ceiling += 1
            if self._at_ceiling >= PROBE_EVERY:
                self._at_ceiling = 0
                self.rows = min(self.limit, self.rows + 1)
