"""When the served encoders send a batch to the model: BentoML's dispatcher with a policy that fills batches.

BentoML's `CorkDispatcher` runs one batch at a time and sends whatever is queued the moment the
model is free, unless its cost model says that waiting pays; with a per-item cost of tens of
milliseconds it never does. Clients that each wait for their answer before they ask again then
split into a batch of one (the request that arrived while the model was busy) and a batch of all
the others (who arrive milliseconds after it was sent), round after round, and the model spends
every other call on one item.

`FillingDispatcher` runs one batch per lane (`clipflow.serve.encoder`) and waits, once a lane is
free, while requests keep arriving: the answers to one batch come back as the next, and it fills
up. With one batch in each lane, a lane's clients read their answers and send their next requests
while the other lanes compute, where a single batch across all lanes left every core but the
event loop's idle for that turnaround (6% of the time with 16 clients on ViT-B-32 images). See the
bench_serve section of benchmarks/README.md for the numbers.

A request whose items would wait longer than the dispatcher's max latency behind those already
queued is refused when it arrives, before any of its work is done, rather than cancelled once it
has waited that long: `Overloaded` says for how long, and `clipflow.serve.http.ShedMiddleware`
answers it with a 503 that says so and a `Retry-After` header.

`clipflow.serve.bentoml_patches.install()` makes BentoML's service app build this dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from contextvars import ContextVar
from typing import Any

from bentoml.exceptions import ServiceUnavailable

from clipflow.serve.bentoml_patches import CorkDispatcher, NonBlockSema

# Set for each request by `clipflow.serve.http.ShedMiddleware`; a refused request leaves its
# `Overloaded` here, since BentoML answers every 5xx exception with one generic message.
SHED: ContextVar[list[Overloaded] | None] = ContextVar("clipflow_shed", default=None)


class Overloaded(ServiceUnavailable):
    """A request refused for the load, with the seconds after which a retry would be served."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"the server is busy: {message}; retry after {retry_after_s} s")

    @classmethod
    def on_arrival(cls, items: int, wait_s: float, max_latency_s: float, retry_after_s: int) -> Overloaded:
        """Its items would wait `wait_s` for the model, past the max latency."""
        return cls(
            f"this request's {items} items would wait about {wait_s:.1f} s for the model, "
            f"more than serve.batch_max_latency_ms = {max_latency_s * 1000:.0f}",
            retry_after_s,
        )

    @classmethod
    def after_waiting(cls, items: int, max_latency_s: float, retry_after_s: int) -> Overloaded:
        """It waited the max latency and none of its items reached the model: the estimate was low."""
        return cls(
            f"this request's {items} items waited serve.batch_max_latency_ms = {max_latency_s * 1000:.0f} "
            "without reaching the model",
            retry_after_s,
        )


