"""The inference pool: TensorFlow stays out of the web process; workers load once, warm, and fail loudly."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TEXT_OPTIONS, VALIDATION_IMAGES, encode, shared_text_detector, upload, xray_like
from test_pipeline import record_for

from service.engine.messages import ImageLimits, TextOptions
from service.engine.pool import InferenceEngine
from service.errors import ModelNotReady, UnprocessableObject
from service.imaging.codec import decode_image
from service.models.fetch import TEXT_DETECTOR_FILE
from service.models.spec import ModelSpec
from service.outputs import Outcome, processed_key
from service.pipeline import Pipeline
from service.storage import ObjectStore, make_s3_client

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)
#: Every engine here: one thread per worker, the limits above, a de-identification key of its own.
WORKER_OPTIONS: dict[str, Any] = {"threads_per_worker": 1, "limits": LIMITS, "deid_key": b"engine-test-pseudonym-key",
                                  "text": TEXT_OPTIONS}


def imported_by(modules: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `modules` (a comma-separated list)."""
    probe = f"import sys, {modules}\nprint(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=True)
    return set(done.stdout.split())


def test_the_web_process_imports_no_pixel_or_model_library() -> None:
    """Only workers decode, draw and run the model: the web process stays small and starts fast."""
    # numpy too: ~17 MB of the web process's memory, and only workers touch pixels or model outputs.
    assert imported_by("service.app, service.cli") & {"cv2", "PIL", "tensorflow", "keras", "onnxruntime", "pydicom",
                                                       "numpy"} == set()
    # A check that can fail: the worker's modules do pull them in.
    assert {"cv2", "PIL"} <= imported_by("service.engine.worker")
    # ONNX's own library folds the text models at fetch time (service.models.onnx_folding); no process serving
    # loads it.
    assert "onnx" not in imported_by("service.app, service.cli, service.engine.worker, service.imaging.detection")
    assert "onnx" in imported_by("service.models.onnx_folding")


def run_spawning(tiny_spec: Path, then: str) -> list[str]:
    """The output lines of a fresh interpreter that spawns a worker of the tiny spec (as `worker`), then runs
    `then`."""
    probe = (
        "import pathlib, sys\n"
        "from service.engine.messages import ImageLimits, TextOptions\n"
        "from service.engine.spawn import spawn_worker\n"
        "from service.models.spec import ModelSpec\n"
        f"worker = spawn_worker(ModelSpec.load({str(tiny_spec)!r}), 1, ImageLimits(10, 10),\n"
        f"                      TextOptions(pathlib.Path({str(TEXT_OPTIONS.models)!r})))\n"
    ) + then
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=True)
    return done.stdout.splitlines()


def test_spawning_a_worker_imports_none_of_its_libraries_into_the_parent(tiny_spec: Path) -> None:
    """The worker's entry point is pickled by reference: naming `worker_main` would import the worker's modules,
    OpenCV and ONNX Runtime with them, into the web process."""
    packages, worker_imported = run_spawning(tiny_spec, (
        "worker.kill()\n"
        "worker.process.join(30)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
        "print('service.engine.worker' in sys.modules)\n"
    ))
    assert set(packages.split()) & {"cv2", "PIL", "onnxruntime", "tensorflow", "keras", "pydicom"} == set()
    assert worker_imported == "False"


def test_a_ready_worker_holds_few_of_its_libraries_pages(tiny_spec: Path) -> None:
    """Loading OpenCV, ONNX Runtime and the model makes tens of MB of library pages resident that the work never
    reads again; the worker drops them before it says Ready (service.models.library_pages)."""
    ready_line, imported_line = run_spawning(tiny_spec, (
        "def opencv_kib(pid):\n"
        "    total, inside = 0, False\n"
        "    for line in pathlib.Path(f'/proc/{pid}/smaps').read_text().splitlines():\n"
        "        if not line.split()[0].endswith(':'):\n"
        "            inside = line.rstrip().endswith('.so') and '/cv2/' in line\n"
        "        elif inside and line.startswith('Rss:'):\n"
        "            total += int(line.split()[1])\n"
        "    return total\n"
        "try:\n"
        "    print(type(worker.connection.recv()).__name__, opencv_kib(worker.pid))\n"
        "finally:\n"
        "    worker.kill()\n"
        "    worker.process.join(30)\n"
        "import os, cv2\n"
        "print(opencv_kib(os.getpid()))\n"
    ))[-2:]
    message, in_worker = ready_line.split()
    assert message == "Ready"
    # Importing OpenCV alone makes ~20 MB of it resident; the ready worker has used it more, and holds far less.
    assert int(in_worker) < int(imported_line) / 4, (in_worker, imported_line)


