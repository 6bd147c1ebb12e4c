"""The inference engine: spawned worker processes that hold the model, behind a micro-batcher.

- `batcher`: the queue, the batching policy and every request's deadline; pure asyncio, no processes.
- `pool`: `InferenceEngine`, the one object the rest of the service uses: keeps the pool of workers full (warm-up,
  replacement, liveness) and feeds the batcher what the workers say.
- `spawn`: one worker process as the parent sees it: spawned, spoken to through its pipe, reaped.
- `supervisor`: keeps the engine's own background tasks running, and says when it cannot.
- `worker`: what runs inside a spawned worker process (load, predict, finish); `analysis`: its work on a batch;
  `boot`: its entry point, which the parent names without importing the worker.
- `messages`: what crosses the pipe between the two, and what an analysis is made of.

Import `InferenceEngine` from `service.engine.pool`: this package imports nothing itself, so a spawned worker,
which imports `service.engine.worker`, does not load the pool's web-side imports (settings, metrics).
"""
