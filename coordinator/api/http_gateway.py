"""The OpenAI-compatible HTTP gateway: GET /v1/models, POST /v1/completions, /v1/chat/completions and
/v1/embeddings, as a Starlette app served by uvicorn.

It is a client of the coordinator's gRPC port like any other (the SDK's AsyncClient, calling Generate, Infer
and ListModels only), so a request takes the same path as a gRPC one: one scheduler, one validation, one error
table. The same gateway runs beside the coordinator (`coordinator serve` / `launch`, in its event loop, over
loopback) or alone in front of a remote one (`coordinator http --endpoint HOST:PORT`).

- Streaming (`stream: true`) writes each gRPC message as a server-sent event the moment it arrives (uvicorn
  writes each body chunk to the socket at once); the first message is awaited before the response starts, so a
  request refused before any token (400, 404, 429, ...) gets its proper status, and one that fails later ends
  with an error event, as OpenAI's streams do.
- A caller's `Authorization: Bearer <key>` goes on to the coordinator with its calls, which decides (401/403);
  so do its `x-request-id` (quoted by the request log, and echoed on the response) and W3C trace context
  (`traceparent`, `tracestate`: the coordinator's spans join the caller's trace).
- Bounded: bodies above `max_body_bytes` are refused (413) unread, a body must arrive within `body_timeout_s`,
  every call has the deadline `timeout_s`, and uvicorn takes at most `max_connections` at once (then 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator.api.http_keys import Judge, bearer_key, keys_first
from coordinator.api.openai_errors import ApiError, from_shardline, internal, redacted
from coordinator.api.openai_requests import (
    EMBEDDING_NAMES,
    GenerationCall,
    chat_call,
    completion_call,
    embedding_call,
    parse_json,
)
from coordinator.api.openai_responses import (
    Answer,
    Choice,
    echo_text,
    embeddings,
    logprobs_object,
    model_entry,
    model_id,
    models,
    result_choices,
    scored_tokens,
    usage,
)
from coordinator.serving.request_log import REQUEST_ID_KEY, check_request_id
from shardline import __version__, tracing
from shardline.client import DEFAULT_TIMEOUT_S, SERVICE, AsyncClient, GenerateChunk
from shardline.errors import InvalidArgument, ShardlineError
from shardline.limits import DEFAULT_MAX_REQUEST_BYTES
from shardline.tls import ClientTLS

log = logging.getLogger(__name__)
HEALTH_TTL_S = 1.0  # /health and /ping ask the coordinator at most this often
T = TypeVar("T")
MAX_TRACE_HEADER_CHARS = 512  # W3C's traceparent is 55; tracestate at most 32 members
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # and tell proxies not to buffer either


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, how it reaches the coordinator, and its bounds."""

    target: str                                   # the coordinator's gRPC host:port
    host: str = "127.0.0.1"
    port: int = 8000                              # 0 = a free one
    tls: ClientTLS | None = None                  # how to reach the coordinator (None: plaintext)
    https_cert: Path | None = None                # serve HTTPS with this certificate and key
    https_key: Path | None = None
    https_client_ca: Path | None = None           # and require client certificates from this CA
    max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S          # each call's deadline at the coordinator
    body_timeout_s: float = 30.0                  # a request body arrives within this
    max_connections: int = 1000                   # more at once are answered 503 by uvicorn
    grace_s: float = 1.0                          # at stop, responses in flight get this long
    api_keys: Path | None = None                  # judge callers' keys by this file before reading a body ...
    judge_remotely: bool = False                  # ... or by asking the coordinator (http_keys.py)


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(content, status_code=status, headers=headers)


