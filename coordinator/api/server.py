"""The coordinator's gRPC server: the client-facing Coordinator service, the KServe v2 inference service
(coordinator/api/kserve.py), the WorkerRegistry, health (SERVING once every shard is loaded and verified) and
reflection; the parameter service in-process unless one is given."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.api import kserve
from coordinator.api.servicer import CoordinatorServicer, RegistryServicer
from coordinator.api.state_metrics import watch
from coordinator.config import CoordinatorConfig
from coordinator.fleet.durable import FleetState
from coordinator.fleet.fleet import Fleet
from coordinator.jobs.runner import JobRunner
from coordinator.serving.result_cache import ResultCache
from coordinator.store.models import ModelStore
from coordinator.store.parameters.server import ParameterServer, start_parameter_server
from shardline import tracing
from shardline.auth import Access, ApiKeys, ClusterIdentity, Guard, Rules, describe
from shardline.limits import MAX_RESPONSE_BYTES
from shardline.metrics import MetricsServer, start_metrics_server
from shardline.server import RunningServer, add_standard_services, bind, check_exposure, new_server, set_serving
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
REGISTRY = coordinator_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name


@dataclass
class Coordinator:
    fleet: Fleet
    server: RunningServer[CoordinatorServicer]
    parameters: ParameterServer | None
    cluster_port: int = 0  # where workers register (the public port, unless the cluster has TLS)
    jobs: JobRunner | None = None
    metrics_server: MetricsServer | None = None  # http://host:port/metrics, with config.metrics_port

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def cluster_address(self) -> str:
        return f"{self.server.host}:{self.cluster_port or self.server.port}"

    async def stop(self) -> None:
        if self.metrics_server is not None:  # first: a scrape never reads a fleet that is stopping
            await self.metrics_server.close()
        if self.jobs is not None:  # first: its items in flight stay pending on disk, not failed
            await self.jobs.stop()
        await self.server.stop(0.5)
        await self.fleet.stop()
        if self.parameters is not None:
            await self.parameters.stop(0)


def identity_of(config: CoordinatorConfig) -> ClusterIdentity:
    """The cluster's identity from the config: its certificates, or else its token (checked as they are read:
    a file that cannot be used stops the start with its name)."""
    return ClusterIdentity.from_files(config.certs_dir, config.cluster_token_file)


ADMIN_METHODS = ("GetClusterStatus", "DrainWorker", "Rebalance", "LoadModel", "UnloadModel", "ScaleModel",
                 "PromoteModel")


def rules() -> Rules:
    """The coordinator's port: the registry for the cluster only; the API for role client, except what
    reads the cluster's state or changes it (role admin)."""
    return Rules({REGISTRY: Access.CLUSTER, SERVICE: Access.CLIENT, kserve.SERVICE: Access.CLIENT},
                 {f"/{SERVICE}/{m}": Access.ADMIN for m in ADMIN_METHODS})


async def start_coordinator(config: CoordinatorConfig, say: Callable[[str], None] = log.info,
                            epoch: str = "", durable: FleetState | None = None) -> Coordinator:
    """The coordinator's servers, fleet and jobs, started; `epoch`: the leadership it serves in, and `durable`
    the fleet state its standbys share (standby coordinators on etcd, coordinator/ha/serve.py); else a new
    epoch, and the fleet state beside its jobs."""
    identity = identity_of(config)
    if tracing.configure(config.otlp_endpoint, "shardline-coordinator"):
        log.info("tracing: one trace per request, exported with OTLP")
    api_keys = ApiKeys(config.api_keys) if config.api_keys is not None else None
    authenticated = api_keys is not None or config.client_certs == "required"
    check_exposure(config.host, identity.tls, authenticated, config.insecure, "coordinator")
    store = ModelStore(config.store)
    parameters = None
    address = config.parameters_address
    if not address:
        parameters = await start_parameter_server(store, config.host, config.parameters_port, identity)
        address = f"{config.advertise or config.host}:{parameters.port}"

    def hint(method: str) -> str:
        if identity.tls and config.client_certs == "optional" and method.startswith(f"/{REGISTRY}/"):
            return f"workers register at the coordinator's cluster port, {config.cluster_port}"
        return ""

    # the public port: small requests (max_request_bytes), responses up to what the SDK accepts; the
    # registry's messages on the same port are small too
    server = new_server(Guard(rules(), identity, api_keys, hint), max_receive_bytes=config.max_request_bytes,
                        max_send_bytes=MAX_RESPONSE_BYTES)
    health = add_standard_services(server, [SERVICE, REGISTRY, kserve.SERVICE])  # reflection: grpcurl sees all

    async def serving(on: bool) -> None:
        await set_serving(health, [SERVICE, kserve.SERVICE], on)

    fleet: Fleet | None = None
    try:  # a fleet state that cannot be read (FleetStateError) stops the start here, holding nothing
        fleet = Fleet(config, store, address, serving, say, identity, epoch=epoch, durable=durable)
        await fleet.start()
    except BaseException:
        if fleet is not None:
            await fleet.stop()
        if parameters is not None:
            await parameters.stop(0)
        raise
    cache = ResultCache(int(config.result_cache_mb * 2**20))
    jobs = JobRunner(fleet, cache, config.jobs_dir or config.store)
    await jobs.start()
    watch(fleet.metrics, fleet, cache, jobs)
    servicer = CoordinatorServicer(fleet, cache, jobs, api_keys)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    kserve.add_to_server(kserve.KServeServicer(servicer), server)  # KServe v2 clients (tritonclient)
    coordinator_pb2_grpc.add_WorkerRegistryServicer_to_server(RegistryServicer(fleet), server)
    try:
        port = bind(server, config.host, config.port,
                    identity.server_credentials(require_client_cert=config.client_certs == "required"))
        # with TLS, workers register on a port of their own that asks every caller for its certificate (the
        # public port cannot: it takes clients without one)
        cluster_port = bind(server, config.host, config.cluster_port, identity.server_credentials()) \
            if identity.tls else port
        metrics_server = start_metrics_server(config.host, config.metrics_port, fleet.metrics.registry) \
            if config.metrics_port is not None else None
    except OSError:
        await jobs.stop()
        await fleet.stop()
        if parameters is not None:
            await parameters.stop(0)
        raise
    await server.start()
    await serving(False)
    await set_serving(health, [REGISTRY], True)
    log.info("coordinator listening on %s:%d (%s%s; public API: %s)", config.host, port, describe(identity),
             f", workers register on port {cluster_port}" if cluster_port != port else "",
             "API keys" if api_keys else "client certificates" if authenticated else "open to any caller")
    return Coordinator(fleet, RunningServer(server, servicer, port, config.host), parameters, cluster_port, jobs,
                       metrics_server=metrics_server)
