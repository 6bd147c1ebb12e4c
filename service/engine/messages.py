"""What crosses the pipe between the web process and one worker process, in both directions.

Each message is a small frozen dataclass, pickled by multiprocessing; the parent's reader thread and the worker's
loop match on the type, so a new message is a new class here rather than a new magic string.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.analysis import AnalysisOutcome, AnalysisRequest

# --- parent -> worker --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeBatch:
    """Analyze these images together; the worker answers with `ModelFree`, then `BatchResults` in the same order."""

    requests: list[AnalysisRequest]


@dataclass(frozen=True)
class Stop:
    """Finish what you hold, then exit."""


# --- worker -> parent --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The model is loaded and warm: the worker takes batches from now on."""

    pid: int


@dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded; the worker exits after saying why."""

    reason: str


@dataclass(frozen=True)
class ModelFree:
    """The model is done with the oldest batch (still being finished): the worker can take another."""


@dataclass(frozen=True)
class BatchResults:
    """One outcome per request of the oldest unanswered batch, in its order."""

    outcomes: list[AnalysisOutcome]


ToWorker = AnalyzeBatch | Stop
FromWorker = Ready | LoadFailed | ModelFree | BatchResults
