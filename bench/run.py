"""Benchmark: raw model speed versus the whole service, side by side, for each configuration and 1 or 2 workers.

The configurations (bench/configurations.py): `keras` and `onnx`, the default X-ray model on each backend fed its 16
validation X-rays, and `imagenet`, the ImageNet photo classifier (ONNX) fed its two sample photos.
`.venv/bin/python bench/run.py [--quick]` measures, in one run and on this machine:

1. the model alone: `service.models.backends.load_predict` called on preprocessed batches of 1 and 8 of the
   configuration's images (decoded and preprocessed as a worker does; repeated up to 16), in a subprocess per
   configuration (TensorFlow must not load into this process, whose CPU is shared with the service under test);
   wall throughput and CPU ms per image (process_time), medians of repeats;
2. the service end to end: a throwaway Ceph RGW, `python -m service.cli serve` as a subprocess (MODEL_URI and
   MODEL_BACKEND from the configuration), cold start (process start -> /readyz 200 -> first event processed), then
   plain Ceph notifications POSTed by concurrent clients at saturation -> images/s, service CPU ms per image
   (utime+stime of the web process and its workers from /proc), peak RSS (sum of VmHWM), and the wall ms per image
   of each stage (the service's /metrics histograms, differenced over the phase);
3. CPU ms per image by stage outside the model (bench/stages.py): a second saturation phase sampled by py-spy,
   each thread's CPU divided between stages by its samples' stacks;
4. latency p50/p95/p99 of the POST (answered only once both outputs are written) under open-loop Poisson arrivals
   at 25 %, 50 % and 90 % of the capacity measured in step 2, each event a fresh object (processed eTags are
   skipped, which would flatter the numbers);
5. cpu_efficiency = model CPU ms per image at batch 8 / service CPU ms per image: the share of the service's
   CPU that is the model itself; outside_cpu_ms_per_image = the difference;
6. the DICOM row (bench/dicom.py): CPU ms per 2-megapixel CR around the model, as JPEG, uncompressed DICOM and
   RLE DICOM, by stage, and the DICOM paths' extra over JPEG;
7. the text-detection row (bench/detection.py): CPU ms per image of the text cascade against the line search
   alone, by modality (the 16 X-rays, synthetic CT scouts, PET, MR and grainy chest films);
8. the privacy row (bench/privacy.py): on random images of those modalities with random patient text burned in
   (none of them tuned on), the text blocks the OCR oracle still reads after redaction and the share of the other
   pixels kept.

It prints the table, the stage tables and issue 16's targets against the figures (bench/targets.py), and writes
bench/results.json (one row per configuration x workers). Everything it starts it stops, also on failure or
Ctrl-C. Only loopback traffic. The load generator runs in this process on the same cores as the service, so
absolute numbers are a floor; compare rows of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # local_rgw lives with the tests; it is a plain module
sys.path.insert(0, str(ROOT))  # bench.dicom, when run as `python bench/run.py`

from local_rgw import LocalRGW  # noqa: E402

from bench import stages, targets  # noqa: E402
from bench.configurations import CONFIGURATIONS, Configuration  # noqa: E402
from bench.detection import print_row as print_detection_row  # noqa: E402
from bench.dicom import print_row as print_dicom_row  # noqa: E402
from bench.privacy import print_row as print_privacy_row  # noqa: E402
from bench.processes import cpu_seconds, descendants, peak_rss_mib, thread_cpu_seconds  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "results.json"
BENCH_PSEUDONYM_KEY = "bench-pseudonym-key-0123456789abcdef"
WORKER_COUNTS = (1, 2)
CLIENTS = 12  # concurrent clients at saturation: enough to keep 2 workers' batches of 8 full
LOAD_FRACTIONS = (0.25, 0.5, 0.9)
#: Starts of the service per configuration and worker count whose times to ready are reported (their median): one
#: start varies by a second or more here (4.5-6.6 s for one Keras worker in six starts in a row).
COLD_STARTS = 5
MODEL_IMAGES = 16  # the model alone runs on this many images (a configuration's own, repeated if fewer)


# ------------------------------------------------------------------------------------------ model alone


def measure_model_in_this_process(configuration: Configuration, repeats: int) -> dict[str, Any]:
    """Runs inside the per-configuration subprocess: load, warm, then time batches of 1 and 8 over 16 images."""
    import numpy as np

    from service.imaging.codec import decode_image, to_model_input
    from service.models.backends import load_predict
    from service.models.preprocess import to_model_tensor
    from service.models.spec import ModelSpec

    spec = ModelSpec.load(configuration.spec).for_backend(configuration.backend)
    # All cores, as one service worker gets them (WORKER_THREADS defaults to CPUs / workers).
    predict = load_predict(spec, threads=os.cpu_count() or 1)
    # Decoded and preprocessed as a worker does; two photos are repeated to fill batches of 8 like 16 X-rays.
    images = [decode_image(path.read_bytes(), max_bytes=10**9, max_pixels=10**9) for path in configuration.images]
    tensors = np.stack([to_model_tensor(spec, to_model_input(images[index % len(images)].pixels))
                        for index in range(MODEL_IMAGES)])
    results: dict[str, Any] = {"model": f"{spec.name} {spec.version}"}
    for batch_size in (1, 8):
        batches = [tensors[start:start + batch_size] for start in range(0, len(tensors), batch_size)]
        for batch in batches:  # a warm pass per batch size: first calls at a new shape allocate
            predict(batch)
        wall_per_image, cpu_per_image = [], []
        for _ in range(repeats):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for batch in batches:
                predict(batch)
            wall_per_image.append((time.perf_counter() - wall_start) / len(tensors))
            cpu_per_image.append((time.process_time() - cpu_start) / len(tensors))
        results[f"batch{batch_size}_images_per_s"] = 1 / statistics.median(wall_per_image)
        results[f"batch{batch_size}_cpu_ms_per_image"] = 1000 * statistics.median(cpu_per_image)
    return results


def measure_model(configuration: Configuration, repeats: int) -> dict[str, Any]:
    """The model figures of one configuration, from a fresh subprocess (keeps TensorFlow out of the bench
    process)."""
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, __file__, "--model-only", configuration.name, "--model-repeats", str(repeats)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"model benchmark for {configuration.name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ the service


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ObjectPool:
    """Uploads a configuration's images again and again under fresh keys: every event must be new work for the
    service."""

    def __init__(self, s3: Any, bucket: str, images: tuple[Path, ...]) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.images = [(path.read_bytes(), path.suffix) for path in images]
        self.uploaded = 0
        for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
            s3.create_bucket(Bucket=name)

    def upload(self, count: int) -> list[dict[str, Any]]:
        """Upload `count` new objects; returns one Ceph notification record per object."""
        numbers = range(self.uploaded, self.uploaded + count)
        self.uploaded += count

        def put(number: int) -> dict[str, Any]:
            body, suffix = self.images[number % len(self.images)]
            key = f"bench/{number:06d}{suffix}"
            etag = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            return {"eventName": "ObjectCreated:Put", "eventSource": "ceph:s3",
                    "s3": {"bucket": {"name": self.bucket}, "object": {"key": key, "eTag": etag["ETag"].strip('"')}}}

        with concurrent.futures.ThreadPoolExecutor(8) as uploaders:
            return list(uploaders.map(put, numbers))

    def purge(self) -> None:
        """Delete every object of the run's three buckets, between phases: the local RGW keeps objects in a 1 GiB
        memstore, which one run of the photos (~1 MB per event with both PNG outputs) could fill (a full OSD
        blocks every write, and the service then answers 503 for ever)."""
        for name in (self.bucket, f"{self.bucket}-processed", f"{self.bucket}-anonymized"):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self.s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})

    def remove(self) -> None:
        """Delete the run's three buckets and what they hold."""
        self.purge()
        for name in (self.bucket, f"{self.bucket}-processed", f"{self.bucket}-anonymized"):
            self.s3.delete_bucket(Bucket=name)


