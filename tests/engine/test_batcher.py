"""The batcher's scheduling, in-process: no worker processes, no sleeps, a clock the test moves.

`FakeWorker` is a double of the worker end of the pipe: it records the batches the dispatcher delivers, and the
test decides when its model frees, when it answers and when it dies, in any order. The named interleavings come
first (each also followed by a shutdown); a Hypothesis state machine then runs thousands of random orders of
arrivals, deaths, warm-ups, answers, cancellations and time, checking the invariants after every step.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.engine.batcher import ARRIVAL_GAP_WEIGHT, BATCHES_PER_WORKER, Batcher, WorkerProtocolError
from service.engine.messages import AnalysisRequest
from service.engine.supervisor import SupervisedTask
from service.errors import InferenceTimedOut, ModelNotReady

MAX_SIZE = 4
MAX_WAIT_S = 10.0
TIMEOUT_S = 100.0
#: A gap between arrivals after which the running mean alone says no company comes within MAX_WAIT_S.
SILENCE_S = 1.25 * MAX_WAIT_S / ARRIVAL_GAP_WEIGHT


class FakeWorker:
    """The worker end of one pipe, as the batcher sees it; checks the batcher never overloads it."""

    _names = itertools.count()

    def __init__(self) -> None:
        self.name = f"worker-{next(self._names)}"
        self.delivered: list[list[AnalysisRequest]] = []
        self.freed = 0  # ModelFree messages sent
        self.answered = 0  # batches answered
        self.abandoned: list[str] = []
        self.broken_deliveries = 0  # deliveries that will raise (a bug in the send path)

    def deliver(self, requests: list[AnalysisRequest]) -> None:
        if self.broken_deliveries:
            self.broken_deliveries -= 1
            raise RuntimeError("simulated bug while sending a batch")
        assert 1 <= len(requests) <= MAX_SIZE, f"batch of {len(requests)}"
        assert len(self.delivered) == self.freed, "a batch was sent while the worker's model was busy"
        assert len(self.delivered) - self.answered < BATCHES_PER_WORKER, "more batches than a worker may hold"
        self.delivered.append(requests)

    def abandon(self, reason: str) -> None:
        self.abandoned.append(reason)

    @property
    def model_busy(self) -> bool:
        return len(self.delivered) > self.freed

    def outcomes_for(self, batch: list[AnalysisRequest]) -> list[Any]:
        return [f"analysis of {request.data.decode()}" for request in batch]

    def __repr__(self) -> str:
        return self.name


class Harness:
    """A batcher and its supervised dispatcher on a private event loop, with a clock that moves only when told."""

    def __init__(self, *, max_size: int = MAX_SIZE, max_wait_s: float = MAX_WAIT_S, timeout_s: float = TIMEOUT_S,
                 adaptive_wait: bool = True):
        self.now = 0.0
        self.loop = asyncio.new_event_loop()
        self.crashes: list[str] = []
        self.batches: list[int] = []
        #: When each batch left (fake time), in order.
        self.sent_at: list[float] = []
        self.batcher = Batcher(max_size=max_size, max_wait_s=max_wait_s, timeout_s=timeout_s,
                               adaptive_wait=adaptive_wait, clock=lambda: self.now, on_batch=self._sent)
        self.dispatcher = SupervisedTask("dispatcher", self.batcher.run, on_crash=self.crashes.append,
                                         max_crashes=3)
        self._requests = itertools.count()
        #: The request each future stands for (its data, as the workers see it).
        self.names: dict[asyncio.Future[Any], str] = {}
        self.call(self.dispatcher.start)

    def _sent(self, size: int) -> None:
        self.batches.append(size)
        self.sent_at.append(self.now)

    def call(self, function: Callable[[], Any]) -> Any:
        """Call a batcher method as the pool does (on the loop), then let the dispatcher settle."""
        async def on_the_loop() -> Any:
            return function()

        result = self.loop.run_until_complete(on_the_loop())
        self.settle()
        return result

    def settle(self) -> None:
        async def until_settled() -> None:
            for _ in range(10_000):
                await asyncio.sleep(0)
                if self.batcher.settled or not self.dispatcher.running:
                    return
            raise AssertionError("the dispatcher never settled")

        self.loop.run_until_complete(until_settled())

    def submit(self, count: int = 1) -> list[asyncio.Future[Any]]:
        def submit_all() -> list[asyncio.Future[Any]]:
            futures = []
            for _ in range(count):
                name = f"r{next(self._requests)}"
                futures.append(self.batcher.submit(AnalysisRequest(name.encode(), False)))
                self.names[futures[-1]] = name
            return futures

        return list(self.call(submit_all))

    def warm(self) -> FakeWorker:
        worker = FakeWorker()
        self.call(lambda: self.batcher.add_worker(worker))
        return worker

    def free(self, worker: FakeWorker) -> None:
        worker.freed += 1
        self.call(lambda: self.batcher.model_free(worker))

    def answer(self, worker: FakeWorker) -> None:
        batch = worker.delivered[worker.answered]
        worker.answered += 1
        self.call(lambda: self.batcher.results(worker, worker.outcomes_for(batch)))

    def die(self, *workers: FakeWorker) -> None:
        def lose_all() -> None:  # in one go: the loop runs no dispatcher turn between them
            for worker in workers:
                self.batcher.lose_worker(worker, ModelNotReady("the inference worker died; retry"))

        self.call(lose_all)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.call(self.batcher.poke)

    def shutdown(self) -> None:
        self.call(lambda: self.batcher.close(ModelNotReady("the service is shutting down")))
        self.loop.run_until_complete(self.dispatcher.stop())

    def close(self) -> None:
        self.loop.run_until_complete(self.dispatcher.stop())
        self.loop.close()


@pytest.fixture
def harness() -> Any:
    harness = Harness()
    yield harness
    harness.close()


def outcome(future: asyncio.Future[Any]) -> Any:
    assert future.done(), "the request is still waiting"
    return future.result()


def assert_analyzed(futures: list[asyncio.Future[Any]], worker: FakeWorker) -> None:
    sent = {request.data.decode() for batch in worker.delivered for request in batch}
    for future in futures:
        result = outcome(future)
        assert isinstance(result, str) and result.removeprefix("analysis of ") in sent, result


def assert_retry(futures: list[asyncio.Future[Any]], error: type[Exception] = ModelNotReady) -> None:
    for future in futures:
        assert isinstance(outcome(future), error), outcome(future)
        assert outcome(future).status_code == 503


# --- the policy -----------------------------------------------------------------------------------------------


def test_a_batch_leaves_when_full_or_when_its_oldest_has_waited(harness: Harness) -> None:
    worker = harness.warm()
    first = harness.submit(3)
    assert worker.delivered == [], "three of four: still gathering"
    harness.advance(MAX_WAIT_S)
    assert [len(batch) for batch in worker.delivered] == [3]
    harness.free(worker)
    full = harness.submit(MAX_SIZE + 1)
    assert [len(batch) for batch in worker.delivered] == [3, MAX_SIZE], "a full batch leaves at once"
    harness.answer(worker)
    harness.answer(worker)
    assert_analyzed(first + full[:MAX_SIZE], worker)
    assert not full[-1].done()
    assert harness.batches == [3, MAX_SIZE]


def test_batches_grow_while_every_worker_is_busy(harness: Harness) -> None:
    worker = harness.warm()
    harness.submit(1)
    harness.advance(MAX_WAIT_S)
    waiting = harness.submit(3)
    harness.advance(MAX_WAIT_S)  # due, but the model is busy: they keep gathering
    assert len(worker.delivered) == 1
    harness.free(worker)
    assert [len(batch) for batch in worker.delivered] == [1, 3], "released together once the model is free"
    harness.answer(worker)
    harness.answer(worker)
    assert_analyzed(waiting, worker)


def test_no_worker_means_503_at_once(harness: Harness) -> None:
    with pytest.raises(ModelNotReady):
        harness.submit(1)


def test_a_cancelled_request_is_not_sent(harness: Harness) -> None:
    worker = harness.warm()
    gone, kept = harness.submit(2)
    harness.call(gone.cancel)
    harness.advance(MAX_WAIT_S)
    assert [[request.data for request in batch] for batch in worker.delivered] == [[b"r1"]]
    harness.answer(worker)
    assert_analyzed([kept], worker)


# --- the wait adapts to the arrival rate -----------------------------------------------------------------------


def serve_at_once(harness: Harness, worker: FakeWorker) -> None:
    """The worker's model frees and it answers every batch it holds, taking no (fake) time."""
    while worker.answered < len(worker.delivered):
        if worker.model_busy:
            harness.free(worker)
        harness.answer(worker)


