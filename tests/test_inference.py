"""The inference pool: TensorFlow stays out of the web process; workers load once, warm, and fail loudly."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, encode, xray_like

from service.analysis import ImageLimits
from service.errors import UnprocessableObject
from service.inference import InferenceEngine

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)


def test_web_modules_do_not_import_tensorflow() -> None:
    probe = (
        "import sys, service.app, service.cli, service.pipeline, service.inference, service.demo\n"
        "service.app.create_app  # noqa\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras'})\n"
        "print(leaked); sys.exit(1 if leaked else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_workers_warm_up_and_analyze(tiny_spec: Path) -> None:
    engine = InferenceEngine(tiny_spec, workers=2, threads_per_worker=1, limits=LIMITS)

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


def test_unloadable_model_fails_start_up_clearly(tiny_spec: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_spec, tmp_path / "tiny.yaml")
    (tmp_path / "tiny.keras").write_bytes(b"not a keras archive")
    engine = InferenceEngine(tmp_path / "tiny.yaml", workers=1, threads_per_worker=1, limits=LIMITS)
    with pytest.raises(RuntimeError, match="failed to load the model"):
        asyncio.run(engine.start())
    assert not engine.ready
