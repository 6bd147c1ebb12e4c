"""What a worker sends back for an item that failed: our errors as they are, anything else without its text; and what
it leaves out of its start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.engine.worker import _UNUSED_BY_WORKERS, _picklable
from service.errors import UnprocessableObject

ROOT = Path(__file__).resolve().parents[2]


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_an_unexpected_error_crosses_the_pipe_without_its_text() -> None:
    # A library's message can quote what it parsed: a DICOM header's patient name, say.
    sent = _picklable(_raised(ValueError("invalid value 'DOE^JANE^MARIE' for VR PN")))
    assert isinstance(sent, RuntimeError)
    assert "DOE" not in str(sent) and "JANE" not in str(sent)
    assert str(sent).startswith("ValueError at test_worker.py:")


def test_our_own_errors_cross_the_pipe_as_they_are() -> None:
    error = UnprocessableObject("the DICOM object has no pixel data", reason="no-pixel-data")
    assert _picklable(error) is error


def _loaded_after(setup: str) -> tuple[list[str], set[str]]:
    """A fresh interpreter's output after `setup`, then building and running a tiny Keras model: the model's output
    shape, and which of _UNUSED_BY_WORKERS it then holds as real modules."""
    probe = (
        f"import sys\n{setup}\n"
        "import keras, numpy\n"
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])\n"
        "print(model.predict(numpy.ones((1, 4), 'float32'), verbose=0).shape)\n"
        f"print(' '.join(name for name in {_UNUSED_BY_WORKERS!r} if sys.modules.get(name) is not None))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=180,
                          check=True, env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = done.stdout.splitlines()
    return lines, set(lines[-1].split())


def test_a_worker_runs_keras_without_the_plotting_and_notebook_modules_keras_would_import() -> None:
    output, loaded = _loaded_after("from service.engine.worker import hide_unused_modules; hide_unused_modules()")
    assert output[0] == "(1, 2)"
    assert loaded == set()
    # The check that can fail: where they are installed (the test environment has the notebooks' extras), Keras
    # imports them unless hidden.
    assert _loaded_after("")[1] == set(_UNUSED_BY_WORKERS)
