"""The notebooks run top to bottom: training on a tiny synthetic dataset, the demo against the real RGW and service.

Each runs in a temporary copy, with its parameters set by a cell injected after its `parameters` cell (as papermill
does), in a kernel of this very interpreter: the kernel spec comes from ipykernel's built-in one (`sys.executable -m
ipykernel_launcher`), never from kernel specs installed on the machine, which could name another Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import ROOT, TEST_PSEUDONYM_KEY, encode, free_port, serve_process, shared_text_detector, xray_like

from service.engine.analysis import analyze_batch
from service.engine.messages import Analysis, AnalysisRequest, ImageLimits
from service.models.backends import load_predict
from service.models.spec import ModelSpec
from service.outputs import processed_key

NOTEBOOKS = ROOT / "notebooks"
CLASSES = ("NORMAL", "PNEUMONIA")


def run_notebook(name: str, parameters: dict[str, Any], workdir: Path, timeout_s: int = 300) -> Any:
    """Execute a copy of notebooks/<name> in `workdir` (also its cwd); returns the executed notebook.

    The executed copy is left in `workdir` for reading when a test fails.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [index for index, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged `parameters`"
    assignments = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(f"# Parameters injected by tests/test_notebooks.py\n{assignments}")
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(tagged[0] + 1, injected)

    # No kernel directories: "python3" is then ipykernel's native spec, this interpreter, wherever it runs.
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    assert manager.kernel_spec.argv[0] == sys.executable, manager.kernel_spec.argv
    client = NotebookClient(
        notebook, km=manager, timeout=timeout_s, startup_timeout=120, resources={"metadata": {"path": str(workdir)}}
    )
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    try:
        # The kernel manager is ours, so nbclient would leave the kernel running without cleanup_kc.
        client.execute(cleanup_kc=True, env=env)
    finally:
        nbformat.write(notebook, workdir / name)
    return notebook




def stream_text(notebook: Any) -> str:
    return "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )


def has_image(notebook: Any) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )


def synthetic_xray(pneumonia: bool, seed: int, size: tuple[int, int] = (112, 96)) -> np.ndarray:
    """A grey X-ray-like image; "pneumonia" ones are brighter, with bright cloudy patches (a learnable difference)."""
    rng = np.random.default_rng(seed)
    brightness = int(rng.integers(140, 175) if pneumonia else rng.integers(60, 95))
    pixels = xray_like(brightness, size=size, seed=seed).astype(np.float64)
    if pneumonia:
        ys, xs = np.mgrid[0 : size[0], 0 : size[1]]
        for _ in range(3):
            cy, cx, radius = rng.uniform(0.2, 0.8) * size[0], rng.uniform(0.2, 0.8) * size[1], rng.uniform(8, 18)
            pixels += 50 * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_synthetic_dataset(root: Path, per_class: int) -> Path:
    """The public dataset's layout and file names (patients `person<N>_...`, `IM-<N>-...`), tiny images."""
    for split_index, split in enumerate(("train", "val", "test")):
        for pneumonia, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                patient = 1000 * split_index + index
                file_name = f"person{patient}_bacteria_{index}.jpeg" if pneumonia else f"IM-{patient:04d}-0001.jpeg"
                seed = 10_000 * split_index + 100 * index + pneumonia
                cv2.imwrite(str(folder / file_name), synthetic_xray(bool(pneumonia), seed))
    return root


def test_committed_notebooks_have_no_outputs() -> None:
    import nbformat

    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {path.name for path in paths} >= {"train_pneumonia.ipynb", "demo.ipynb"}
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


def test_training_notebook_writes_a_model_the_service_runs(tmp_path: Path) -> None:
    data_dir = write_synthetic_dataset(tmp_path / "chest_xray", per_class=16)
    out_dir = tmp_path / "model"
    notebook = run_notebook(
        "train_pneumonia.ipynb",
        {
            "DATA_DIR": str(data_dir), "OUT_DIR": str(out_dir), "IMAGE_SIZE": 32, "EPOCHS": 12, "BATCH_SIZE": 8,
            "ARCHITECTURE": "small_cnn", "EXPORT_ONNX": True, "MODEL_NAME": "synthetic-pneumonia",
            "LEARNING_RATE": 3e-3,
        },
        tmp_path,
    )
    assert "validation AUC" in stream_text(notebook)

    spec = ModelSpec.load(out_dir / "synthetic-pneumonia.yaml")
    assert spec.backend == "keras" and spec.weights == (out_dir / "synthetic-pneumonia.keras").resolve()
    assert (spec.input.width, spec.input.height, spec.input.resize, spec.input.scale) == (
        32, 32, "nearest_exact", "x/127.5-1")
    assert spec.output.positive_class == "PNEUMONIA" and spec.output.kind == "logits"
    assert 0.0 <= spec.labels.negative_threshold <= spec.labels.positive_threshold <= 1.0
    onnx_spec = ModelSpec.load(out_dir / "synthetic-pneumonia.onnx.yaml")
    assert onnx_spec.backend == "onnx" and onnx_spec.weights == spec.weights.with_suffix(".onnx")
    assert onnx_spec.labels == spec.labels and onnx_spec.input == spec.input
    evaluation = json.loads((out_dir / "evaluation.json").read_text())
    assert evaluation["images"]["train"] + evaluation["images"]["val"] == 64 and evaluation["images"]["test"] == 32
    assert evaluation["test_auc"] > 0.9, evaluation

    # The exported model through the service's own path: decode, preprocess, model, interpret; on unseen images.
    predict = load_predict(onnx_spec, threads=1)
    risks: dict[bool, list[float]] = {False: [], True: []}
    for pneumonia in (False, True):
        requests = [AnalysisRequest(encode(synthetic_xray(pneumonia, seed=90_000 + seed), ".jpeg"), False)
                    for seed in range(6)]
        for outcome in analyze_batch(requests, spec=onnx_spec, predict=predict, limits=ImageLimits(1 << 24, 10**7),
                                     detector=shared_text_detector()):
            assert isinstance(outcome, Analysis), outcome
            assert outcome.prediction.risk is not None
            risks[pneumonia].append(outcome.prediction.risk)
    assert np.mean(risks[True]) > np.mean(risks[False]) + 0.2, risks


