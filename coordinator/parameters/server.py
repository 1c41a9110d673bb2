"""The parameter service's gRPC server (standalone via `coordinator parameters`, or in-process)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from coordinator.parameters.service import ParametersServicer
from coordinator.store import ModelStore
from shardline.server import add_standard_services, bind, new_server, set_serving
from shardline.v1 import parameters_pb2, parameters_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = parameters_pb2.DESCRIPTOR.services_by_name["Parameters"].full_name


@dataclass
class ParameterServer:
    server: grpc.aio.Server
    servicer: ParametersServicer
    port: int
    host: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)


async def start_parameter_server(store: ModelStore, host: str = "127.0.0.1", port: int = 0) -> ParameterServer:
    server = new_server()
    health = add_standard_services(server, [SERVICE])
    servicer = ParametersServicer(store)
    parameters_pb2_grpc.add_ParametersServicer_to_server(servicer, server)
    bound = bind(server, host, port)
    await server.start()
    await set_serving(health, [SERVICE], True)
    log.info("parameter service for %s listening on %s:%d", store.root, host, bound)
    return ParameterServer(server, servicer, bound, host)
