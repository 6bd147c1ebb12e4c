"""The batcher alone, fixed wait against adaptive wait: what waiting for company costs at light load, and what the
adaptive wait gives up at saturation.

An asyncio loop drives `service.engine.batcher.Batcher` with a simulated worker: a batch of n holds the model for
`model_ms(n)` (fitted to the default Keras model's batch-1 and batch-8 figures in bench/README.md), then its second
thread finishes it for `FINISH_MS_PER_IMAGE` per image (the imaging measured with a no-op model) while the model
takes the next batch. No processes, no S3, no model: the figures are the batcher's own share of latency. By default
the loop runs on virtual time (it jumps to its next timer instead of sleeping): exact, repeatable and fast, so the
p99 rests on many arrivals; `--real-time` runs the same on the wall clock, with this machine's timer jitter.

1. saturation: `CLIENTS` closed-loop senders (16, and 6: fewer than a batch) -> images/s, batch sizes;
2. open-loop Poisson arrivals at 25 % (and 50 %, 90 %) of the fixed policy's capacity, the same arrival times for
   both policies: p50/p99 of the queue wait (arrival -> batch sent to a worker: gathering plus waiting for a busy
   model) and of the whole latency (arrival -> answer).

`.venv/bin/python bench/batching.py [--max-wait-ms 5] [--arrivals 20000] [--real-time]` prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import selectors
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine.batcher import Batcher  # noqa: E402
from service.engine.messages import AnalysisRequest  # noqa: E402
from service.errors import ModelNotReady  # noqa: E402

#: The default Keras model on this machine (bench/README.md): 20.2 images/s at batch 1, 34.3 at batch 8.
BATCH1_MS = 1000 / 20.2
BATCH8_MS = 8 * 1000 / 34.3
PER_IMAGE_MS = (BATCH8_MS - BATCH1_MS) / 7
FINISH_MS_PER_IMAGE = 28.0
MAX_SIZE = 8
#: Closed-loop senders at saturation: twice a full batch, and fewer than one (batches then never fill).
CLIENTS = (16, 6)
LOAD_FRACTIONS = (0.25, 0.5, 0.9)


def model_ms(size: int) -> float:
    return BATCH1_MS + PER_IMAGE_MS * (size - 1)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of waiting for it (the simulation has no I/O)."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0
        poll = self._selector.select

        def select_without_waiting(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout:
                self._virtual_now += timeout
            return poll(0)

        self._selector.select = select_without_waiting  # type: ignore[method-assign]

    def time(self) -> float:
        return self._virtual_now


def now() -> float:
    return asyncio.get_running_loop().time()


class SimulatedWorker:
    """A worker as the batcher sees it: the model frees after `model_ms(n)`, answers after its finishing thread."""

    def __init__(self, batcher: Batcher, sent: dict[bytes, float]) -> None:
        self.batcher = batcher
        self.sent = sent
        self.finishing_until = 0.0

    def deliver(self, requests: list[AnalysisRequest]) -> None:
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        for request in requests:
            self.sent[request.data] = sent_at
        model_done = sent_at + model_ms(len(requests)) / 1000
        self.finishing_until = max(model_done, self.finishing_until) + FINISH_MS_PER_IMAGE * len(requests) / 1000
        loop.call_at(model_done, self.batcher.model_free, self)
        loop.call_at(self.finishing_until, self.batcher.results, self, [b"ok" for _ in requests])

    def abandon(self, reason: str) -> None:
        raise AssertionError(f"a simulated worker was abandoned: {reason}")


class Run:
    """One batcher with one simulated worker; records when each request arrived, was sent and was answered."""

    def __init__(self, *, adaptive: bool, max_wait_ms: float) -> None:
        self.batches: list[int] = []
        self.batcher = Batcher(max_size=MAX_SIZE, max_wait_s=max_wait_ms / 1000, timeout_s=600,
                               adaptive_wait=adaptive, clock=now, on_batch=self.batches.append)
        self.arrived: dict[bytes, float] = {}
        self.sent: dict[bytes, float] = {}
        self.answered: dict[bytes, float] = {}
        self._names = 0

    async def request(self) -> None:
        name = str(self._names).encode()
        self._names += 1
        self.arrived[name] = now()
        await self.batcher.submit(AnalysisRequest(name, False))
        self.answered[name] = now()

    async def __aenter__(self) -> Run:
        self.dispatcher = asyncio.get_running_loop().create_task(self.batcher.run())
        self.batcher.add_worker(SimulatedWorker(self.batcher, self.sent))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.batcher.close(ModelNotReady("the run is over"))
        await self.dispatcher


async def saturate(adaptive: bool, max_wait_ms: float, count: int, clients: int) -> dict[str, Any]:
    async with Run(adaptive=adaptive, max_wait_ms=max_wait_ms) as run:
        remaining = [count]

        async def sender() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await run.request()

        started = now()
        await asyncio.gather(*(sender() for _ in range(clients)))
        elapsed = now() - started
    sizes = collections.Counter(run.batches)
    return {"images_per_s": count / elapsed, "mean_batch": statistics.mean(run.batches),
            "full_batches": sizes[MAX_SIZE] / len(run.batches)}


async def open_loop(adaptive: bool, max_wait_ms: float, rate: float, count: int, seed: int) -> dict[str, float]:
    gaps = random.Random(seed)
    async with Run(adaptive=adaptive, max_wait_ms=max_wait_ms) as run:
        tasks, next_at = [], now()
        for _ in range(count):
            delay = next_at - now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run.request()))
            next_at += gaps.expovariate(rate)
        await asyncio.gather(*tasks)
    queued = [1000 * (run.sent[name] - run.arrived[name]) for name in run.arrived]
    total = [1000 * (run.answered[name] - run.arrived[name]) for name in run.arrived]
    return {"queue_p50": percentile(queued, 0.5), "queue_p99": percentile(queued, 0.99),
            "total_p50": percentile(total, 0.5), "total_p99": percentile(total, 0.99),
            "mean_batch": statistics.mean(run.batches)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="BATCH_MAX_WAIT_MS (default 5)")
    parser.add_argument("--arrivals", type=int, default=20000, help="open-loop arrivals per load level")
    parser.add_argument("--saturation", type=int, default=5000, help="requests in the saturation run")
    parser.add_argument("--real-time", action="store_true", help="the wall clock, not virtual time")
    parser.add_argument("--seed", type=int, default=0, help="added to each load level's seed of arrivals")
    parser.add_argument("--loads", default=",".join(map(str, LOAD_FRACTIONS)), help="fractions of capacity")
    args = parser.parse_args(argv)

    def run(coroutine: Any) -> Any:
        with asyncio.Runner(loop_factory=None if args.real_time else VirtualTimeLoop) as runner:
            return runner.run(coroutine)

    print(f"model {BATCH1_MS:.1f} ms at batch 1, +{PER_IMAGE_MS:.1f} ms per image; finishing "
          f"{FINISH_MS_PER_IMAGE:.0f} ms per image; BATCH_MAX_SIZE {MAX_SIZE}, BATCH_MAX_WAIT_MS {args.max_wait_ms:g}")
    capacity = None
    for clients in CLIENTS:
        for policy in ("fixed", "adaptive"):
            figures = run(saturate(policy == "adaptive", args.max_wait_ms, args.saturation, clients))
            capacity = capacity or figures["images_per_s"]
            print(f"saturation, {clients:2d} clients  {policy:8}  {figures['images_per_s']:5.1f} images/s  mean batch "
                  f"{figures['mean_batch']:.2f}  full batches {100 * figures['full_batches']:.0f} %", flush=True)
    assert capacity is not None
    for fraction in (float(part) for part in args.loads.split(",")):
        for policy in ("fixed", "adaptive"):
            figures = run(open_loop(policy == "adaptive", args.max_wait_ms, fraction * capacity, args.arrivals,
                                    seed=round(100 * fraction) + args.seed))
            print(f"{round(100 * fraction):3d} % load  {policy:8}  queue wait p50 {figures['queue_p50']:6.1f} ms  "
                  f"p99 {figures['queue_p99']:6.1f}   arrival->answer p50 {figures['total_p50']:6.1f} "
                  f"p99 {figures['total_p99']:6.1f}   mean batch {figures['mean_batch']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