def _event(payload: Any) -> bytes:
    """One server-sent event (JSON has no raw newline, so one `data:` line is the whole payload)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Routes:
    """The endpoints. `on_first` is told each stream's id when its first gRPC message reaches the gateway
    (for timing how long the gateway takes to pass it on)."""

    def __init__(self, client: AsyncClient, settings: GatewaySettings,
                 on_first: Callable[[str], None] | None = None) -> None:
        self.client, self.settings, self.on_first = client, settings, on_first
        self._health: tuple[float, asyncio.Task[tuple[bool, str]]] | None = None  # (asked at, the answer)

    def client_for(self, request: Request) -> AsyncClient:
        """The SDK client carrying the caller's key (checked for form here; the coordinator judges it), request
        id and trace context."""
        key, passed = bearer_key(request.headers.raw), forwarded(request)
        if key is None:
            return self.client.with_api_key(None, passed) if passed else self.client
        return self.client.with_api_key(key, passed)

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, read up to the limit and no further (413), within body_timeout_s (408)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
            raise _too_large(f"{int(declared)} bytes", limit)
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise _too_large("more than that", limit)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s",
                           code="timeout") from None
        return parse_json(bytes(body))

    async def health(self, request: Request) -> Response:
        """200 while the coordinator serves; 503 saying why not (a probe's answer: no key needed). The
        coordinator is asked at most once a second, however many probes come: a keyless caller's probes
        cost the coordinator nothing more."""
        now = asyncio.get_running_loop().time()
        if self._health is None or now - self._health[0] >= HEALTH_TTL_S:
            self._health = (now, asyncio.ensure_future(self._ask_health()))
        serving, why = await asyncio.shield(self._health[1])
        if serving:
            return _json({"status": "ok"})
        return _json({"status": "unavailable", "reason": why}, 503)

    async def _ask_health(self) -> tuple[bool, str]:
        try:
            reply = await self.client.health.Check(HealthCheckRequest(service=SERVICE), timeout=5)
        except grpc.RpcError as err:  # any failure to ask is a 503 saying so
            return False, f"the coordinator does not answer: {redacted(err.details() or '')}"
        if reply.status == HealthCheckResponse.SERVING:
            return True, ""
        return False, "the coordinator does not serve yet (its workers are loading, or too few)"

    async def version(self, request: Request) -> Response:
        return _json({"version": __version__})

    async def list_models(self, request: Request) -> Response:
        return _json(models(await self.client_for(request).list_models()))

    async def get_model(self, request: Request) -> Response:
        wanted = str(request.path_params["model"])
        for m in await self.client_for(request).list_models():
            if wanted in (model_id(m), f"{m.name}@{m.version}"):
                return _json(model_entry(m))
        raise ApiError(404, f"model {wanted!r} is not served here (GET /v1/models lists them)", "not_found_error",
                       "model", "model_not_found")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_call(await self.read_json(request)), chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat_call(await self.read_json(request)), chat=True)

    async def _generate(self, request: Request, call: GenerationCall, chat: bool) -> Response:
        client = self.client_for(request)
        answer = Answer(call.model, chat)
        timeout = self.settings.timeout_s
        try:
            if chat:
                started = await unless_gone(request, client.chat(call.messages, stream=call.stream,
                                                                 timeout=timeout, **call.params))
            else:
                started = await unless_gone(request, client.generate(call.prompt, stream=call.stream,
                                                                     timeout=timeout, **call.params))
            if not call.stream:
                r = started
                answer = replace(answer, model=call.model or r.model)  # no model asked: the version that served
                return _json(answer.whole(result_choices(answer, call, r), r.prompt_tokens, r.completion_tokens))
            try:
                first = await unless_gone(request, anext(started))
            except BaseException:
                await started.aclose()
                raise
            answer = replace(answer, model=call.model or first.model)
        except ShardlineError as exc:
            raise from_shardline(exc, call.names) from None
        if self.on_first is not None:
            self.on_first(answer.id)
        return StreamingResponse(self._events(answer, call, started, first), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    async def _events(self, answer: Answer, call: GenerationCall, chunks: AsyncIterator[GenerateChunk],
                      chunk: GenerateChunk) -> AsyncIterator[bytes]:
        """Each gRPC message as an event, at once; then the usage (if asked for) and [DONE]. A failure after the
        first event is an error event (the status went out with the first). A client that goes away cancels
        the gRPC stream (closing `chunks` cancels its call)."""
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            prompt_tokens, completion, prompt = 0, 0, list(chunk.prompt_logprobs)
            choices = [Choice() for _ in range(call.n)]  # each choice's own place in its text and its calls
            try:
                while True:
                    completion += len(chunk.token_ids)
                    prompt_tokens = prompt_tokens or chunk.prompt_tokens
                    prompt = prompt or list(chunk.prompt_logprobs)  # the first choice's, for the others' echo
                    c = choices[chunk.index]
                    text = (echo_text(call, prompt) if c.first else "") + chunk.text
                    scored = scored_tokens(call, answer.chat, prompt if c.first else [], chunk.logprobs,
                                           len(chunk.token_ids))
                    event = answer.chunk(text, chunk.finish_reason, c.first, call.include_usage,
                                         logprobs_object(answer.chat, scored, c.offset), chunk.tool_calls, c.called,
                                         chunk.index)
                    c.called, c.offset, c.first = c.called + len(chunk.tool_calls), c.offset + len(text), False
                    c.done = bool(chunk.finish_reason)
                    if call.continuous_usage:  # every chunk says the usage so far (vLLM's extension)
                        event["usage"] = usage(prompt_tokens, completion)
                    yield _event(event)
                    if all(c.done for c in choices):
                        break
                    chunk = await anext(chunks)
            except ShardlineError as exc:
                yield _event(from_shardline(exc, call.names).body())
                return
            except StopAsyncIteration:  # pragma: no cover - the coordinator always ends with a finish reason
                log.warning("a generation stream ended without a finish reason")
            if call.include_usage:
                yield _event(answer.usage_chunk(prompt_tokens, completion))
            yield DONE

    async def embeddings(self, request: Request) -> Response:
        call = embedding_call(await self.read_json(request))
        try:
            found = await unless_gone(request, self.client_for(request).embeddings(
                call.texts, model=call.model, timeout=self.settings.timeout_s))
        except ShardlineError as exc:
            raise from_shardline(exc, EMBEDDING_NAMES) from None
        width = found.vectors.shape[1] if found.vectors.ndim == 2 else 0
        if call.dimensions is not None and call.dimensions != width:
            raise ApiError(400, f"dimensions is {call.dimensions}; this model's embeddings have {width} (they "
                           "cannot be shortened)", param="dimensions")
        return _json(embeddings(call.model, found.vectors, found.tokens, call.base64))


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled as soon as the client disconnects (Starlette does not cancel a handler whose client
    went away; an abandoned generation would otherwise hold its place in the batch until it ends). Called once
    the body is read, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    return task.result()


def forwarded(request: Request) -> tuple[tuple[str, str], ...]:
    """The headers that go on to the coordinator as gRPC metadata: the caller's request id (400 if malformed)
    and its trace context (dropped if malformed, as W3C trace context asks)."""
    passed = []
    request_id = request.headers.get(REQUEST_ID_KEY)
    if request_id is not None:
        try:
            passed.append((REQUEST_ID_KEY, check_request_id(request_id)))
        except InvalidArgument as exc:
            raise ApiError(400, str(exc), code="invalid_request_id") from None
    for key in tracing.CONTEXT_KEYS:
        value = request.headers.get(key)
        if value and len(value) <= MAX_TRACE_HEADER_CHARS and value.isascii() and value.isprintable():
            passed.append((key, value))
    return tuple(passed)


def echo_request_id(app: Any) -> Any:
    """ASGI middleware: every response carries the caller's `x-request-id` back, errors and streams included."""
    wanted = REQUEST_ID_KEY.encode()

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = [(k, v) for k, v in scope["headers"] if k == wanted][:1]

        async def sending(message: Any) -> None:
            if given and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *given]}
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size}; the limit is {limit} bytes (max_http_body_bytes)",
                    code="request_too_large")


