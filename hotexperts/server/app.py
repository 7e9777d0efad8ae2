"""An OpenAI-compatible HTTP server (FastAPI) over one Engine; `hotexperts serve` (cli/serve.py) runs it
with uvicorn.

    app = create_app(engine, ServerSettings(model_name="m", api_key=None, max_queue=32, request_timeout=600))

Any `model` name is accepted (llama-server's rule: one model is served): a response names the requested
model when it is one of the served names (model_name + aliases, `--served-model-name A B`), else
model_name. Sampling values a request leaves out come from the model's generation_config
(sampling.generation_defaults), listed as "generation_defaults" in the /v1/models card (the chat page's).
Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not: a non-streaming
response is the folded stream), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics, GET / (a
small chat page). With an API key, /v1/* and /metrics need `Authorization: Bearer KEY` (else 401).
server/guard.py refuses foreign Host headers, cross-origin requests and non-JSON POST bodies first;
uvicorn_limits(settings) gives uvicorn its header-size, idle-connection and connection-count limits.
Parsing (JSON nesting bounded) and tokenizing (after a length cap) run in a thread pool; no user input
makes a 500.
Every error is OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
The engine runs in one worker thread: queue.EngineWorker (one request at a time) or, when the engine has N > 1
sequence slots (`--parallel N`, engine.batch), batch_worker.BatchWorker (up to N requests decoded together
in one step); the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from hotexperts.engine.sampling import generation_defaults, model_generation_config
from hotexperts.server import protocol
from hotexperts.server.batch_worker import BatchWorker
from hotexperts.server.errors import APIError, bad_request
from hotexperts.server.events import JobStreamingResponse, job_events
from hotexperts.server.guard import LOOPBACK_HOSTS, Guard
from hotexperts.server.metrics import Metrics
from hotexperts.server.queue import EngineWorker, Job, QueueFull
from hotexperts.server.stream import Meta, fold, make_chunks, sse_lines

log = logging.getLogger("hotexperts.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/"}


@dataclass
class ServerSettings:
    model_name: str
    aliases: tuple[str, ...] = ()        # more names /v1/models lists and responses may echo
    api_key: str | None = None
    max_queue: int = 32                  # requests waiting behind the running one
    request_timeout: float | None = 600.0  # seconds from arrival; None/0 = no limit
    max_body_bytes: int = 16 * 2**20
    allowed_origins: tuple[str, ...] = ()  # CORS: browser pages on these origins may call the API
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS   # Host header names accepted ("*" = any)
    max_headers: int = 64                # request headers at most (431 beyond)
    max_header_bytes: int = 16 * 2**10   # request line + headers (uvicorn's h11 refuses beyond)
    keep_alive_s: float = 5.0            # an idle keep-alive connection is closed after this
    max_connections: int = 256           # concurrent connections (uvicorn answers 503 beyond)
    max_prompt_chars_per_token: int = 32  # text longer than max_context x this is refused untokenized


def uvicorn_limits(settings: ServerSettings) -> dict:
    """uvicorn.Config keywords for the header size, idle-connection and connection-count limits."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_keep_alive": settings.keep_alive_s, "limit_concurrency": settings.max_connections}


class Server:
    """State shared by the routes: engine, worker, metrics, settings."""

    def __init__(self, engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.stats: dict | None = None
        worker = BatchWorker if getattr(engine, "batch", None) is not None else EngineWorker
        self.worker = worker(engine, settings.max_queue, on_finish=self._on_finish)
        self.metrics = Metrics(lambda: (self.worker.depth, self.worker.running_count), lambda: self.stats,
                               getattr(engine, "device", "cpu"))
        self.defaults = generation_defaults(model_generation_config(engine))
        self.names = tuple(dict.fromkeys((settings.model_name, *settings.aliases)))

    def _on_finish(self, job, ev) -> None:            # worker thread
        if ev.kind == "end" and job.first_token_s is not None:
            self.stats = self.engine.stats()
        self.metrics.finished(job, ev, self.stats, time.monotonic())


def create_app(engine, settings: ServerSettings) -> FastAPI:
    server = Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.worker.stop)

    app = FastAPI(title="hotexperts", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_handlers(app, server)
    _add_routes(app, server)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, allowed_hosts=settings.allowed_hosts, allowed_origins=settings.allowed_origins,
                       max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes)
    app.add_middleware(_StatusMetrics, metrics=server.metrics)
    return app


# ---- errors, auth, metrics middleware ------------------------------------------------------------
def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}"))