#: The clock moves in steps this long while images arrive, so a batch leaves when it is due, not at the next arrival.
TICK_S = MAX_WAIT_S / 10


def pass_time(harness: Harness, worker: FakeWorker, seconds: float) -> None:
    """Move the clock tick by tick, the worker serving at once whatever it is sent."""
    end = harness.now + seconds
    while harness.now < end:
        harness.advance(min(TICK_S, end - harness.now))
        serve_at_once(harness, worker)


def arrive_every(harness: Harness, worker: FakeWorker, gaps: list[float]) -> dict[str, float]:
    """One image after each gap, the worker serving at once; returns when each image arrived, by name."""
    arrived = {}
    for gap in gaps:
        pass_time(harness, worker, gap)
        [future] = harness.submit(1)
        arrived[harness.names[future]] = harness.now
        serve_at_once(harness, worker)
    return arrived


def waits(harness: Harness, worker: FakeWorker, arrived: dict[str, float]) -> dict[str, float]:
    """How long each image waited for its batch to leave (the only worker's batches, in order)."""
    return {request.data.decode(): sent_at - arrived[request.data.decode()]
            for batch, sent_at in zip(worker.delivered, harness.sent_at, strict=True)
            for request in batch if request.data.decode() in arrived}


def test_sparse_arrivals_go_to_a_free_worker_at_once(harness: Harness) -> None:
    """Gaps far longer than the wait: each image leaves alone the moment it arrives, even one that follows another
    closely (a single short gap does not make a rate)."""
    worker = harness.warm()
    gaps = [SILENCE_S, SILENCE_S, 2 * SILENCE_S, MAX_WAIT_S / 10, SILENCE_S, 3 * SILENCE_S]
    arrived = {}
    for gap in gaps:
        harness.advance(gap)
        [future] = harness.submit(1)  # the clock does not move: sent now or not at all
        arrived[harness.names[future]] = harness.now
        assert len(worker.delivered) == len(arrived), f"{harness.names[future]} is waiting for company"
        serve_at_once(harness, worker)
        assert_analyzed([future], worker)
    assert harness.batches == [1] * len(gaps)
    assert set(waits(harness, worker, arrived).values()) == {0.0}


