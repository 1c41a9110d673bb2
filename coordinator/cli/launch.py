"""`coordinator launch`: a whole cluster on this machine (launcher.py's local cluster) from its flags: the
models and their replicas, the plan checked and printed before any worker starts, then serving until Ctrl-C /
SIGTERM, which drains the streams in flight and stops every child."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import typer

from coordinator.cli import startup
from coordinator.cli.common import STORE_DEFAULT, STORE_HELP, _fail
from coordinator.config import CoordinatorConfig
from coordinator.store.models import ModelStore, default_store
from shardline.auth import ApiKeys
from shardline.cli_options import configure_logging, log_level_option, memory_option


def launch(model: list[str] = typer.Option(["smollm2"], help="model name in the store, or a store directory; "
                                          "repeat it to serve several models on one pool"),
           replicas: list[str] = typer.Option([], help="pipeline replicas: N for every model, or NAME=N "
                                              "(repeatable)", show_default="1"),
           workers: int = typer.Option(3, min=1, help="shard workers (stages) of one replica"),
           host: str = typer.Option("127.0.0.1", help="address every server listens on"),
           port: int = typer.Option(50051, min=1, max=65535, help="the coordinator's port"),
           store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT),
           worker_memory_mb: int = memory_option(),
           micro_batch_groups: int = typer.Option(1, min=0, help="micro-batch groups in flight (0 = one per "
                                                  "stage). Here every worker shares this machine's cores, so "
                                                  "one big batch beats several small ones (BENCHMARKS.md)"),
           spares: int = typer.Option(0, min=0, help="extra workers kept loaded-on-demand as spares: one takes "
                                      "over a dead worker's layers"),
           drain_seconds: float = typer.Option(30, min=0, help="on SIGTERM, how long the streams in flight may "
                                               "finish (a second SIGTERM stops at once)"),
           rebalance_on_join: bool = typer.Option(True, help="fold a worker that (re)joins into a chain left "
                                                  "narrower by a failure"),
           secure: bool = typer.Option(False, help="mutual TLS on every link with a throwaway CA and "
                                       "certificates, and an admin API key (their paths are printed)"),
           certs_dir: Path | None = typer.Option(None, help=startup.CERTS_HELP),
           client_certs: str = typer.Option("optional", help=startup.CLIENT_CERTS_HELP),
           cluster_port: int = typer.Option(0, min=0, max=65535, help=startup.CLUSTER_PORT_HELP +
                                            " (0 = a free one, chosen at start)"),
           api_keys_file: Path | None = typer.Option(None, "--api-keys", help=startup.API_KEYS_HELP),
           insecure: bool = typer.Option(False, help=startup.INSECURE_HELP),
           result_cache_mb: float = typer.Option(0, min=0, help=startup.RESULT_CACHE_HELP, show_default="0: off"),
           prefix_cache: bool = typer.Option(True, help=startup.PREFIX_CACHE_HELP),
           metrics_port: int | None = typer.Option(None, min=0, max=65535, help=startup.METRICS_HELP + "; each worker "
                                                   "gets the next port (0: a free one each)", show_default="off"),
           http_port: int | None = typer.Option(None, min=0, max=65535, envvar="SHARDLINE_HTTP_PORT",
                                                show_envvar=False, help=startup.HTTP_PORT_HELP,
                                                show_default="8000, or a free one when 8000 is taken"),
           jobs_dir: Path | None = typer.Option(None, "--jobs-dir", help="where this cluster's jobs and run-time "
                                                "changes live", show_default="the store, or a folder of its own "
                                                "in it beside another cluster"),
           http: bool = typer.Option(True, help=startup.HTTP_HELP),
           log_level: str = log_level_option(),
           log_prompts: bool = typer.Option(False, help=startup.LOG_PROMPTS_HELP),
           wire_dtype: str = typer.Option("", help=startup.WIRE_DTYPE_HELP, show_default="float32"),
           quantize: str = typer.Option("", help=startup.QUANTIZE_HELP, show_default="none"),
           calibrate: bool = typer.Option(False, help="calibrate the workers and plan layer ranges by measured "
                                          "time, not bytes (README \"Planning for mixed machines\")"),
           worker_compute_threads: int = typer.Option(0, min=0, help="torch's compute threads of each worker "
                                                      "process (shard-worker serve --compute-threads); 0 = torch's "
                                                      "default", show_default="0"),
           standby: bool = typer.Option(False, help="two coordinators (PORT, PORT+1) on a local etcd: one leads, "
                                        "the other takes over if it dies (README \"Standby coordinators\")"),
           jobs_db: str | None = typer.Option(None, "--jobs-db", help="PostgreSQL URL: jobs the coordinators share",
                                              show_default="SQLite in the store"),
           exit_when_ready: bool = typer.Option(False, help="stop once ready (for timing start-up)")) -> None:
    """Start a whole cluster on this machine: coordinator and parameter service, and shard workers as child
    processes (restarted if they die), each loaded with its planned layers; serve until Ctrl-C / SIGTERM,
    which drains the streams in flight and stops every child. Its processes prove they belong with a random
    cluster token (or, with --secure / --certs-dir, certificates): no other process can drive its workers.
    The plan (which layers each worker holds) is checked and printed before any worker starts."""
    configure_logging(log_level)
    names = []
    for m in model:
        store, name = startup.resolve_model(m, store)
        names.append(name)
    try:
        deployments = _deployments(names, replicas)
        if not cluster_port and (secure or certs_dir is not None):  # the workers' registration port: a free one
            cluster_port = startup.free_port(host)
        if http_port is None:  # a second cluster on this machine: the HTTP API moves, not the cluster
            http_port = 8000 if startup.port_free(host, 8000) else startup.free_port(host)
            if http_port != 8000:
                print(f"port 8000 is taken (another cluster?): the HTTP API takes port {http_port}", flush=True)
        if jobs_dir is None and not standby and startup.jobs_held(store or default_store()):
            jobs_dir = (store or default_store()) / f"launch-{port}"
            print(f"another coordinator runs this store's jobs: this cluster keeps its jobs and run-time changes in "
                  f"{jobs_dir}", flush=True)
        config = startup.coordinator_config(
            store, model=names[0], workers=workers, host=host, port=port, deployments=deployments,
            micro_batch_groups=micro_batch_groups, drain_seconds=drain_seconds, metrics_port=metrics_port,
            rebalance_on_join=rebalance_on_join, certs_dir=certs_dir, client_certs=client_certs,
            cluster_port=cluster_port or 50053, api_keys=api_keys_file, insecure=insecure,
            result_cache_mb=result_cache_mb,
            http=http, http_port=http_port, log_prompts=log_prompts, prefix_cache=prefix_cache, jobs_dir=jobs_dir,
            wire_dtype=wire_dtype, quantize=quantize, calibrate=calibrate, jobs_db=jobs_db)
    except ValueError as exc:
        _fail(str(exc))
        return
    startup.check_ports(config)
    if standby:
        startup.check_ports(config.model_copy(update={"port": port + 1, "http": False, "metrics_port": None}))
    if jobs_db is not None and (failure := startup.check_jobs_db(jobs_db)):
        _fail(failure)
        return
    asyncio.run(_launch(config, worker_memory_mb, spares, exit_when_ready, secure,
                        "DEBUG" if log_level.upper() == "DEBUG" else "WARNING",
                        ("--compute-threads", str(worker_compute_threads)) if worker_compute_threads else (),
                        standby))


def _deployments(names: list[str], replicas: list[str]) -> list[dict[str, object]]:
    """--model and --replicas as deployments (none for one model with one replica: the plain config)."""
    counts: dict[str, int] = {}
    for item in replicas:
        name, _, n = item.rpartition("=")
        if not n.isdigit():
            raise ValueError(f"--replicas {item!r}: give N or NAME=N")
        if name and name not in names:
            raise ValueError(f"--replicas {item!r}: {name!r} is not one of the --model names ({', '.join(names)})")
        for target in [name] if name else names:
            counts[target] = int(n)
    if len(set(names)) != len(names):
        raise ValueError(f"--model lists a model twice: {', '.join(names)}")
    if len(names) == 1 and counts.get(names[0], 1) == 1:
        return []
    return [dict(name=n, replicas=counts.get(n, 1)) for n in names]


async def _launch(config: CoordinatorConfig, worker_memory_mb: int, spares: int, exit_when_ready: bool,
                  secure: bool = False, worker_log_level: str = "WARNING",
                  worker_extra: tuple[str, ...] = (), standby: bool = False) -> None:
    from coordinator.cli.launcher import LaunchSecurity, LocalCluster, preflight_plan, shared_memory_mb
    from coordinator.fleet.planner import PlanDoesNotFit
    from shardline.server import Signals

    signals = Signals()
    for spec in config.initial_deployments():
        await startup.ensure_model(ModelStore(config.store), spec.model)
    if not worker_memory_mb:  # the workers share this machine: together they offer what it has, not each
        started = sum(s.workers * s.replicas for s in config.initial_deployments()) + spares
        worker_memory_mb = shared_memory_mb(started)
        print(f"each of the {started} workers may use {worker_memory_mb} MiB in all, its runtime included (80% of "
              "the memory available, divided among them; --worker-memory-mb to choose)", flush=True)
    try:  # before anything is spawned: a plan that cannot fit is one line, at once
        for line in preflight_plan(config, worker_memory_mb):
            print(line, flush=True)
    except PlanDoesNotFit as exc:
        _fail(f"{exc}; give fewer --workers, more --worker-memory-mb, or a smaller model")
        return
    try:
        security = LaunchSecurity.prepare(config, secure)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        return
    config = security.config
    for line in security.lines:
        print(line, flush=True)
    if standby:
        try:
            await _launch_standby(config, security, worker_memory_mb, spares, exit_when_ready, signals,
                                  (*security.worker_args, *worker_extra), worker_log_level)
        finally:
            security.cleanup()
        return
    if config.certs_dir is not None:
        print(f"workers register on port {config.cluster_port} (mutual TLS; --cluster-port to choose it)",
              flush=True)
    cluster = LocalCluster(config, worker_memory_mb, spares, (*security.worker_args, *worker_extra),
                           worker_log_level=worker_log_level)
    failed = ""
    gateway = None
    try:
        gateway = await startup.start_http(config, config.port)  # answers 503 until the cluster serves
        try:
            seconds = await _started(cluster.start(say=lambda line: print(line, flush=True)), signals)
        except (RuntimeError, ValueError, OSError) as exc:
            failed = str(exc)
            return
        if seconds is None:
            return
        fleet = cluster.coordinator.fleet if cluster.coordinator else None
        keys = [d.key for d in fleet.deployments.values()] if fleet is not None else [config.model]
        serving = len(cluster.processes) - spares
        print(f"ready in {seconds:.1f} s: {serving} workers serving {', '.join(keys)} on {config.host}:{config.port}"
              + (f", and {spares} spare{'s' if spares > 1 else ''}" if spares else ""), flush=True)
        for line in cluster.metrics_lines():
            print(line, flush=True)
        key = ""  # the key from its file, in the environment: never on a command line (ps shows those)
        if secure and security.private is not None and config.api_keys == security.private / "api-keys.json":
            key = f"SHARDLINE_API_KEY=$(cat {security.private / 'admin.key'}) "
        if gateway is not None:
            print(f"OpenAI-compatible HTTP API on {gateway.url} (try: {curl_hint(gateway.url, config, key)})",
                  flush=True)
        if not exit_when_ready:
            endpoint = f"{config.host}:{config.port}"
            flags = f" --certs-dir {config.certs_dir}" if config.certs_dir is not None else ""
            if fleet is not None and fleet.find("").task == "embed":
                print(f'try: python -c "from shardline.client import Client; '
                      f"print(Client('{endpoint}').embed(['hello world']))\"")
            else:
                print(f'try: {key}coordinator generate "The capital of France is" --endpoint {endpoint}{flags}')
            print("serving; Ctrl-C to stop", flush=True)
            await signals.first.wait()
            await startup.drain_unless_stopped(cluster.drain, config.drain_seconds, signals)
    finally:
        print("stopping", flush=True)
        try:
            if gateway is not None:  # first: no HTTP request starts on a coordinator that is going away
                with contextlib.suppress(Exception):
                    await gateway.stop()
            with contextlib.suppress(Exception):
                await cluster.stop()
        finally:
            security.cleanup()  # the throwaway CA and keys never outlive the cluster
        if failed:
            _fail(failed)


async def _started(start: Coroutine[Any, Any, float], signals: Any) -> float | None:
    """The cluster's start, until ready (its seconds) or the first signal (None: "stopped before ready"; what
    it had started is recorded by then, so the caller's stop ends it). Its errors are raised."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(signals.first.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        print("stopped before ready", flush=True)
        return None
    stopping.cancel()
    return starting.result()