class FillingDispatcher(CorkDispatcher):
    """Runs up to `lanes` batches at once, each of at most `max_batch_size` items.

    When the free lanes can all be given full batches, they are, at once. Otherwise the free lanes
    wait while requests keep arriving, and once none has arrived for LINGER seconds, what is queued
    is spread evenly over them, so a lone request of several items uses every free lane.

    Each batch's seconds per item feed a moving average, the expected wait of a new request is
    the queued items and its own over the lanes at that rate, and a request that would wait
    longer than the max latency is refused with `Overloaded`. One still queued that long with
    none of its items sent (the estimate was low) is dropped and refused the same way, with its own
    message; once a request's first items are computed, the rest is never dropped.
    """

    # Requests that answer a batch arrive a few milliseconds apart; a gap of two polls means the
    # rest are not coming soon. A lone request on an idle model waits this long.
    LINGER = 0.02
    # BentoML polls every millisecond by default while a batch runs and requests wait; every poll
    # takes the GIL from the lanes' forward passes, which a slower poll leaves to them.
    TICKET_INTERVAL = 0.01
    # Weight of the latest batch in the moving average of seconds per item.
    RATE_WEIGHT = 0.2

    def __init__(self, *args: Any, lanes: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Its count is the free lanes; BentoML's outbound_call releases it when a batch ends.
        self._sema = NonBlockSema(lanes)
        self._lanes = lanes
        self._free_since = 0.0
        self._item_seconds = 0.0  # none measured yet: nothing is refused before the first batch
        self._computing = 0  # items in the batches sent to the lanes and not yet answered

    def expected_wait(self, items: int) -> float:
        """Seconds until `items` more would be computed, behind what is computing and queued, at the measured rate."""
        queued = sum(self.get_batch_size(job.data) for job in self._queue)
        return (self._computing + queued + items) * self._item_seconds / self._lanes

    async def inbound_call(self, data: Any) -> Any:
        items = self.get_batch_size(data)
        wait = self.expected_wait(items)
        if wait > self.max_latency:
            raise self._refuse(Overloaded.on_arrival(items, wait, self.max_latency, self._retry_after()))
        try:
            return await super().inbound_call(data)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the request itself is being cancelled: its client has gone
            # The controller dropped it unstarted at the max latency.
            raise self._refuse(Overloaded.after_waiting(items, self.max_latency, self._retry_after())) from None

    def _retry_after(self) -> int:
        """Once the queue ahead has drained, a request would be next."""
        return max(1, math.ceil(self.expected_wait(0)))

    @staticmethod
    def _refuse(refusal: Overloaded) -> Overloaded:
        notices = SHED.get()
        if notices is not None:
            notices.append(refusal)
        return refusal

    async def controller(self) -> None:
        while True:
            async with self._wake_event:  # until a request is queued
                await self._wake_event.wait_for(self._queue.__len__)
            now = time.time()
            head = self._queue[0]
            if not head.dispatch_time and now - head.enqueue_time >= self.max_latency:
                self._queue.popleft().future.cancel()
                continue
            if self._sema.is_locked():
                await asyncio.sleep(self.TICKET_INTERVAL)
                continue
            queued = sum(self.get_batch_size(job.data) for job in self._queue)
            free_lanes = self._sema.sema
            if queued >= self.max_batch_size * free_lanes:
                self._send(self.max_batch_size)
                continue
            quiet = now - max(self._free_since, self._queue[-1].enqueue_time)
            if quiet < self.LINGER:
                # Look again at the next arrival, which may fill the batches, rather than a poll later.
                async with self._wake_event:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake_event.wait(), self.LINGER - quiet)
                continue
            self._send(-(-queued // free_lanes))

    def _send(self, size: int) -> None:
        """Start a batch of up to `size` queued items in a free lane (splitting a request if needed)."""
        self._sema.acquire()
        inputs = tuple(self._get_inputs(size))
        # Counted from now, not when the task starts: a request arriving meanwhile waits behind them.
        self._computing += sum(self.get_batch_size(job.data) for job in inputs)
        self._loop.create_task(self.outbound_call(inputs))

    def split_job(self, job: Any, split_indexes: list[int]) -> tuple[Any, Any]:
        """BentoML's split of a request over two batches, the rest marked as started, never to be cancelled."""
        first, rest = super().split_job(job, split_indexes)
        # The rest keeps the request's arrival time: waiting behind its own first part, it would
        # otherwise be cancelled after most of its work was done.
        rest.dispatch_time = time.time()
        return first, rest

    async def outbound_call(self, inputs_info: tuple, training: bool = False) -> None:
        started = time.time()
        items = sum(self.get_batch_size(job.data) for job in inputs_info)
        try:
            await super().outbound_call(inputs_info, training)
        finally:
            self._computing -= items
        self._free_since = time.time()
        per_item = (self._free_since - started) / max(1, items)
        weight = self.RATE_WEIGHT if self._item_seconds else 1.0
        self._item_seconds += weight * (per_item - self._item_seconds)
