"""`coordinator parameters`, `serve` and `http`: each runs one server of a cluster alone (the parameter
service, the coordinator, the OpenAI-compatible HTTP API), for a cluster across machines; `launch` runs them
all on this one."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import typer

from coordinator.cli import startup
from coordinator.cli.common import CLIENT_NAME, STORE_DEFAULT, STORE_HELP, _fail, _store
from coordinator.config import CoordinatorConfig
from coordinator.store.models import ModelStore
from shardline.cli_options import configure_logging, endpoint_option, log_level_option


def parameters(store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT),
               host: str = typer.Option("127.0.0.1", help="address to listen on"),
               port: int = typer.Option(50052, help="port (0 = a free one)"),
               certs_dir: Path | None = typer.Option(None, help=startup.CERTS_HELP),
               cluster_token_file: Path | None = typer.Option(None, help=startup.TOKEN_HELP),
               insecure: bool = typer.Option(False, help=startup.INSECURE_HELP),
               log_level: str = log_level_option()) -> None:
    """Run the parameter service alone: it streams each worker the tensors of its layers (only to the
    cluster's processes: a node certificate, or the cluster token)."""
    from coordinator.cli.launcher import wait_for_signal
    from coordinator.store.parameters.server import start_parameter_server
    from shardline.auth import ClusterIdentity
    from shardline.server import check_exposure

    configure_logging(log_level)
    try:
        identity = ClusterIdentity.from_files(certs_dir, cluster_token_file)
        check_exposure(host, identity.tls, identity.tls, insecure, "parameter service")
    except ValueError as exc:
        _fail(str(exc))
        return

    async def run() -> None:
        server = await start_parameter_server(_store(store), host, port, identity)
        print(f"parameter service listening on {server.address}", flush=True)
        await wait_for_signal()
        await server.stop()

    asyncio.run(run())


def serve(config_file: Path | None = typer.Option(None, "--config", help="a TOML file of coordinator settings "
                                                  "(see deploy/cluster.example.toml); flags given here win"),
          model: str | None = typer.Option(None, help="model name in the store, or a store directory",
                                           show_default="smollm2"),
          workers: int | None = typer.Option(None, min=1, help="deploy once this many workers registered",
                                             show_default="1"),
          host: str | None = typer.Option(None, help="address to listen on", show_default="127.0.0.1"),
          port: int | None = typer.Option(None, min=0, max=65535, help="port", show_default="50051"),
          advertise: str | None = typer.Option(None, help="host workers reach this machine on",
                                               show_default="--host"),
          store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT),
          parameters_address: str | None = typer.Option(None, "--parameters", help="a parameter service's "
                                                        "HOST:PORT", show_default="run one in-process"),
          parameters_port: int | None = typer.Option(None, help="port of the in-process parameter service",
                                                     show_default="a free one"),
          max_tokens_limit: int | None = typer.Option(None, min=1, help="the largest max_tokens allowed",
                                                      show_default="2048"),
          drain_seconds: float | None = typer.Option(None, min=0, help="on SIGTERM, how long the streams in "
                                                     "flight may finish", show_default="30"),
          certs_dir: Path | None = typer.Option(None, help=startup.CERTS_HELP),
          client_certs: str | None = typer.Option(None, help=startup.CLIENT_CERTS_HELP, show_default="optional"),
          cluster_port: int | None = typer.Option(None, min=0, max=65535, help=startup.CLUSTER_PORT_HELP,
                                                  show_default="50053"),
          cluster_token_file: Path | None = typer.Option(None, help=startup.TOKEN_HELP),
          api_keys_file: Path | None = typer.Option(None, "--api-keys", help=startup.API_KEYS_HELP),
          insecure: bool | None = typer.Option(None, "--insecure", help=startup.INSECURE_HELP),
          metrics_port: int | None = typer.Option(None, min=0, max=65535, help=startup.METRICS_HELP,
                                                  show_default="off"),
          result_cache_mb: float | None = typer.Option(None, min=0, help=startup.RESULT_CACHE_HELP,
                                                       show_default="0: off"),
          prefix_cache: bool | None = typer.Option(None, "--prefix-cache/--no-prefix-cache",
                                                   help=startup.PREFIX_CACHE_HELP, show_default="on"),
          http_port: int | None = typer.Option(None, min=0, max=65535, envvar="SHARDLINE_HTTP_PORT",
                                               show_envvar=False, help=startup.HTTP_PORT_HELP, show_default="8000"),
          http: bool | None = typer.Option(None, "--http/--no-http", help=startup.HTTP_HELP, show_default="on"),
          log_level: str = log_level_option(),
          log_prompts: bool | None = typer.Option(None, "--log-prompts", help=startup.LOG_PROMPTS_HELP,
                                                  show_default="off"),
          wire_dtype: str | None = typer.Option(None, help=startup.WIRE_DTYPE_HELP, show_default="--dtype"),
          quantize: str | None = typer.Option(None, help=startup.QUANTIZE_HELP, show_default="none"),
          etcd: list[str] | None = typer.Option(None, "--etcd", help="etcd URL(s): stand by, lead when elected",
                                                show_default="none: one coordinator"),
          etcd_prefix: str | None = typer.Option(None, help="the cluster's keys in etcd",
                                                 show_default="/shardline/default"),
          etcd_lease_s: int | None = typer.Option(None, min=1, max=60, help="the leader's lease (s)",
                                                  show_default="3"),
          jobs_db: str | None = typer.Option(None, "--jobs-db", help="PostgreSQL URL: jobs shared by the "
                                             "coordinators", show_default="SQLite in the store"),
          ) -> None:
    """Run the coordinator alone; workers join with `shard-worker serve --coordinator HOST:PORT`."""
    from coordinator.config import load_config

    configure_logging(log_level)
    given = dict(model=model, workers=workers, host=host, port=port, advertise=advertise, store=store,
                 parameters_address=parameters_address, parameters_port=parameters_port,
                 max_tokens_limit=max_tokens_limit, drain_seconds=drain_seconds, certs_dir=certs_dir,
                 client_certs=client_certs, cluster_port=cluster_port, cluster_token_file=cluster_token_file,
                 api_keys=api_keys_file, insecure=insecure, result_cache_mb=result_cache_mb, http_port=http_port,
                 http=http)
    given["metrics_port"] = metrics_port
    given["prefix_cache"] = prefix_cache
    given["log_prompts"] = log_prompts
    given["wire_dtype"], given["quantize"] = wire_dtype, quantize
    given["etcd_prefix"], given["etcd_lease_s"] = etcd_prefix, etcd_lease_s
    given["jobs_db"] = jobs_db
    flags: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    if etcd:
        flags["etcd"] = etcd
    if "model" in flags:
        resolved_store, flags["model"] = startup.resolve_model(str(flags["model"]), store)
        if resolved_store is not None:
            flags["store"] = resolved_store
    try:
        if config_file is not None:
            config = load_config(config_file, **flags)  # the file's `workers` stands unless --workers is given
        else:
            flags.setdefault("workers", 1)
            config = startup.coordinator_config(flags.pop("store", None), **flags)  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
        return

    if config.jobs_db is not None and (failure := startup.check_jobs_db(config.jobs_db)):
        _fail(failure)
        return
    if config.etcd:
        asyncio.run(_serve_standby(config))
        return
    startup.check_ports(config)

    async def run() -> None:
        from coordinator.api.server import start_coordinator
        from shardline.server import Signals

        signals = Signals()
        await startup.ensure_model(ModelStore(config.store), config.model)
        try:
            coordinator = await start_coordinator(config, say=lambda line: print(line, flush=True))
        except (ValueError, OSError) as exc:
            _fail(str(exc))
            return
        joins = "" if coordinator.cluster_address == coordinator.address else \
            f" (workers register on {coordinator.cluster_address})"
        print(f"coordinator listening on {coordinator.address}{joins}; waiting for {config.workers} workers",
              flush=True)
        if coordinator.metrics_server is not None:
            print(f"metrics at {coordinator.metrics_server.url}", flush=True)
        gateway = None
        try:
            gateway = await startup.start_http(config, coordinator.server.port)
            if gateway is not None:
                print(f"OpenAI-compatible HTTP API on {gateway.url}", flush=True)
            await signals.first.wait()
            await startup.drain_unless_stopped(coordinator.fleet.drain, config.drain_seconds, signals)
        finally:
            try:
                if gateway is not None:  # first: no HTTP request starts on a coordinator that is going away
                    await gateway.stop()
            finally:
                await coordinator.stop()

    asyncio.run(run())


