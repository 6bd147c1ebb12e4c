"""The worker process's entry point, apart from `worker` so that the parent can name it without importing the
worker's libraries.

A spawned process's target is pickled by reference, and pickling a reference imports its module in the parent:
naming `worker_main` there put OpenCV, ONNX Runtime (the text models) and the imaging modules, ~25 MB, into the
web process, which never uses them. This module imports nothing at import time; the child imports the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from service.engine.messages import ImageLimits, TextOptions
    from service.models.spec import ModelSpec


def run_worker(connection: Connection, spec: ModelSpec, threads: int, limits: ImageLimits, text: TextOptions) -> None:
    """Run in the spawned child: import the worker (its libraries load here, not in the parent) and run it."""
    from service.engine.worker import worker_main

    worker_main(connection, spec, threads, limits, text)
