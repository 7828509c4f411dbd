"""Micro-batching with back-pressure: many small requests, one model call.

Requests put work items on a bounded asyncio queue and await a future. One background task takes
the first waiting item, keeps collecting for up to `max_wait_ms` or until `max_batch` units (texts,
prompts) are gathered, and runs `fn(payloads) -> results` in the model's single worker thread, so
the event loop keeps accepting connections while the model computes (the dynamic batching of
Clipper, Crankshaw et al. 2017, and of TorchServe / Triton). A full queue raises Overloaded at once
(HTTP 503 with Retry-After) instead of letting latency grow without bound.

The wait is adaptive: it only happens when the previous batch held more than one unit. Under load
the requests that arrive while the model computes fill the next batch anyway, and a few milliseconds
more gather the stragglers; a lone client, whose requests never find company, is never delayed.

>>> batcher = MicroBatcher(lambda batch: [len(t) for t in batch], executor, max_batch=32, max_wait_ms=5)
>>> await batcher.submit("质量很好")                                # doctest: +SKIP
4
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


class Overloaded(Exception):
    """The queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message="server overloaded: the request queue is full", retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    payload: object
    size: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collect payloads from concurrent requests into batches for `fn`, run in `executor`.

    `fn(payloads) -> results` takes a list and returns one result per payload, in order (it may
    raise; then every request of that batch gets the exception). `size(payload)` counts how many
    units a payload brings (a request with 10 texts counts 10 toward `max_batch`); a single payload
    larger than `max_batch` still runs, alone. With `max_batch=1` every payload runs on its own.
    """

    def __init__(self, fn, executor, max_batch=32, max_wait_ms=5.0, max_queue=256, size=lambda p: 1,
                 on_batch=None):
        self.fn, self.executor, self.size = fn, executor, size
        self.max_batch, self.max_wait, self.max_queue = max(1, max_batch), max_wait_ms / 1000.0, max_queue
        self.on_batch = on_batch  # called with (units, seconds) after each batch, e.g. for metrics
        self._queue = None
        self._task = None
        self._held = None  # an item taken from the queue that did not fit the last batch
        self._last_units = 0  # size of the previous batch: waiting for company only pays under load

    @property
    def depth(self):
        """Items waiting (not yet in a running batch)."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._held is not None)

    async def submit(self, payload):
        """Queue `payload` and wait for its result; raises Overloaded when the queue is full."""
        self._start()
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(payload, self.size(payload), future))
        except asyncio.QueueFull:
            raise Overloaded() from None
        return await future

    def _start(self):
        if self._task is None or self._task.done():
            if self._queue is None:
                self._queue = asyncio.Queue(self.max_queue)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(Overloaded("server shutting down"))

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item.payload for item in batch])
            except Exception as e:  # noqa: BLE001  handed to each waiting request, which answers 500
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(sum(item.size for item in batch), time.perf_counter() - started)
            for item, result in zip(batch, results):
                if not item.future.done():  # a request that timed out has cancelled its future
                    item.future.set_result(result)

    async def _collect(self):
        """Wait for a first live item, then gather more until max_batch units or max_wait elapses."""
        first = self._held or await self._queue.get()
        self._held = None
        if first.future.done():
            return []
        batch, units = [first], first.size
        deadline = time.perf_counter() + (self.max_wait if self._last_units > 1 else 0.0)
        while units < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item.future.done():
                continue
            if units + item.size > self.max_batch:
                self._held = item  # first in line for the next batch
                break
            batch.append(item)
            units += item.size
        self._last_units = units
        return batch
