"""The worker pool with real processes: deaths are reaped, logged and replaced; hung workers and replacements are
killed; shutdown spawns nothing; liveness turns false only when the pool cannot heal.

The scheduling itself is tested without processes in tests/engine/test_batcher.py; these prove the wiring.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TEXT_OPTIONS, encode, xray_like

from service.engine.messages import ImageLimits
from service.engine.pool import InferenceEngine
from service.engine.spawn import describe_exit
from service.errors import InferenceTimedOut, ModelNotReady
from service.models.spec import ModelSpec

LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)
#: Every engine here: one thread per worker, the limits above, a de-identification key of its own.
WORKER_OPTIONS: dict[str, Any] = {"threads_per_worker": 1, "limits": LIMITS, "deid_key": b"engine-test-pseudonym-key",
                                  "text": TEXT_OPTIONS}


async def until(condition: Callable[[], Any], timeout_s: float, message: str) -> None:
    """Poll a real condition on the event loop (the engine keeps working meanwhile) under a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def others() -> set[Any]:
    """Child processes already running before the test (other fixtures' engines): not this test's to judge."""
    return set(multiprocessing.active_children())


def left_running(others: set[Any]) -> set[Any]:
    """This test's child processes still running."""
    return set(multiprocessing.active_children()) - others


@pytest.fixture
def own_spec(tiny_spec: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model this test may break and mend."""
    for name in ("tiny.yaml", "tiny.keras"):
        shutil.copy(tiny_spec.parent / name, tmp_path / name)
    return tmp_path / "tiny.yaml"


def test_exits_are_described_by_their_cause() -> None:
    assert describe_exit(-signal.SIGKILL).startswith("killed by SIGKILL (the kernel's OOM killer")
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exit code 3"


def test_a_killed_worker_is_reaped_logged_and_replaced(
    tiny_spec: Path, caplog: pytest.LogCaptureFixture, others: set[Any]
) -> None:
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS)

    async def scenario() -> tuple[int, int, int]:
        await engine.start()
        try:
            descriptors = open_descriptors()
            victim = engine.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            await until(lambda: engine.warm_workers == 2 and victim not in engine.worker_pids(), 120,
                        "the pool did not come back to full strength")
            await until(lambda: "died: killed by SIGKILL" in caplog.text, 10, "the death was not logged")
            analysis = await engine.analyze(encode(xray_like(230)), anonymize_always=False)
            assert analysis.prediction.label == "Pneumonia"
            return victim, descriptors, open_descriptors()
        finally:
            await engine.stop()

    with caplog.at_level(logging.INFO, logger="service.engine"):
        victim, before, after = asyncio.run(scenario())
    assert not Path(f"/proc/{victim}").exists(), "the dead worker was not reaped (a zombie)"
    assert after == before, "the dead worker's pipe or sentinel was left open"
    assert "the 0 request(s) it held" in caplog.text
    assert engine.restarts == 1 and not left_running(others)


def test_a_worker_that_stops_reading_is_killed_without_blocking_the_others(tiny_spec: Path) -> None:
    """SIGSTOP: alive, but reads nothing and answers nothing. Its send blocks only its writer thread; its
    requests get 503 at INFERENCE_TIMEOUT_S; it is killed and replaced; the other worker serves meanwhile."""
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS,
                             batch_max_size=1, batch_max_wait_ms=0, inference_timeout_s=4)
    # Larger than a pipe's buffer: the send to the stopped worker blocks for real.
    large = encode(xray_like(230, size=(1400, 1400)), ".png")
    assert len(large) > 1 << 20

    async def scenario() -> list[Any]:
        await engine.start()
        try:
            stopped = engine.worker_pids()[0]
            os.kill(stopped, signal.SIGSTOP)
            results = await asyncio.gather(
                *(engine.analyze(large, anonymize_always=False) for _ in range(4)), return_exceptions=True
            )
            await until(lambda: engine.warm_workers == 2 and stopped not in engine.worker_pids(), 120,
                        "the hung worker was not replaced")
            return results
        finally:
            await engine.stop()

    results = asyncio.run(scenario())
    timed_out = [result for result in results if isinstance(result, InferenceTimedOut)]
    analyzed = [result for result in results if not isinstance(result, Exception)]
    assert timed_out and analyzed and len(timed_out) + len(analyzed) == 4, results


def test_a_replacement_that_cannot_load_makes_the_engine_unhealthy_until_one_can(own_spec: Path) -> None:
    weights = own_spec.parent / "tiny.keras"
    engine = InferenceEngine(ModelSpec.load(own_spec), workers=1, **WORKER_OPTIONS,
                             restart_limit=2)

    async def scenario() -> None:
        await engine.start()
        try:
            good = weights.read_bytes()
            weights.write_bytes(b"not a keras archive")
            os.kill(engine.worker_pids()[0], signal.SIGKILL)
            await until(lambda: not engine.healthy, 120, "failing replacements never made the engine unhealthy")
            assert engine.failed_starts_in_a_row >= 2 and not engine.ready
            with pytest.raises(ModelNotReady):
                await engine.analyze(encode(xray_like(230)), anonymize_always=False)
            weights.write_bytes(good)
            await until(lambda: engine.healthy and engine.ready, 120, "the engine did not heal once it could")
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_a_replacement_that_hangs_while_loading_is_killed_at_the_start_timeout(
    own_spec: Path, caplog: pytest.LogCaptureFixture, others: set[Any]
) -> None:
    weights = own_spec.parent / "tiny.keras"
    engine = InferenceEngine(ModelSpec.load(own_spec), workers=1, **WORKER_OPTIONS,
                             start_timeout_s=20)

    async def scenario() -> None:
        await engine.start()
        try:
            good = weights.read_bytes()
            weights.unlink()
            os.mkfifo(weights)  # opening it blocks until a writer comes: a load that hangs for ever
            os.kill(engine.worker_pids()[0], signal.SIGKILL)
            await until(lambda: engine.failed_starts_in_a_row >= 1, 120, "the hung replacement was never killed")
            weights.unlink()
            weights.write_bytes(good)
            await until(lambda: engine.ready and engine.failed_starts_in_a_row == 0, 120, "no replacement warmed")
        finally:
            await engine.stop()

    with caplog.at_level(logging.ERROR, logger="service.engine"):
        asyncio.run(scenario())
    assert "did not warm within 20 s" in caplog.text
    assert not left_running(others), "the hung replacement was left running"


def test_a_worker_killed_during_shutdown_is_not_replaced(tiny_spec: Path, others: set[Any]) -> None:
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS)

    async def scenario() -> None:
        await engine.start()
        pids = engine.worker_pids()
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0)  # stop() has begun
        os.kill(pids[0], signal.SIGKILL)
        await stopping

    asyncio.run(scenario())
    assert engine.restarts == 0 and engine.worker_pids() == []
    assert not left_running(others), "a replacement was spawned during shutdown"
