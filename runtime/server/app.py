"""The FastAPI app: routes, error answers, and Server-Sent Events (``sse-starlette``) for streams.

A generation request is watched while it waits and generates: a client that disconnects has its generation
cancelled and its slot (or queue place) freed at once, streaming or not; a shutdown that outlives its timeout
aborts it (503 JSON, or a stream's final error event and ``[DONE]``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from .body import read_json
from .metrics import MetricsMiddleware
from .middleware import ApiKeyMiddleware, RequestIdMiddleware
from .protocol import APIError, ReplyHead, bad_request, parse_request
from .service import GenerationService, Job, Lifeline
from .settings import ServerSettings

log = logging.getLogger("rocket_deploy.server")

SSE_PING_S = 15             # keep-alive comment lines on a quiet stream (proxies drop idle connections)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone (the body has been read, so the next ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def watched(work: Awaitable, lifeline: Lifeline, receive: Callable[[], Awaitable[dict]]) -> Any:
    """``await work``, unless the client disconnects (cancel it, raise :class:`ClientGone`) or the lifeline is
    aborted (cancel it, raise the abort's error) first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone, lifeline.aborted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if not task.cancelled():
        return task.result()
    if lifeline.error is not None:
        raise lifeline.error
    raise ClientGone()


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the FastAPI app serving ``engine``. ``app.state.rocket`` is the :class:`GenerationService`."""
    settings = settings or ServerSettings()
    srv = GenerationService(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.loop = asyncio.get_running_loop()
        yield
        srv.close()

    app = FastAPI(title="rocket-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rocket = srv
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    app.add_middleware(RequestIdMiddleware)          # added last: the outermost, so every answer carries the id

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail))
        return error_response(APIError(exc.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):              # runs outside the middleware: add the request id here
        log.exception("unhandled error on %s", request.url.path)
        resp = error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                       code="internal_error"))
        rid = request.scope.get("state", {}).get("request_id")
        if rid:
            resp.headers["x-request-id"] = rid
        return resp

    def _model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": srv.created, "owned_by": "rocket-deploy"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card()

    @app.get("/health")
    async def health():
        a = srv.admission
        body = {"status": "draining" if a.draining else "ok", "model": settings.model_name,
                "backend": engine.backend, "is_decoder": bool(engine.is_decoder), "in_flight": a.in_flight,
                "waiting": a.waiting}
        return JSONResponse(body, status_code=503 if a.draining else 200,
                            headers=a.retry_headers() if a.draining else None)

    @app.get("/metrics")
    async def metrics(request: Request):
        body, content_type = srv.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def generation(request: Request, kind: str):
        t_arrival = time.monotonic()
        body = await read_json(request, settings)
        if not engine.is_decoder:
            raise APIError(400, f"the served model is an encoder ({engine.backend} backend): it cannot generate "
                                f"text, so {request.url.path} is unavailable", code="model_not_generative")
        req = parse_request(kind, body, settings.max_new_tokens)
        if req.model is not None and req.model != settings.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                                f"'{settings.model_name}' (see GET /v1/models)", param="model",
                           code="model_not_found")
        if req.stop and engine.tokenizer is None:
            raise bad_request("stop strings need a tokenizer; this model has none", "stop", "no_tokenizer")
        head = ReplyHead(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex, int(time.time()),
                         settings.model_name)
        lifeline = Lifeline(srv)
        handed_over = False
        try:
            if req.stream:
                job = await watched(srv.start(req, t_arrival, lifeline), lifeline, request.receive)
                handed_over = True
                return _EventStream(_events(head, job, req.include_usage), job, srv)
            return await watched(_complete(head, srv.start(req, t_arrival, lifeline)), lifeline, request.receive)
        except ClientGone:
            srv.metrics.disconnects.inc()
            log.debug("client went away before its answer was ready")
            return error_response(APIError(499, "the client closed the connection", code="client_disconnected"))
        finally:
            if not handed_over:
                lifeline.close()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, "chat")

    return app


async def _complete(head: ReplyHead, started: Awaitable[Job]) -> dict:
    """Generate a non-streamed answer to the end (the slot is released however this ends)."""
    job = await started
    try:
        text = job.pending
        while not job.gen.done:
            text += await job.step()
    finally:
        job.release()
    return head.final(text, job.gen.finish_reason, job.usage())


def _data(obj: Any) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}


async def _events(head: ReplyHead, job: Job, include_usage: bool):
    """The stream's events. It ends with ``[DONE]`` after the last chunk (and the usage chunk), or after an
    in-band ``{"error": ...}`` event when generation fails once the 200 status line is sent."""
    try:
        if head.kind == "chat":
            yield _data(head.chunk("", role=True, include_usage=include_usage))
        if job.pending:
            yield _data(head.chunk(job.pending, include_usage=include_usage))
        while not job.gen.done:
            delta = await job.step()
            if delta:
                yield _data(head.chunk(delta, include_usage=include_usage))
        yield _data(head.chunk(None if head.kind == "chat" else "", finish=job.gen.finish_reason,
                               include_usage=include_usage))
        job.release()
        if include_usage:
            yield _data(head.usage_chunk(job.usage()))
    except APIError as e:
        job.release()
        yield _data(e.body())
    except Exception as e:          # noqa: BLE001 -- the status line is sent; report in-band and end the stream
        job.release()
        log.exception("error while streaming")
        yield _data(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                             code="internal_error").body())
    yield {"data": "[DONE]"}


class _EventStream(EventSourceResponse):
    """An SSE response (``sse-starlette``: framing, keep-alive pings, disconnect detection). However it ends --
    finished, client gone (the stream is cancelled), server stopping -- the job's slot and lifeline are freed."""

    def __init__(self, events, job: Job, service: GenerationService):
        super().__init__(events, sep="\n", ping=SSE_PING_S, headers={"Cache-Control": "no-cache"})
        self.job, self.service = job, service

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.released:           # abandoned mid-way: the client went away
                self.service.metrics.disconnects.inc()
                self.job.release()
            self.job.lifeline.close()
