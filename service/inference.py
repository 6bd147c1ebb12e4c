"""The inference engine: supervised worker processes behind an adaptive micro-batcher.

Workers are spawned (never forked from a process that holds TensorFlow), load the model once, warm it, and then
analyze whole batches: one round trip per batch, encoded bytes in, encoded outputs back. Concurrent requests are
gathered into a batch that is released when it is full (`BATCH_MAX_SIZE`) or when its first request has waited
`BATCH_MAX_WAIT_MS`; while every worker's model is busy, requests keep gathering, so batches grow with load.

Inside a worker the model and the imaging (stamp, text search, blur, encodes) overlap: as soon as the model has
run on a batch the worker says so (`MODEL_FREE`) and the next batch may arrive while a second thread finishes
the previous one. A worker holds at most two batches, so memory stays bounded.

Each worker has its own pipe, so a worker that dies (SIGKILL, OOM, segfault) fails only the batch it held: those
requests get `ModelNotReady` (503, redelivered), a replacement is spawned and takes work once warm. The engine is
ready while at least one worker is warm. TensorFlow is imported only inside workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cv2

from service.analysis import (
    Analysis,
    AnalysisOutcome,
    AnalysisRequest,
    ImageLimits,
    PredictedBatch,
    finish_batch,
    predict_batch,
)
from service.backends import load_predict
from service.errors import ModelNotReady, PipelineError
from service.model_spec import ModelSpec
from service.settings import Settings

logger = logging.getLogger(__name__)
_SPAWN = multiprocessing.get_context("spawn")
#: A worker's message that its model is idle again (the batch it ran is still being finished).
MODEL_FREE = "model-free"
#: Batches one worker may hold: one in the model, one being finished.
_BATCHES_PER_WORKER = 2


@dataclass
class _Pending:
    request: AnalysisRequest
    future: asyncio.Future[AnalysisOutcome]
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Worker:
    """The parent's handle on one worker process."""

    process: Any
    connection: Connection
    warm: bool = False
    #: Batches sent and not yet answered, oldest first (failed with ModelNotReady if the worker dies).
    batches: collections.deque[list[_Pending]] = field(default_factory=collections.deque)
    model_busy: bool = False

    @property
    def can_take_batch(self) -> bool:
        return self.warm and not self.model_busy and len(self.batches) < _BATCHES_PER_WORKER


