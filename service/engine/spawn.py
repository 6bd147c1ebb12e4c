"""One worker process as the parent sees it: spawned (never forked from a process that may hold TensorFlow), with
its pipe, its outbox and the two threads that use the pipe, and reaped once it is gone (no zombie, no leaked
descriptor, its exit described by cause)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from service import metrics
from service.engine.boot import run_worker
from service.engine.messages import AnalysisRequest, AnalyzeBatch, ImageLimits, Stop, TextOptions, ToWorker
from service.models.spec import ModelSpec

logger = logging.getLogger(__name__)
_SPAWN = multiprocessing.get_context("spawn")
#: How long a worker told to stop may take to finish what it holds before it is killed.
_STOP_GRACE_S = 10.0


@dataclass(eq=False)
class WorkerProcess:
    """The parent's handle on one worker process: its pipe, its two threads, and what it has said."""

    process: Any
    connection: Connection
    pid: int
    #: Resolved by the worker's first message (Ready, or LoadFailed/exit as an error); made once a loop runs.
    warmed: asyncio.Future[int] | None = None
    outbox: queue.SimpleQueue[ToWorker | None] = field(default_factory=queue.SimpleQueue)
    threads: list[threading.Thread] = field(default_factory=list)
    #: Taking batches (warm and handed to the batcher).
    serving: bool = False
    #: Its pipe reached EOF: the process has exited or is about to.
    exited: bool = False
    #: The pool has taken it out of service (died, killed, failed to start, or stopped); it is reaped once.
    gone: bool = False
    #: How the process ended, once reaped (a negative number is the signal that killed it).
    exit_code: int | None = None

    def deliver(self, requests: list[AnalysisRequest]) -> None:
        self.outbox.put(AnalyzeBatch(requests))

    def abandon(self, reason: str) -> None:
        logger.error("killing inference worker %d: %s", self.pid, reason)
        self.kill()

    def kill(self) -> None:
        # A killed worker's pipe reaches EOF, and the reader thread reports the exit like any other death.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()


def spawn_worker(spec: ModelSpec, threads: int, limits: ImageLimits, text: TextOptions) -> WorkerProcess:
    """Start a worker process (it loads the model on its own); the caller starts its threads once a loop runs."""
    parent_end, child_end = _SPAWN.Pipe()
    process = _SPAWN.Process(
        target=run_worker,
        args=(child_end, spec, threads, limits, text),
        name="xray-inference-worker",
        daemon=True,  # never outlive the web process
    )
    with _main_module_hidden(), _worker_environment():
        process.start()
    child_end.close()
    return WorkerProcess(process, parent_end, pid=process.pid)


def write_forever(worker: WorkerProcess) -> None:
    """The worker's writer thread: a worker that stopped reading blocks only this thread (the batcher's
    deadline then abandons it, and the kill ends the blocked send)."""
    while (message := worker.outbox.get()) is not None:
        try:
            worker.connection.send(message)
        except (OSError, ValueError):
            worker.kill()  # its pipe is broken: make sure the reader sees the EOF and the pool replaces it
            return
        except Exception:
            # A message that cannot be sent (a bug): the worker's batches would never be answered, so it is
            # replaced like a dead one, and its requests answered 503 at once.
            logger.exception("sending to inference worker %d failed; killing it", worker.pid)
            metrics.observe_engine_task_crash("worker-writer")
            worker.kill()
            return
        if isinstance(message, Stop):
            return


async def reap(worker: WorkerProcess) -> None:
    """Wait for the process to end (killed after a grace period), end both threads, close the pipe; then reap it
    (no zombie), keep its exit status and close its sentinel (no leaked descriptor). Called once per worker."""
    if not await asyncio.to_thread(_release, worker):
        return  # not ended even by SIGKILL (stuck in the kernel): multiprocessing reaps it whenever it ends
    # Reaped here, on the event loop's thread, never in a helper thread: multiprocessing polls every child (a
    # waitpid) from the thread that starts a process, which is this one; a helper thread's waitpid racing it could
    # lose the exit status (ECHILD), and a death would be logged as "still running". The process has ended: this
    # waits a moment at most.
    worker.process.join(timeout=1)
    worker.exit_code = worker.process.exitcode
    if worker.exit_code is not None:
        worker.process.close()


def _release(worker: WorkerProcess) -> bool:
    """Blocking: wait until the process has ended (its sentinel closes with it), killing it after the grace
    period; end its threads, close its pipe. Whether it has ended."""
    ended = bool(multiprocessing.connection.wait([worker.process.sentinel], _STOP_GRACE_S))
    if not ended:
        worker.kill()
        ended = bool(multiprocessing.connection.wait([worker.process.sentinel], 5))
    worker.outbox.put(None)
    for thread in worker.threads:
        thread.join(timeout=5)
    worker.connection.close()
    return ended


def describe_exit(exit_code: int | None) -> str:
    """How a process ended, in words: `killed by SIGKILL (...)` says more than `-9`, and says it was not a crash."""
    if exit_code is None:
        return "still running"
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
        hint = " (the kernel's OOM killer, the watchdog, or an operator)" if -exit_code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exit_code}"


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
#: per core, lets the model's threads and the finishing thread each fragment their own: 2 kept a Keras worker's
#: peak ~16 MB lower at the same speed (measured with 64 X-rays), and 1 an ONNX worker's another ~40 MB lower
#: (474 -> 435 MiB over 64 X-rays), at the same CPU per image: the threads rarely allocate at the same moment (the
#: runtimes keep their own pools), so one arena's lock is not contended.
_WORKER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}


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