class _StatusMetrics:
    """Pure ASGI middleware: counts every HTTP response by route and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http(route, status["code"])


def _authorize(server: Server, request: Request) -> None:
    key = server.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


# ---- routes --------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(server, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(server, request, "completion")

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(server, request)
        return {"object": "list", "data": [_model_card(server, name) for name in server.names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(server, request)
        if model_id not in server.names:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{', '.join(map(repr, server.names))}", param="model_id",
                           code="model_not_found")
        return _model_card(server, model_id)

    @app.get("/health")
    async def health():
        w = server.worker
        body = {"status": "ok" if w.alive else "error", "model": server.settings.model_name,
                "queue_depth": w.depth, "running": w.busy,
                "slots": getattr(getattr(server.engine, "batch", None), "num_slots", 1)}
        return JSONResponse(body, status_code=200 if w.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(server, request)
        data, ctype = server.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = resources.files("hotexperts.server") / "static" / "index.html"
        return HTMLResponse(page.read_text("utf-8"))


def _model_card(server: Server, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "hotexperts",
            "max_model_len": server.engine.max_context, "generation_defaults": server.defaults}


def answered_model(server: Server, requested: str | None) -> str:
    """The name a response carries: the requested one if served under it, else the main name."""
    return requested if requested in server.names else server.settings.model_name


async def _read_body(server: Server, request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > server.settings.max_body_bytes
    raw = b"" if too_big else await request.body()
    if too_big or len(raw) > server.settings.max_body_bytes:
        raise APIError(413, f"request body over {server.settings.max_body_bytes} bytes",
                       code="body_too_large")
    return raw


def _check_length(server: Server, chars: int) -> None:
    """Text too long to fit the context whatever the tokenizer does is refused before tokenizing it."""
    cap = server.engine.max_context * server.settings.max_prompt_chars_per_token
    if chars > cap:
        raise bad_request(f"the prompt has {chars} characters; this model's context is "
                          f"{server.engine.max_context} tokens (at most {cap} characters are tokenized)",
                          param="messages", code="context_length_exceeded")


def _prompt_ids(server: Server, kind: str, req) -> list[int]:
    """Tokenize (runs in a thread pool: chat templates and long prompts must not block the loop; the
    tokenizer releases the GIL, tokenizer.Tokenizer.encode), after the length cap."""
    tok = server.engine.tokenizer
    try:
        if kind == "chat":
            messages = protocol.chat_messages(req)
            _check_length(server, sum(len(m["content"]) for m in messages))
            return tok.encode_chat(messages, **(req.chat_template_kwargs or {}))
        prompt = protocol.completion_prompt(req)
        if isinstance(prompt, str):
            _check_length(server, len(prompt))
            return tok.encode(prompt)
        vocab = server.engine.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt",
                              code="invalid_value")
        return list(prompt)
    except APIError:
        raise
    except Exception as e:   # chat template errors (HotExpertsError), bad kwargs
        raise bad_request(str(e), param="messages" if kind == "chat" else "prompt") from None


async def _complete(server: Server, request: Request, kind: str):
    arrived = time.monotonic()
    _authorize(server, request)
    req = await run_in_threadpool(protocol.parse_request, kind, await _read_body(server, request))
    ids = await run_in_threadpool(_prompt_ids, server, kind, req)
    if not ids:
        raise bad_request("the prompt is empty (0 tokens)", param="prompt", code="empty_prompt")
    params = protocol.sampling_params(req, len(ids), server.engine.max_context, server.defaults)
    job = _submit(server, ids, params, arrived)
    events = job_events(server.worker, job)
    first = await events.until_started(request)       # errors before any output -> JSON error status
    if first is None:                                 # the client left while waiting
        return Response(status_code=499)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    chunks = make_chunks(kind, events, Meta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()),
                                            answered_model(server, req.model)))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return JobStreamingResponse(sse_lines(chunks, include_usage), events.close,
                                    media_type="text/event-stream", headers=SSE_HEADERS)
    events.watch(request)                             # non-streaming: stop when the client leaves
    try:
        return JSONResponse(await fold(kind, chunks))
    finally:
        events.close()


def _submit(server: Server, ids, params, arrived: float) -> Job:
    timeout = server.settings.request_timeout
    job = Job(ids, params, asyncio.get_running_loop(), deadline=arrived + timeout if timeout else None,
              arrived=arrived)
    try:
        server.worker.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry later", code="queue_full",
                       headers={"Retry-After": str(server.worker.retry_after())}) from None
    return job


# ---- CLI -----------------------------------------------------------------------------------------
