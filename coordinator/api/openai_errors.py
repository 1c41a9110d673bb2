"""The HTTP gateway's errors: OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with the
matching HTTP status, and the one mapping from shardline's error table (gRPC status codes) onto it, so that a
request refused over gRPC is refused the same way over HTTP."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import grpc

from shardline.errors import GENERIC_INTERNAL, ShardlineError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer in OpenAI's error shape. `param` names the request field at fault (as the caller spelled it)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after  # seconds (a 429 over a key's quota): the Retry-After header

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    """400: a request this server will not run as sent."""
    return ApiError(400, message, param=param)


# gRPC status -> (HTTP status, OpenAI error type, error code); INTERNAL and anything unlisted is a 500 with a
# generic message (the coordinator already logged the details)
STATUS: Mapping[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),  # e.g. an encoder asked to generate
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "insufficient_permissions"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "capacity_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "unavailable"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable", "cancelled"),  # the coordinator stopped mid-call
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
}
# gRPC's own refusal of a message above the coordinator's max_request_bytes (a gateway in front of a
# coordinator with a smaller limit than its own body limit): the request is too large, not the cluster busy
TOO_LARGE = "larger than max"
# the gateway's own link to the coordinator failing: the caller learns the cluster is unreachable, not the
# internal address or TLS setup behind it (those go to the gateway's log)
TRANSPORT = ("failed to connect", "Connection refused", "Connection reset", "Socket closed", "DNS resolution",
             "GOAWAY", "Broken pipe", "Cancelling all calls", "TLS handshake failed")
UNREACHABLE = "the gateway cannot reach the cluster's coordinator at the moment: retry later"
_last_logged = [float("-inf")]


def _log_unreachable(message: str) -> None:
    """One line a second while the coordinator is out of reach (every request would say the same)."""
    now = time.monotonic()
    if now - _last_logged[0] >= 1.0:
        _last_logged[0] = now
        log.warning("the coordinator is unreachable: %s", message)
_LEADING_FIELD = re.compile(r"[a-z_]+")


def param_of(message: str, names: Mapping[str, str]) -> str | None:
    """The request field a coordinator message is about: its messages start with the field's name
    ("max_tokens must be ...", "stop[0] is empty"), in the gRPC API's spelling, which `names` turns into the
    caller's ("prompt_token_ids" -> "prompt")."""
    found = _LEADING_FIELD.match(message)
    return names.get(found.group()) if found else None


def from_shardline(exc: ShardlineError, names: Mapping[str, str]) -> ApiError:
    """The HTTP answer to an error the coordinator (or the SDK's channel to it) reported."""
    code = exc.code
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED) and any(
            t in exc.message for t in TRANSPORT):
        _log_unreachable(exc.message)
        return ApiError(503, UNREACHABLE, "service_unavailable", code="unavailable")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE in exc.message:
        return ApiError(413, f"the request is too large for the coordinator: {exc.message}", code="request_too_large")
    found = STATUS.get(code)
    if found is None:
        log.warning("the coordinator answered %s: %s", code.name, exc.message)
        return ApiError(500, GENERIC_INTERNAL, "server_error")
    status, kind, error_code = found
    param = "model" if code == grpc.StatusCode.NOT_FOUND else param_of(exc.message, names) if status == 400 else None
    retry = RETRY_IN.search(exc.message) if status == 429 else None
    return ApiError(status, redacted(exc.message), kind, param, error_code if status != 400 else None,
                    (math.ceil(float(retry.group(1))) if retry else 1) if status == 429 else None)


# an IPv6 literal holds a colon: "[3]" in "prompt[3] is ..." names an index, not an address
RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) s")  # a quota's refusal says when (coordinator/api/quotas.py)
ADDRESS = re.compile(r"\b(?:ipv4|ipv6|unix|dns):\S+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"
                     r"|\[[0-9a-fA-F]*:[0-9a-fA-F:]+\](?::\d+)?")


def redacted(message: str) -> str:
    """`message` without network addresses: a transport error of the gateway's own channel can name the
    coordinator's address, which an HTTP caller has no business seeing."""
    return ADDRESS.sub("<address>", message)


def internal() -> ApiError:
    """500 for a failure of the gateway itself (its traceback is logged where it is caught)."""
    return ApiError(500, GENERIC_INTERNAL, "server_error")