class InferenceEngine:
    """Owns the workers and the batcher; `ready` while at least one worker is warm."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        workers: int,
        threads_per_worker: int,
        limits: ImageLimits,
        start_timeout_s: float = 300.0,
        batch_max_size: int = 8,
        batch_max_wait_ms: float = 5.0,
    ) -> None:
        self._spec = spec
        self._worker_count = workers
        self._threads = threads_per_worker
        self._limits = limits
        self._start_timeout_s = start_timeout_s
        self._batch_max_size = batch_max_size
        self._batch_max_wait_s = batch_max_wait_ms / 1000
        self._workers: list[_Worker] = []
        self._queue: collections.deque[_Pending] = collections.deque()
        self._work_arrived = asyncio.Event()
        self._worker_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Imported here, not at the top: worker processes import this module too, and prometheus_client would
        # only add to each worker's start (~60 ms). Engines exist only in the web process.
        from service import metrics

        self._metrics = metrics
        #: Sizes of the most recent batches dispatched (for tests; /metrics has them as a histogram).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self.restarts = 0

    @property
    def ready(self) -> bool:
        return not self._stopping and any(worker.warm for worker in self._workers)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def queue_depth(self) -> int:
        """Images waiting for a worker, not yet in a batch."""
        return len(self._queue)

    @property
    def warm_workers(self) -> int:
        return sum(worker.warm for worker in self._workers)

    @property
    def worker_count(self) -> int:
        return self._worker_count

    def worker_pids(self) -> list[int]:
        return sorted(worker.process.pid for worker in self._workers if worker.process.is_alive())

    @classmethod
    def from_settings(cls, settings: Settings, spec: ModelSpec) -> InferenceEngine:
        return cls(
            spec,
            workers=settings.workers,
            threads_per_worker=settings.effective_worker_threads,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            start_timeout_s=settings.worker_start_timeout_s,
            batch_max_size=settings.batch_max_size,
            batch_max_wait_ms=settings.batch_max_wait_ms,
        )

    def launch(self) -> None:
        """Spawn every worker now, without waiting: they import their runtime and load the model while the
        caller goes on (`serve` imports the web stack meanwhile). `start` waits for them."""
        if not self._workers:
            for _ in range(self._worker_count):
                self._launch_worker()

    async def start(self) -> None:
        """Launch the workers (unless `launch` did) and wait until all are warm; raise if any cannot load."""
        self._loop = asyncio.get_running_loop()
        self._work_arrived = asyncio.Event()
        self._worker_freed = asyncio.Event()
        self._metrics.watch_engine(self)
        self.launch()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._until_warm(worker) for worker in list(self._workers))),
                timeout=self._start_timeout_s,
            )
        except BaseException as error:
            await self.stop()
            if isinstance(error, TimeoutError):
                raise RuntimeError(f"workers did not load the model within {self._start_timeout_s:.0f} s") from None
            raise
        self._background(self._dispatch_forever())

    async def analyze(self, data: bytes, *, anonymize_always: bool) -> Analysis:
        if not self.ready:
            raise ModelNotReady("the model is not loaded yet")
        future: asyncio.Future[AnalysisOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(AnalysisRequest(data, anonymize_always), future))
        self._work_arrived.set()
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        self._metrics.add_stage_timings(outcome.timings)
        return outcome

    async def stop(self) -> None:
        self._stopping = True
        self._metrics.forget_engine(self)
        for task in self._tasks:
            task.cancel()
        self._fail_queued(ModelNotReady("the service is shutting down"))
        workers, self._workers = self._workers, []
        for worker in workers:
            with contextlib.suppress(OSError, ValueError):
                worker.connection.send(None)  # finish and exit
        await asyncio.gather(*(asyncio.to_thread(self._reap, worker) for worker in workers))

    # --- supervision ------------------------------------------------------------------------------------

    async def _spawn_worker(self) -> None:
        await self._until_warm(self._launch_worker())

    def _launch_worker(self) -> _Worker:
        parent_end, child_end = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=worker_main,
            args=(child_end, self._spec, self._threads, self._limits),
            name="xray-inference-worker",
            daemon=True,  # never outlive the web process
        )
        with _main_module_hidden(), _worker_environment():
            process.start()
        child_end.close()
        worker = _Worker(process, parent_end)
        self._workers.append(worker)
        return worker

    async def _until_warm(self, worker: _Worker) -> None:
        hello = await asyncio.to_thread(_receive, worker.connection)
        if not (isinstance(hello, tuple) and hello[0] == "ready"):
            self._workers.remove(worker)
            await asyncio.to_thread(self._reap, worker)
            reason = hello[1] if isinstance(hello, tuple) else "it exited while loading"
            raise RuntimeError(f"an inference worker failed to load the model: {reason}")
        worker.warm = True
        threading.Thread(target=self._read_results, args=(worker,), daemon=True, name="worker-reader").start()
        self._worker_freed.set()

    def _read_results(self, worker: _Worker) -> None:
        """One thread per worker: blocking reads keep large results off the event loop."""
        assert self._loop is not None
        while True:
            message = _receive(worker.connection)
            try:
                if message is None:
                    self._loop.call_soon_threadsafe(self._on_worker_exit, worker)
                    return
                if message == MODEL_FREE:
                    self._loop.call_soon_threadsafe(self._on_model_free, worker)
                    continue
                self._loop.call_soon_threadsafe(self._on_results, worker, message)
            except RuntimeError:
                return  # the event loop is closed: the engine was stopped

    def _on_model_free(self, worker: _Worker) -> None:
        worker.model_busy = False
        self._worker_freed.set()

    def _on_results(self, worker: _Worker, outcomes: list[AnalysisOutcome]) -> None:
        batch = worker.batches.popleft()  # a worker answers its batches in the order it got them
        for pending, outcome in zip(batch, outcomes, strict=True):
            if not pending.future.done():
                pending.future.set_result(outcome)
        self._worker_freed.set()

    def _on_worker_exit(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return  # stopped on purpose
        self._workers.remove(worker)
        exit_code = worker.process.exitcode
        held = [pending for batch in worker.batches for pending in batch]
        logger.error("inference worker %d died (exit code %s) holding %d request(s); replacing it",
                     worker.process.pid, exit_code, len(held))
        for pending in held:
            if not pending.future.done():
                pending.future.set_result(ModelNotReady("the inference worker died; retry"))
        worker.batches.clear()
        if not self.ready:
            # Nobody can take the queued work soon: answer 503 now rather than hold requests for a reload.
            self._fail_queued(ModelNotReady("no inference worker is ready"))
        if not self._stopping:
            self.restarts += 1
            self._metrics.observe_worker_restart()
            self._background(self._replace_worker())

    async def _replace_worker(self) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                await self._spawn_worker()
                logger.info("replacement inference worker is warm")
                return
            except Exception:
                logger.exception("starting a replacement worker failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    @staticmethod
    def _reap(worker: _Worker) -> None:
        worker.process.join(timeout=10)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.connection.close()

    # --- batching -----------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            while not self._queue:
                self._work_arrived.clear()
                await self._work_arrived.wait()
            worker = await self._idle_worker()
            # Gather until full or until the oldest request has waited long enough.
            deadline = self._queue[0].queued_at + self._batch_max_wait_s
            while len(self._queue) < self._batch_max_size and (remaining := deadline - time.monotonic()) > 0:
                self._work_arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work_arrived.wait(), remaining)
            if worker not in self._workers or not self._queue:
                continue  # it died, or the queue was failed, while the batch gathered
            size = min(len(self._queue), self._batch_max_size)
            batch = [self._queue.popleft() for _ in range(size)]
            worker.batches.append(batch)
            worker.model_busy = True
            self.batch_sizes.append(size)
            self._metrics.observe_batch_size(size)
            # If the worker died meanwhile, its reader thread reports the exit and fails the batch.
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(worker.connection.send, [pending.request for pending in batch])

    async def _idle_worker(self) -> _Worker:
        while True:
            # The least loaded first: a worker with nothing to finish answers soonest.
            candidates = [worker for worker in self._workers if worker.can_take_batch]
            if candidates:
                return min(candidates, key=lambda worker: len(worker.batches))
            self._worker_freed.clear()
            await self._worker_freed.wait()

    def _fail_queued(self, error: PipelineError) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_result(error)

    def _background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Keep a spawned worker from importing the parent's `__main__` (multiprocessing does that by default).

    For the service that module is the CLI, which pulls in FastAPI, uvicorn and boto3: about a second of CPU
    and tens of MB per worker, none of it used there (`worker_main` is importable on its own). Only the
    spawn reads `__main__` meanwhile; nothing in this service is defined in `__main__`.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


#: Set for worker processes unless the environment already says otherwise. glibc reads MALLOC_ARENA_MAX when a
#: process starts, so it must be in the environment the worker is spawned with. Its default, up to 8 malloc arenas
#: per core, lets the model's threads and the finishing thread each fragment their own: 2 keep a Keras worker's
#: peak ~16 MB lower at the same speed (measured with 64 X-rays).
_WORKER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "2"}


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """`_WORKER_ENVIRONMENT` in os.environ while a worker is spawned (it inherits it), then as it was."""
    added = {name: value for name, value in _WORKER_ENVIRONMENT.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _receive(connection: Connection) -> Any:
    try:
        return connection.recv()
    except (EOFError, OSError):
        return None


# --- Everything below runs inside worker processes. ------------------------------------------------------


class _HeldOutput:
    """What native code wrote to file descriptor 2 while it was redirected to a temporary file."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def read_tail(self, limit: int = 2000) -> str:
        self._file.seek(0)
        return self._file.read().decode(errors="replace").strip()[-limit:]


