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

`clipflow.serve.bentoml_patches.install()` makes BentoML's service app build this dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from clipflow.serve.bentoml_patches import CorkDispatcher, NonBlockSema


class FillingDispatcher(CorkDispatcher):
    """Runs up to `lanes` batches at once, each of at most `max_batch_size` items.

    When the free lanes can all be given full batches, they are, at once. Otherwise the free lanes
    wait while requests keep arriving, and once none has arrived for LINGER seconds, what is queued
    is spread evenly over them, so a lone request of several items uses every free lane. A request
    queued longer than the dispatcher's max latency is cancelled, which BentoML answers with 503.
    """

    # Requests that answer a batch arrive a few milliseconds apart; a gap of two polls means the
    # rest are not coming soon. A lone request on an idle model waits this long.
    LINGER = 0.02
    # BentoML polls every millisecond by default while a batch runs and requests wait; every poll
    # takes the GIL from the lanes' forward passes. At 10 ms a ViT-B-32 text batch of 8 took 395 ms
    # in the server against 503 ms at 1 ms.
    TICKET_INTERVAL = 0.01

    def __init__(self, *args: Any, lanes: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Its count is the free lanes; BentoML's outbound_call releases it when a batch ends.
        self._sema = NonBlockSema(lanes)
        self._free_since = 0.0

    async def controller(self) -> None:
        while True:
            async with self._wake_event:  # until a request is queued
                await self._wake_event.wait_for(self._queue.__len__)
            now = time.time()
            if now - self._queue[0].enqueue_time >= self.max_latency:
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
        self._loop.create_task(self.outbound_call(tuple(self._get_inputs(size))))

    async def outbound_call(self, inputs_info: tuple, training: bool = False) -> None:
        await super().outbound_call(inputs_info, training)
        self._free_since = time.time()
