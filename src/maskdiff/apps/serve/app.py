"""The HTTP API and the page (FastAPI): ``GET /healthz``, ``GET /v1/model``, ``GET /v1/stats``,
``POST /v1/generate``, ``POST /v1/generate/stream`` (server-sent events) and the page at ``/``.

Reference: ``docs/serve.md``. Every refusal is JSON ``{"error": {"field", "message", "limit"}}``
with a 4xx status (503 when the queue is full, 504 past the time-out); the server stays up.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from maskdiff.apps.serve.batching import Cancelled, JobRunner, QueueFull, RequestTimedOut
from maskdiff.apps.serve.schemas import ApiError, GenerateRequest, validation_error
from maskdiff.apps.serve.service import ModelService, Prepared

__all__ = ["create_app"]

STATIC = resources.files("maskdiff.apps.serve") / "static"


def _as_api_error(err: BaseException, prep: Prepared, timeout_s: float) -> ApiError:
    """What the client is told when sampling a request failed."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, RequestTimedOut):
        return ApiError(504, None, "the request ran past the server's time-out; ask for fewer samples or steps",
                        limit=timeout_s)
    if isinstance(err, Cancelled):
        return ApiError(503, None, f"the request was cancelled ({err})")
    if isinstance(err, (ValueError, TypeError)):  # the sampler's own argument checks
        field = "sampler_options" if prep.request.sampler_options else "sampler"
        return ApiError(422, field, f"the sampler refused the request: {err}")
    return ApiError(500, None, f"internal error, {type(err).__name__}: {err}")


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(prep: Prepared, events: asyncio.Queue, cancelled: threading.Event,
                  timeout_s: float) -> AsyncIterator[str]:
    """The server-sent events of a streamed request: ``start``, the states ``emit`` queued
    (``step``), then ``done`` or ``error`` once the job's future is queued as ``("end", future)``."""
    yield _sse("start", {"settings": prep.settings, "length": prep.length, "num_samples": prep.request.num_samples,
                         "steps": prep.request.steps, "fixed": prep.fixed_mask})
    try:
        while True:
            kind, data = await events.get()
            if kind != "end":
                yield _sse(kind, data)
                continue
            while not events.empty():  # states emitted just before the end
                k, d = events.get_nowait()
                if k != "end":
                    yield _sse(k, d)
            if data.cancelled():
                yield _sse("error", ApiError(503, None, "the request was cancelled").body())
            elif data.exception() is not None:
                yield _sse("error", _as_api_error(data.exception(), prep, timeout_s).body())
            else:
                yield _sse("done", data.result())
            return
    finally:
        cancelled.set()  # the client went away, or the stream ended: stop sampling


def create_app(service: ModelService) -> FastAPI:
    """The app serving ``service``'s model under ``service.limits``."""
    limits = service.limits
    runner = JobRunner(max_active=limits.max_active, queue_size=limits.queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.stop()
        service.close()

    app = FastAPI(title="maskdiff", summary="Sample a masked-diffusion run", lifespan=lifespan)
    app.state.service, app.state.runner = service, runner

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _refused(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def submit(prep: Prepared, emit: Callable[[str, dict[str, Any]], None] | None,
               cancelled: threading.Event) -> asyncio.Future:
        try:
            fut = runner.submit(lambda check: service.run_request(prep, check, emit),
                                timeout_s=limits.timeout_s, cancelled=cancelled)
        except QueueFull:
            raise ApiError(503, None, f"the server is busy: {limits.max_active} requests are sampling and "
                           f"{limits.queue_size} waiting; retry later",
                           limit={"max_active": limits.max_active, "queue_size": limits.queue_size}) from None
        return asyncio.wrap_future(fut)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return service.info()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        b = service.batcher
        return {"served": runner.served, "rejected": runner.rejected, "timed_out": runner.timed_out,
                "in_server": runner.inside, "network_calls": b.calls, "network_rows": b.rows,
                "network_requests": b.requests, "requests_per_call": round(b.requests / max(b.calls, 1), 3)}

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        prep = service.prepare(req)
        start = time.perf_counter()
        cancelled = threading.Event()
        fut = submit(prep, None, cancelled)
        try:
            result = await fut
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except BaseException as err:
            raise _as_api_error(err, prep, limits.timeout_s) from None
        result["timing"]["total_s"] = round(time.perf_counter() - start, 6)
        return result

    @app.post("/v1/generate/stream")
    async def generate_stream(req: GenerateRequest) -> StreamingResponse:
        prep = service.prepare(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, data: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

        fut = submit(prep, emit, cancelled)  # 503 here, before the stream starts

        def ended(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()  # retrieved here: the stream may be gone (a client that left) and never read it
            events.put_nowait(("end", f))

        fut.add_done_callback(ended)

        return StreamingResponse(_events(prep, events, cancelled, limits.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
