"""What runs inside one spawned worker process: load and warm the model once, then analyze batches.

The main thread decodes and runs the model; a second thread searches each decoded image for text meanwhile, and a
third (the finisher) stamps, blurs and encodes each batch and sends its results, so the model can start on the
next batch meanwhile. The worker holds at most two batches (the parent sends no more), so its memory stays
bounded. TensorFlow is imported only here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2

from service.engine.analysis import PredictedBatch, finish_batch, load_dicom_modules, predict_batch
from service.engine.messages import (
    AnalysisOutcome,
    AnalyzeBatch,
    BatchResults,
    ImageLimits,
    LoadFailed,
    ModelFree,
    Ready,
    TextOptions,
)
from service.errors import PipelineError
from service.imaging.detection import TextDetector
from service.models.backends import load_predict
from service.models.library_pages import release_installed_library_pages
from service.models.spec import ModelSpec

#: Modules Keras imports whenever they are installed, which a worker never uses: matplotlib for Keras' plotting
#: utilities (about 0.7 s and 30 MB of a Keras worker's start, measured in a venv with the notebooks' extras) and
#: IPython to tell whether it runs in a notebook. The service image installs neither; elsewhere they are hidden.
_UNUSED_BY_WORKERS = ("matplotlib", "IPython")


def hide_unused_modules() -> None:
    """Make the modules of _UNUSED_BY_WORKERS look absent to this process: a name bound to None in sys.modules
    makes its import raise ImportError, which Keras takes for "not installed". Only in a worker (a process of its
    own): anything else in the process that wants them would fail too. A module already imported stays."""
    for name in _UNUSED_BY_WORKERS:
        sys.modules.setdefault(name, None)


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


def _receive(connection: Connection) -> Any:
    try:
        return connection.recv()
    except (EOFError, OSError):
        return None  # the parent is gone


def worker_main(
    connection: Connection, spec: ModelSpec, threads: int, limits: ImageLimits, text: TextOptions
) -> None:
    """Load and warm the model and the text models, say so, then analyze batches until told to stop or the parent
    goes away."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    hide_unused_modules()
    # The model's threads already use the cores this worker is given; OpenCV's own pool on top of them would
    # spend CPU on hand-offs and spinning (about 20 % more CPU for the imaging, measured).
    cv2.setNumThreads(1)
    with _native_start_notices_held() as held:
        try:
            predict = load_predict(spec, threads)
            detector = TextDetector.load(text.models, keep_markers=text.keep_markers)
        except Exception as error:
            notices = held.read_tail()
            connection.send(LoadFailed(f"{type(error).__name__}: {error}" + (f" [{notices}]" if notices else "")))
            return
    sending = threading.Lock()

    def send(message: Any) -> None:
        with sending:  # the main thread and the finisher both send; a pickled message must not interleave
            connection.send(message)

    # Measured with one ONNX worker: its peak resident memory 417 -> 373 MiB (some pages fault back in).
    release_installed_library_pages()
    send(Ready(os.getpid()))
    # What only DICOM objects need is loaded now, while the first batch is on its way, rather than before Ready
    # (the pool would wait for it) or in the first DICOM object's time.
    preloading = threading.Thread(target=_preload_dicom, name="preload-dicom")
    preloading.start()
    to_finish: queue.SimpleQueue[PredictedBatch | None] = queue.SimpleQueue()

    def finish_forever() -> None:
        while (batch := to_finish.get()) is not None:
            outcomes = finish_batch(batch, spec=spec, detector=detector)
            try:
                send(BatchResults([_picklable(outcome) for outcome in outcomes]))
            except (OSError, ValueError):
                return  # the parent is gone

    finisher = threading.Thread(target=finish_forever, name="finisher")
    finisher.start()
    # Each image's text search starts as soon as it is decoded, beside the model (it needs no model output).
    searching = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="text-search")
    try:
        while isinstance(message := _receive(connection), AnalyzeBatch):
            predicted = predict_batch(message.requests, spec=spec, predict=predict, limits=limits,
                                      text_search=(detector, searching))
            # ModelFree before the batch is handed on: the parent must never see a batch's results before it
            # knows the model is free of it.
            send(ModelFree())
            to_finish.put(predicted)
    except (OSError, ValueError):
        pass  # the parent is gone: nobody is waiting for results
    finally:
        to_finish.put(None)
        finisher.join()
        searching.shutdown()
        preloading.join()


def _preload_dicom() -> None:
    try:
        load_dicom_modules()
        release_installed_library_pages()  # pydicom's codecs (GDCM, OpenJPEG, CharLS: ~15 MB at import)
    except Exception:
        # Not here: the first DICOM object imports it again, and its failure is then that object's answer (a
        # traceback on stderr would be the log's one line that is not JSON).
        return


def _picklable(outcome: AnalysisOutcome) -> AnalysisOutcome:
    """Our errors pickle by design and carry messages we wrote; any other exception (a bug) is reduced to its type
    and where it was raised, so one odd error cannot break the pipe for the whole batch. Its text stays here: the
    web process logs what it gets, and a library's message can quote what it was parsing (a DICOM header's
    patient name)."""
    if isinstance(outcome, Exception) and not isinstance(outcome, PipelineError):
        frames = traceback.extract_tb(outcome.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return RuntimeError(f"{type(outcome).__name__}{where} in the worker (its message is not passed on)")
    return outcome
