"""What both SDK clients hold: a channel to the coordinator's public port (plaintext or TLS, blocking or
asyncio), the Coordinator's stub that sends the API key on every call, the health stub and the default
deadline. `shardline.client` says how to use them."""

from __future__ import annotations

import copy
import functools
import re
import threading
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


@dataclass(frozen=True)
class _Hop:
    """The coordinator talked to now: replaced whole (one assignment), never changed in place."""

    channel: Any
    health: Any
    target: str


@dataclass
class _Route:
    """Which coordinator a client (and every view of it, with_api_key) talks to now: shared, so that one
    view's switch to the leader is every view's. One channel per coordinator ever talked to, kept until the
    client closes (a call may still be on one; their number is bounded by the coordinators). Switches are made
    under `lock` (the blocking client is used from several threads)."""

    hop: _Hop
    channels: dict[str, _Hop] = field(default_factory=dict)  # target -> its hop
    dead: DeadLeaders = field(default_factory=DeadLeaders)  # coordinators found unreachable (shardline/leader.py)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def all_channels(self) -> list[Any]:
        return [hop.channel for hop in self.channels.values()]


GRPC_SCHEMES = re.compile(r"^(ipv4|ipv6|dns|unix|unix-abstract|vsock|xds):")


def endpoints_of(target: str) -> list[str]:
    """The coordinators a target names: comma-separated HOST:PORTs (standbys); a gRPC target with a scheme
    (`ipv4:a:1,b:1`, `dns:///...`) is one, as gRPC reads it."""
    if GRPC_SCHEMES.match(target):
        return [target]
    return [t.strip() for t in target.split(",") if t.strip()] or [target]


class Connection:
    """What both clients hold: a channel (blocking or asyncio), the Coordinator's stub with the key, the health
    stub, the default deadline."""

    aio: ClassVar[bool]

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = DEFAULT_TIMEOUT_S, *,
                 api_key: str | None = None, tls: TLSOption = None, client_name: str = "") -> None:
        # several coordinators (comma-separated: standby coordinators, issue 29): the client talks to one at a
        # time, goes to the leader a standby names, and to the next one when its coordinator cannot be reached
        self.endpoints = endpoints_of(target)
        self.timeout = timeout
        self._tls, self._client_name, self._api_key = tls, client_name, api_key
        self._metadata: tuple[tuple[str, str], ...] = ()
        first = self.endpoints[0]
        channel = _open(first, tls, client_name, self.aio)
        hop = _Hop(channel, health_pb2_grpc.HealthStub(channel), first)
        self._route = _Route(hop, {first: hop})
        self._stub_pair: tuple[Any, Any] = (None, None)  # (the channel it was built on, this view's stub)
        _ = self._authorized(stacklevel=4)  # the plaintext-key warning names the caller of Client(...)

    @property
    def channel(self) -> Any:
        return self._route.hop.channel

    @property
    def health(self) -> Any:
        return self._route.hop.health

    @property
    def _target(self) -> str:
        return self._route.hop.target

    @property
    def stub(self) -> Any:
        return self._authorized()[1]

    def _authorized(self, stacklevel: int = 5) -> tuple[Any, Any]:
        """(the channel, this view's stub on it: its key and metadata), for the route's coordinator now; read
        once, so a call and the failure it reports name the same channel."""
        hop = self._route.hop
        built_on, stub = self._stub_pair
        if built_on is not hop.channel:
            stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(hop.channel), self._api_key, hop.target,
                               self._tls, self._metadata, stacklevel=stacklevel)
            self._stub_pair = (hop.channel, stub)
        return hop.channel, stub

    def _connect(self, target: str) -> None:
        """Talk to `target` from now on (under the route's lock)."""
        route = self._route
        hop = route.channels.get(target)
        if hop is None:
            channel = _open(target, self._tls, self._client_name, self.aio)
            hop = route.channels[target] = _Hop(channel, health_pb2_grpc.HealthStub(channel), target)
        route.hop = hop

    def _several(self) -> bool:
        """Whether there is another coordinator to go to (several given, or a standby sent us off the list)."""
        return len(self.endpoints) > 1 or self._route.hop.target not in self.endpoints

    def _switch(self, err: grpc.RpcError | None, used: Any) -> bool:
        """After a call on channel `used` failed with `err` (None: a health probe found no serving coordinator):
        go to the leader a standby named (True: call again at once, the standby did nothing with the call), or,
        with several coordinators and a connection that failed, to the next one (False: the caller's own retry
        rules apply). Only the first failure on a channel switches it."""
        route = self._route
        said = Redirect.of(err) if err is not None else Redirect()
        code = getattr(err, "code", None)
        lost = err is None or (callable(code) and code() == grpc.StatusCode.UNAVAILABLE and not answered(err)
                               and not said.standby)
        with route.lock:
            hop = route.hop
            if said.standby and used is hop.channel:
                route.dead.standing_by(hop.target)
            if lost and used is hop.channel:
                lost = route.dead.lost(hop.target)  # False: a standby a moment ago, taking over: stay
            # a leader just found unreachable, still named (its lease not lapsed yet): stale news, wait here
            leader = said.address if said.address and route.dead.fresh(said.address, said.epoch) else ""
            standby_alone = said.standby and not said.address  # a standby that knows no leader (cut off?)
            if used is not hop.channel:  # another call switched already
                return bool(leader)
            if leader and leader != hop.target:
                self._connect(leader)
                return True
            # the next one given: this one cannot be reached, or is a standby that knows no leader at all (it may
            # be cut off from etcd itself); or, when a standby sent us here, the ones given
            if (lost or standby_alone) and self._several():
                at = self.endpoints.index(hop.target) if hop.target in self.endpoints else -1
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
        view._api_key, view._metadata, view._stub_pair = api_key, metadata, (None, None)
        _ = view._authorized(stacklevel=4)  # ValueError now for a key that is not one word of ASCII
        return view

    def _call(self, step: Unary, stub: Any = None) -> Any:
        """The step's RPC, started (a reply, or an awaitable one on an asyncio channel), on `stub` (this view's
        now if None)."""
        return getattr(stub or self.stub, step.rpc)(step.request, timeout=step.timeout or self.timeout)

    def _generate(self, request: coordinator_pb2.GenerateRequest, timeout: float, stub: Any = None) -> Any:
        """A Generate stream, started: its responses, iterable (blocking) or async-iterable (asyncio)."""
        return (stub or self.stub).Generate(request, timeout=timeout)
