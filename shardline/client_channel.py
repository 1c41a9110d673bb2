"""What both SDK clients hold: a channel to the coordinator's public port (plaintext or TLS, blocking or
asyncio), the Coordinator's stub that sends the API key on every call, the health stub and the default
deadline. `shardline.client` says how to use them."""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import grpc
from grpc_health.v1 import health_pb2_grpc

from shardline.client_calls import Unary
from shardline.errors import answered
from shardline.leader import DeadLeaders, Redirect
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
                 metadata: tuple[tuple[str, str], ...] = (), stacklevel: int = 3) -> None:
        if api_key and not tls and not is_loopback(target.rpartition(":")[0]):
            warnings.warn(f"the API key goes to {target} in plaintext: anyone on the network can read it "
                          "(give tls=)", stacklevel=stacklevel)
        if api_key is not None and (not api_key or any(c.isspace() for c in api_key) or not api_key.isascii()):
            raise ValueError("api_key must be one word of ASCII characters")
        self._stub = stub
        self._metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + metadata or None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return method if self._metadata is None else functools.partial(method, metadata=self._metadata)


@dataclass
class _Route:
    """Which coordinator a client (and every view of it, with_api_key) talks to now: shared, so that one
    view's switch to the leader is every view's. One channel per coordinator ever talked to, kept until the
    client closes (a call may still be on one; their number is bounded by the coordinators)."""

    channel: Any
    health: Any
    target: str
    channels: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # target -> (channel, health stub)
    dead: DeadLeaders = field(default_factory=DeadLeaders)  # coordinators found unreachable (shardline/leader.py)

    def all_channels(self) -> list[Any]:
        return [channel for channel, _ in self.channels.values()]


class Connection:
    """What both clients hold: a channel (blocking or asyncio), the Coordinator's stub with the key, the health
    stub, the default deadline."""

    aio: ClassVar[bool]

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = DEFAULT_TIMEOUT_S, *,
                 api_key: str | None = None, tls: TLSOption = None, client_name: str = "") -> None:
        # several coordinators (comma-separated: standby coordinators, issue 29): the client talks to one at a
        # time, goes to the leader a standby names, and to the next one when its coordinator cannot be reached
        self.endpoints = [t.strip() for t in target.split(",") if t.strip()] or [target]
        self.timeout = timeout
        self._tls, self._client_name, self._api_key = tls, client_name, api_key
        self._metadata: tuple[tuple[str, str], ...] = ()
        first = self.endpoints[0]
        channel = _open(first, tls, client_name, self.aio)
        self._route = _Route(channel, health_pb2_grpc.HealthStub(channel), first)
        self._route.channels[first] = (channel, self._route.health)
        self._stub_on: Any = None
        self._stub: Any = None
        _ = self._authorized(stacklevel=4)  # the plaintext-key warning names the caller of Client(...)

    @property
    def channel(self) -> Any:
        return self._route.channel

    @property
    def health(self) -> Any:
        return self._route.health

    @property
    def _target(self) -> str:
        return self._route.target

    @property
    def stub(self) -> Any:
        return self._authorized()

    def _authorized(self, stacklevel: int = 5) -> Any:
        """This view's stub (its key and metadata) on the route's channel now."""
        if self._stub_on is not self._route.channel:
            self._stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self._route.channel), self._api_key,
                                     self._route.target, self._tls, self._metadata, stacklevel=stacklevel)
            self._stub_on = self._route.channel
        return self._stub

    def _connect(self, target: str) -> None:
        route = self._route
        if target not in route.channels:
            channel = _open(target, self._tls, self._client_name, self.aio)
            route.channels[target] = (channel, health_pb2_grpc.HealthStub(channel))
        route.channel, route.health = route.channels[target]
        route.target = target

    def _several(self) -> bool:
        """Whether there is another coordinator to go to (several given, or a standby sent us off the list)."""
        return len(self.endpoints) > 1 or self._route.target not in self.endpoints

    def _switch(self, err: grpc.RpcError | None, used: Any) -> bool:
        """After a call on channel `used` failed with `err` (None: a health probe found no serving coordinator):
        go to the leader a standby named (True: call again at once, the standby did nothing with the call), or,
        with several coordinators and a connection that failed, to the next one (False: the caller's own retry
        rules apply). Only the first failure on a channel switches it."""
        route = self._route
        said = Redirect.of(err) if err is not None else Redirect()
        lost = err is None or (err.code() == grpc.StatusCode.UNAVAILABLE and not answered(err) and not said.standby)
        if said.standby and used is route.channel:
            route.dead.standing_by(route.target)
        if lost and used is route.channel:
            lost = route.dead.lost(route.target)  # False: a standby a moment ago, taking over: stay
        # a leader just found unreachable, still named (its lease not lapsed yet): stale news, wait here
        leader = said.address if said.address and route.dead.fresh(said.address, said.epoch) else ""
        standby_alone = said.standby and not said.address  # a standby that knows no leader (cut off from etcd?)
        if used is not route.channel:  # another call switched already
            return bool(leader)
        if leader and leader != route.target:
            self._connect(leader)
            return True
        # the next one given: this one cannot be reached, or is a standby that knows no leader at all (it may be
        # cut off from etcd itself); or, when a standby sent us here, the ones given
        if (lost or standby_alone) and self._several():
            at = self.endpoints.index(route.target) if route.target in self.endpoints else -1
            self._connect(self.endpoints[(at + 1) % len(self.endpoints)])
        return False

    def _unreachable(self) -> str:
        """Why the cluster does not answer, when it is one of the usual reasons (shardline/diagnose.py)."""
        from shardline.diagnose import unreachable

        settings = _tls(self._tls, "")
        return unreachable(self._target, settings.ca_file if settings else None, settings is not None)

    def with_api_key(self, api_key: str | None, metadata: tuple[tuple[str, str], ...] = ()) -> Self:
        """This client with another key (and `metadata`) on every call, over the same channel (no new
        connection): how a gateway passes each caller's key, request id and trace context on. Closing it closes
        the shared channel: close the original only. ValueError if the key is not one word of ASCII characters."""
        view = copy.copy(self)  # shares the route: a switch to the leader is every view's
        view._api_key, view._metadata, view._stub_on = api_key, metadata, None
        _ = view._authorized(stacklevel=4)  # ValueError now for a key that is not one word of ASCII
        return view

    def _call(self, step: Unary) -> Any:
        """The step's RPC, started (a reply, or an awaitable one on an asyncio channel)."""
        return getattr(self.stub, step.rpc)(step.request, timeout=step.timeout or self.timeout)

    def _generate(self, request: coordinator_pb2.GenerateRequest, timeout: float) -> Any:
        """A Generate stream, started: its responses, iterable (blocking) or async-iterable (asyncio)."""
        return self.stub.Generate(request, timeout=timeout)
