"""`InferenceEngine`, the one object the rest of the service uses to analyze images: it keeps the pool of worker
processes full and feeds the batcher what they say.

Workers (service.engine.spawn) load the model once and warm it. Each has its own pipe, read by one reader thread
(here) and written by one writer thread, so neither a large result nor a worker that stopped reading can block the
event loop or another worker. Every message is handled on the event loop.

A worker that dies (SIGKILL, OOM, segfault) or is abandoned as hung fails only the requests it held (503, which
Knative and Ceph redeliver); its pipe is closed, its process reaped and its exit logged, and the pool keeper starts
a replacement, which takes work once warm. A replacement that does not warm within `WORKER_START_TIMEOUT_S` is
killed and tried again with backoff; after `WORKER_RESTART_LIMIT` failures in a row, or when a supervised task
cannot be kept running, `healthy` turns false and /healthz answers 503, so Kubernetes restarts the pod.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from typing import Any

from service import metrics
from service.engine.batcher import Batcher
from service.engine.messages import (
    Analysis,
    AnalysisRequest,
    BatchResults,
    ImageLimits,
    LoadFailed,
    ModelFree,
    Ready,
    Stop,
    TextOptions,
)
from service.engine.spawn import WorkerProcess, describe_exit, reap, spawn_worker, write_forever
from service.engine.supervisor import SupervisedTask
from service.errors import InferenceTimedOut, ModelNotReady
from service.models.spec import ModelSpec
from service.settings import Settings

logger = logging.getLogger(__name__)
#: Longest the pool waits between two attempts to start a replacement that failed.
_MAX_RETRY_DELAY_S = 30.0
#: Past INFERENCE_TIMEOUT_S, when `analyze` stops waiting for the batcher's own answer.
_DEADLINE_GRACE_S = 5.0


class InferenceEngine:
    """Owns the workers and the batcher; `ready` while at least one worker is warm, `healthy` while it can heal."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        workers: int,
        threads_per_worker: int,
        limits: ImageLimits,
        deid_key: bytes,
        text: TextOptions,
        dicom_output_syntax: str = "source",
        start_timeout_s: float = 300.0,
        batch_max_size: int = 8,
        batch_max_wait_ms: float = 5.0,
        adaptive_wait: bool = True,
        inference_timeout_s: float = 60.0,
        restart_limit: int = 3,
    ) -> None:
        self._spec = spec
        self._worker_count = workers
        self._threads = threads_per_worker
        self._limits = limits
        self._deid_key = deid_key
        self._dicom_output_syntax = dicom_output_syntax
        self._text = text
        self._start_timeout_s = start_timeout_s
        self._restart_limit = restart_limit
        self._inference_timeout_s = inference_timeout_s
        self._batch_max_size = batch_max_size
        self._batch_max_wait_s = batch_max_wait_ms / 1000
        self._adaptive_wait = adaptive_wait
        self._batcher = self._new_batcher()
        self._workers: list[WorkerProcess] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._pool_changed: asyncio.Event | None = None
        self._retry_at = 0.0
        self._retry_delay_s = 1.0
        #: Replacements that failed to warm since the last one that did.
        self.failed_starts_in_a_row = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        crashed = metrics.observe_engine_task_crash
        # A lambda, not the bound method: `start` after a `stop` makes a new batcher.
        self._dispatcher = SupervisedTask("dispatcher", lambda: self._batcher.run(), on_crash=crashed)
        self._keeper = SupervisedTask("pool-keeper", self._keep_pool_full, on_crash=crashed, first_backoff_s=1.0)
        #: Sizes of the most recent batches dispatched (for tests; /metrics has them as a histogram).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self.restarts = 0

    @classmethod
    def from_settings(cls, settings: Settings, spec: ModelSpec) -> InferenceEngine:
        return cls(
            spec,
            workers=settings.workers,
            threads_per_worker=settings.effective_worker_threads,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            deid_key=settings.effective_pseudonym_key,
            text=TextOptions(settings.effective_text_models_dir, keep_markers=not settings.redact_orientation_markers),
            dicom_output_syntax=settings.dicom_output_syntax,
            start_timeout_s=settings.worker_start_timeout_s,
            batch_max_size=settings.batch_max_size,
            batch_max_wait_ms=settings.batch_max_wait_ms,
            adaptive_wait=settings.batch_wait_policy == "adaptive",
            inference_timeout_s=settings.inference_timeout_s,
            restart_limit=settings.worker_restart_limit,
        )

    # --- state --------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self._stopping and self._batcher.warm_workers > 0

    @property
    def healthy(self) -> bool:
        """False when the engine cannot recover by itself: a supervised task was given up on, or replacements
        keep failing to warm. Before start and after stop it is healthy (there is nothing to recover)."""
        return not (
            self._dispatcher.gave_up or self._keeper.gave_up or self.failed_starts_in_a_row >= self._restart_limit
        )

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def queue_depth(self) -> int:
        """Images waiting for a worker, not yet in a batch."""
        return self._batcher.queue_depth

    @property
    def warm_workers(self) -> int:
        return self._batcher.warm_workers

    @property
    def worker_count(self) -> int:
        return self._worker_count

    def worker_pids(self) -> list[int]:
        return sorted(worker.pid for worker in self._workers if not worker.gone and worker.exit_code is None)

    # --- life cycle ---------------------------------------------------------------------------------------

    def launch(self) -> None:
        """Spawn every worker now, without waiting: they import their runtime and load the model while the
        caller goes on (`serve` imports the web stack meanwhile). `start` waits for them."""
        if not self._workers:
            for _ in range(self._worker_count):
                self._launch_worker()

    async def start(self) -> None:
        """Launch the workers (unless `launch` did) and wait until all are warm; raise if any cannot load."""
        self._loop = asyncio.get_running_loop()
        self._pool_changed = asyncio.Event()
        if self._stopping:  # started again after a stop (a tool's run, a test): a fresh start
            self._stopping = False
            self._batcher = self._new_batcher()
            self._retry_at, self._retry_delay_s, self.failed_starts_in_a_row = 0.0, 1.0, 0
        metrics.watch_engine(self)
        self.launch()
        for worker in self._workers:
            self._start_threads(worker)
        warming = [asyncio.ensure_future(self._until_warm(worker)) for worker in list(self._workers)]
        try:
            async with asyncio.timeout(self._start_timeout_s):  # not wait_for: see Batcher.run
                await asyncio.gather(*warming)
        except BaseException as error:
            # One failed: the others are stopped too (each discards its worker), not left waiting for ever.
            for task in warming:
                task.cancel()
            await asyncio.gather(*warming, return_exceptions=True)
            await self.stop()
            if isinstance(error, TimeoutError):
                raise RuntimeError(f"workers did not load the model within {self._start_timeout_s:.0f} s") from None
            raise
        self._dispatcher.start()
        self._keeper.start()

    async def analyze(self, data: bytes, *, anonymize_always: bool) -> Analysis:
        """Analyze one image in a worker; raises its PipelineError, or a TransientFailure (503) when no worker
        answers it within INFERENCE_TIMEOUT_S, when its worker dies, or at shutdown."""
        if not self.ready:
            raise ModelNotReady("the model is not loaded yet")
        future = self._batcher.submit(AnalysisRequest(data, anonymize_always, self._deid_key,
                                                      self._dicom_output_syntax))
        try:
            # The batcher answers by the deadline; this bound holds even if its dispatcher could not be kept running.
            # asyncio.timeout, not wait_for (see Batcher.run): with wait_for, an answer coming in the same turn of
            # the loop as the caller's cancellation (Ctrl-C in a tool) was returned and the cancellation lost, and
            # the tool went on to the next image instead of stopping.
            async with asyncio.timeout(self._inference_timeout_s + _DEADLINE_GRACE_S):
                outcome = await future
        except TimeoutError:
            raise InferenceTimedOut("no inference worker answered in time; retry") from None
        if isinstance(outcome, Exception):
            raise outcome
        metrics.add_stage_timings(outcome.timings)
        return outcome

    async def stop(self) -> None:
        """Answer every pending request (503), stop the workers and reap them; no replacement starts after this."""
        self._stopping = True
        metrics.forget_engine(self)
        await self._keeper.stop()
        await self._dispatcher.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._batcher.close(ModelNotReady("the service is shutting down"))
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.gone = True
            worker.outbox.put(Stop())
        await asyncio.gather(*(reap(worker) for worker in workers))

    def _new_batcher(self) -> Batcher:
        return Batcher(
            max_size=self._batch_max_size,
            max_wait_s=self._batch_max_wait_s,
            adaptive_wait=self._adaptive_wait,
            timeout_s=self._inference_timeout_s,
            on_batch=self._observe_batch,
        )

    # --- the workers --------------------------------------------------------------------------------------

    def _launch_worker(self) -> WorkerProcess:
        worker = spawn_worker(self._spec, self._threads, self._limits, self._text)
        self._workers.append(worker)
        if self._loop is not None:
            self._start_threads(worker)
        return worker

    def _start_threads(self, worker: WorkerProcess) -> None:
        if worker.threads:
            return
        assert self._loop is not None
        # Here, not at launch: `launch` may run before there is an event loop (`serve` launches workers first).
        worker.warmed = self._loop.create_future()
        worker.threads = [
            threading.Thread(target=self._read_forever, args=(worker,), daemon=True, name="worker-reader"),
            threading.Thread(target=write_forever, args=(worker,), daemon=True, name="worker-writer"),
        ]
        for thread in worker.threads:
            thread.start()

    async def _until_warm(self, worker: WorkerProcess) -> None:
        """Wait for the worker's Ready, then hand it to the batcher; a worker that cannot is discarded."""
        assert worker.warmed is not None
        try:
            await worker.warmed
            # Re-checked after the await: it may have died, or the engine stopped, since it said Ready.
            if worker.exited or worker.gone or self._stopping:
                raise RuntimeError("an inference worker failed to load the model: it exited as it warmed up")
        except BaseException:
            await self._discard(worker)
            raise
        worker.serving = True
        self._batcher.add_worker(worker)

    async def _discard(self, worker: WorkerProcess) -> None:
        """Take a worker that never served out of the pool: kill it if it still runs, reap it."""
        if worker.gone:
            return  # stop() has it
        worker.gone = True
        worker.kill()
        if worker in self._workers:
            self._workers.remove(worker)
        await asyncio.shield(reap(worker))

    def _read_forever(self, worker: WorkerProcess) -> None:
        """The worker's reader thread: blocking reads keep large results off the event loop; every message is
        handled on the loop. Ends at the pipe's EOF (the worker exited or was killed)."""
        assert self._loop is not None
        while True:
            try:
                message = worker.connection.recv()
            except (EOFError, OSError):
                message = None
            except Exception as error:  # an unreadable message: the stream from this worker cannot be trusted
                logger.error("unreadable message from inference worker %d (%s); killing it",
                             worker.pid, type(error).__name__)
                metrics.observe_engine_task_crash("worker-reader")
                worker.kill()
                continue  # read on until the EOF of the killed worker
            try:
                self._loop.call_soon_threadsafe(self._on_message, worker, message)
            except RuntimeError:
                return  # the event loop is closed: the engine was stopped
            if message is None:
                return

    def _on_message(self, worker: WorkerProcess, message: Any) -> None:
        try:
            if message is None:
                self._on_worker_exit(worker)
            elif isinstance(message, ModelFree):
                self._batcher.model_free(worker)
            elif isinstance(message, BatchResults):
                self._batcher.results(worker, message.outcomes)
            elif isinstance(message, Ready):
                if worker.warmed is not None and not worker.warmed.done():
                    worker.warmed.set_result(message.pid)
            elif isinstance(message, LoadFailed):
                self._not_warm(worker, message.reason)
            else:
                raise TypeError(f"unexpected message {type(message).__name__} from an inference worker")
        except Exception:
            # A worker that says what cannot be cannot be trusted with more: replaced like a dead one.
            logger.exception("inference worker %d broke the protocol; killing it", worker.pid)
            metrics.observe_engine_task_crash("message-handler")
            worker.kill()

    def _not_warm(self, worker: WorkerProcess, reason: str) -> None:
        if not worker.gone and worker.warmed is not None and not worker.warmed.done():
            worker.warmed.set_exception(RuntimeError(f"an inference worker failed to load the model: {reason}"))

    def _on_worker_exit(self, worker: WorkerProcess) -> None:
        worker.exited = True
        if worker.gone:
            return  # stopped on purpose, or already handled
        if not worker.serving:
            self._not_warm(worker, "it exited while loading")
            return  # its starter (`_until_warm`) sees it and discards it
        held = self._batcher.lose_worker(worker, ModelNotReady("the inference worker died; retry"))
        worker.gone = True
        self._workers.remove(worker)
        self.restarts += 1
        metrics.observe_worker_restart()
        self._background(self._bury(worker, held))
        if self._pool_changed is not None:
            self._pool_changed.set()

    async def _bury(self, worker: WorkerProcess, held: int) -> None:
        """Reap a dead worker (its exit code is known only then) and close its pipe, then say how it died."""
        await reap(worker)
        logger.error("inference worker %d died: %s; the %d request(s) it held were answered 503; replacing it",
                     worker.pid, describe_exit(worker.exit_code), held)

    async def _keep_pool_full(self) -> None:
        """Start a replacement for every worker missing from the pool, at once, with backoff after failures."""
        assert self._pool_changed is not None and self._loop is not None
        while not self._stopping:
            self._pool_changed.clear()
            missing = self._worker_count - len(self._workers)
            delay = self._retry_at - self._loop.time()
            if missing > 0 and delay <= 0:
                for _ in range(missing):
                    self._background(self._warm_replacement(self._launch_worker()))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay if missing > 0 else None):  # not wait_for: see Batcher.run
                    await self._pool_changed.wait()

    async def _warm_replacement(self, worker: WorkerProcess) -> None:
        assert self._loop is not None and self._pool_changed is not None
        try:
            # _until_warm discards the worker on any failure, the timeout's cancellation included.
            async with asyncio.timeout(self._start_timeout_s):  # not wait_for: see Batcher.run
                await self._until_warm(worker)
        except Exception as error:
            if isinstance(error, TimeoutError):
                logger.error("a replacement inference worker did not warm within %.0f s; killed it",
                             self._start_timeout_s)
            else:
                logger.error("a replacement inference worker failed: %s", error)
            self.failed_starts_in_a_row += 1
            metrics.observe_worker_start_failure()
            if self.failed_starts_in_a_row >= self._restart_limit:
                logger.critical("%d replacement workers in a row failed to warm; the service reports itself "
                                "unhealthy", self.failed_starts_in_a_row)
            self._retry_at = self._loop.time() + self._retry_delay_s
            self._retry_delay_s = min(self._retry_delay_s * 2, _MAX_RETRY_DELAY_S)
        else:
            self.failed_starts_in_a_row = 0
            self._retry_delay_s = 1.0
            logger.info("replacement inference worker %d is warm", worker.pid)
        finally:
            self._pool_changed.set()

    def _observe_batch(self, size: int) -> None:
        self.batch_sizes.append(size)
        metrics.observe_batch_size(size)

    def _background(self, coroutine: Any) -> None:
        """Run a short task of the engine's own; stop() cancels and awaits what is left of them."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._after_background)

    def _after_background(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("engine task failed", exc_info=task.exception())
            metrics.observe_engine_task_crash("background")
            if self._pool_changed is not None:
                self._pool_changed.set()  # whatever it was doing for the pool, the keeper looks again