def test_a_burst_still_fills_batches_and_nothing_waits_past_max_wait(harness: Harness) -> None:
    """Sparse traffic, then a burst of an image every tenth of the wait: the burst's first images still go alone
    (the mean gap is long), then the rate is learned and batches fill to max_size."""
    worker = harness.warm()
    sparse = arrive_every(harness, worker, [SILENCE_S] * 4)
    burst = arrive_every(harness, worker, [TICK_S] * 10 * MAX_SIZE)
    pass_time(harness, worker, MAX_WAIT_S)  # the last, partial batch leaves
    burst_batches = harness.batches[len(sparse):]
    assert burst_batches[0] == 1, "the burst's first image waited for company though the mean gap was long"
    assert burst_batches[-4:-1] == [MAX_SIZE] * 3, f"the burst did not fill batches: {burst_batches}"
    assert sum(burst_batches) == len(burst)
    assert max(waits(harness, worker, sparse | burst).values()) <= MAX_WAIT_S


def test_when_the_rate_drops_after_a_burst_images_go_at_once_again(harness: Harness) -> None:
    worker = harness.warm()
    arrive_every(harness, worker, [TICK_S] * 4 * MAX_SIZE)
    pass_time(harness, worker, MAX_WAIT_S)
    assert MAX_SIZE in harness.batches, "the burst was batched"
    burst_batches = len(harness.batches)
    later = arrive_every(harness, worker, [SILENCE_S] * 4)
    assert harness.batches[burst_batches:] == [1] * 4
    assert set(waits(harness, worker, later).values()) == {0.0}, "after the burst, sparse images waited for company"


