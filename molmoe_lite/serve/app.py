"""The ASGI app: OpenAI's chat-completions routes, model list, health, and the web page.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health`` (200 once the model is loaded, 503 before), ``GET /`` (the page) and its
static files. The model loads in a thread when the app starts, so the port answers
(``/health``: 503 "loading") while it loads. A request goes: body (size-limited) ->
JSON -> ``schema`` -> in a worker thread: the text's token floor against the context, the
images (``image_urls``), the processor -> ``engine.submit``; its text comes back through
``bridge`` as a whole response or as server-sent events, as the engine made it: it already
ends before a ``stop`` string, and no streamed piece holds text the answer will not (the
engine's ``TextPieces`` holds back what may begin a stop string). Every refusal is an
``APIError`` answered in OpenAI's error shape; anything unexpected is logged and answered
500, and the server carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from molmoe_lite.engine import ContextLengthError, EngineFullError
from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.sampling import SamplingSettings
from molmoe_lite.serve import errors, page
from molmoe_lite.serve.bridge import HandleStream
from molmoe_lite.serve.image_urls import ImageLimits, read_image
from molmoe_lite.serve.prompt import conversation_images, conversation_text
from molmoe_lite.serve.responses import Reply, sse
from molmoe_lite.serve.schema import ChatRequest, parse_chat_request
from molmoe_lite.tokenizer import TokenFloor

log = logging.getLogger("molmoe_lite.serve")


@dataclass
class ServeConfig:
    """Everything the app decides by, besides the model and engine."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    default_max_tokens: int = 200  # when a request names none (the release's example uses 200)
    retry_after_s: int = 1  # Retry-After of a 429 (a full queue drains in about a decode step)


@dataclass
class Loaded:
    """What the loader returns: the model (processor attached), a started engine, its context;
    and, measured once from the tokenizer here, the floor of a text's token count."""

    model: Any
    engine: Any
    max_context: int
    token_floor: TokenFloor = field(init=False)

    def __post_init__(self) -> None:
        self.token_floor = TokenFloor(self.model.processor.tokenizer)


class ServeState:
    def __init__(self, config: ServeConfig, loader: Callable[[], Loaded]) -> None:
        self.config = config
        self.loader = loader
        self.loaded: Loaded | None = None
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None  # the runner stops the server
        self.ready = threading.Event()
        self.created = 0
        self.finished: Counter[str] = Counter()  # requests by how they ended, for /health
        self._count_lock = threading.Lock()

    def count_finished(self, reason: str, request_id: str) -> None:
        with self._count_lock:
            self.finished[reason] += 1
        log.info("%s ended: %s", request_id, reason)

    def load(self) -> None:
        try:
            self.loaded = self.loader()
            self.ready.set()
            log.info("model loaded; ready")
        except BaseException as exc:  # reported by the runner, which then stops the server
            self.load_error = exc
            if self.on_load_error is not None:
                self.on_load_error(exc)

    def require(self) -> Loaded:
        if not self.ready.is_set() or self.loaded is None:
            raise errors.loading()
        return self.loaded


