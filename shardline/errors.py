"""The one error table: domain exceptions <-> gRPC status codes.

Servers raise these and `grpc_errors` turns them into statuses; clients turn statuses back into them with
`from_rpc_error`. Anything that is not a ShardlineError becomes INTERNAL with a generic message, and its
traceback goes to the log, never to the caller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class ShardlineError(Exception):
    """Base of every error shardline reports; `.code` is the grpc.StatusCode it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShardlineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ShardlineError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ShardlineError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ShardlineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ShardlineError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ShardlineError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ShardlineError):
    code = grpc.StatusCode.CANCELLED


class DataLoss(ShardlineError):
    """Bytes that fail their checksum: never used, always reported."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ShardlineError):
    """No credentials, or wrong ones: a missing or unknown API key, no cluster certificate or token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ShardlineError):
    """A known caller without the right: a client key on an admin RPC, a client certificate on an internal
    RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(ShardlineError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ShardlineError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
                DeadlineExceeded, Cancelled, DataLoss, Unauthenticated, PermissionDenied, Internal)
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

TLS_FAILURES = ("Ssl handshake failed", "Tls handshake failed", "CERTIFICATE_VERIFY_FAILED",
                "Verification Check failed", "certificate verify failed")
UNTRUSTED_SERVER = ("CERTIFICATE_VERIFY_FAILED", "Verification Check failed", "certificate verify failed")
GENERIC_INTERNAL = "internal error; the server log has the details"


def error_for_code(code: grpc.StatusCode, message: str) -> ShardlineError:
    """The exception for a status code (INTERNAL for codes without their own class)."""
    return _BY_CODE.get(code, Internal)(message)


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def from_rpc_error(err: grpc.RpcError) -> ShardlineError:
    """A client-side grpc error as the matching shardline exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE and details and any(s in details for s in TLS_FAILURES):
        code = grpc.StatusCode.UNAUTHENTICATED
        if any(s in details for s in UNTRUSTED_SERVER):  # this side refused the server's certificate
            details = ("TLS handshake failed: the server's certificate is not signed by the CA given, or not for "
                       f"the host name dialed ({details})")
        else:
            details = ("TLS handshake failed: the server refused this client (does it require a client "
                       f"certificate from its CA?) ({details})")
    exc = error_for_code(code, details or str(code))
    exc.code = code
    return exc


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status an exception is reported as; unexpected ones are logged with their traceback."""
    if isinstance(exc, ShardlineError):
        return exc.code, exc.message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


F = TypeVar("F", bound=Callable[..., Any])

# every status a shardline server sends itself carries this trailing metadata: a client tells the server's
# answers (a model loading, a cluster draining) from a connection that broke (shardline.client_calls.Resuming)
ANSWERED = ("shardline-answered", "1")


def answered(err: grpc.RpcError) -> bool:
    """Whether a shardline server sent this status (else the transport made it: a connection lost or refused)."""
    try:
        metadata: Any = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an error object without a call behind it
        return False
    return any(tuple(item) == ANSWERED for item in metadata)


def grpc_errors(handler: F) -> F:
    """Wrap an async unary or server-streaming grpc.aio handler: errors become statuses via the table."""
    import inspect

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - the table decides what the caller sees
                code, message = status_of(exc)
                await context.abort(code, message, trailing_metadata=(ANSWERED,))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc)
            await context.abort(code, message, trailing_metadata=(ANSWERED,))

    return unary_wrapper  # type: ignore[return-value]


__all__ = [
    "Cancelled", "DataLoss", "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument",
    "ANSWERED", "NotFound", "ResourceExhausted", "ShardlineError", "Unavailable", "answered", "code_from_number",
    "error_for_code",
    "from_rpc_error", "grpc_errors", "status_of",
]
