"""Starting the HTTP gateway (coordinator/api/http_gateway.py): beside a coordinator on a thread and event loop
of its own (`serve`, `launch`), or alone in front of a remote one (`coordinator http`), under the exposure
rule."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from coordinator.api.http_gateway import GatewaySettings, build_app
from coordinator.api.http_keys import CoordinatorJudge, FileJudge, Judge
from coordinator.api.http_server import Https, LoopThread, ServedApp, serve_app
from shardline.auth import ApiKeys
from shardline.client import AsyncClient
from shardline.errors import ShardlineError, Unauthenticated
from shardline.limits import is_loopback
from shardline.server import check_exposure
from shardline.tls import CA_CERT, NODE_CERT, NODE_KEY, SERVER_CERT, SERVER_KEY, ClientTLS

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 10.0  # a key's judgement by the coordinator waits at most this


class Gateway:
    """A running gateway: the app served (ServedApp: uvicorn, supervised) and its SDK client."""

    def __init__(self, settings: GatewaySettings, client: AsyncClient, served: ServedApp) -> None:
        self.settings, self.client, self.served = settings, client, served

    @property
    def host(self) -> str:
        return self.served.host

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def url(self) -> str:
        return f"{self.served.scheme}://{self.served.address}/v1"

    async def stop(self) -> None:
        """Stop taking requests, give those in flight `grace_s`, free the port, close the channel."""
        try:
            await self.served.stop()
        finally:
            await self.client.close()


async def start_gateway(settings: GatewaySettings, on_first: Callable[[str], None] | None = None) -> Gateway:
    """Listen on settings.host:port and serve, in this event loop; the coordinator need not answer yet (calls
    until it does get 503)."""
    if (settings.https_cert is None) != (settings.https_key is None):
        raise ValueError("HTTPS needs a certificate and its key, or neither")
    judge: Judge | None = FileJudge(ApiKeys(settings.api_keys)) if settings.api_keys is not None else None
    client = AsyncClient(settings.target, timeout=settings.timeout_s, tls=settings.tls)
    if judge is None and settings.judge_remotely:
        async def ask(key: str | None) -> None:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                await (client.with_api_key(key) if key is not None else client).list_models()
        judge = CoordinatorJudge(ask)
    https = Https(settings.https_cert, settings.https_key, settings.https_client_ca) \
        if settings.https_cert is not None and settings.https_key is not None else None
    try:
        served = serve_app(build_app(client, settings, on_first, judge), settings.host, settings.port, https,
                           settings.max_connections, settings.grace_s)
    except BaseException:
        await client.close()
        raise
    gateway = Gateway(settings, client, served)
    log.info("HTTP gateway listening on %s, a client of the coordinator at %s", gateway.url, settings.target)
    return gateway


WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}


def host_port(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def settings_beside(config: CoordinatorConfig, port: int, *standbys: int) -> GatewaySettings:
    """The gateway started with a coordinator (its gRPC port `port`; `standbys`: the ports of the others of a
    cluster on this host, `launch --standby`, which its client follows): on the coordinator's host, under the same
    exposure rule; it dials the coordinator on that host (a wildcard bind: on `advertise`, else loopback).
    With the cluster's certificates it serves HTTPS with the server certificate (server.crt beside them; else,
    with a warning, the node certificate), and reaches the coordinator
    with it too (so that `client_certs = "required"` admits it); client certificates required on the gRPC
    port are required on HTTPS as well."""
    tls = config.certs_dir is not None
    authenticated = config.api_keys is not None or config.client_certs == "required"
    check_exposure(config.host, tls, authenticated, config.insecure, "HTTP gateway")
    dial = (config.advertise or WILDCARDS[config.host]) if config.host in WILDCARDS else config.host
    target = ",".join(host_port(dial, p) for p in (port, *standbys))
    settings = GatewaySettings(target, config.host, config.http_port,
                               max_body_bytes=config.max_http_body_bytes, api_keys=config.api_keys)
    if config.certs_dir is None:
        return settings
    d = config.certs_dir
    cert, key = (d / SERVER_CERT, d / SERVER_KEY) if (d / SERVER_CERT).is_file() else (d / NODE_CERT, d / NODE_KEY)
    if cert.name == NODE_CERT:
        log.warning("HTTPS serves the node certificate of %s: give the gateway a key of its own (coordinator certs "
                    "create-server HOST --certs-dir %s), so the public edge holds no key internal links trust", d, d)
    return replace(settings, tls=ClientTLS(d / CA_CERT, d / NODE_CERT, d / NODE_KEY), https_cert=cert,
                   https_key=key, https_client_ca=d / CA_CERT if config.client_certs == "required" else None)


class ThreadedGateway(Gateway):
    """A gateway on a thread and event loop of its own (beside the coordinator): its HTTP parsing, TLS
    handshakes, JSON and key checks never run on the coordinator's loop, whose heartbeats and steps they would
    delay. It reaches the coordinator over loopback gRPC like any client."""

    def __init__(self, gateway: Gateway, thread: LoopThread) -> None:
        super().__init__(gateway.settings, gateway.client, gateway.served)
        self.thread = thread

    async def stop(self) -> None:
        try:
            await self.thread.run(super().stop(), self.settings.grace_s + STOP_MARGIN_S)
        finally:
            await self.thread.close()


STOP_MARGIN_S = 15.0  # beyond the grace: the server's own stop, and the channel's close


async def start_beside(config: CoordinatorConfig, port: int, *standbys: int) -> ThreadedGateway | None:
    """The gateway of `coordinator serve` / `launch`, on its own thread (None with http off); OSError or
    ValueError if it cannot start (the port taken, the exposure rule)."""
    if not config.http:
        return None
    settings = settings_beside(config, port, *standbys)
    thread = LoopThread("http gateway")
    try:
        gateway = await thread.run(start_gateway(settings), START_TIMEOUT_S)
    except BaseException:
        await thread.close()
        raise
    return ThreadedGateway(gateway, thread)


START_TIMEOUT_S = 30.0


async def exposure_checked(settings: GatewaySettings, insecure: bool) -> None:
    """The exposure rule for a gateway alone: on an address other machines reach, it needs HTTPS and a
    coordinator that authenticates callers (asked: is ListModels without a key refused?), unless `insecure`
    (then it warns). Whatever it listens on, it passes callers' API keys on, so it reaches a coordinator on
    another machine only over TLS (--certs-dir), unless `insecure`. ValueError saying what is missing."""
    target_host = settings.target.rpartition(":")[0].strip("[]")
    if settings.tls is None and not is_loopback(target_host):
        if not insecure:
            raise ValueError(f"refusing to pass API keys to the coordinator at {settings.target} in plaintext: "
                             "give --certs-dir (TLS to the coordinator), or pass --insecure to accept the risk")
        log.warning("INSECURE: callers' API keys go to the coordinator at %s without TLS", settings.target)
    if is_loopback(settings.host):
        return
    https = settings.https_cert is not None
    authenticated = https and await coordinator_wants_keys(settings)
    if https and authenticated:
        return
    missing = " and ".join(m for m, ok in (("HTTPS (--tls-cert, --tls-key)", https),
                                          ("a coordinator that requires API keys", authenticated)) if not ok)
    if not insecure:
        raise ValueError(f"refusing to serve the HTTP API on {settings.host}, which other machines can reach, "
                         f"without {missing}; pass --insecure to accept the risk")
    log.warning("INSECURE: the HTTP API serves on %s without %s; anyone who can reach it can use it",
                settings.host, missing)


async def coordinator_wants_keys(settings: GatewaySettings) -> bool:
    """Whether the coordinator refuses a call without an API key."""
    async with AsyncClient(settings.target, timeout=10, tls=settings.tls) as client:
        try:
            await client.list_models()
        except Unauthenticated as exc:
            return "TLS handshake failed" not in exc.message
        except ShardlineError:
            return False
    return False