def test_a_worker_loads_dicom_support_only_after_it_is_ready() -> None:
    """pydicom and its codecs are a third of a worker's start: the worker imports them once it has said Ready
    (service.engine.worker), or the first DICOM object does."""
    assert "pydicom" not in imported_by("service.engine.worker")
    assert "pydicom" in imported_by("service.engine.worker, service.dicom.instances")


def test_no_command_imports_tensorflow_outside_workers() -> None:
    modules = "service.cli, service.pipeline, service.engine.pool, service.tools.demo, service.tools.process"
    assert imported_by(modules) & {"tensorflow", "keras"} == set()


def test_workers_do_not_import_the_parents_main_module(tiny_spec: Path, tmp_path: Path) -> None:
    """multiprocessing re-imports `__main__` in spawned children; for the service that is the whole web CLI."""
    marker = tmp_path / "main-imported-in-a-worker"
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, pathlib, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "if __name__ != '__main__':\n"
        f"    pathlib.Path({str(marker)!r}).write_text(__name__)\n"
        "from service.engine.messages import ImageLimits, TextOptions\n"
        "from service.engine.pool import InferenceEngine\n"
        "from service.models.spec import ModelSpec\n"
        "async def main():\n"
        f"    engine = InferenceEngine(ModelSpec.load({str(tiny_spec)!r}), workers=1, threads_per_worker=1,\n"
        "                             limits=ImageLimits(10, 10), deid_key=b\"k\" * 16,\n"
        f"                             text=TextOptions(pathlib.Path({str(TEXT_OPTIONS.models)!r})))\n"
        "    await engine.start()\n"
        "    await engine.stop()\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists(), "the worker imported the parent's main module"


def test_two_workers_warm_up_and_analyze(tiny_spec: Path) -> None:
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS)

    async def scenario() -> tuple[list[int], list[str]]:
        await engine.start()
        try:
            assert engine.ready
            pids = engine.worker_pids()
            analyses = await asyncio.gather(
                *(engine.analyze(encode(xray_like(b)), anonymize_always=False) for b in (230, 20, 230, 20))
            )
            with pytest.raises(UnprocessableObject) as raised:
                await engine.analyze(b"definitely not an image", anonymize_always=False)
            assert raised.value.reason == "not-an-image"  # the error crosses the process boundary intact
            return pids, [analysis.prediction.label for analysis in analyses]
        finally:
            await engine.stop()

    pids, labels = asyncio.run(scenario())
    assert not engine.ready and engine.worker_pids() == []
    assert len(pids) == 2
    assert labels == ["Pneumonia", "Normal", "Pneumonia", "Normal"]


