"""What both SDK clients hold: a channel to the coordinator's public port (plaintext or TLS, blocking or
asyncio), the Coordinator's stub that sends the API key on every call, the health stub and the default
deadline. `shardline.client` says how to use them."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any, ClassVar, Self

import grpc
from grpc_health.v1 import health_pb2_grpc

from shardline.client_calls import Unary
from shardline.limits import MAX_RESPONSE_BYTES, is_loopback
from shardline.tls import ClientTLS
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

DEFAULT_TIMEOUT_S = 300.0
# a coordinator that restarts is reached again within a second of its return (gRPC's default reconnect
# backoff starts at 1 s and grows to 120 s): a stream resumes as soon as it can
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
TLSOption = bool | str | Path | ClientTLS | None


def _tls(tls: TLSOption, client_name: str) -> ClientTLS | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return ClientTLS()
    if isinstance(tls, ClientTLS):
        return tls
    return ClientTLS.from_certs_dir(tls, client_name)


def _open(target: str, tls: TLSOption, client_name: str, aio: bool) -> Any:
    """A channel to the coordinator's public port, plaintext or TLS."""
    settings = _tls(tls, client_name)
    if settings is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(target, options=CHANNEL_OPTIONS)
    options = [*CHANNEL_OPTIONS, *settings.options()]
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(target, settings.credentials(), options=options)


class _Authorized:
    """A stub whose every call carries `authorization: Bearer <key>` (when there is a key), and `metadata`."""

    def __init__(self, stub: Any, api_key: str | None, target: str = "", tls: TLSOption = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        if api_key and not tls and not is_loopback(target.rpartition(":")[0]):
            warnings.warn(f"the API key goes to {target} in plaintext: anyone on the network can read it "
                          "(give tls=)", stacklevel=3)
        if api_key is not None and (not api_key or any(c.isspace() for c in api_key) or not api_key.isascii()):
            raise ValueError("api_key must be one word of ASCII characters")
        self._stub = stub
        self._metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + metadata or None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return method if self._metadata is None else functools.partial(method, metadata=self._metadata)


class Connection:
    """What both clients hold: a channel (blocking or asyncio), the Coordinator's stub with the key, the health
    stub, the default deadline."""

    aio: ClassVar[bool]

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = DEFAULT_TIMEOUT_S, *,
                 api_key: str | None = None, tls: TLSOption = None, client_name: str = "") -> None:
        self.channel = _open(target, tls, client_name, self.aio)
        self.stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self.channel), api_key, target, tls)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._target, self._tls = target, tls

    def _unreachable(self) -> str:
        """Why the cluster does not answer, when it is one of the usual reasons (shardline/diagnose.py)."""
        from shardline.diagnose import unreachable

        settings = _tls(self._tls, "")
        return unreachable(self._target, settings.ca_file if settings else None, settings is not None)

    def with_api_key(self, api_key: str | None, metadata: tuple[tuple[str, str], ...] = ()) -> Self:
        """This client with another key (and `metadata`) on every call, over the same channel (no new
        connection): how a gateway passes each caller's key, request id and trace context on. Closing it closes
        the shared channel: close the original only. ValueError if the key is not one word of ASCII characters."""
        view = copy.copy(self)
        view.stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self.channel), api_key, self._target, self._tls,
                                metadata)
        return view

    def _call(self, step: Unary) -> Any:
        """The step's RPC, started (a reply, or an awaitable one on an asyncio channel)."""
        return getattr(self.stub, step.rpc)(step.request, timeout=step.timeout or self.timeout)

    def _generate(self, request: coordinator_pb2.GenerateRequest, timeout: float) -> Any:
        """A Generate stream, started: its responses, iterable (blocking) or async-iterable (asyncio)."""
        return self.stub.Generate(request, timeout=timeout)