class Service:
    """`python -m service.cli serve` as a subprocess in its own session, so a kill reaches its workers too."""

    def __init__(self, rgw: LocalRGW, configuration: Configuration, workers: int, log_path: Path,
                 anonymize_when: str = "always") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | rgw.env() | {
            "PORT": str(self.port), "HOST": "127.0.0.1", "PSEUDONYM_KEY": BENCH_PSEUDONYM_KEY,
            "MODEL_URI": str(configuration.spec), "MODEL_BACKEND": configuration.backend, "WORKERS": str(workers),
            "ANONYMIZE_WHEN": anonymize_when, "LOG_LEVEL": "WARNING",
        }
        for variable in ("MODEL_SPEC", "MODEL_SHA256"):  # the configuration's model is what is measured
            env.pop(variable, None)
        env.pop("WORKER_THREADS", None)  # the service's default (CPUs / workers) is what is being measured
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> float:
        """Seconds from process start to /readyz 200."""
        deadline = self.started_at + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited during start-up:\n{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("service did not become ready")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the service and its workers
                self.process.wait()


#: 503s (e.g. the shared local RGW stalling past S3_READ_TIMEOUT_S under load) are redelivered as Knative would,
#: with exponential backoff (8 retries, like knative/base/kafka-source.yaml, but starting at 0.5 s and ~2 min in all,
#: not 8.5); the latency then includes the retries, as a user would see it.
RETRY_DELAYS_S = (0.5, 1, 2, 4, 8, 16, 32, 64)
RETRIES = {"count": 0}


async def post_event(client: httpx.AsyncClient, url: str, record: dict[str, Any]) -> float:
    """One plain Ceph push of one record, redelivered on 503; returns its duration, raising on anything else."""
    started = time.perf_counter()
    for delay in (*RETRY_DELAYS_S, None):
        response = await client.post(url, json={"Records": [record]})
        if response.status_code != 503 or delay is None:
            break
        RETRIES["count"] += 1
        await asyncio.sleep(delay)
    duration = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"service answered {response.status_code}: {response.text[:300]}")
    outcomes = [record.get("outcome") for record in response.json().get("records", [])]
    if outcomes != ["processed"]:
        # A skipped (duplicate) or failed record is cheap work and would flatter the numbers.
        raise RuntimeError(f"event not processed: {response.text[:300]}")
    return duration


