"""The HTTP layer: turns requests into deliveries for the pipeline and errors into status codes.

`POST /` is the Knative sink (and Ceph's HTTP push endpoint); `GET /healthz` says the process is alive and its
inference engine can heal itself, `GET /readyz` says the model is loaded and warm in the workers, `GET /metrics` is
for Prometheus (the metrics themselves live in service.metrics). All status decisions live here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.engine.pool import InferenceEngine
from service.errors import MalformedDelivery, PipelineError, UnprocessableObject
from service.events import Transport, parse_delivery
from service.models.source import resolve_model
from service.models.spec import ModelSpec
from service.pipeline import DeliveryResult, Pipeline
from service.settings import Settings, load_settings
from service.storage import ObjectStore, make_s3_client

logger = logging.getLogger(__name__)


class RequestTooLarge(MalformedDelivery):
    status_code = 413
    reason = "request-too-large"


def create_app(
    settings: Settings | None = None, *, spec: ModelSpec | None = None, engine: InferenceEngine | None = None
) -> FastAPI:
    """Build the app; the model loads in its lifespan, so the port opens only once workers are warm.

    The model is fetched (from S3 when MODEL_URI says so) and verified before the app exists, unless the caller
    did it (`spec`): nothing can report ready without it, and a model that cannot be fetched stops `serve` with a
    ConfigurationError. `engine` may come already launched (`serve` starts the workers before importing the web
    stack, so both load at once); its lifespan waits for it to be warm.
    """
    settings = settings or load_settings()
    spec = spec or resolve_model(settings, make_s3_client)
    engine = engine or InferenceEngine.from_settings(settings, spec)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # S3 calls are blocking and run in the loop's default pool; its default size (cores + 4) would let
        # fewer objects be fetched at once than one batch holds. The threads mostly wait on the network.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="s3"))
        app.state.engine = engine
        app.state.pipeline = Pipeline(settings, ObjectStore(make_s3_client(settings)), engine, spec)
        await engine.start()
        logger.info("ready: model %s %s in %d worker(s)", spec.name, spec.version, settings.workers)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="xray-pipeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(PipelineError)
    async def pipeline_error(_: Request, error: PipelineError) -> JSONResponse:
        if error.status_code >= 500:
            logger.warning("answering %d: %s", error.status_code, error.message)
        return JSONResponse({"error": error.reason, "detail": error.message}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        # A bug, not a verdict on the event: 500 is retried by Knative and Ceph, so the event is not lost.
        logger.exception("unexpected %s while handling an event", type(error).__name__)
        return JSONResponse({"error": "internal", "detail": "unexpected error; see the service log"}, status_code=500)

    @app.post("/")
    async def receive_event(request: Request) -> JSONResponse:
        transport = "unknown"  # until the request parses
        status = 500  # what `unexpected_error` answers for anything but a PipelineError
        try:
            body = await _read_body(request, settings.max_request_bytes)
            delivery = parse_delivery(request.headers, body)
            transport = delivery.transport.value
            logger.debug("delivery: %s with %d record(s)", transport, len(delivery.records))
            result = await request.app.state.pipeline.process_delivery(delivery)
            status = _status_for(result, delivery.transport)
            return JSONResponse(_summary(result, status), status_code=status)
        except PipelineError as error:
            status = error.status_code
            raise
        finally:
            metrics.observe_request(status, transport)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        # Liveness: 503 only when the engine cannot heal by itself, so that Kubernetes restarts the pod. A dead
        # worker being replaced is not that (/readyz covers it): restarting the pod would only lose the others.
        engine: InferenceEngine | None = getattr(request.app.state, "engine", None)
        if engine is not None and not engine.healthy:
            return JSONResponse({"status": "unhealthy", "detail": "the inference engine cannot recover"},
                                status_code=503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        engine: InferenceEngine | None = getattr(request.app.state, "engine", None)
        if engine is None or not engine.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # On the event loop, not in a thread: the engine's gauges are read between its own steps.
        exposition, content_type = metrics.render()
        return Response(exposition, media_type=content_type)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is larger than {limit} bytes")
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _status_for(result: DeliveryResult, transport: Transport) -> int:
    # Knative does not retry a 422 and hands the event to its dead-letter sink; Ceph's push retries every
    # non-2xx at once and forever, so for it the durable failure record is the answer and 200 ends the retries.
    if result.has_permanent_failure and transport is Transport.CLOUDEVENT:
        return UnprocessableObject.status_code
    return 200


def _summary(result: DeliveryResult, status: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if status == UnprocessableObject.status_code:
        # Like every other 4xx, named by an `error` field, first: a dead-lettered event keeps only the first
        # 1024 bytes of the answer (`knativeerrordata`).
        summary["error"] = UnprocessableObject.reason
    summary["records"] = [record.summary() for record in result.records]
    if result.note:
        summary["note"] = result.note
    return summary