async def _launch_standby(config: CoordinatorConfig, security: Any, worker_memory_mb: int, spares: int,
                          exit_when_ready: bool, signals: Any, worker_args: tuple[str, ...],
                          worker_log_level: str) -> None:
    """`launch --standby` (coordinator/cli/launch_standby.py): etcd, two coordinators, the workers, the gateway
    in front of both; serve until Ctrl-C / SIGTERM."""
    import shutil
    import tempfile

    from coordinator.cli.launch_standby import StandbyCluster

    jobs_root = config.jobs_dir or config.store / f"launch-{config.port}"
    if config.jobs_db is None:
        print(f"jobs: each coordinator keeps its own (in {jobs_root}/coordinator-N): a job stays with the "
              "coordinator that took it; give --jobs-db postgresql://... to share them", flush=True)
    directory = tempfile.mkdtemp(prefix="shardline-standby-")  # the logs: removed after a clean stop only
    cluster = StandbyCluster(config, Path(directory), jobs_root, worker_memory_mb, spares, worker_args,
                             worker_log_level)
    failed, gateway = "", None
    try:
        gateway = await startup.start_http(config, config.port, config.port + 1)
        try:
            seconds = await _started(cluster.start(say=lambda line: print(line, flush=True)), signals)
        except (RuntimeError, ValueError, OSError) as exc:
            failed = str(exc)
            return
        if seconds is None:
            return
        pids = cluster.pids()
        leader = cluster.leader if cluster.leader is not None else 0
        print(f"ready in {seconds:.1f} s: coordinators on {cluster.endpoint} (logs in {directory}); "
              f"{cluster.coordinators[leader].name} leads (pid {pids.get(leader)})", flush=True)
        if gateway is not None:
            print(f"OpenAI-compatible HTTP API on {gateway.url}, in front of both", flush=True)
        if not exit_when_ready:
            flags = f" --certs-dir {config.certs_dir}" if config.certs_dir is not None else ""
            print(f'try: coordinator generate "The capital of France is" --endpoint {cluster.endpoint}{flags}; '
                  f"then kill {pids.get(leader)} (the leader): the other takes over within "
                  f"{config.etcd_lease_s} s or so, and streams resume", flush=True)
            print("serving; Ctrl-C to stop", flush=True)
            stopping = asyncio.ensure_future(signals.first.wait())
            gave_up = asyncio.ensure_future(cluster.ended.wait())
            await asyncio.wait({stopping, gave_up}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            gave_up.cancel()
            failed = cluster.gave_up
    finally:
        print("stopping", flush=True)
        try:
            if gateway is not None:
                with contextlib.suppress(Exception):
                    await gateway.stop()
        finally:
            with contextlib.suppress(Exception):
                await cluster.stop()
        if failed:
            _fail(f"{failed} (the logs are kept in {directory})")
        shutil.rmtree(directory, ignore_errors=True)


def curl_hint(url: str, config: CoordinatorConfig, key: str) -> str:
    """A curl command that works against this gateway as launched: the cluster's CA for HTTPS, the API key
    (from its file, `key`, or the operator's own in $SHARDLINE_API_KEY) where keys are needed."""
    cacert = f" --cacert {config.certs_dir / 'ca.crt'}" if url.startswith("https") and config.certs_dir else ""
    if config.api_keys is None or ApiKeys(config.api_keys).keyless() is not None:  # callers without a key served
        return f"curl{cacert} {url}/models"
    return f'{key or "SHARDLINE_API_KEY=<your key> "}sh -c \'curl{cacert} -H "Authorization: Bearer ' \
           f'$SHARDLINE_API_KEY" {url}/models\''