def test_at_a_moderate_rate_company_is_gathered_without_waiting_the_whole_wait(harness: Harness) -> None:
    """Pairs of images (0.2 x max_wait apart, 0.8 x max_wait between pairs, a mean gap near half the wait): once
    the rate is learned each pair leaves together, and no image waits max_wait for company that is not coming."""
    worker = harness.warm()
    arrived = arrive_every(harness, worker, [0.2 * MAX_WAIT_S, 0.8 * MAX_WAIT_S] * 6)
    pass_time(harness, worker, MAX_WAIT_S)
    assert harness.batches[-5:-1] == [2] * 4, f"pairs were not gathered: {harness.batches}"
    assert max(waits(harness, worker, arrived).values()) <= 0.6 * MAX_WAIT_S


def test_the_fixed_policy_waits_max_wait_whatever_the_rate() -> None:
    """BATCH_WAIT_POLICY=fixed: the wait before adaptation, for every image."""
    harness = Harness(adaptive_wait=False)
    try:
        worker = harness.warm()
        for _ in range(3):
            harness.advance(SILENCE_S)
            harness.submit(1)
            assert harness.batcher.queue_depth == 1
            harness.advance(MAX_WAIT_S - 1)
            assert harness.batcher.queue_depth == 1
            harness.advance(1)
            serve_at_once(harness, worker)
        assert harness.batches == [1, 1, 1]
    finally:
        harness.close()


# --- the interleavings that matter, each also ended by a shutdown ------------------------------------------------


def dies_while_the_dispatcher_waits_for_an_idle_worker(harness: Harness) -> list[asyncio.Future[Any]]:
    """Both workers busy, the queue waiting; one dies: its batch gets 503, the queue goes to the other."""
    a, b = harness.warm(), harness.warm()
    in_a, in_b = harness.submit(MAX_SIZE), harness.submit(MAX_SIZE)
    queued = harness.submit(2)
    harness.die(a)
    assert_retry(in_a)
    assert not any(future.done() for future in queued), "the queue waits for the worker that is left"
    harness.free(b)
    harness.advance(MAX_WAIT_S)
    harness.answer(b)
    harness.answer(b)
    assert_analyzed(in_b + queued, b)
    return []


def last_worker_dies_then_a_replacement_warms(harness: Harness) -> list[asyncio.Future[Any]]:
    """The wedge this engine once had: the queue is failed while the dispatcher waits; the replacement finds it
    empty."""
    old = harness.warm()
    held = harness.submit(MAX_SIZE)
    queued = harness.submit(3)
    harness.die(old)
    assert_retry(held + queued)
    assert harness.batcher.queue_depth == 0
    new = harness.warm()
    assert new.delivered == [] and harness.dispatcher.running
    later = harness.submit(MAX_SIZE)
    harness.answer(new)
    assert_analyzed(later, new)
    return []


def replacement_warms_while_the_queue_is_empty(harness: Harness) -> list[asyncio.Future[Any]]:
    first = harness.warm()
    harness.die(first)
    second = harness.warm()
    pending = harness.submit(1)
    harness.advance(MAX_WAIT_S)
    assert len(second.delivered) == 1
    return pending


def two_deaths_in_a_row(harness: Harness) -> list[asyncio.Future[Any]]:
    a, b = harness.warm(), harness.warm()
    held = harness.submit(2 * MAX_SIZE)
    queued = harness.submit(1)
    harness.die(a, b)
    assert_retry(held + queued)
    c = harness.warm()
    harness.die(c)  # the replacement dies too, holding nothing
    d = harness.warm()
    later = harness.submit(MAX_SIZE)
    assert len(d.delivered) == 1
    return later


def dies_during_send(harness: Harness) -> list[asyncio.Future[Any]]:
    """Delivered but never acknowledged: the pipe broke under the send."""
    worker, other = harness.warm(), harness.warm()
    sent = harness.submit(MAX_SIZE)
    assert worker.delivered or other.delivered
    victim = worker if worker.delivered else other
    harness.die(victim)
    assert_retry(sent)
    return harness.submit(1)


