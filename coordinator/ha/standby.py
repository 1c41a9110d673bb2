"""A standby coordinator's ports: while another coordinator leads, every call to the public API (Coordinator,
KServe) and to the worker registry is answered UNAVAILABLE, saying where the leader is, in the message and in
trailing metadata (`shardline-leader`: its public address; `shardline-leader-cluster`: where workers
register), so that the SDK and workers go there. Health says NOT_SERVING, so that a load balancer's probe
sends nobody here. Nothing else is served: a standby holds no worker and no stream."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.api import kserve
from coordinator.config import CoordinatorConfig
from coordinator.ha.election import Leader
from shardline.auth import ClusterIdentity
from shardline.leader import LEADER_CLUSTER_HEADER, LEADER_EPOCH_HEADER, LEADER_HEADER, STANDBY_HEADER
from shardline.server import add_standard_services, bind, new_server, set_serving
from shardline.v1 import coordinator_pb2

log = logging.getLogger(__name__)
COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
REGISTRY = coordinator_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name
REFUSED = (COORDINATOR, REGISTRY, kserve.SERVICE)


def redirect(leader: Leader | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The message and trailing metadata of a standby's answer."""
    if leader is None or not leader.address:
        return ("this coordinator is a standby and no leader is elected yet (etcd elects one within its lease): "
                "try again in a second", ((STANDBY_HEADER, "1"),))
    return (f"this coordinator is a standby; the leader is {leader.address} (epoch {leader.epoch}): call it",
            ((STANDBY_HEADER, "1"), (LEADER_HEADER, leader.address), (LEADER_CLUSTER_HEADER, leader.cluster_address),
             (LEADER_EPOCH_HEADER, str(leader.epoch))))


class _Refuse(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, leader: Callable[[], Leader | None]) -> None:
        self.leader = leader

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = str(details.method)
        if method.split("/")[1:2] not in ([s] for s in REFUSED):
            return None

        async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            message, trailers = redirect(self.leader())
            context.set_trailing_metadata(trailers)
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        # raw bytes in and out: nothing of the request is parsed
        return grpc.stream_stream_rpc_method_handler(refuse)  # type: ignore[arg-type]


@dataclass
class Standby:
    server: grpc.aio.Server

    async def stop(self) -> None:
        await self.server.stop(0)


async def start_standby(config: CoordinatorConfig, identity: ClusterIdentity,
                        leader: Callable[[], Leader | None]) -> Standby:
    """Bind the coordinator's ports (public, and with TLS the cluster port) and refuse every call there."""
    server = new_server()
    server.add_generic_rpc_handlers((_Refuse(leader),))
    health = add_standard_services(server, [COORDINATOR, REGISTRY, kserve.SERVICE])
    bind(server, config.host, config.port,
         identity.server_credentials(require_client_cert=config.client_certs == "required"))
    if identity.tls:
        bind(server, config.host, config.cluster_port, identity.server_credentials())
    await server.start()
    await set_serving(health, [COORDINATOR, kserve.SERVICE, REGISTRY], False)
    return Standby(server)


__all__ = ["Standby", "redirect", "start_standby"]
