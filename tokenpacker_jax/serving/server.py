"""The OpenAI-compatible HTTP app (FastAPI/Starlette) over an engine thread.

    POST /v1/chat/completions   chat completion, whole or as server-sent events
    GET  /v1/models             the one model served
    GET  /health                200 while serving; 503 when shutting down or failed; the
                                engine's counters and ``lowered_while_serving``
    POST /v1/region_maps        {"image": data URL} -> TokenPacker's region maps (the page)
    GET  /                      the web page (``static/index.html``)

Every request's events come from the engine thread (``worker.EngineWorker``) on its own
queue, so nothing of one answer reaches another. Errors are OpenAI error bodies with a 4xx
status (5xx for the server's own failures): see ``openai_api``. A request that waits or
runs longer than ``request_timeout`` seconds is dropped from the engine and answered 504;
when ``max_waiting`` requests already wait for a row, a new one is answered 503.

Every program is compiled before the server listens (``Engine.compile``,
``RegionMapper.compile``); ``lowered_while_serving`` counts the jitted functions (eager
operations included) the process lowered to XLA since, so a request that would compile
something shows there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import jax
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from tokenpacker_jax.serving import openai_api
from tokenpacker_jax.serving.engine import Request
from tokenpacker_jax.serving.model import ChatModel
from tokenpacker_jax.serving.openai_api import ApiError, ImagePolicy, error_body
from tokenpacker_jax.serving.region_view import RegionMapper
from tokenpacker_jax.serving.text import TextStream
from tokenpacker_jax.serving.worker import EngineWorker, Overloaded

PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")


class LoweringCounter:
    """Counts the XLA programs this process lowers while it is registered (jax.monitoring's
    event for each lowering of a jitted function or eager operation to MLIR; it fires
    whether or not the persistent compilation cache then holds the executable)."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == self.EVENT:
            self.names.append(str(kwargs.get("fun_name")))

    def __enter__(self) -> LoweringCounter:
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *_) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


class ServerState:
    """What the handlers share: the model, the engine's thread, the limits."""

    def __init__(self, model: ChatModel, *, max_waiting: int, request_timeout: float,
                 images: ImagePolicy, default_max_tokens: int):
        self.model = model
        self.worker = EngineWorker(model.engine, max_waiting)
        self.request_timeout = request_timeout
        self.images = images
        self.default_max_tokens = default_max_tokens
        self.draining = False
        self.region_mapper = RegionMapper(model.engine.model, model.engine.params,
                                          model.builder)
        self.created = int(time.time())
        self.lowered = LoweringCounter()

    @property
    def max_body_bytes(self) -> int:
        # One image, base64-encoded (4/3), plus the conversation's text.
        return self.images.max_bytes * 4 // 3 + 4 * 2**20


async def _json_body(request: HttpRequest, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of "
                            f"{limit}", code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                       code="request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", code="invalid_json") from err