def test_a_caller_cancelled_as_its_answer_arrives_stays_cancelled(
    tiny_spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in a tool cancels every analysis in flight. An answer arriving in the same turn of the loop must not
    undo that: with Python 3.11's asyncio.wait_for the answer was returned, the cancellation lost, and the tool went
    on to its next image instead of stopping."""
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **WORKER_OPTIONS)

    async def scenario() -> asyncio.Task[Any]:
        await engine.start()
        try:
            submit = engine._batcher.submit

            def cancelled_when_answered(request: Any) -> asyncio.Future[Any]:
                future = submit(request)
                future.add_done_callback(lambda _: analyzing.cancel())  # in the turn the answer arrives
                return future

            monkeypatch.setattr(engine._batcher, "submit", cancelled_when_answered)
            analyzing = asyncio.create_task(engine.analyze(encode(xray_like(230)), anonymize_always=False))
            await asyncio.wait([analyzing], timeout=120)
            return analyzing
        finally:
            await engine.stop()

    analyzing = asyncio.run(scenario())
    assert analyzing.cancelled(), f"the cancellation was lost: {analyzing.result() if analyzing.done() else 'running'}"


def test_workers_get_fewer_malloc_arenas_and_the_parent_keeps_its_environment(
    tiny_spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **WORKER_OPTIONS)

    async def worker_environment() -> dict[str, str]:
        await engine.start()
        try:
            [pid] = engine.worker_pids()
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        finally:
            await engine.stop()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    assert asyncio.run(worker_environment())["MALLOC_ARENA_MAX"] == "1"
    assert "MALLOC_ARENA_MAX" not in os.environ
    # An operator's own value wins.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert asyncio.run(worker_environment())["MALLOC_ARENA_MAX"] == "4"


def test_workers_launched_early_are_the_ones_start_waits_for(tiny_spec: Path) -> None:
    """`serve` launches the workers before importing the web stack; start-up must not spawn a second set."""
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS)
    engine.launch()
    engine.launch()  # idempotent
    launched = engine.worker_pids()
    assert len(launched) == 2 and not engine.ready  # loading, not warm yet

    async def scenario() -> list[int]:
        await engine.start()
        try:
            await engine.analyze(encode(xray_like(230)), anonymize_always=False)
            return engine.worker_pids()
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == launched


def test_unloadable_model_fails_start_up_clearly(tiny_spec: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_spec, tmp_path / "tiny.yaml")
    (tmp_path / "tiny.keras").write_bytes(b"not a keras archive")
    engine = InferenceEngine(ModelSpec.load(tmp_path / "tiny.yaml"), workers=1, **WORKER_OPTIONS)
    with pytest.raises(RuntimeError, match="failed to load the model"):
        asyncio.run(engine.start())
    assert not engine.ready


def test_missing_text_models_fail_start_up_naming_the_file_and_the_command(tiny_spec: Path, tmp_path: Path) -> None:
    options = WORKER_OPTIONS | {"text": TextOptions(tmp_path / "no-text-models")}
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **options)
    with pytest.raises(RuntimeError, match=rf"{re.escape(TEXT_DETECTOR_FILE)} is not in .*xray-pipeline model fetch"):
        asyncio.run(engine.start())
    assert not engine.ready


def test_concurrent_requests_are_batched_and_errors_stay_with_their_item(tiny_spec: Path) -> None:
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **WORKER_OPTIONS,
                             batch_max_size=4, batch_max_wait_ms=200)

    async def scenario() -> list[object]:
        await engine.start()
        try:
            images = [encode(xray_like(230)), b"not an image", encode(xray_like(20)), encode(xray_like(230))]
            return await asyncio.gather(
                *(engine.analyze(image, anonymize_always=True) for image in images), return_exceptions=True
            )
        finally:
            await engine.stop()

    outcomes = asyncio.run(scenario())
    assert list(engine.batch_sizes) == [4], "four concurrent requests travel as one batch, in one round trip"
    assert isinstance(outcomes[1], UnprocessableObject) and outcomes[1].reason == "not-an-image"
    labels = [outcome.prediction.label for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert labels == ["Pneumonia", "Normal", "Pneumonia"]


def test_a_full_batch_leaves_without_waiting_for_the_deadline(tiny_spec: Path) -> None:
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **WORKER_OPTIONS,
                             batch_max_size=2, batch_max_wait_ms=60_000)

    async def scenario() -> None:
        await engine.start()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(engine.analyze(encode(xray_like(200)), anonymize_always=False) for _ in range(4))),
                timeout=30,
            )
        finally:
            await engine.stop()

    asyncio.run(scenario())
    assert list(engine.batch_sizes) == [2, 2]


def test_many_small_batches_in_flight_keep_every_answer_with_its_request(tiny_spec: Path) -> None:
    """A worker runs the model on one batch while finishing the previous one; answers must not cross."""
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=1, **WORKER_OPTIONS,
                             batch_max_size=3, batch_max_wait_ms=0)
    brightness = [230 if index % 3 else 20 for index in range(25)]

    async def scenario() -> list[str]:
        await engine.start()
        try:
            analyses = await asyncio.gather(
                *(engine.analyze(encode(xray_like(level, seed=index)), anonymize_always=False)
                  for index, level in enumerate(brightness))
            )
            return [analysis.prediction.label for analysis in analyses]
        finally:
            await engine.stop()

    labels = asyncio.run(scenario())
    assert labels == ["Pneumonia" if level == 230 else "Normal" for level in brightness]
    assert len(engine.batch_sizes) > 1 and max(engine.batch_sizes) <= 3


def _worker_with_a_batch_outstanding(engine: InferenceEngine) -> int | None:
    """The pid of a worker the batcher has sent a batch it has not yet had back, if any."""
    return next((worker.pid for worker, slot in engine._batcher._slots.items() if slot.batches), None)


@pytest.mark.rgw
def test_worker_killed_during_a_burst_fails_only_its_batch_and_nothing_is_written_twice(
    tiny_spec: Path, make_settings: Any, s3: Any, input_bucket: str
) -> None:
    """Every event ends processed after redelivery of the 503s, and each output is written exactly once."""
    s3.put_bucket_versioning(Bucket=f"{input_bucket}-processed", VersioningConfiguration={"Status": "Enabled"})
    keys = [f"burst/{index:02d}.jpg" for index in range(16)]
    etags = {key: upload(s3, input_bucket, key, encode(xray_like(200, seed=index))) for index, key in enumerate(keys)}
    settings = make_settings()
    engine = InferenceEngine(ModelSpec.load(tiny_spec), workers=2, **WORKER_OPTIONS,
                             batch_max_size=2, batch_max_wait_ms=1)
    pipeline = Pipeline(settings, ObjectStore(make_s3_client(settings)), engine, ModelSpec.load(tiny_spec))

    async def deliver(key: str) -> tuple[Outcome, int]:
        for attempt in range(1, 60):
            try:
                result = await pipeline.process_record(record_for(input_bucket, key, etags[key]))
                return result.outcome, attempt
            except ModelNotReady:
                await asyncio.sleep(0.5)  # Knative's retry, compressed
        raise AssertionError("never processed")

    async def burst() -> tuple[list[tuple[Outcome, int]], int]:
        await engine.start()
        try:
            deliveries = [asyncio.ensure_future(deliver(key)) for key in keys]
            # Kill a worker while it has a batch outstanding: on a busy machine the fetches trickle in, and the
            # first worker may still be idle when the other's first batch is sent.
            async with asyncio.timeout(60):
                while (victim := _worker_with_a_batch_outstanding(engine)) is None:
                    await asyncio.sleep(0.001)
            os.kill(victim, signal.SIGKILL)
            results = await asyncio.gather(*deliveries)
            assert victim not in engine.worker_pids()
            return results, engine.restarts
        finally:
            await engine.stop()

    results, restarts = asyncio.run(burst())
    assert restarts == 1
    assert {outcome for outcome, _ in results} == {Outcome.PROCESSED}
    assert any(attempts > 1 for _, attempts in results), "the killed worker's batch must have been answered 503"
    versions = s3.list_object_versions(Bucket=f"{input_bucket}-processed")["Versions"]
    assert sorted(version["Key"] for version in versions) == sorted(processed_key(key) for key in keys)


def test_redact_orientation_markers_reaches_the_workers(make_settings: Any) -> None:
    """A demo film's `R` (found and kept by default) is pixelated in the anonymized copy once
    REDACT_ORIENTATION_MARKERS is set: the setting travels from Settings through the engine to every worker."""
    film = VALIDATION_IMAGES / "NORMAL2-IM-1427-0001.jpeg"
    data = film.read_bytes()
    pixels = decode_image(data, max_bytes=10**8, max_pixels=10**8).pixels
    [marker] = shared_text_detector().find(pixels).markers
    x, y, width, height = marker

    async def marker_change(redact: bool) -> float:
        settings = make_settings(workers=1, worker_threads=1, redact_orientation_markers=redact)
        engine = InferenceEngine.from_settings(settings, ModelSpec.load(settings.model_uri))
        await engine.start()
        try:
            analysis = await engine.analyze(data, anonymize_always=True)
        finally:
            await engine.stop()
        assert analysis.anonymized is not None
        anonymized = decode_image(analysis.anonymized, max_bytes=10**8, max_pixels=10**8).pixels
        region = (slice(y, y + height), slice(x, x + width))
        return float(np.abs(anonymized[region].astype(np.int16) - pixels[region].astype(np.int16)).mean())

    kept, redacted = asyncio.run(marker_change(False)), asyncio.run(marker_change(True))
    assert kept < 3, f"the kept marker changed by {kept:.1f} grey levels on average (more than JPEG's re-encoding)"
    assert redacted > 10, f"the marker to redact changed by only {redacted:.1f} grey levels on average"
