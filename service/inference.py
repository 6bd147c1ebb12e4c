"""The inference pool: spawned worker processes that each load the model once and analyze images.

TensorFlow is imported only inside workers (started with `spawn`, never forked from a process that holds it),
so the web process stays small and fast. Workers receive encoded image bytes and return encoded outputs.
The standard library's ProcessPoolExecutor breaks as a whole when one worker dies; the engine then reports
not-ready, answers the affected requests with `ModelNotReady` (503, redelivered) and rebuilds the pool.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from service.analysis import Analysis, ImageLimits, PredictBatch, analyze_image
from service.errors import ModelNotReady
from service.model_spec import ModelSpec

logger = logging.getLogger(__name__)


class InferenceEngine:
    """Owns the worker pool; `ready` only while every worker has loaded and warmed the model."""

    def __init__(
        self,
        spec_path: Path,
        *,
        workers: int,
        threads_per_worker: int,
        limits: ImageLimits,
        start_timeout_s: float = 300.0,
    ) -> None:
        self._spec_path = spec_path
        self._workers = workers
        self._threads = threads_per_worker
        self._limits = limits
        self._start_timeout_s = start_timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._ready = False
        self._rebuild: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Start the workers and wait until each has loaded and warmed the model; raise if any cannot."""
        self._pool = await self._start_pool()
        self._ready = True

    async def analyze(self, data: bytes, *, anonymize_always: bool) -> Analysis:
        pool = self._pool
        if not self._ready or pool is None:
            raise ModelNotReady("the model is not loaded yet")
        try:
            future = pool.submit(worker_analyze, data, anonymize_always)
            return await asyncio.wrap_future(future)
        except BrokenExecutor:
            self._replace_broken(pool)
            raise ModelNotReady("an inference worker died; the pool is being restarted") from None

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False
        if self._rebuild is not None:
            self._rebuild.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(pid for pid, process in processes.items() if process.is_alive())

    async def _start_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker_initialize,
            initargs=(str(self._spec_path), self._threads, self._limits),
        )
        try:
            await asyncio.wait_for(self._wait_until_all_warm(pool), timeout=self._start_timeout_s)
        except BaseException as error:
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(error, BrokenExecutor):
                raise RuntimeError("an inference worker failed to load the model (see its error above)") from None
            if isinstance(error, TimeoutError):
                raise RuntimeError(f"workers did not load the model within {self._start_timeout_s:.0f} s") from None
            raise
        return pool

    async def _wait_until_all_warm(self, pool: ProcessPoolExecutor) -> None:
        # The executor spawns one process per concurrent submission, and a worker answers the probe only after
        # its initializer loaded and warmed the model; re-probe until every worker has answered.
        answered: set[int] = set()
        while len(answered) < self._workers:
            probes: list[Future[int]] = [pool.submit(worker_probe) for _ in range(self._workers)]
            answered.update(await asyncio.gather(*(asyncio.wrap_future(probe) for probe in probes)))
            if len(answered) < self._workers:
                await asyncio.sleep(0.05)  # a warm worker answered for one still loading: ask again shortly

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        if broken is not self._pool or self._stopping:
            return  # another request already started the replacement
        self._ready = False
        logger.error("inference pool broken (a worker died); restarting it")
        broken.shutdown(wait=False, cancel_futures=True)
        self._rebuild = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                self._pool = await self._start_pool()
                self._ready = True
                logger.info("inference pool restarted")
                return
            except Exception:
                logger.exception("restarting the inference pool failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


# --- Everything below runs inside worker processes. ------------------------------------------------------

_worker: dict[str, Any] = {}


def worker_initialize(spec_path: str, threads: int, limits: ImageLimits) -> None:
    """Load the model once per worker and warm its compiled call, before the worker takes any work."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = ModelSpec.load(spec_path)
    _worker.update(spec=spec, limits=limits, predict=_load_keras(spec, threads))


def _load_keras(spec: ModelSpec, threads: int) -> PredictBatch:
    import numpy as np
    import tensorflow as tf

    # Threads must be set before TensorFlow runs anything; workers x threads should not exceed the cores.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    model = keras.saving.load_model(spec.weights, compile=False)
    signature = tf.TensorSpec([None, spec.input.height, spec.input.width, spec.input.channels], tf.float32)
    # One trace for every batch size: a compiled graph instead of an eager call per request.
    # No Python control flow to convert: autograph off (it would also litter /tmp with generated files).
    compiled = tf.function(
        lambda batch: model(batch, training=False), input_signature=[signature], autograph=False
    )

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(tf.constant(batch, dtype=tf.float32)))

    predict(np.zeros((1, spec.input.height, spec.input.width, spec.input.channels), np.float32))
    return predict


def worker_probe() -> int:
    """Answered only once the initializer has finished: proof that this worker is warm."""
    return os.getpid()


def worker_analyze(data: bytes, anonymize_always: bool) -> Analysis:
    return analyze_image(
        data,
        spec=_worker["spec"],
        predict=_worker["predict"],
        limits=_worker["limits"],
        anonymize_always=anonymize_always,
    )