async def _serve_standby(config: CoordinatorConfig) -> None:
    """One of several coordinators on etcd (coordinator/ha/serve.py): stands by, leads when elected. Its HTTP
    gateway runs as a process of its own (`coordinator http --endpoint A,B`), so no HTTP port is served here."""
    from coordinator.ha.etcd import EtcdUnavailable
    from coordinator.ha.serve import start_ha
    from shardline.server import Signals

    signals = Signals()
    await startup.ensure_model(ModelStore(config.store), config.model)
    try:
        ha = await start_ha(config.model_copy(update={"http": False}), say=lambda line: print(line, flush=True))
    except (EtcdUnavailable, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    running = asyncio.ensure_future(ha.run())
    stop = asyncio.ensure_future(signals.first.wait())
    try:
        await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
        if ha.coordinator is not None and signals.first.is_set():
            await startup.drain_unless_stopped(ha.coordinator.fleet.drain, config.drain_seconds, signals)
    finally:
        stop.cancel()
        await ha.stop()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


def http(endpoint: str = endpoint_option(),
         host: str = typer.Option("127.0.0.1", help="address to listen on"),
         port: int = typer.Option(8000, min=0, max=65535, help="port (0 = a free one)"),
         certs_dir: Path | None = typer.Option(None, "--certs-dir", help="TLS to the coordinator: trust this "
                                               "directory's ca.crt"),
         client_name: str = CLIENT_NAME,
         tls_cert: Path | None = typer.Option(None, help="serve HTTPS with this certificate (PEM) ..."),
         tls_key: Path | None = typer.Option(None, help="... and this key"),
         max_body_bytes: int = typer.Option(4 * 2**20, min=1024, help="the largest request body read (larger: 413)"),
         timeout: float = typer.Option(300, min=0.001, help="each request's deadline at the coordinator, in seconds"),
         insecure: bool = typer.Option(False, help="allow a non-loopback --host without HTTPS and API keys at the "
                                       "coordinator (warns at start)"),
         api_keys_file: Path | None = typer.Option(None, "--api-keys", help="the coordinator's API keys file: "
                                                   "a caller's key is judged by it before its body is read "
                                                   "(without it, a coordinator that wants keys is asked)"),
         log_level: str = log_level_option()) -> None:
    """Run the OpenAI-compatible HTTP API alone, in front of a coordinator elsewhere (`serve` and `launch`
    start one beside theirs: --http-port). Callers' `Authorization: Bearer` keys go on to the coordinator."""
    from dataclasses import replace

    from coordinator.api.http_gateway import GatewaySettings
    from coordinator.api.http_launch import exposure_checked, start_gateway
    from shardline.limits import is_host_port
    from shardline.server import Signals
    from shardline.tls import ClientTLS, TLSFilesError

    configure_logging(log_level)
    if not all(is_host_port(e.strip()) for e in endpoint.split(",")):
        _fail(f"--endpoint must be HOST:PORT (standby coordinators: HOST:PORT,HOST:PORT), got {endpoint!r}")
    if (tls_cert is None) != (tls_key is None):
        _fail("give --tls-cert and --tls-key together (HTTPS), or neither")
    if api_keys_file is not None and not api_keys_file.is_file():
        _fail(f"--api-keys {api_keys_file}: no such file (`coordinator api-keys create` makes one)")
    tls = ClientTLS.from_certs_dir(certs_dir, client_name) if certs_dir is not None else None
    settings = GatewaySettings(endpoint, host, port, tls, tls_cert, tls_key, max_body_bytes=max_body_bytes,
                               timeout_s=timeout, api_keys=api_keys_file)

    async def run() -> None:
        signals = Signals()
        try:
            await exposure_checked(settings, insecure)
            # without the keys file, the coordinator itself judges each key (and whether it needs one)
            gateway = await start_gateway(replace(settings, judge_remotely=api_keys_file is None))
        except OSError as exc:
            _fail(f"{exc}; choose another port with --port")
            return
        except (ValueError, TLSFilesError) as exc:
            _fail(str(exc))
            return
        print(f"OpenAI-compatible HTTP API on {gateway.url}, in front of the coordinator at {endpoint}", flush=True)
        try:
            await signals.first.wait()
        finally:
            await gateway.stop()

    asyncio.run(run())