def dies_while_its_second_thread_encodes(harness: Harness) -> list[asyncio.Future[Any]]:
    """The model freed the first batch (being finished) and took a second: both are lost with the worker."""
    worker = harness.warm()
    finishing = harness.submit(MAX_SIZE)
    harness.free(worker)
    in_model = harness.submit(MAX_SIZE)
    assert len(worker.delivered) == 2
    harness.die(worker)
    assert_retry(finishing + in_model)
    return []


def a_broken_send_path_is_supervised(harness: Harness) -> list[asyncio.Future[Any]]:
    """A bug while sending crashes the dispatcher: the batch is answered 503, the crash counted, the dispatcher
    starts again and serves the next request."""
    worker = harness.warm()
    worker.broken_deliveries = 1
    lost = harness.submit(MAX_SIZE)
    harness.settle()
    assert_retry(lost)
    assert harness.crashes == ["dispatcher"] and harness.dispatcher.running
    later = harness.submit(MAX_SIZE)
    harness.answer(worker)
    assert_analyzed(later, worker)
    return harness.submit(1)


INTERLEAVINGS = [
    dies_while_the_dispatcher_waits_for_an_idle_worker,
    last_worker_dies_then_a_replacement_warms,
    replacement_warms_while_the_queue_is_empty,
    two_deaths_in_a_row,
    dies_during_send,
    dies_while_its_second_thread_encodes,
    a_broken_send_path_is_supervised,
]


@pytest.mark.parametrize("scenario", INTERLEAVINGS, ids=lambda scenario: scenario.__name__)
def test_interleaving_then_shutdown(harness: Harness, scenario: Callable[[Harness], list[Any]]) -> None:
    still_pending = scenario(harness)
    assert harness.dispatcher.running, "the dispatcher survived"
    assert harness.crashes in ([], ["dispatcher"])
    harness.shutdown()
    assert_retry(still_pending)
    assert not harness.dispatcher.running and not harness.dispatcher.gave_up


@pytest.mark.parametrize("stage", ["queued", "in the model", "being finished"])
def test_shutdown_answers_every_request_wherever_it_is(harness: Harness, stage: str) -> None:
    worker = harness.warm()
    futures = harness.submit(MAX_SIZE if stage != "queued" else 1)
    if stage == "being finished":
        harness.free(worker)
    harness.shutdown()
    assert_retry(futures)
    with pytest.raises(ModelNotReady, match="shutting down"):
        harness.submit(1)


def test_the_dispatcher_stops_when_a_wake_up_comes_with_the_stop(harness: Harness) -> None:
    """A worker's answer can wake the dispatcher in the same turn of the loop as the engine's stop cancels it (Ctrl-C
    in a tool while batches are in flight). Python 3.11's asyncio.wait_for then returned the wake-up and lost the
    cancellation: the dispatcher waited again, for ever, and so did the stop."""
    harness.warm()
    harness.submit(1)  # in flight: the dispatcher waits for a wake-up or the request's deadline

    async def woken_as_it_stops() -> None:
        harness.batcher.poke()
        async with asyncio.timeout(30):
            await harness.dispatcher.stop()

    harness.loop.run_until_complete(woken_as_it_stops())
    assert not harness.dispatcher.running


# --- deadlines --------------------------------------------------------------------------------------------------


def test_a_request_that_waits_too_long_in_the_queue_gets_503(harness: Harness) -> None:
    worker = harness.warm()
    harness.submit(MAX_SIZE)  # the model is busy with these for ever
    queued = harness.submit(1)
    harness.advance(TIMEOUT_S - 1)
    assert not queued[0].done()
    harness.advance(1)
    assert_retry(queued, InferenceTimedOut)
    assert harness.batcher.queue_depth == 0 and worker.abandoned, "the hung worker is abandoned too"


