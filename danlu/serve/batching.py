"""Micro-batching with back-pressure: many small requests, one model call.

Requests put work items on a bounded queue and await a future. One model thread takes the first
waiting item and every item queued behind it, up to `max_batch` units (texts, prompts), runs
`fn(payloads) -> results`, hands the results to the event loop in one call and goes straight on to
the next batch, made of the requests that arrived meanwhile (the dynamic batching of Clipper,
Crankshaw et al. 2017, and of TorchServe / Triton): the batch size follows the load, and the event
loop is never a step between two model calls. A full queue raises Overloaded at once (HTTP 503 with
Retry-After) instead of letting latency grow without bound.

The wait is for company, not for a full batch: a request that finds the model idle and nobody
queued behind it waits up to `max_wait_ms` (from its arrival) for a second one, and the batch then
takes whatever is queued. A batch that has company never waits (waiting for a batch to fill, when
every client's request is already in it, only idles the model), and nothing waits right after a batch
that ran alone, so a lone client is never delayed.

The batcher is also the executor of its thread: `submit(fn, *args)` (or `loop.run_in_executor(batcher,
...)`) runs any other call, such as a stream's next step, in the same thread in turn with the batches,
so that the model never runs twice at once.

>>> batcher = MicroBatcher(lambda batch: [len(t) for t in batch], max_batch=32, max_wait_ms=2)
>>> await batcher.put("质量很好")                                    # doctest: +SKIP
4
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Executor, Future
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


@dataclass
class _Call:
    fn: object
    args: tuple
    kwargs: dict
    future: Future

    def run(self):
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn(*self.args, **self.kwargs))
            except BaseException as e:  # noqa: BLE001  the caller awaits the future and gets it there
                self.future.set_exception(e)


_STOP = object()


class ModelThread:
    """The one thread that runs the model for a batcher or an engine: started once, on first use, whichever
    request thread gets there first."""

    def __init__(self, target):
        self.target, self._thread, self._lock = target, None, threading.Lock()

    def start(self):
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self.target, name="danlu-model", daemon=True)
                    self._thread.start()

    def join(self):
        """Wait for the thread to end (not from the thread itself, nor before it started)."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


class MicroBatcher(Executor):
    """Collect payloads from concurrent requests into batches for `fn`, run in the batcher's own thread.

    `fn(payloads) -> results` takes a list and returns one result per payload, in order (it may
    raise; then each payload of that batch runs again alone, and only those that fail alone get the
    exception). `size(payload)` counts how many
    units a payload brings (a request with 10 texts counts 10 toward `max_batch`); a single payload
    larger than `max_batch` still runs, alone. With `max_batch=1` every payload runs on its own.
    """

    def __init__(self, fn, max_batch=32, max_wait_ms=2.0, max_queue=256, size=lambda p: 1, on_batch=None):
        self.fn, self.size = fn, size
        self.max_batch, self.max_wait, self.max_queue = max(1, max_batch), max_wait_ms / 1000.0, max_queue
        self.on_batch = on_batch  # called in the model thread with (units, seconds) after each batch
        self._queue = queue.SimpleQueue()  # _Item, _Call or _STOP; bounded by put(), which counts
        self._thread = ModelThread(self._work)
        self._held = None  # an entry taken from the queue that did not fit the last batch
        self._last_units = 0  # size of the previous batch: waiting for company only pays under load
        self._closed = False

    @property
    def depth(self):
        """Entries waiting (not yet in a running batch)."""
        return self._queue.qsize() + (self._held is not None)

    def put(self, payload) -> asyncio.Future:
        """Queue `payload`; the future gets its result. Raises Overloaded when the queue is full.
        Cancelling the future (a timeout) drops the payload if its batch has not started yet."""
        if self._closed:
            raise Overloaded("server shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded()
        future = asyncio.get_running_loop().create_future()
        self._start()
        self._queue.put(_Item(payload, self.size(payload), future))
        return future

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` in the model thread, after what is queued before it (Executor's API)."""
        if self._closed:
            raise RuntimeError("the model thread is shut down")
        future = Future()
        self._start()
        self._queue.put(_Call(fn, args, kwargs, future))
        return future

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop the thread after its current batch; queued requests get Overloaded, queued calls are cancelled."""
        self._closed = True
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(entry, _Item):
                entry.future.get_loop().call_soon_threadsafe(_fail, entry.future, Overloaded("server shutting down"))
            elif isinstance(entry, _Call):
                entry.future.cancel()
        self._queue.put(_STOP)
        if wait:
            self._thread.join()

    async def close(self):
        """shutdown() from the event loop, without waiting for the batch or call in progress."""
        self.shutdown(wait=False)

    def _start(self):
        self._thread.start()

    # -- the model thread ---------------------------------------------------------------------------
    def _work(self):
        while True:
            entry = self._held or self._queue.get()
            self._held = None
            if entry is _STOP:
                return
            if isinstance(entry, _Call):
                entry.run()
                continue
            batch = self._collect(entry)
            if batch:
                self._run(batch)

    def _collect(self, first):
        """`first` and the live items queued behind it, up to max_batch units."""
        if first.future.done():  # cancelled while it waited (a timeout): drop it
            return []
        batch, units = [first], first.size
        deadline = first.queued_at + (self.max_wait if self._last_units > 1 else 0.0)
        while units < self.max_batch:
            try:
                remaining = deadline - time.perf_counter() if len(batch) == 1 else 0.0
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(entry, _Item) and entry.future.done():
                continue
            if entry is _STOP or isinstance(entry, _Call) or units + entry.size > self.max_batch:
                self._held = entry  # first in line after this batch
                break
            batch.append(entry)
            units += entry.size
        self._last_units = units
        return batch

    def _run(self, batch):
        """Run one batch; when it fails, run each of its items alone, so that one item that makes the model
        fail fails only its own request, never the others batched with it."""
        started = time.perf_counter()
        try:
            results, error = self.fn([item.payload for item in batch]), None
        except Exception as e:  # noqa: BLE001  handed to the waiting request, which answers 500
            results, error = None, e
        if error is not None and len(batch) > 1:
            for item in batch:
                if not item.future.done():
                    self._run([item])
            return
        if error is None and self.on_batch is not None:
            self.on_batch(sum(item.size for item in batch), time.perf_counter() - started)
        try:
            batch[0].future.get_loop().call_soon_threadsafe(_deliver, batch, results, error)
        except RuntimeError:  # the event loop is closed: nobody waits for these results any more
            pass


def _deliver(batch, results, error):
    """In the event loop: each request's future gets its result (or the batch's exception)."""
    for i, item in enumerate(batch):
        if not item.future.done():  # a request that timed out has cancelled its future
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(results[i])


def _fail(future, error):
    if not future.done():
        future.set_exception(error)