class _Answer:
    """One engine request seen from its HTTP handler: text pieces as they become final."""

    def __init__(self, state: ServerState, request: Request, stop: tuple[str, ...],
                 every_token: bool):
        self.state, self.request, self.every_token = state, request, every_token
        self.text = TextStream(state.model.trained.tokenizer, stop)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.deadline = asyncio.get_running_loop().time() + state.request_timeout

    def submit(self) -> None:
        try:
            self.state.worker.submit(self.request, asyncio.get_running_loop(), self.queue,
                                     self.every_token)
        except Overloaded as err:
            raise ApiError(503, f"the server is busy: {err}; try again later",
                           code="server_overloaded", kind="server_error") from err

    async def _next_event(self):
        try:
            async with asyncio.timeout_at(self.deadline):  # (a timer, not a task per token)
                return await self.queue.get()
        except TimeoutError:
            raise ApiError(504, f"the request took longer than {self.state.request_timeout} s",
                           code="timeout", kind="server_error") from None

    async def _tokens(self) -> AsyncIterator[int]:
        """Yields the answer's tokens as they come; sets ``finish_reason`` (stop | length);
        a request left early is dropped from the engine."""
        try:
            while self.finish_reason is None:
                event = await self._next_event()
                if event.finish_reason == "error":
                    raise ApiError(500, "the model failed while answering",
                                   code="engine_error", kind="server_error")
                if event.token is not None:
                    self.tokens.append(event.token)
                    yield event.token
                if event.finish_reason is not None:
                    self.finish_reason = ("length" if event.finish_reason == "length"
                                          else "stop")
        finally:
            self.request.cancel()  # a no-op when it is finished; else frees its row

    async def pieces(self) -> AsyncIterator[str]:
        """Yields the answer's text pieces as they become final."""
        async with contextlib.aclosing(self._tokens()) as tokens:
            async for token in tokens:
                piece = self.text.add(token)
                if piece:
                    yield piece
                if self.text.stopped:  # a stop string: the rest is not wanted
                    self.finish_reason = "stop"
                    break
        rest = self.text.finish()
        if rest:
            yield rest

    async def whole(self) -> str:
        """The whole answer (for a request that is not streamed)."""
        if self.every_token:
            return "".join([piece async for piece in self.pieces()])
        try:  # only the last event comes: the text is decoded once
            event = await self._next_event()
        finally:
            self.request.cancel()
        if event.finish_reason == "error":
            raise ApiError(500, "the model failed while answering", code="engine_error",
                           kind="server_error")
        self.tokens = list(self.request.tokens)
        self.finish_reason = "length" if event.finish_reason == "length" else "stop"
        return self.state.model.decode(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with state.lowered:  # (everything is compiled by now: see the module docstring)
            state.worker.start()
            yield
            state.draining = True
            await run_in_threadpool(state.worker.stop)

    app = FastAPI(title="tokenpacker-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state
    model = state.model

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.get("/health")
    async def health():
        engine = model.engine
        status = ("failed" if state.worker.error is not None
                  else "draining" if state.draining else "ok")
        return JSONResponse({"status": status, "model": model.name, "live": engine.live,
                             "waiting": engine.waiting, "slots": engine.config.slots,
                             "decode_steps": engine.steps, "rows_decoded": engine.rows_decoded,
                             "prefills": engine.prefills,
                             "lowered_while_serving": state.lowered.names},
                            status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model",
                                            "created": state.created,
                                            "owned_by": "tokenpacker-jax"}]}

    with open(PAGE, encoding="utf-8") as file:
        page_html = file.read()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html)

    @app.post("/v1/region_maps")
    async def region_maps(http: HttpRequest):
        body = await _json_body(http, state.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object with 'image'")
        if state.region_mapper.unavailable:
            raise ApiError(400, state.region_mapper.unavailable, code="no_region_attention")
        image = await run_in_threadpool(openai_api.load_image_url, body.get("image"),
                                        "image", state.images)
        return await run_in_threadpool(state.region_mapper, image)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        if state.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           kind="server_error")
        body = await _json_body(http, state.max_body_bytes)
        job = await run_in_threadpool(openai_api.parse_chat_request, body, model.name,
                                      state.images)
        try:
            prompt = await run_in_threadpool(model.prompt, job.turns, job.image, job.system)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from err
        length = len(prompt.ids)
        room = model.room(length)
        if room < 1:
            raise ApiError(400, f"the prompt has {length} tokens, more than this server's "
                                f"longest prompt ({model.engine.config.buckets[-1]})",
                           "messages", "context_length_exceeded")
        if job.max_tokens is not None and job.max_tokens > room:
            raise ApiError(400, f"the prompt has {length} tokens: at most {room} new tokens "
                                f"fit the context of {model.engine.config.max_length}, "
                                f"max_tokens asks for {job.max_tokens}", "max_tokens",
                           "context_length_exceeded")
        max_tokens = job.max_tokens or min(state.default_max_tokens, room)
        # Tokens one by one only where they are needed: streamed, or checked for stop strings.
        answer = _Answer(state, Request(prompt, max_tokens, job.sampling), job.stop,
                         every_token=job.stream or bool(job.stop))
        answer.submit()
        cid = openai_api.completion_id()
        if not job.stream:
            text = await answer.whole()
            return openai_api.completion(cid, model.name, text, answer.finish_reason, length,
                                         answer.completion_tokens)
        return StreamingResponse(_events(answer, cid, model.name, length, job.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(answer: _Answer, cid: str, name: str, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    yield _sse(openai_api.chunk(cid, name, {"role": "assistant", "content": ""}))
    try:
        async for piece in answer.pieces():
            yield _sse(openai_api.chunk(cid, name, {"content": piece}))
    except ApiError as err:  # the status line is sent: the error goes in the stream
        yield _sse(err.body())
        return
    yield _sse(openai_api.chunk(cid, name, {}, answer.finish_reason))
    if include_usage:
        yield _sse(openai_api.chunk(cid, name, {}, usage_=openai_api.usage(
            prompt_tokens, answer.completion_tokens), choices=False))
    yield "data: [DONE]\n\n"