def test_a_hung_worker_is_abandoned_and_its_late_answer_ignored(harness: Harness) -> None:
    hung, healthy = harness.warm(), harness.warm()
    held = harness.submit(MAX_SIZE)
    victim = hung if hung.delivered else healthy
    harness.advance(TIMEOUT_S)
    assert_retry(held, InferenceTimedOut)
    assert len(victim.abandoned) == 1
    harness.advance(TIMEOUT_S)
    assert len(victim.abandoned) == 1, "abandoned once, not at every turn"
    harness.answer(victim)  # it answers after all: the requests were answered already, exactly once
    assert_retry(held, InferenceTimedOut)
    harness.die(victim)  # the pool killed it
    survivor = healthy if victim is hung else hung
    later = harness.submit(MAX_SIZE)
    harness.answer(survivor)
    assert_analyzed(later, survivor)


def test_results_that_do_not_fit_are_a_protocol_error(harness: Harness) -> None:
    worker = harness.warm()
    sent = harness.submit(MAX_SIZE)
    with pytest.raises(WorkerProtocolError):
        harness.call(lambda: harness.batcher.results(worker, ["just one"]))
    assert_retry(sent)
    with pytest.raises(WorkerProtocolError):
        harness.call(lambda: harness.batcher.results(worker, []))  # nothing outstanding


def test_a_dispatcher_that_keeps_crashing_is_given_up_on(harness: Harness) -> None:
    worker = harness.warm()
    worker.broken_deliveries = 100
    for _ in range(3):
        futures = harness.submit(MAX_SIZE)
        harness.settle()
        assert_retry(futures)
    assert harness.dispatcher.gave_up and not harness.dispatcher.running
    assert harness.crashes == ["dispatcher"] * 3


# --- thousands of random orders ---------------------------------------------------------------------------------


