"""Requests whose bytes are not the message they should be: INVALID_ARGUMENT and one log line, on every
service of every shardline server.

grpc.aio deserializes a request before any handler runs; a DecodeError there would surface as UNKNOWN
("Unexpected DecodeError") with a traceback logged per message. `MalformedRequests`, a server interceptor
that `shardline.server.new_server` installs, wraps each handler instead: its deserializer turns bytes that
do not parse into a `Malformed` marker, and its behavior answers a marker with INVALID_ARGUMENT "request is
not a valid <Type>: <why>" before the servicer sees it, logged at WARNING in one line (at most one line per
method and second; the next line counts those left out). On a client stream, the servicer sees its
requests end at the first malformed message, and the call ends the same way (at once if the servicer sends
a response, else when it returns). A servicer that reads with `context.read()` instead of its request
iterator is not covered.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from shardline.errors import InvalidArgument

log = logging.getLogger(__name__)

LOG_EVERY_S = 1.0


@dataclass(frozen=True)
class Malformed:
    """What the wrapped deserializer returns for bytes that do not parse."""

    type_name: str
    reason: str


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "")) or "request message"


def _reason(exc: Exception) -> str:
    # protobuf's message repeats the type: "Error parsing message with type 'X': Wire format was corrupt"
    text = str(exc).rsplit(": ", 1)[-1].strip() or type(exc).__name__
    return text[:200]


def safe_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    type_name = _type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - whatever the parser says, the bytes are the caller's fault
            return Malformed(type_name, _reason(exc))

    return deserialize


class _Warnings:
    """One WARNING line per method and LOG_EVERY_S at most; the next line says how many were left out."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.left_out: dict[str, int] = {}

    def warn(self, method: str, peer: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(method, float("-inf")) < LOG_EVERY_S:
            self.left_out[method] = self.left_out.get(method, 0) + 1
            return
        self.last[method] = now
        more = self.left_out.pop(method, 0)
        log.warning("%s from %s: %s%s", method, peer, message,
                    f" ({more} more malformed requests since the last line)" if more else "")


def handler_kind(handler: Any) -> str:
    """'unary_unary', 'unary_stream', 'stream_unary' or 'stream_stream': the handler's attribute holding its
    behavior, and (with '_rpc_method_handler') the grpc function that makes one."""
    return ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")


class WrappedHandlers:
    """An interceptor's wrapped handler per method, made once and made again only if the handler changes."""

    def __init__(self, wrap: Callable[[str, Any], Any]) -> None:
        self.wrap = wrap
        self.cache: dict[str, tuple[Any, Any]] = {}  # method -> (its handler, the wrapped handler)

    def get(self, method: str, handler: Any) -> Any:
        cached = self.cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self.cache[method] = (handler, wrapped)
        return wrapped


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    def __init__(self) -> None:
        self.warnings = _Warnings()
        self._wrapped = WrappedHandlers(self._wrap)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrapped.get(str(details.method), handler)

    async def _refuse(self, method: str, bad: Malformed, context: Any) -> None:
        message = f"request is not a valid {bad.type_name}: {bad.reason}"
        self.warnings.warn(method, str(context.peer()), message)
        await context.abort(InvalidArgument.code, message)  # the error table's code for bad input

    def _wrap(self, method: str, handler: Any) -> Any:
        kind = handler_kind(handler)
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler: left as grpc runs it
        if handler.request_streaming:
            wrapped = self._stream_request(method, behavior)
        else:
            wrapped = self._unary_request(method, behavior)
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(wrapped, request_deserializer=safe_deserializer(handler.request_deserializer),
                    response_serializer=handler.response_serializer)

    def _unary_request(self, method: str, behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):
            async def stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await self._refuse(method, request, context)
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            return stream_out

        async def unary_out(request: Any, context: Any) -> Any:
            if isinstance(request, Malformed):
                await self._refuse(method, request, context)
            return await behavior(request, context)

        return unary_out

    def _stream_request(self, method: str, behavior: Any) -> Any:
        # the status is sent from the handler's own task, never from whichever task reads the requests (a
        # status sent there can race a response the handler is sending, and the call then never ends)
        async def checked(requests: AsyncIterator[Any], seen: list[Malformed]) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    seen.append(request)
                    return  # the servicer sees its requests end, and winds down
                yield request

        if inspect.isasyncgenfunction(behavior):
            async def stream_out(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                seen: list[Malformed] = []
                async with contextlib.aclosing(behavior(checked(requests, seen), context)) as responses:
                    async for response in responses:
                        if seen:
                            break
                        yield response
                if seen:
                    await self._refuse(method, seen[0], context)

            return stream_out

        async def unary_out(requests: AsyncIterator[Any], context: Any) -> Any:
            seen: list[Malformed] = []
            response = await behavior(checked(requests, seen), context)
            if seen:
                await self._refuse(method, seen[0], context)
            return response

        return unary_out
