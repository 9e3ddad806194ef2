"""The served encoders' batch dispatcher: full batches from clients that ask again once answered."""

from __future__ import annotations

import asyncio
import functools
import inspect

from _bentoml_impl import serde
from _bentoml_impl.server import app

from clipflow.serve.bentoml_patches import install
from clipflow.serve.dispatch import FillingDispatcher
from clipflow.serve.http import StrictJSONSerde, StrictMultipartSerde

STRICT_SERDES = (StrictJSONSerde, StrictMultipartSerde)


def _dispatcher(max_latency_ms: int, linger: float, lanes: int = 1, get_batch_size=lambda item: 1) -> FillingDispatcher:
    dispatcher = FillingDispatcher(
        max_latency_in_ms=max_latency_ms,
        max_batch_size=4,
        fallback=lambda: "shed",
        get_batch_size=get_batch_size,
        lanes=lanes,
    )
    dispatcher.LINGER = linger
    return dispatcher


def test_a_request_that_waited_for_a_busy_model_is_batched_with_those_that_arrive_after_it():
    async def scenario() -> list[list[str]]:
        batches: list[list[str]] = []
        release = asyncio.Event()

        async def model(batch):
            batches.append(list(batch))
            if len(batches) == 1:
                await release.wait()
            return batch

        # A long linger, so that the test does not depend on how fast this machine answers.
        call = _dispatcher(60_000, linger=1.0)(model)
        first = asyncio.ensure_future(call("a"))
        while not batches:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(call("b"))
        await asyncio.sleep(0.05)
        release.set()
        assert await first == "a"
        later = [call(item) for item in "cde"]
        assert await asyncio.gather(waiting, *later) == ["b", "c", "d", "e"]
        return batches

    # BentoML's own dispatcher sends "b" alone the moment the model is free.
    assert asyncio.run(scenario()) == [["a"], ["b", "c", "d", "e"]]


def test_each_lane_takes_a_full_batch_while_the_others_compute():
    async def scenario() -> tuple[list[list[str]], int]:
        batches: list[list[str]] = []
        running = 0
        most_running = 0
        release = asyncio.Event()

        async def model(batch):
            nonlocal running, most_running
            batches.append(list(batch))
            running += 1
            most_running = max(most_running, running)
            await release.wait()
            running -= 1
            return batch

        call = _dispatcher(60_000, linger=1.0, lanes=2)(model)
        answers = [asyncio.ensure_future(call(item)) for item in "abcdefghij"]
        while len(batches) < 2:
            await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.gather(*answers) == list("abcdefghij")
        return batches, most_running

    batches, most_running = asyncio.run(scenario())
    # Two full batches at once, without waiting out the linger; the rest spread once the lanes are free.
    assert batches == [list("abcd"), list("efgh"), ["i"], ["j"]]
    assert most_running == 2


def test_a_lone_request_of_many_items_is_spread_over_the_free_lanes():
    async def scenario() -> list[list[int]]:
        batches: list[list[int]] = []

        async def model(batch):  # each request is a list of items; answers one result per item
            batches.append([item for request in batch for item in request])
            return [[item * 10 for item in request] for request in batch]

        call = _dispatcher(60_000, linger=0.0, lanes=3, get_batch_size=len)(model)
        assert await call([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
        return batches

    assert asyncio.run(scenario()) == [[1, 2], [3, 4], [5]]


def test_bentoml_builds_the_dispatchers_of_its_service_app_from_the_name_install_replaces(monkeypatch):
    # Were BentoML to build its dispatchers some other way, install() would silently do nothing.
    assert "CorkDispatcher(" in inspect.getsource(app.ServiceAppFactory.__init__)
    # install() patches these for the whole process; undone after the test.
    monkeypatch.setattr(app, "CorkDispatcher", app.CorkDispatcher)
    for media_type in ("application/json", "multipart/form-data"):
        monkeypatch.setitem(serde.ALL_SERDE, media_type, serde.ALL_SERDE[media_type])
    install(functools.partial(FillingDispatcher, lanes=3), STRICT_SERDES)
    dispatcher = app.CorkDispatcher(max_latency_in_ms=1000, max_batch_size=4, fallback=lambda: None)
    assert isinstance(dispatcher, FillingDispatcher)
    assert dispatcher._sema.sema == 3