@pytest.fixture(scope="module")
def served(rgw: Any, tiny_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`xray-pipeline serve` with the tiny model on a free port, and an input bucket notifying it (HTTP push)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("notebook-service") / "service.log"
    env = os.environ | rgw.env() | {
        "PORT": str(port), "HOST": "127.0.0.1", "PSEUDONYM_KEY": TEST_PSEUDONYM_KEY, "MODEL_URI": str(tiny_spec),
        "WORKER_THREADS": "1",
    }
    for variable in ("MODEL_SPEC", "MODEL_SHA256", "MODEL_BACKEND", "PROCESSED_BUCKET", "ANONYMIZED_BUCKET",
                     "INPUT_BUCKETS", "ANONYMIZE_WHEN"):
        env.pop(variable, None)
    bucket = f"nb-demo-{uuid.uuid4().hex[:8]}"
    cli = [sys.executable, "-m", "service.cli"]
    with serve_process(env, log_path):
        s3 = rgw.s3_client()
        for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
            s3.create_bucket(Bucket=name)
        subprocess.run(
            [*cli, "notify", "create", "--bucket", bucket, "--topic", bucket, "--endpoint",
             f"http://127.0.0.1:{port}/", "--no-persistent", "--regex", r".*\.(jpe?g|png)$"],
            env=env, check=True, capture_output=True, timeout=60,
        )
        try:
            yield {"bucket": bucket, "s3": s3, "log": log_path}
        finally:
            subprocess.run([*cli, "notify", "remove", "--bucket", bucket, "--id", bucket, "--topic", bucket],
                           env=env, capture_output=True, timeout=60)


@pytest.mark.rgw
def test_demo_notebook_shows_the_service_outputs(served: dict[str, Any], rgw: Any, tmp_path: Path) -> None:
    image = tmp_path / "bright-chest.jpeg"
    image.write_bytes(encode(xray_like(200, size=(240, 200)), ".jpeg"))  # bright: the tiny model says Pneumonia
    endpoint = rgw.env()
    notebook = run_notebook(
        "demo.ipynb",
        {
            "S3_ENDPOINT_URL": endpoint["S3_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": endpoint["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": endpoint["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": endpoint["AWS_DEFAULT_REGION"], "INPUT_BUCKET": served["bucket"],
            "IMAGE_PATH": str(image), "TIMEOUT_S": 60,
        },
        tmp_path,
    )
    text = stream_text(notebook)
    assert "label: Pneumonia" in text and "risk: " in text, text
    assert f"anonymized copy: s3://{served['bucket']}-anonymized/" in text, text
    assert has_image(notebook), "the side-by-side figure is missing"
    s3 = served["s3"]
    uploaded = [item["Key"] for item in s3.list_objects_v2(Bucket=served["bucket"])["Contents"]]
    assert len(uploaded) == 1 and uploaded[0].endswith("-bright-chest.jpeg")
    metadata = s3.head_object(Bucket=f"{served['bucket']}-processed", Key=processed_key(uploaded[0]))["Metadata"]
    assert metadata["label"] == "Pneumonia" and f"risk: {float(metadata['risk']):.1%}" in text


@pytest.mark.rgw
def test_demo_notebook_says_what_to_check_when_nothing_arrives(rgw: Any, tmp_path: Path) -> None:
    from nbclient.exceptions import CellExecutionError

    bucket = f"nb-silent-{uuid.uuid4().hex[:8]}"
    s3 = rgw.s3_client()
    for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
        s3.create_bucket(Bucket=name)
    cli = [sys.executable, "-m", "service.cli", "notify"]
    env = os.environ | rgw.env()
    # A notification that never fires for the upload (PNG only): the check passes, no output ever comes.
    subprocess.run([*cli, "create", "--bucket", bucket, "--topic", bucket, "--endpoint",
                    f"http://127.0.0.1:{free_port()}/", "--no-persistent", "--regex", r".*\.png$"],
                   env=env, check=True, capture_output=True, timeout=60)
    image = tmp_path / "chest.jpeg"
    image.write_bytes(encode(xray_like(90, size=(120, 100)), ".jpeg"))
    try:
        with pytest.raises(CellExecutionError, match=r"no processed copy after 2 s\. Is `xray-pipeline serve` running"):
            run_notebook("demo.ipynb", rgw.env() | {"INPUT_BUCKET": bucket, "IMAGE_PATH": str(image), "TIMEOUT_S": 2},
                         tmp_path)
    finally:
        subprocess.run([*cli, "remove", "--bucket", bucket, "--id", bucket, "--topic", bucket], env=env,
                       capture_output=True, timeout=60)
