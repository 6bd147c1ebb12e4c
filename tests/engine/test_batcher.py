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

from service.engine.batcher import BATCHES_PER_WORKER, Batcher, WorkerProtocolError
from service.engine.messages import AnalysisRequest
from service.engine.supervisor import SupervisedTask
from service.errors import InferenceTimedOut, ModelNotReady

MAX_SIZE = 4
MAX_WAIT_S = 10.0
TIMEOUT_S = 100.0


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

    def __init__(self, *, max_size: int = MAX_SIZE, max_wait_s: float = MAX_WAIT_S, timeout_s: float = TIMEOUT_S):
        self.now = 0.0
        self.loop = asyncio.new_event_loop()
        self.crashes: list[str] = []
        self.batches: list[int] = []
        self.batcher = Batcher(max_size=max_size, max_wait_s=max_wait_s, timeout_s=timeout_s,
                               clock=lambda: self.now, on_batch=self.batches.append)
        self.dispatcher = SupervisedTask("dispatcher", self.batcher.run, on_crash=self.crashes.append,
                                         max_crashes=3)
        self._requests = itertools.count()
        self.call(self.dispatcher.start)

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
            return [self.batcher.submit(AnalysisRequest(f"r{next(self._requests)}".encode(), False))
                    for _ in range(count)]

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

    @rule(count=st.integers(1, 2 * MAX_SIZE + 1))
    def requests_arrive(self, count: int) -> None:
        try:
            for future in self.h.submit(count):
                self.futures[future] = self.h.now
        except ModelNotReady:
            assert self.closed or not self.live, "refused while a worker was warm"
            self.refused += 1

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