@contextlib.contextmanager
def _native_start_notices_held() -> Iterator[_HeldOutput]:
    """TensorFlow's C++ start-up notices (oneDNN, absl, CPU features) are written straight to file descriptor 2,
    bypassing TF_CPP_MIN_LOG_LEVEL: they would be the only lines of the JSON log that are not JSON. They are held
    while the runtime loads and dropped, unless loading fails (then they go with the error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield _HeldOutput(held)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def worker_main(connection: Connection, spec: ModelSpec, threads: int, limits: ImageLimits) -> None:
    """Load and warm the model, say so, then analyze batches until told to stop or the parent goes away.

    This thread decodes and runs the model; a second thread finishes each batch (stamp, text search, blur,
    encodes) and sends the results, so the model can start on the next batch meanwhile.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The model's threads already use the cores this worker is given; OpenCV's own pool on top of them would
    # spend CPU on hand-offs and spinning (about 20 % more CPU for the imaging, measured).
    cv2.setNumThreads(1)
    with _native_start_notices_held() as held:
        try:
            predict = load_predict(spec, threads)
        except Exception as error:
            notices = held.read_tail()
            connection.send(("failed", f"{type(error).__name__}: {error}" + (f" [{notices}]" if notices else "")))
            return
    sending = threading.Lock()

    def send(message: Any) -> None:
        with sending:
            connection.send(message)

    send(("ready", os.getpid()))
    to_finish: queue.SimpleQueue[PredictedBatch | None] = queue.SimpleQueue()

    def finish_forever() -> None:
        while (batch := to_finish.get()) is not None:
            outcomes = finish_batch(batch, spec=spec)
            try:
                send([_picklable(outcome) for outcome in outcomes])
            except (OSError, ValueError):
                return  # the parent is gone

    finisher = threading.Thread(target=finish_forever, name="finisher")
    finisher.start()
    try:
        while (requests := _receive(connection)) is not None:
            to_finish.put(predict_batch(requests, spec=spec, predict=predict, limits=limits))
            send(MODEL_FREE)
    except (OSError, ValueError):
        pass  # the parent is gone: nobody is waiting for results
    finally:
        to_finish.put(None)
        finisher.join()


def _picklable(outcome: AnalysisOutcome) -> AnalysisOutcome:
    # Our errors pickle by design; any other exception is reduced to its text so one odd error cannot
    # break the pipe for the whole batch.
    if isinstance(outcome, Exception) and not isinstance(outcome, PipelineError):
        return RuntimeError(f"{type(outcome).__name__}: {outcome}")
    return outcome