async def saturate(url: str, records: list[dict[str, Any]], clients: int) -> float:
    """Closed loop: `clients` senders, each posting its next event as soon as the previous one is answered."""
    queue = list(reversed(records))

    async def sender(client: httpx.AsyncClient) -> None:
        while queue:
            await post_event(client, url, queue.pop())

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(clients)))
        return time.perf_counter() - started


async def open_loop(url: str, records: list[dict[str, Any]], rate_per_s: float, seed: int) -> list[float]:
    """Poisson arrivals at `rate_per_s` regardless of answers (a closed loop would hide queueing delay)."""
    arrivals = random.Random(seed)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        tasks, next_at = [], time.perf_counter()
        for record in records:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post_event(client, url, record)))
            next_at += arrivals.expovariate(rate_per_s)
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure_service(rgw: LocalRGW, s3: Any, configuration: Configuration, workers: int, workdir: Path,
                    quick: bool, run: int, py_spy: Path | None, anonymize_when: str = "always") -> dict[str, Any]:
    name = f"{configuration.name}-{workers}-{run}"
    pool = ObjectPool(s3, f"bench-{name}", configuration.images)
    events = 48 if quick else 128
    saturation_records = pool.upload(events)
    first_record = pool.upload(1)[0]
    service = Service(rgw, configuration, workers, workdir / f"service-{name}.log", anonymize_when)
    retries_before = RETRIES["count"]
    try:
        ready_s = service.wait_ready()
        asyncio.run(post_event_once(service.url, first_record))
        first_event_s = time.monotonic() - service.started_at
        # A short warm-up at saturation: first batches of each size trace/allocate in every worker.
        asyncio.run(saturate(service.url, pool.upload(2 * CLIENTS), CLIENTS))

        stages_before = stages.scrape_stage_seconds(service.url)
        cpu_before = cpu_seconds(service.process.pid)
        wall_s = asyncio.run(saturate(service.url, saturation_records, CLIENTS))
        cpu_after = cpu_seconds(service.process.pid)
        stages_after = stages.scrape_stage_seconds(service.url)
        web_ms, workers_ms = (1000 * (cpu_after[part] - cpu_before[part]) / len(saturation_records)
                              for part in ("web", "workers"))
        capacity = len(saturation_records) / wall_s
        row: dict[str, Any] = {
            "configuration": configuration.name, "backend": configuration.backend, "workers": workers,
            "anonymize_when": anonymize_when,
            "xray": configuration.xray,
            "e2e_images_per_s": capacity,
            "service_cpu_ms_per_image": web_ms + workers_ms,
            "web_cpu_ms_per_image": web_ms, "workers_cpu_ms_per_image": workers_ms,
            "cold_start_ready_s": ready_s, "first_event_s": first_event_s,
        }
        row |= stages.wall_ms_by_stage(stages_before, stages_after, len(saturation_records))
        pool.purge()
        if py_spy is not None:
            try:
                row |= profile_stages(service, pool, py_spy, workdir, events)
            except RuntimeError as error:  # e.g. ptrace not permitted: the other figures stand
                print(f"CPU by stage not measured: {error}", flush=True)
            pool.purge()

        seconds_per_level = 6 if quick else 15
        for fraction in LOAD_FRACTIONS:
            rate = fraction * capacity
            records = pool.upload(max(20, round(rate * seconds_per_level)))
            latencies = asyncio.run(open_loop(service.url, records, rate, seed=int(fraction * 100) + run))
            level = f"at{round(fraction * 100)}"
            for quantile_name, quantile in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                row[f"{quantile_name}_ms_{level}"] = 1000 * percentile(latencies, quantile)
            pool.purge()
        # The headline latency is at 50 % load: a service sized for its peak runs there.
        row["p50_ms"], row["p95_ms"], row["p99_ms"] = row["p50_ms_at50"], row["p95_ms_at50"], row["p99_ms_at50"]
        row["rss_mib"] = peak_rss_mib(service.process.pid)
        row["redeliveries"] = RETRIES["count"] - retries_before
        row["processes"] = len(descendants(service.process.pid))
        return row
    finally:
        service.stop()
        pool.remove()


