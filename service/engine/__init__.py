"""The inference engine: spawned worker processes that hold the model, behind a micro-batcher.

- `batcher`: the queue, the batching policy and every request's deadline; pure asyncio, no processes.
- `pool`: the worker processes (spawn, warm-up, pipes, reaping, replacement) and `InferenceEngine`, the one
  object the rest of the service uses.
- `supervisor`: keeps the engine's own background tasks running, and says when it cannot.
- `worker`: what runs inside a spawned worker process (load, predict, finish).
- `messages`: what crosses the pipe between the two.

Import `InferenceEngine` from `service.engine.pool`: this package imports nothing itself, so a spawned worker,
which imports `service.engine.worker`, does not load the pool's web-side imports (settings, metrics).
"""