Handler = Callable[[Request], Awaitable[Response]]


def answering(handler: Handler) -> Handler:
    """Errors as OpenAI's JSON error shape: ApiError as it says, anything else a logged 500 with a generic
    message. A 413 closes the connection unless the body's length was declared (then uvicorn discards the
    rest of it, unbuffered, and the caller reads its answer)."""
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            error = exc
        except ShardlineError as exc:  # from a call with no fields of its own to name (the model list)
            error = from_shardline(exc, {"model": "model"})
        except Exception:  # noqa: BLE001 - the caller gets a generic 500; the log gets the traceback
            log.exception("%s %s failed", request.method, request.url.path)
            error = internal()
        close = error.status == 413 and "content-length" not in request.headers
        headers = {"connection": "close"} if close else {}
        if error.retry_after is not None:
            headers["retry-after"] = str(error.retry_after)
        return _json(error.body(), error.status, headers or None)

    return handle


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = {404: f"no such endpoint: {request.url.path} (this server serves /v1/models, /v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /health, /ping and /version)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(status, "request failed")
    return _json(ApiError(status, message).body(), status)


def build_app(client: AsyncClient, settings: GatewaySettings, on_first: Callable[[str], None] | None = None,
              judge: Judge | None = None) -> Any:
    """The gateway's ASGI app; with a `judge`, a caller's key is judged before anything else (http_keys.py)."""
    routes = Routes(client, settings, on_first)
    app = Starlette(routes=[
        # probes, as vLLM, SGLang and TGI answer them (load generators and orchestrators ask these first)
        Route("/health", routes.health, methods=["GET"]),
        Route("/ping", routes.health, methods=["GET", "POST"]),
        Route("/version", routes.version, methods=["GET"]),
        Route("/v1/models", answering(routes.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", answering(routes.get_model), methods=["GET"]),
        Route("/v1/completions", answering(routes.completions), methods=["POST"]),
        Route("/v1/chat/completions", answering(routes.chat_completions), methods=["POST"]),
        Route("/v1/embeddings", answering(routes.embeddings), methods=["POST"]),
    ], exception_handlers={HTTPException: _http_error})
    return echo_request_id(keys_first(app, judge) if judge is not None else app)
