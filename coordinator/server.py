"""The coordinator's gRPC server: the client-facing Coordinator service, the WorkerRegistry, health
(SERVING once every shard is loaded and verified) and reflection; the parameter service in-process unless
one is given."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.cluster import Cluster
from coordinator.config import CoordinatorConfig
from coordinator.parameters.server import ParameterServer, start_parameter_server
from coordinator.servicer import CoordinatorServicer, RegistryServicer
from coordinator.store import ModelStore
from shardline.limits import MAX_RESPONSE_BYTES
from shardline.server import RunningServer, add_standard_services, bind, new_server, set_serving
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
REGISTRY = coordinator_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name


@dataclass
class Coordinator:
    cluster: Cluster
    server: RunningServer[CoordinatorServicer]
    parameters: ParameterServer | None

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        await self.server.stop(0.5)
        await self.cluster.stop()
        if self.parameters is not None:
            await self.parameters.stop(0)


async def start_coordinator(config: CoordinatorConfig, say: Callable[[str], None] = log.info) -> Coordinator:
    store = ModelStore(config.store)
    parameters = None
    address = config.parameters_address
    if not address:
        parameters = await start_parameter_server(store, config.host, config.parameters_port)
        address = f"{config.advertise or config.host}:{parameters.port}"
    # the public port: small requests (max_request_bytes), responses up to what the SDK accepts; the
    # registry's messages on the same port are small too
    server = new_server(max_receive_bytes=config.max_request_bytes, max_send_bytes=MAX_RESPONSE_BYTES)
    health = add_standard_services(server, [SERVICE, REGISTRY])

    async def serving(on: bool) -> None:
        await set_serving(health, [SERVICE], on)

    cluster = Cluster(config, store, address, serving, say)
    await cluster.start()
    servicer = CoordinatorServicer(cluster)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    coordinator_pb2_grpc.add_WorkerRegistryServicer_to_server(RegistryServicer(cluster), server)
    port = bind(server, config.host, config.port)
    await server.start()
    await serving(False)
    await set_serving(health, [REGISTRY], True)
    return Coordinator(cluster, RunningServer(server, servicer, port, config.host), parameters)
