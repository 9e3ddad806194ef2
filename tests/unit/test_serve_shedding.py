"""Shedding in the batch dispatcher: refuse on arrival what would wait too long, never cancel work begun."""

from __future__ import annotations

import asyncio
import time

import pytest

from clipflow.serve.dispatch import SHED, FillingDispatcher, Overloaded


def _dispatcher(max_latency_ms: int, lanes: int = 1) -> FillingDispatcher:
    dispatcher = FillingDispatcher(
        max_latency_in_ms=max_latency_ms,
        max_batch_size=4,
        fallback=lambda: "cancelled",
        get_batch_size=len,
        lanes=lanes,
    )
    dispatcher.LINGER = 0.0
    return dispatcher


def test_a_request_that_would_wait_past_the_max_latency_is_refused_on_arrival_with_a_retry_time():
    seconds_per_item = 0.05

    async def scenario() -> tuple[list, list[Overloaded], list]:
        computed: list[list[str]] = []

        async def model(batch):
            await asyncio.sleep(seconds_per_item * sum(map(len, batch)))
            computed.append([item for part in batch for item in part])
            return batch

        dispatcher = _dispatcher(max_latency_ms=500, lanes=2)
        call = dispatcher(model)
        assert await call(list("ab")) == list("ab")  # measures the rate: 0.05 s an item
        refusals: list[Overloaded] = []
        SHED.set(refusals)
        admitted = [asyncio.ensure_future(call(list("cdefgh")))]  # about 0.15 s behind nothing
        await asyncio.sleep(0)
        admitted.append(asyncio.ensure_future(call(list("ijklmnop"))))  # about 0.35 s
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as raised:
            await call(list("qrstuvwxyz"))  # about 0.6 s: past 0.5 s
        assert refusals == [raised.value]
        answers = await asyncio.gather(*admitted)
        return answers, refusals, computed

    answers, refusals, computed = asyncio.run(scenario())
    assert answers == [list("cdefgh"), list("ijklmnop")]
    assert "qrstuvwxyz" not in "".join(item for batch in computed for item in batch)  # no work done for it
    (refusal,) = refusals
    assert refusal.retry_after_s >= 1
    assert refusal.error_code == 503
    assert "this request's 10 items would wait about" in refusal.message
    assert "more than serve.batch_max_latency_ms = 500" in refusal.message


def test_the_rest_of_a_request_split_over_batches_is_never_cancelled_for_waiting():
    async def scenario() -> list:
        async def model(batch):
            await asyncio.sleep(0.15)  # each batch of up to 4 items
            return batch

        call = _dispatcher(max_latency_ms=200)(model)
        started = time.monotonic()
        # Three batches of one lane: the last starts 0.3 s after the request arrived, past 0.2 s.
        answer = await call(list("abcdefghij"))
        return [answer, time.monotonic() - started]

    answer, seconds = asyncio.run(scenario())
    assert answer == list("abcdefghij")
    assert seconds > 0.2  # it did wait past the max latency, and was answered


def test_a_request_dropped_unstarted_at_the_max_latency_is_refused_with_a_retry_time():
    """Before any batch is timed nothing is refused on arrival; one that then waits past the latency says so."""

    async def scenario() -> tuple[Overloaded, list[Overloaded], list]:
        computed: list[str] = []

        async def model(batch):
            await asyncio.sleep(0.3)
            computed.extend(item for part in batch for item in part)
            return batch

        call = _dispatcher(max_latency_ms=100, lanes=1)(model)
        busy = asyncio.ensure_future(call(list("ab")))  # holds the one lane for 0.3 s
        await asyncio.sleep(0.02)
        refusals: list[Overloaded] = []
        SHED.set(refusals)
        with pytest.raises(Overloaded) as raised:
            await call(list("cd"))
        await busy
        return raised.value, refusals, computed

    refusal, noted, computed = asyncio.run(scenario())
    assert noted == [refusal] and refusal.retry_after_s >= 1
    assert "request's 2 items waited serve.batch_max_latency_ms = 100 without reaching the model" in refusal.message
    assert computed == ["a", "b"]  # no work was done for it


def test_unbatched_calls_past_those_allowed_in_are_refused_unread_and_admitted_again_after():
    from clipflow.serve.http import AdmissionMiddleware

    async def scenario() -> tuple[int, list[dict], int]:
        release, entered = asyncio.Event(), []

        async def model_endpoint(scope, receive, send):
            entered.append(scope["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        gate = AdmissionMiddleware(model_endpoint, frozenset({"/classify"}), workers=1, max_waiting=1)

        async def call(path: str) -> list[dict]:
            sent: list[dict] = []

            async def send(message):
                sent.append(message)

            async def receive():  # never asked for a refused request: its body stays unread
                raise AssertionError("the body was read")

            await gate({"type": "http", "path": path, "headers": []}, receive, send)
            return sent

        running = [asyncio.create_task(call("/classify")) for _ in range(2)]
        other = asyncio.create_task(call("/livez"))  # paths outside the gate are never counted
        await asyncio.sleep(0)
        refused = await call("/classify")
        admitted_while_full = len(entered)
        release.set()
        await asyncio.gather(*running, other)
        again = await call("/classify")
        return admitted_while_full, refused, again[0]["status"]

    admitted_while_full, refused, status_after = asyncio.run(scenario())
    assert admitted_while_full == 3  # two classify calls and /livez; the third classify never reached the app
    start = refused[0]
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert b"2 model calls are running or waiting" in refused[1]["body"]
    assert status_after == 200
