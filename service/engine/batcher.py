"""The batcher: the queue of images waiting for a worker, the batching policy, and every request's deadline.

Pure asyncio and no processes: the pool tells it when a worker becomes warm, frees its model, answers a batch or
is lost, and the batcher hands batches to workers through `WorkerSlot.deliver`, which never blocks. Its tests
drive those calls in any order with a double of the worker end (tests/engine/test_batcher.py).

One rule makes the dispatcher impossible to wedge: it keeps no state across a suspension point. Each turn of
`run` reads the queue and the workers afresh, does everything that is due without awaiting, and then sleeps until
something changes (`_wake`) or the next deadline. Every change of state sets `_wake`.

The policy: a batch leaves when a worker can take one and either `max_size` images wait or the oldest has waited
`max_wait_s`; while every worker is busy, images keep gathering, so batches grow with load. With `adaptive_wait`
(the default) a free worker waits for company only while company is expected: `submit` keeps a running mean of the
gaps between arrivals, and the oldest image stops waiting once the wait it has left is no longer than that mean gap
(at once when arrivals are sparser than `max_wait_s`, or before a second arrival has given a gap). At light load an
image then goes to its worker as it arrives instead of waiting for others it will not get. A worker holds at most
`BATCHES_PER_WORKER` batches (one in the model, one being finished). Every request is answered exactly once: by its
worker, or 503 when its worker is lost, when no worker is left, when it has waited `timeout_s`, or at shutdown.
A worker that holds a batch for `timeout_s` without answering is taken for hung and abandoned (the pool kills it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from service.engine.messages import AnalysisOutcome, AnalysisRequest
from service.errors import InferenceTimedOut, ModelNotReady, PipelineError

logger = logging.getLogger(__name__)

#: Batches one worker may hold: one in the model, one being finished by its second thread.
BATCHES_PER_WORKER = 2
#: Weight of the newest gap between arrivals in their running mean. A quarter: a few arrivals make a new rate, one
#: short gap in sparse traffic does not, and one silence of 4 x max_wait ends the waiting at once.
ARRIVAL_GAP_WEIGHT = 0.25


class WorkerSlot(Protocol):
    """The batcher's view of one warm worker."""

    def deliver(self, requests: list[AnalysisRequest]) -> None:
        """Send a batch to the worker without blocking (the pool's writer thread does the blocking send)."""

    def abandon(self, reason: str) -> None:
        """The worker is taken for hung: kill it. The pool then reports it lost (`Batcher.lose_worker`)."""


class WorkerProtocolError(RuntimeError):
    """A worker said something that does not fit what it was sent (results without a batch, a wrong count)."""


@dataclass(eq=False)
class _Pending:
    request: AnalysisRequest
    future: asyncio.Future[AnalysisOutcome]
    queued_at: float
    deadline: float


@dataclass(eq=False)
class _Batch:
    items: list[_Pending]
    sent_at: float


@dataclass(eq=False)
class _Slot:
    worker: WorkerSlot
    batches: collections.deque[_Batch] = field(default_factory=collections.deque)
    model_busy: bool = False
    abandoned: bool = False

    @property
    def can_take_batch(self) -> bool:
        return not self.model_busy and not self.abandoned and len(self.batches) < BATCHES_PER_WORKER


