"""One run of an operator tool (`xray-pipeline process`, `xray-pipeline backfill`): its inference workers, its
bounded concurrency, and its console (a progress bar on stderr, counts by outcome, lines that name pseudonyms only).

Ctrl-C stops a run in order: the workers are launched deaf to the terminal's SIGINT, so the run (not the signal)
stops them, after the objects in flight are finished or abandoned whole; outputs are written atomically, so what
was written is complete and a rerun skips it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from service.engine.pool import InferenceEngine
from service.errors import ConfigurationError
from service.logs import configure_logging
from service.models.spec import ModelSpec
from service.outputs import NOT_ASSESSED_REASON_CODE
from service.settings import Settings

ItemT = TypeVar("ItemT")
#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT = 130
#: Failure reasons the same bytes always meet again (unlike limits, which settings change): a rerun repeats a
#: failure on record for unchanged content instead of analyzing it again.
CONTENT_FAILURES = frozenset({"not-an-image", "corrupt-image", "unsupported-format", "animated-image",
                              "corrupt-dicom", "unsupported-dicom", "no-pixel-data"})
#: In a run's counts (beside the outcomes): how many of the processed images the model did not assess.
NOT_ASSESSED = "not assessed"


def configure_tool_logging(settings: Settings) -> None:
    """The service's logging, quieter: a tool prints its own line per object, so the service's INFO summaries
    (and JSON, meant for log collectors) only when LOG_LEVEL / LOG_FORMAT ask. A host that set up logging
    (a test, a notebook) keeps its own."""
    if logging.getLogger().handlers:
        return
    level = settings.log_level if "log_level" in settings.model_fields_set else "WARNING"
    log_format = settings.log_format if "log_format" in settings.model_fields_set else "text"
    configure_logging(level, log_format)


def describe_not_assessed(counts: dict[str, int]) -> str:
    """The end of a run's summary line: how many processed images were not assessed, when any were."""
    count = counts.get(NOT_ASSESSED, 0)
    return f"; {count} {NOT_ASSESSED} ({NOT_ASSESSED_REASON_CODE})" if count else ""


def describe_outcomes(tally: dict[str, int]) -> str:
    """A run's counts (a `Console.tally`) as one line: "3 processed, 1 skipped; 1 not assessed (...)"."""
    outcomes = ", ".join(f"{count} {outcome}" for outcome, count in sorted(tally.items()) if outcome != NOT_ASSESSED)
    return outcomes + describe_not_assessed(tally) if outcomes else "nothing to do"


def default_concurrency(settings: Settings) -> int:
    """Objects in flight: enough for every worker to hold a full batch in the model and gather the next."""
    return 2 * settings.batch_max_size * settings.workers


class ToolEngine:
    """The inference engine of a run, started on first use: a run with nothing to analyze loads no model."""

    def __init__(self, settings: Settings, spec: ModelSpec) -> None:
        self._settings = settings
        self._spec = spec
        self._engine: InferenceEngine | None = None
        self._failure: str | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> InferenceEngine:
        async with self._lock:
            if self._failure is not None:
                raise ConfigurationError(self._failure)
            if self._engine is None:
                engine = InferenceEngine.from_settings(self._settings, self._spec)
                with _terminal_interrupt_ignored():
                    engine.launch()
                self._engine = engine
                try:
                    await engine.start()
                except RuntimeError as error:  # a worker could not load the model
                    self._engine = None
                    self._failure = f"MODEL_URI: {error}"
                    raise ConfigurationError(self._failure) from None
            return self._engine

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()


@contextlib.contextmanager
def _terminal_interrupt_ignored() -> Iterator[None]:
    """Spawned workers inherit an ignored SIGINT (and Python keeps it ignored), so Ctrl-C in a terminal, which
    signals the whole process group, reaches only this process; the workers are stopped by the run itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


async def for_each(items: Iterable[ItemT], handle: Callable[[ItemT], Awaitable[None]], *, limit: int) -> None:
    """`handle` every item, at most `limit` at once, in order of the items; `handle` deals with its own errors."""
    iterator = iter(items)

    async def lane() -> None:
        for item in iterator:  # shared: each lane takes the next item when it is free
            await handle(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, limit)):
                group.create_task(lane())
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None  # a run-stopping error (the model cannot load), as itself


async def retrying(attempt: Callable[[], Awaitable[Any]], *, retry_on: tuple[type[BaseException], ...],
                   attempts: int = 5, first_delay_s: float = 0.5) -> Any:
    """`attempt()` until it does not raise one of `retry_on`, backing off exponentially; the last error is raised."""
    delay = first_delay_s
    for remaining in range(attempts - 1, -1, -1):
        try:
            return await attempt()
        except retry_on:
            if not remaining:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


class Console:
    """What a run shows: a progress bar on stderr (when stderr is a terminal, or when asked), one line per object
    on stdout when the tool has one, and counts by outcome. Lines name pseudonyms, never paths or keys."""

    def __init__(self, total: int, *, progress: bool, unit: str = "image") -> None:
        enabled = progress or sys.stderr.isatty()
        self.counts: collections.Counter[str] = collections.Counter()
        #: Processed images the model did not assess (outside its domain), also counted as processed.
        self.not_assessed = 0
        self._bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                         mininterval=0.5)
        self._redirect = contextlib.ExitStack()
        if enabled:
            # Log lines go through the bar instead of tearing it.
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm())

    def record(self, outcome: str, line: str | None = None, *, not_assessed: bool = False) -> None:
        self.counts[outcome] += 1
        self.not_assessed += not_assessed
        if line is not None:
            self._bar.write(line, file=sys.stdout)
        self._bar.set_postfix_str(self.summary(), refresh=False)
        self._bar.update()

    def tally(self) -> dict[str, int]:
        """The counts by outcome, and NOT_ASSESSED when some processed images were not assessed."""
        return dict(self.counts) | ({NOT_ASSESSED: self.not_assessed} if self.not_assessed else {})

    def summary(self) -> str:
        return describe_outcomes(self.tally())

    def close(self) -> None:
        self._bar.close()
        self._redirect.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ToolRun(Protocol):
    """One run of an operator command: `execute` handles every item; `counts` are its outcomes so far."""

    @property
    def counts(self) -> dict[str, int]: ...

    async def execute(self) -> None: ...


def run_to_the_end(command: str, run: ToolRun, *, items: str, describe: Callable[[dict[str, int]], str],
                   failed: Callable[[dict[str, int]], bool]) -> int:
    """Execute a run and end it the way every command does: one summary line on stderr (`items` says what was
    run over, e.g. "16 image(s)"), and the exit status: 130 after Ctrl-C (with how far it got: a rerun finishes
    the rest), 1 when `failed(counts)`, else 0."""
    try:
        asyncio.run(run.execute())
    except KeyboardInterrupt:
        print(f"{command}: interrupted after {describe(run.counts)}; run the same command again to finish",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"{command}: {items}: {describe(run.counts)}", file=sys.stderr)
    return 1 if failed(run.counts) else 0