class SchedulingMachine(RuleBasedStateMachine):
    """Random arrivals, warm-ups, model frees, answers, deaths, hangs, cancellations, time and shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.live: list[FakeWorker] = []
        self.everyone: list[FakeWorker] = []
        #: Every request submitted, with the (fake) time it was.
        self.futures: dict[asyncio.Future[Any], float] = {}
        self.refused = 0
        self.closed = False
        #: When the latest image arrived, and the gap before it (None for the first).
        self.last_arrival: float | None = None
        self.latest_gap: float | None = None

    # --- the pool's side --------------------------------------------------------------------------------------

    @precondition(lambda self: not self.closed and len(self.live) < 3)
    @rule()
    def warm_a_worker(self) -> None:
        worker = self.h.warm()
        self.live.append(worker)
        self.everyone.append(worker)

    @precondition(lambda self: any(worker.model_busy for worker in self.live))
    @rule(data=st.data())
    def model_frees(self, data: st.DataObject) -> None:
        self.h.free(data.draw(st.sampled_from([worker for worker in self.live if worker.model_busy])))

    @precondition(lambda self: any(worker.answered < worker.freed for worker in self.live))
    @rule(data=st.data())
    def worker_answers(self, data: st.DataObject) -> None:
        self.h.answer(data.draw(st.sampled_from([worker for worker in self.live if worker.answered < worker.freed])))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), everyone=st.booleans())
    def workers_die(self, data: st.DataObject, everyone: bool) -> None:
        self._lose(list(self.live) if everyone else [data.draw(st.sampled_from(self.live))])

    @precondition(lambda self: any(worker.abandoned for worker in self.live))
    @rule()
    def pool_kills_the_abandoned(self) -> None:
        self._lose([worker for worker in self.live if worker.abandoned])

    def _lose(self, victims: list[FakeWorker]) -> None:
        self.h.die(*victims)
        for victim in victims:
            self.live.remove(victim)

    # --- the world's side -------------------------------------------------------------------------------------

    @rule(count=st.integers(1, 2 * MAX_SIZE + 1),
          after=st.sampled_from([0.0, 1.0, MAX_WAIT_S / 2, MAX_WAIT_S, SILENCE_S]))
    def requests_arrive(self, count: int, after: float) -> None:
        """`count` images at once, `after` seconds from now: bursts and silences, so the arrival rate varies."""
        if after:
            self.h.advance(after)
        try:
            for future in self.h.submit(count):
                self.futures[future] = self.h.now
        except ModelNotReady:
            assert self.closed or not self.live, "refused while a worker was warm"
            self.refused += 1
            return
        first_gap = None if self.last_arrival is None else self.h.now - self.last_arrival
        self.latest_gap = first_gap if count == 1 else 0.0
        self.last_arrival = self.h.now

    @precondition(lambda self: any(not future.done() for future in self.futures))
    @rule(data=st.data())
    def a_caller_goes_away(self, data: st.DataObject) -> None:
        waiting = [future for future in self.futures if not future.done()]
        self.h.call(data.draw(st.sampled_from(waiting)).cancel)

    @rule(seconds=st.sampled_from([0.0, 1.0, MAX_WAIT_S / 2, MAX_WAIT_S, TIMEOUT_S / 2, TIMEOUT_S]))
    def time_passes(self, seconds: float) -> None:
        self.h.advance(seconds)

    @precondition(lambda self: not self.closed)
    @rule()
    def shutdown(self) -> None:
        self.h.shutdown()
        self.closed = True
        self.live.clear()

    # --- what must always hold --------------------------------------------------------------------------------

    @invariant()
    def no_task_died(self) -> None:
        assert self.h.crashes == []
        assert self.h.dispatcher.running or self.closed

    @invariant()
    def answers_are_right_and_come_by_the_deadline(self) -> None:
        delivered = {request.data.decode() for worker in self.everyone
                     for batch in worker.delivered for request in batch}
        for future, submitted_at in self.futures.items():
            if not future.done():
                assert not self.closed, "a request left waiting after shutdown"
                assert self.live, "a request left waiting with no worker"
                assert self.h.now - submitted_at < TIMEOUT_S, "a request waited past its deadline"
                continue
            if future.cancelled():
                continue
            result = future.result()
            if isinstance(result, str):
                assert result.removeprefix("analysis of ") in delivered, result
            else:
                assert isinstance(result, ModelNotReady | InferenceTimedOut), result

    @invariant()
    def nothing_due_is_left_waiting(self) -> None:
        """After every step, if a worker could take a batch, nothing in the queue is due yet."""
        if self.closed or self.h.batcher.queue_depth == 0:
            return
        idle = [w for w in self.live if not w.model_busy and not w.abandoned
                and len(w.delivered) - w.answered < BATCHES_PER_WORKER]
        if idle:
            assert self.h.batcher.queue_depth < MAX_SIZE, "a full batch waits beside an idle worker"

    def _idle_workers(self) -> list[FakeWorker]:
        return [w for w in self.live if not w.model_busy and not w.abandoned
                and len(w.delivered) - w.answered < BATCHES_PER_WORKER]

    def _queued(self) -> dict[asyncio.Future[Any], float]:
        """Requests still waiting and not sent to any worker, with when they arrived."""
        sent = {request.data.decode() for worker in self.everyone for batch in worker.delivered for request in batch}
        return {future: submitted_at for future, submitted_at in self.futures.items()
                if not future.done() and self.h.names[future] not in sent}

    @invariant()
    def no_image_waits_past_max_wait_beside_an_idle_worker(self) -> None:
        if self.closed or not self._idle_workers():
            return
        for submitted_at in self._queued().values():
            assert self.h.now - submitted_at < MAX_WAIT_S, "an image waited past max_wait beside an idle worker"

    @invariant()
    def after_a_silence_nothing_waits_beside_an_idle_worker(self) -> None:
        """An image that arrived after a silence (or first) finds the mean gap past max_wait: no company is expected,
        so neither it nor anything queued with it waits while a worker could take it."""
        silence = self.last_arrival is not None and (self.latest_gap is None or self.latest_gap >= SILENCE_S)
        if self.closed or not silence or not self._idle_workers():
            return
        assert not self._queued(), "images wait for company beside an idle worker after a silence"

    @invariant()
    def batch_sizes_within_limits(self) -> None:
        assert all(1 <= size <= MAX_SIZE for size in self.h.batches)

    def teardown(self) -> None:
        if not self.closed:
            self.h.shutdown()
        for future in self.futures:
            assert future.done(), "every request is answered, exactly once (a future resolves once)"
        self.h.close()


SchedulingMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_schedules = SchedulingMachine.TestCase
