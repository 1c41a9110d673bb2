"""The parameter service's gRPC server (standalone via `coordinator parameters`, or in-process)."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from coordinator.store.models import ModelStore
from coordinator.store.parameters.service import ParametersServicer
from shardline.auth import Access, ClusterIdentity, Guard, Rules, describe
from shardline.chunks import serialize_response
from shardline.server import RunningServer, add_standard_services, bind, new_server, set_serving
from shardline.v1 import parameters_pb2

log = logging.getLogger(__name__)

SERVICE = parameters_pb2.DESCRIPTOR.services_by_name["Parameters"].full_name


ParameterServer = RunningServer[ParametersServicer]


def _handlers(servicer: ParametersServicer) -> Any:
    """The Parameters service as the generated code registers it, except that FetchTensors' chunks are
    serialized by shardline.chunks (they arrive pre-encoded)."""
    p = parameters_pb2

    def unary(method: Any, request: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ListStoredModels": unary(servicer.ListStoredModels, p.ListStoredModelsRequest),
        "GetManifest": unary(servicer.GetManifest, p.GetManifestRequest),
        "GetStats": unary(servicer.GetStats, p.GetStatsRequest),
        "FetchTensors": grpc.unary_stream_rpc_method_handler(
            servicer.FetchTensors, request_deserializer=p.FetchTensorsRequest.FromString,
            response_serializer=serialize_response),
    })


async def start_parameter_server(store: ModelStore, host: str = "127.0.0.1", port: int = 0,
                                 identity: ClusterIdentity | None = None) -> ParameterServer:
    """The parameter service on exactly host:port; every RPC only for the cluster's processes (`identity`)."""
    identity = identity or ClusterIdentity()
    server = new_server(Guard(Rules({SERVICE: Access.CLUSTER}), identity))
    health = add_standard_services(server, [SERVICE])
    servicer = ParametersServicer(store)
    server.add_generic_rpc_handlers([_handlers(servicer)])
    bound = bind(server, host, port, identity.server_credentials())
    await server.start()
    await set_serving(health, [SERVICE], True)
    log.info("parameter service for %s listening on %s:%d (%s)", store.root, host, bound, describe(identity))
    return ParameterServer(server, servicer, bound, host)