class Batcher:
    """Gathers requests into batches for the warm workers; `run` is its dispatcher (one task, supervised)."""

    def __init__(
        self,
        *,
        max_size: int,
        max_wait_s: float,
        timeout_s: float,
        adaptive_wait: bool = True,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._adaptive_wait = adaptive_wait
        self._timeout_s = timeout_s
        self._clock = clock
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._slots: dict[WorkerSlot, _Slot] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._last_arrival: float | None = None
        self._mean_gap_s: float | None = None
        #: True while `run` sleeps with nothing due.
        self.idle = False

    # --- what the engine reads ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def warm_workers(self) -> int:
        return len(self._slots)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mean_arrival_gap_s(self) -> float | None:
        """The running mean of the seconds between arrivals; None before the second arrival."""
        return self._mean_gap_s

    @property
    def settled(self) -> bool:
        """The dispatcher is asleep with nothing left to do until an event or a deadline (tests wait for this)."""
        return self.idle and not self._wake.is_set()

    def held_by(self, worker: WorkerSlot) -> int:
        """Requests a worker holds (sent and not yet answered by it)."""
        slot = self._slots.get(worker)
        return 0 if slot is None else sum(len(batch.items) for batch in slot.batches)

    # --- requests -----------------------------------------------------------------------------------------

    def submit(self, request: AnalysisRequest) -> asyncio.Future[AnalysisOutcome]:
        """Queue one image; the future is resolved exactly once, with an Analysis or an error (never raises)."""
        if self._closed:
            raise ModelNotReady("the service is shutting down")
        if not self._slots:
            raise ModelNotReady("no inference worker is ready")
        now = self._clock()
        future: asyncio.Future[AnalysisOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, future, now, now + self._timeout_s))
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            mean = self._mean_gap_s
            self._mean_gap_s = gap if mean is None else mean + ARRIVAL_GAP_WEIGHT * (gap - mean)
        self._last_arrival = now
        self._wake.set()
        return future

    # --- what the pool reports ----------------------------------------------------------------------------

    def add_worker(self, worker: WorkerSlot) -> None:
        """A worker is warm and takes batches from now on."""
        if self._closed:
            return
        self._slots.setdefault(worker, _Slot(worker))
        self._wake.set()

    def model_free(self, worker: WorkerSlot) -> None:
        """The worker's model is done with its latest batch (which may still be being finished)."""
        slot = self._slots.get(worker)
        if slot is not None:
            slot.model_busy = False
            self._wake.set()

    def results(self, worker: WorkerSlot, outcomes: list[AnalysisOutcome]) -> None:
        """The worker answered its oldest batch. Raises WorkerProtocolError if that cannot be (the pool then
        abandons the worker); the batch's requests are answered 503 either way."""
        slot = self._slots.get(worker)
        if slot is None:
            return  # lost meanwhile: its requests were answered already
        if not slot.batches:
            raise WorkerProtocolError("a worker sent results with no batch outstanding")
        batch = slot.batches.popleft()
        self._wake.set()
        if len(outcomes) != len(batch.items):
            self._answer_all(batch.items, ModelNotReady("the inference worker answered out of turn; retry"))
            raise WorkerProtocolError(f"a worker sent {len(outcomes)} results for a batch of {len(batch.items)}")
        for pending, outcome in zip(batch.items, outcomes, strict=True):
            _answer(pending, outcome)

    def lose_worker(self, worker: WorkerSlot, error: PipelineError) -> int:
        """The worker is gone (died, killed, or stopped): answer what it held with `error`. Returns how many
        requests it held. With no worker left the queue is answered 503 too: no one will take it soon, and the
        sender's retry may find a pod that can."""
        slot = self._slots.pop(worker, None)
        held = 0
        if slot is not None:
            for batch in slot.batches:
                held += len(batch.items)
                self._answer_all(batch.items, error)
            slot.batches.clear()
        if not self._slots:
            self._fail_queue(ModelNotReady("no inference worker is ready"))
        self._wake.set()
        return held

    def close(self, error: PipelineError) -> None:
        """Shutdown: answer everything queued and held with `error`; `run` returns."""
        self._closed = True
        for worker in list(self._slots):
            self.lose_worker(worker, error)
        self._fail_queue(error)
        self._wake.set()

    def poke(self) -> None:
        """Look at the state again now (tests call it after moving a fake clock)."""
        self._wake.set()

    # --- the dispatcher -----------------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._closed:
            # Cleared before the state is read: whatever changes after this sets it again, so no change is missed.
            self._wake.clear()
            now = self._clock()
            self._expire(now)
            self._dispatch_due(now)
            wake_at = self._next_deadline(now)
            self.idle = True
            try:
                timeout = None if wake_at is None else max(0.0, wake_at - now)
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result of what it waited for if
                # that ends in the same turn of the loop as a cancellation, and the cancellation is lost. A wake-up
                # (a worker's answer) coming with the engine's stop left the dispatcher waiting for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            finally:
                self.idle = False

    def _dispatch_due(self, now: float) -> None:
        while self._queue:
            if self._queue[0].future.done():  # its caller went away (cancelled)
                self._queue.popleft()
                continue
            slot = self._idle_slot()
            if slot is None:
                return
            if len(self._queue) < self._max_size and now < self._gathering_until():
                return  # gathering: not full, and the oldest may still wait for company
            items: list[_Pending] = []
            while self._queue and len(items) < self._max_size:
                pending = self._queue.popleft()
                if not pending.future.done():
                    items.append(pending)
            if items:
                self._send(slot, _Batch(items, now))

    def _gathering_until(self) -> float:
        """When the oldest queued image stops waiting for company beside a free worker: after `max_wait_s`, or,
        with `adaptive_wait`, once the wait left is no longer than the mean gap between arrivals (no company is
        then expected in it)."""
        queued_at = self._queue[0].queued_at
        if not self._adaptive_wait:
            return queued_at + self._max_wait_s
        if self._mean_gap_s is None:
            return queued_at  # no gap seen yet: nothing says another image is coming
        return max(queued_at, queued_at + self._max_wait_s - self._mean_gap_s)

    def _send(self, slot: _Slot, batch: _Batch) -> None:
        slot.batches.append(batch)
        slot.model_busy = True
        try:
            slot.worker.deliver([pending.request for pending in batch.items])
        except BaseException:
            # Nobody else will answer these: the batch never reached the worker.
            slot.batches.remove(batch)
            slot.model_busy = False
            self._answer_all(batch.items, ModelNotReady("the batch could not be sent to a worker; retry"))
            raise
        self._on_batch(len(batch.items))

    def _idle_slot(self) -> _Slot | None:
        candidates = [slot for slot in self._slots.values() if slot.can_take_batch]
        # The least loaded first: a worker with nothing to finish answers soonest.
        return min(candidates, key=lambda slot: len(slot.batches), default=None)

    def _expire(self, now: float) -> None:
        while self._queue and (self._queue[0].future.done() or self._queue[0].deadline <= now):
            _answer(self._queue.popleft(), InferenceTimedOut("the image waited too long for a worker; retry"))
        for slot in list(self._slots.values()):
            for batch in slot.batches:
                for pending in batch.items:
                    if pending.deadline <= now:
                        _answer(pending, InferenceTimedOut("the worker did not answer in time; retry"))
            if slot.batches and not slot.abandoned and now - slot.batches[0].sent_at >= self._timeout_s:
                slot.abandoned = True
                logger.error("an inference worker has held a batch for %.0f s without answering; abandoning it",
                             now - slot.batches[0].sent_at)
                slot.worker.abandon("held a batch past INFERENCE_TIMEOUT_S")

    def _next_deadline(self, now: float) -> float | None:
        """The next moment something becomes due without any event: a gathering batch, a request's deadline,
        a hung worker's."""
        moments: list[float] = []
        if self._queue:
            moments.append(self._queue[0].deadline)  # first in, first due: every request gets the same timeout
            if self._idle_slot() is not None:
                moments.append(self._gathering_until())
        for slot in self._slots.values():
            if slot.batches and not slot.abandoned:
                moments.append(slot.batches[0].sent_at + self._timeout_s)
            moments.extend(p.deadline for batch in slot.batches for p in batch.items if not p.future.done())
        return min(moments, default=None)

    def _answer_all(self, items: list[_Pending], outcome: AnalysisOutcome) -> None:
        for pending in items:
            _answer(pending, outcome)

    def _fail_queue(self, error: PipelineError) -> None:
        while self._queue:
            _answer(self._queue.popleft(), error)


def _answer(pending: _Pending, outcome: AnalysisOutcome) -> None:
    if not pending.future.done():
        pending.future.set_result(outcome)