def measure_cold_starts(rgw: LocalRGW, configuration: Configuration, workers: int, workdir: Path, count: int,
                        anonymize_when: str) -> list[float]:
    """Seconds from process start to /readyz 200 of `count` more starts of the service, each stopped once ready."""
    ready = []
    for start in range(count):
        log_path = workdir / f"start-{configuration.name}-{workers}-{start}.log"
        service = Service(rgw, configuration, workers, log_path, anonymize_when)
        try:
            ready.append(service.wait_ready())
        finally:
            service.stop()
    return ready


def profile_stages(service: Service, pool: ObjectPool, py_spy: Path, workdir: Path, events: int) -> dict[str, float]:
    """CPU ms per image by stage: a second saturation phase with py-spy sampling every thread of the service (a
    phase of its own, so that the sampler's CPU does not weigh on the throughput and CPU figures above)."""
    records = pool.upload(events)
    profiler = stages.StageProfiler(py_spy, service.process.pid, workdir)
    try:
        threads_before = thread_cpu_seconds(service.process.pid)
        asyncio.run(saturate(service.url, records, CLIENTS))
        threads_after = thread_cpu_seconds(service.process.pid)
    finally:
        samples = profiler.stop()
    return stages.cpu_ms_by_stage(samples, threads_before, threads_after, service.process.pid, len(records))


async def post_event_once(url: str, record: dict[str, Any]) -> float:
    async with httpx.AsyncClient(timeout=300) as client:
        return await post_event(client, url, record)


# ------------------------------------------------------------------------------------------ report


