"""What every shardline gRPC server shares: message limits, health checking, reflection, binding."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


def new_server() -> grpc.aio.Server:
    # no SO_REUSEPORT: a port another server holds is an error here, not a silently shared listener
    return grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])


def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str]) -> Any:
    """gRPC health checking (every service starts NOT_SERVING) and server reflection."""
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: Any, service_names: Iterable[str],
                      serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on exactly host:port (port 0 = a free one); returns the bound port."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not this machine's")
    return bound


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


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
