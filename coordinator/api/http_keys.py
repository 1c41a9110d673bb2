"""Who may send the HTTP gateway a body, judged from the request's headers alone: a caller without a key the
coordinator takes is answered 401 before a byte of its body is read (and the connection is closed, so the rest
of the body is never read either). A refused request costs a header parse: it cannot stall the gateway with
large bodies, let alone the coordinator behind it.

The judge is the API keys file itself where the gateway can read it (beside the coordinator, or
`coordinator http --api-keys FILE`), re-read when it changes as the coordinator's guard does. A gateway in front
of a remote coordinator without the file asks the coordinator (a ListModels with the key, or with none) and
remembers each answer for a second: a flood of one key, or of none, costs the coordinator one call a second, a
revoked key is refused within a second, and a coordinator that takes any caller lets keyless callers through.
The coordinator still authorizes every call; this is only the door. Refusals are logged, at most once every
LOG_EVERY_S seconds with how many there were.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.api.openai_errors import ApiError
from shardline.auth import MAX_CREDENTIAL_BYTES, ApiKeys
from shardline.errors import ShardlineError, Unauthenticated

log = logging.getLogger(__name__)

REMEMBER_S = 1.0           # a remote judgement holds this long (revocation reaches the gateway within it)
REMEMBERED_KEYS = 4096     # judgements kept at most (the oldest go first)
LOG_EVERY_S = 10.0
NO_KEY = "this server requires an API key: send the header 'Authorization: Bearer <key>'"
UNKNOWN_KEY = "the API key is not valid here (ask the cluster's operator for one)"
MALFORMED = "the Authorization header must be 'Bearer <key>', the key one word of ASCII characters"


class Judge(Protocol):
    async def admits(self, key: str | None) -> bool:
        """Whether a caller with this key (None: without one) may send its request."""


@dataclass
class FileJudge:
    """The keys file, as the coordinator's guard reads it (a caller without a key needs the file's "keyless"
    role)."""

    keys: ApiKeys

    async def admits(self, key: str | None) -> bool:
        return (self.keys.role_of(key) if key is not None else self.keys.keyless()) is not None


class CoordinatorJudge:
    """The coordinator asked (a ListModels with the key, or with none), each answer remembered for REMEMBER_S."""

    def __init__(self, ask: Callable[[str | None], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ask, self.clock = ask, clock
        self.known: collections.OrderedDict[str | None, tuple[float, bool]] = collections.OrderedDict()

    async def admits(self, key: str | None) -> bool:
        now = self.clock()
        held = self.known.get(key)
        if held is not None and now - held[0] < REMEMBER_S:
            return held[1]
        try:
            await self.ask(key)
            admitted = True
        except Unauthenticated as exc:
            if "TLS handshake failed" in exc.message:  # the gateway's own link, not the key: the call will say
                return True
            admitted = False
        except (ShardlineError, TimeoutError):  # the coordinator is down or slow: the call itself will say so
            return True
        self.known[key] = (now, admitted)
        self.known.move_to_end(key)
        while len(self.known) > REMEMBERED_KEYS:
            self.known.popitem(last=False)
        return admitted


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None without the header; ApiError 401 if malformed."""
    values = [v for k, v in headers if k == b"authorization"]
    if not values:
        return None
    scheme, _, key = values[0].decode("latin-1").strip().partition(" ")
    key = key.strip()
    if scheme.lower() == "bearer" and not key:  # `Bearer $KEY` with KEY unset: no key (fine where none is needed)
        return None
    if scheme.lower() != "bearer" or len(key) > MAX_CREDENTIAL_BYTES or not key.isascii() \
            or any(c.isspace() for c in key):
        raise ApiError(401, MALFORMED, "authentication_error", code="invalid_api_key")
    return key


class Refusals:
    """How many callers were refused, logged at most once every LOG_EVERY_S (a flood is one line, not a
    line a request); never the key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.count, self.logged = clock, 0, -LOG_EVERY_S

    def refused(self, error: ApiError, client: Any) -> None:
        self.count += 1
        now = self.clock()
        if now - self.logged >= LOG_EVERY_S:
            log.warning("HTTP gateway: refused %d caller(s) without a valid API key in the last %.0f s (latest "
                        "from %s: %s)", self.count, min(now - self.logged, LOG_EVERY_S * 99), client, error.code)
            self.count, self.logged = 0, now


# probes answer without a key (an orchestrator's liveness check carries none): readiness and the release only
OPEN_PATHS = frozenset({"/health", "/ping", "/version"})


def keys_first(app: Any, judge: Judge) -> Any:
    """ASGI middleware: every HTTP request's key judged before the app (and its body) is touched."""
    refusals = Refusals()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await app(scope, receive, send)
            return
        try:
            key = bearer_key(scope["headers"])
            if not await judge.admits(key):
                raise ApiError(401, NO_KEY if key is None else UNKNOWN_KEY, "authentication_error",
                               code="missing_api_key" if key is None else "invalid_api_key")
        except ApiError as refused:
            refusals.refused(refused, (scope.get("client") or ("?",))[0])
            await _refuse(send, refused)
            return
        await app(scope, receive, send)

    return guarded


async def _refuse(send: Any, error: ApiError) -> None:
    """The answer, and the connection closed after it: the body the caller may still be sending is never read."""
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
    await asyncio.sleep(0)