#: The side-by-side table: (row field, header, format).
COLUMNS = [
    ("configuration", "config", "{}"), ("workers", "wrk", "{}"),
    ("model_images_per_s", "model img/s b8", "{:.1f}"), ("model_b1_images_per_s", "b1", "{:.1f}"),
    ("e2e_images_per_s", "e2e img/s", "{:.2f}"), ("e2e_over_model", "e2e/model", "{:.2f}"),
    ("e2e_vs_keras", "vs keras", "{:.2f}"),
    ("model_cpu_ms_per_image", "model cpu ms", "{:.0f}"), ("service_cpu_ms_per_image", "svc cpu ms", "{:.0f}"),
    ("web_cpu_ms_per_image", "web", "{:.0f}"), ("workers_cpu_ms_per_image", "wrk", "{:.0f}"),
    ("outside_cpu_ms_per_image", "outside ms", "{:.0f}"), ("cpu_efficiency", "cpu eff", "{:.2f}"),
    ("p50_ms_at25", "p50@25%", "{:.0f}"), ("p99_ms_at25", "p99@25%", "{:.0f}"),
    ("p99_at25_over_model_b1", "p99@25/b1", "{:.1f}"),
    ("p50_ms_at50", "p50@50%", "{:.0f}"), ("p99_ms_at50", "p99@50%", "{:.0f}"),
    ("p50_ms_at90", "p50@90%", "{:.0f}"), ("p99_ms_at90", "p99@90%", "{:.0f}"),
    ("cold_start_ready_s", "ready s", "{:.1f}"), ("first_event_s", "1st ev s", "{:.1f}"),
    ("rss_mib", "rss MiB", "{:.0f}"),
]


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] = COLUMNS) -> None:
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns])
    widths = [max(len(line[column]) for line in cells) for column in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def print_stage_tables(rows: list[dict[str, Any]]) -> None:
    """Outside the model, by stage: CPU where it was sampled, and the wall time of the service's own stages."""
    keys = [("configuration", "config", "{}"), ("workers", "wrk", "{}")]
    sampled = [row for row in rows if row.get("stage_cpu_ms_outside") is not None]
    if sampled:
        print("CPU ms per image by stage, at saturation (py-spy samples dividing each thread's /proc CPU; the groups "
              "before '= outside' add up to it):")
        print_table(sampled, [*keys, *stages.CPU_COLUMNS])
    else:
        print("CPU ms per image by stage: not measured (no py-spy, or --no-stage-cpu)")
    print()
    print("Wall ms per image by stage, at saturation (/metrics; each record's thread time: stages of different "
          "records overlap, so these are not CPU and do not add up to it; infer is the batch's call):")
    print_table(rows, [*keys, *stages.WALL_COLUMNS])


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per configuration: the median of every figure over its runs (the machine is noisy)."""
    row = {key: statistics.median(run[key] for run in runs) if isinstance(value, float) else value
           for key, value in runs[0].items()}
    row["repeats"] = len(runs)
    row["redeliveries"] = sum(run["redeliveries"] for run in runs)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios and differences against baselines measured in this same run: the model alone, and Keras (the same
    X-ray model) at equal workers."""
    keras_e2e = {row["workers"]: row["e2e_images_per_s"] for row in rows if row["configuration"] == "keras"}
    for row in rows:
        row["e2e_over_model"] = row["e2e_images_per_s"] / row["model_images_per_s"]
        row["cpu_efficiency"] = row["model_cpu_ms_per_image"] / row["service_cpu_ms_per_image"]
        row["outside_cpu_ms_per_image"] = row["service_cpu_ms_per_image"] - row["model_cpu_ms_per_image"]
        row["model_b1_ms"] = 1000 / row["model_b1_images_per_s"]
        row["p99_at25_over_model_b1"] = row["p99_ms_at25"] / row["model_b1_ms"]
        baseline = keras_e2e.get(row["workers"])
        row["e2e_vs_keras"] = row["e2e_images_per_s"] / baseline if baseline and row["xray"] else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, shorter latency runs, 2 repeats (~10 min)")
    parser.add_argument("--repeats", type=int, help="service runs per configuration, reported as medians (default 3)")
    parser.add_argument("--configurations", "--backends", dest="configurations", default=",".join(CONFIGURATIONS),
                        help=f"comma-separated, default: {','.join(CONFIGURATIONS)}")
    parser.add_argument("--workers", default=",".join(map(str, WORKER_COUNTS)), help="comma-separated, default 1,2")
    parser.add_argument("--no-stage-cpu", action="store_true", help="skip the py-spy phase (CPU by stage)")
    parser.add_argument("--anonymize-when", choices=("always", "positive"), default="always",
                        help="the service's ANONYMIZE_WHEN (default always, as issue 16 measures; positive is the "
                             "service's default)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--model-only", help=argparse.SUPPRESS)  # internal: the per-configuration model subprocess
    parser.add_argument("--model-repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_only:
        print(json.dumps(measure_model_in_this_process(CONFIGURATIONS[args.model_only], args.model_repeats)))
        return 0
    repeats = args.repeats or (2 if args.quick else 3)

    unknown = set(args.configurations.split(",")) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configuration {', '.join(sorted(unknown))}: choose among {', '.join(CONFIGURATIONS)}")
    configurations = [CONFIGURATIONS[name] for name in args.configurations.split(",")]
    worker_counts = [int(count) for count in args.workers.split(",")]
    for configuration in configurations:
        configuration.ensure_built()
    py_spy = None if args.no_stage_cpu else stages.fetch_py_spy()
    started = time.monotonic()
    # In its own process, before the service runs: process CPU time then counts the DICOM path alone.
    dicom = subprocess.run([sys.executable, str(ROOT / "bench" / "dicom.py"), "--json",
                            "--repeats", "7" if args.quick else "15"],
                           cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    dicom_row = json.loads(dicom.stdout.strip().splitlines()[-1])
    print(f"[{time.monotonic() - started:5.0f} s] DICOM over JPEG: "
          f"{dicom_row['dicom_explicit_extra_cpu_ms']:+.1f} CPU ms (explicit VR), "
          f"{dicom_row['dicom_rle_extra_cpu_ms']:+.1f} (RLE), {dicom_row['dicom_jpegls_extra_cpu_ms']:+.1f} (JPEG-LS), "
          f"{dicom_row['dicom_j2k_extra_cpu_ms']:+.1f} (JPEG 2000), {dicom_row['dicom_j2k_as_rle_extra_cpu_ms']:+.1f} "
          "(JPEG 2000 written as RLE)", flush=True)
    detection = subprocess.run([sys.executable, str(ROOT / "bench" / "detection.py"), "--json",
                                *(["--quick"] if args.quick else [])],
                               cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    detection_row = json.loads(detection.stdout.strip().splitlines()[-1])
    print(f"[{time.monotonic() - started:5.0f} s] text cascade over line search, CPU per image: " + ", ".join(
        f"{name} {figures['cascade_over_line_search']:.1f}x" for name, figures in detection_row["modalities"].items()
    ), flush=True)
    privacy = subprocess.run([sys.executable, str(ROOT / "bench" / "privacy.py"), "--json",
                              *(["--quick"] if args.quick else [])],
                             cwd=ROOT, check=True, capture_output=True, text=True, timeout=1800)
    privacy_row = json.loads(privacy.stdout.strip().splitlines()[-1])
    print(f"[{time.monotonic() - started:5.0f} s] privacy: {privacy_row['all']['blocks_leaked']} of "
          f"{privacy_row['all']['blocks_readable']} readable text blocks leaked", flush=True)
    rows: list[dict[str, Any]] = []
    evaluated: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="xray-bench-") as workdir:
        rgw = LocalRGW(Path(workdir) / "rgw")
        try:
            rgw.start()
            s3 = rgw.s3_client()
            for configuration in configurations:
                model = measure_model(configuration, repeats=3 if args.quick else 5)
                print(f"[{time.monotonic() - started:5.0f} s] {configuration.name} model: {model}", flush=True)
                for workers in worker_counts:
                    runs = []
                    for run in range(repeats):
                        runs.append(measure_service(rgw, s3, configuration, workers, Path(workdir), args.quick, run,
                                                    py_spy, args.anonymize_when))
                        print(f"[{time.monotonic() - started:5.0f} s] {configuration.name} x{workers} run "
                              f"{run + 1}/{repeats}: {runs[-1]['e2e_images_per_s']:.2f} img/s", flush=True)
                    row = median_row(runs)
                    # Each service run starts the service once; more starts, for a time to ready that one slow or
                    # quick start does not decide.
                    ready = [run["cold_start_ready_s"] for run in runs]
                    ready += measure_cold_starts(rgw, configuration, workers, Path(workdir),
                                                 max(0, COLD_STARTS - len(runs)), args.anonymize_when)
                    row |= {"cold_start_ready_s": statistics.median(ready), "cold_start_ready_min_s": min(ready),
                            "cold_start_ready_max_s": max(ready), "cold_starts": len(ready)}
                    row |= {
                        "model": model["model"],
                        "model_images_per_s": model["batch8_images_per_s"],
                        "model_b1_images_per_s": model["batch1_images_per_s"],
                        "model_cpu_ms_per_image": model["batch8_cpu_ms_per_image"],
                        "model_b1_cpu_ms_per_image": model["batch1_cpu_ms_per_image"],
                    }
                    rows.append(row)
        finally:
            rgw.stop()
            if rows:  # a partial run still leaves its rows
                add_ratios(rows)
                evaluated = targets.evaluate(rows)
                args.output.write_text(json.dumps([*rows, {"dicom": dicom_row}, {"detection": detection_row},
                                                   {"privacy": privacy_row}, {"targets": evaluated}], indent=2) + "\n")
    print()
    print_table(rows)
    print()
    print_stage_tables(rows)
    print()
    targets.print_targets(evaluated, rows)
    print()
    print_dicom_row(dicom_row)
    print()
    print_detection_row(detection_row)
    print()
    print_privacy_row(privacy_row)
    print(f"\n{len(rows)} configurations in {time.monotonic() - started:.0f} s; rows in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