def error_response(exc: errors.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---- limits and API key: a plain ASGI middleware, so it applies before any body is read ----


class Guard:
    """Refuses bodies over the limit (413: by Content-Length at once, else while reading) and
    requests to ``/v1/`` without the API key (401), before the app sees them."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(scope["path"], headers)
        if problem is not None:
            return await error_response(problem)(scope, receive, send)
        limit, seen = self.config.max_body_bytes, 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise errors.too_large(limit)
            return message

        return await self.app(scope, limited_receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> errors.APIError | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_body_bytes:
            return errors.too_large(self.config.max_body_bytes)
        key = self.config.api_key
        if key is not None and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not given:
                return errors.unauthorized("missing API key: send the header 'Authorization: Bearer KEY'")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return errors.unauthorized("incorrect API key")
        return None


# ---- routes --------------------------------------------------------------------------


async def health(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    if state.ready.is_set():
        engine = state.loaded.engine
        with state._count_lock:
            finished = dict(state.finished)
        return JSONResponse({"status": "ok", "model": state.config.model_name, "running": engine.running,
                             "waiting": engine.waiting, "finished": finished})
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})


def _model_card(state: ServeState) -> dict[str, Any]:
    return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "molmoe-lite"}


async def list_models(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    name = request.path_params["model"]
    if name != state.config.model_name:
        raise errors.model_not_found(name, state.config.model_name)
    return JSONResponse(_model_card(state))


async def chat_completions(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    config = state.config
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    req = parse_chat_request(body)
    if req.model != config.model_name:
        raise errors.model_not_found(req.model, config.model_name)
    loaded = state.require()
    inputs, image_size = await asyncio.to_thread(_prepare_inputs, loaded, req, config.image_limits)
    settings = _sampling_settings(req, inputs, loaded, config)
    reply = Reply(model=config.model_name, image_size=image_size)
    try:
        handle = loaded.engine.submit(inputs, settings)
    except EngineFullError as exc:
        raise errors.busy(config.retry_after_s, f"the server is busy (its request queue is full): {exc}") from None
    except ContextLengthError as exc:
        raise errors.bad_request(str(exc), param="messages", code="context_length_exceeded") from None
    log.info("%s: %d prompt tokens, up to %d new", reply.id, int(inputs["input_ids"].numel()),
             settings.max_new_tokens)
    stream = HandleStream(handle, on_finish=lambda reason: state.count_finished(reason, reply.id))
    if req.stream:
        return EventStream(_events(stream, reply, req), on_disconnect=stream.cancel)
    return await _whole_answer(request, stream, reply, req)


def _prepare_inputs(loaded: Loaded, req: ChatRequest, limits: ImageLimits):
    """Images decoded and checked, then the processor's inputs for the whole conversation.

    A text whose token floor alone leaves no room is refused first: tokenizing megabytes
    takes seconds, only to be refused by the same check afterwards."""
    text = conversation_text(req.turns)
    _check_room(loaded, loaded.token_floor(text), req.max_tokens, at_least=True)
    images = [read_image(url, limits, param) for url, param in conversation_images(req.turns)]
    try:
        inputs = loaded.model.processor.process(images=images or None, text=text)
    except MolmoeLiteError as exc:
        raise errors.bad_request(str(exc), param="messages", code="invalid_image") from None
    return inputs, (images[0].size if images else None)


def _check_room(loaded: Loaded, prompt: int, wanted: int | None, at_least: bool = False) -> int:
    """The context left after a prompt of ``prompt`` tokens (``at_least``: a lower bound);
    a 400 when no token, or fewer than ``wanted``, would fit."""
    room = loaded.max_context - prompt
    if room < 1 or (wanted is not None and wanted > room):
        asked = f"{'at least ' if at_least else ''}{prompt} in the messages" + (
            f" + {wanted} to generate" if wanted is not None else "")
        raise errors.bad_request(
            f"the server's context is {loaded.max_context} tokens, and this request needs more: {asked} "
            "(send a shorter conversation, a smaller image, or fewer max_tokens)",
            param="messages", code="context_length_exceeded",
        )
    return room


def _sampling_settings(req: ChatRequest, inputs: dict, loaded: Loaded, config: ServeConfig):
    wanted = req.max_tokens
    room = _check_room(loaded, int(inputs["input_ids"].numel()), wanted)
    max_new = wanted if wanted is not None else min(config.default_max_tokens, room)
    return SamplingSettings(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                            stop_strings=req.stop, seed=req.seed)


def _finish_reason(completion: Any) -> str:
    """The engine's reason: "stop" for EOS or a stop string (the text ends before it), "length"."""
    if completion.finish_reason == "cancelled":
        raise errors.APIError(503, "the request was cancelled (the server is shutting down)",
                              type="server_error", code="cancelled")
    return completion.finish_reason


async def _whole_answer(request: Request, stream: HandleStream, reply: Reply, req: ChatRequest) -> Response:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
    try:
        async for _piece in stream:  # the pieces join to the completion's text
            pass
    except MolmoeLiteError as exc:  # the engine failed this request (its memory, its inputs)
        raise errors.internal(f"generation failed: {exc}") from None
    finally:
        watcher.cancel()
    c = stream.completion
    return JSONResponse(reply.completion(c.text, _finish_reason(c), c.prompt_tokens, c.completion_tokens))


async def _cancel_on_disconnect(request: Request, stream: HandleStream) -> None:
    # the body has been read, so the next ASGI message is the client going away
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


async def _events(stream: HandleStream, reply: Reply, req: ChatRequest):
    """The answer as OpenAI's chunks: role first, then text, then the finish (and usage)."""
    yield sse(reply.chunk({"role": "assistant", "content": ""}))
    try:
        async for piece in stream:
            yield sse(reply.chunk({"content": piece}))
        c = stream.completion
        yield sse(reply.last_chunk(c.text, _finish_reason(c)))
        if req.include_usage:
            yield sse(reply.usage_chunk(c.prompt_tokens, c.completion_tokens))
    except errors.APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # headers are sent: the error travels as an event, as OpenAI's does
        log.error("request %s failed mid-stream:\n%s", reply.id, traceback.format_exc())
        yield sse(errors.internal(f"internal error while generating: {type(exc).__name__}").body())
    yield sse("[DONE]")


class EventStream:
    """A server-sent-events response that notices a client going away at once.

    A task listens for ``http.disconnect`` while the events are sent; when it comes,
    ``on_disconnect`` frees the request's engine row, and sending stops.
    """

    def __init__(self, events, on_disconnect: Callable[[], None]) -> None:
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]})
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.on_disconnect()

        listener = asyncio.create_task(listen())
        try:
            async for event in self.events:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": event, "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            pass
        except asyncio.CancelledError:
            # the server is shutting down and the grace period is over: end the stream
            # properly (an error event, then [DONE]) so the client is not left with a cut body
            if not gone.is_set():
                with contextlib.suppress(Exception):
                    ending = errors.APIError(503, "the server shut down before the answer was complete",
                                             type="server_error", code="server_shutdown")
                    for event in (sse(ending.body()), sse("[DONE]")):
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise
        finally:
            # however it ended (done, client gone, cancelled by a shutdown), the row is given back;
            # a no-op for a request that finished
            self.on_disconnect()
            listener.cancel()
            with contextlib.suppress(Exception):
                await self.events.aclose()


# ---- errors and the app ----------------------------------------------------------------


async def _api_error(request: Request, exc: errors.APIError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    return error_response(errors.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                          code=kind))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
    return error_response(errors.internal())


def create_app(config: ServeConfig, loader: Callable[[], Loaded]) -> Any:
    """The ASGI app; the model loads (``loader``) in a thread when the app starts."""
    import time

    state = ServeState(config, loader)
    state.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, daemon=True, name="molmoe-serve-load").start()
        yield
        if state.loaded is not None:
            log.info("shutting down the engine")
            await asyncio.to_thread(state.loaded.engine.shutdown)

    routes = [
        Route("/", page.index, methods=["GET"]),
        Route("/static/{name}", page.static_file, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        errors.APIError: _api_error, HTTPException: _http_error, Exception: _unexpected,
    })
    app.state.serve = state
    return Guard(app, config), state
