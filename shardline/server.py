"""What every shardline gRPC server shares: message limits, malformed requests answered INVALID_ARGUMENT
(shardline/malformed.py), health checking, reflection, binding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.auth import ClusterIdentity, Guard
from shardline.limits import MAX_MESSAGE_BYTES, is_loopback
from shardline.malformed import MalformedRequests

log = logging.getLogger(__name__)

# Keepalive, in one place for both ends of every channel. Clients ping an idle connection every
# `Keepalive.time_ms` so a dead peer or a stalled link is noticed; every server accepts pings as often as
# PING_FLOOR_MS, with or without calls, so no client interval the config allows can earn a GOAWAY
# "too_many_pings" (gRPC's server default accepts one ping per 5 minutes without data, and closes the
# connection after two strikes: that is what silenced idle clusters).
PING_FLOOR_MS = 1_000


@dataclass(frozen=True)
class Keepalive:
    """How a client keeps its connections alive: ping every `time_ms`, give up after `timeout_ms`."""

    time_ms: int = 20_000
    timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if self.time_ms < PING_FLOOR_MS:
            raise ValueError(f"keepalive time {self.time_ms} ms is below the servers' floor of {PING_FLOOR_MS} ms")
        if self.timeout_ms < 1:
            raise ValueError(f"keepalive timeout must be positive, got {self.timeout_ms} ms")


MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SERVER_PING_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", PING_FLOOR_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", PING_FLOOR_MS),
    ("grpc.http2.max_ping_strikes", 2),
]


def channel_options(keepalive: Keepalive | None = None) -> list[tuple[str, int]]:
    k = keepalive or Keepalive()
    # a local subchannel pool: gRPC otherwise shares one TCP connection among channels to the same target, so
    # a channel opened to replace a stalled link (or to probe its peer) would reuse the stalled connection
    return [*MESSAGE_OPTIONS, ("grpc.keepalive_time_ms", k.time_ms), ("grpc.keepalive_timeout_ms", k.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.use_local_subchannel_pool", 1)]


CHANNEL_OPTIONS = channel_options()
# all of a call's metadata: more is refused by gRPC itself (RESOURCE_EXHAUSTED) before any handler; below
# it, the guard refuses more than shardline.auth.MAX_METADATA_BYTES on a guarded RPC (UNAUTHENTICATED)
MAX_WIRE_METADATA_BYTES = 64 * 1024


def new_server(guard: Guard | None = None, max_receive_bytes: int = MAX_MESSAGE_BYTES,
               max_send_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Server:
    """A server for internal links by default; the coordinator's public port passes its smaller limits.
    `guard` checks every call's credentials first (shardline/auth.py; every role's server has one). A
    larger message than `max_receive_bytes` is answered RESOURCE_EXHAUSTED by gRPC itself, and one whose
    bytes do not parse INVALID_ARGUMENT (MalformedRequests). Metadata beyond MAX_WIRE_METADATA_BYTES is refused
    by gRPC itself."""
    limits = [("grpc.max_send_message_length", max_send_bytes), ("grpc.max_receive_message_length", max_receive_bytes),
              ("grpc.max_metadata_size", MAX_WIRE_METADATA_BYTES),
              ("grpc.absolute_max_metadata_size", MAX_WIRE_METADATA_BYTES)]
    # no SO_REUSEPORT: a port another server holds is an error here, not a silently shared listener
    interceptors = [MalformedRequests()] if guard is None else [guard, MalformedRequests()]
    return grpc.aio.server(interceptors=interceptors,
                           options=[*limits, *SERVER_PING_OPTIONS, ("grpc.so_reuseport", 0)])


def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> Any:
    """gRPC health checking (every service starts NOT_SERVING) and server reflection."""
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=reflection_pool(names))
    return health_servicer


SPEC_NAMES = {"shardline.kserve": "inference"}  # a package of ours -> the one its service is served under


def renamed(message: Any, old: str, new: str) -> None:
    """Every type reference (`.package.Type`) in a descriptor proto, from one package to another, in place."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                renamed(item, old, new)
        elif field.type == field.TYPE_STRING and not field.is_repeated and value.startswith(old):
            setattr(message, field.name, new + value[len(old):])


def reflection_pool(names: list[str]) -> descriptor_pool.DescriptorPool:
    """What reflection describes: the files of the served services (and what they import), with KServe's under
    the specification's package (`inference`), the name its methods are served at; ours is another
    (protos/shardline/kserve/grpc_predict_v2.proto says why). A pool of its own: the default one keeps ours."""
    default, pool = descriptor_pool.Default(), descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        for package, spec in SPEC_NAMES.items():  # in every file: one that imports KServe's refers to it too
            renamed(proto, f".{package}.", f".{spec}.")
            if proto.package == package:
                proto.package = spec
        pool.Add(proto)
        added.add(file.name)

    ours = {spec: package for package, spec in SPEC_NAMES.items()}
    for name in names:
        package, _, service = name.rpartition(".")
        try:
            add(default.FindFileContainingSymbol(f"{ours.get(package, package)}.{service}"))
        except KeyError:  # listed, but reflection cannot describe it: said, not fatal
            log.warning("reflection: no descriptor for %s (its _pb2 module is not imported)", name)
    return pool


async def set_serving(health_servicer: Any, service_names: Iterable[str],
                      serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def check_exposure(host: str, tls: bool, authenticated: bool, insecure: bool, role: str) -> None:
    """Safe defaults: a server on an address other machines can reach needs TLS and authentication, unless
    the operator says --insecure (then it warns once at start)."""
    if is_loopback(host) or (tls and authenticated):
        return
    missing = " and ".join(m for m, ok in (("TLS (--certs-dir)", tls), (AUTH_HINT.get(role, "authentication"),
                                                                          authenticated)) if not ok)
    if not insecure:
        raise ValueError(f"refusing to serve the {role} on {host}, which other machines can reach, without "
                         f"{missing}: create certificates with `coordinator certs create-ca` and `create-node`, "
                         "or pass --insecure to accept the risk")
    log.warning("INSECURE: the %s serves on %s without %s; anyone who can reach it can use it", role, host, missing)


AUTH_HINT = {"coordinator": "API keys (--api-keys) or required client certificates"}


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on exactly host:port (port 0 = a free one), with TLS when `credentials` are given; returns the
    bound port."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials is not None \
            else server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not this machine's")
    return bound


def channel(target: str, keepalive: Keepalive | None = None,
            identity: ClusterIdentity | None = None) -> grpc.aio.Channel:
    """A channel of one of the cluster's processes to another: TLS with the node certificate when the
    cluster has certificates (calls then need no token: pass `identity.metadata` on each call anyway)."""
    credentials = identity.channel_credentials() if identity is not None else None
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=channel_options(keepalive))
    return grpc.aio.insecure_channel(target, options=channel_options(keepalive))


def sync_channel(target: str, identity: ClusterIdentity | None = None) -> grpc.Channel:
    credentials = identity.channel_credentials() if identity is not None else None
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


S = TypeVar("S")


@dataclass
class RunningServer(Generic[S]):
    """A started gRPC server, its servicer and where it listens."""

    server: grpc.aio.Server
    servicer: S
    port: int
    host: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)
        close = getattr(self.servicer, "close", None)
        if close is not None:
            await close()


class Signals:
    """SIGINT/SIGTERM for a server process: the first asks for a graceful stop (`first`), a second for an
    immediate one (`second`)."""

    def __init__(self) -> None:
        self.first, self.second = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.receive)

    def receive(self) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def stop_now(self) -> None:
        self.first.set()
        self.second.set()
