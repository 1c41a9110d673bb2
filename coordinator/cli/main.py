"""`coordinator`: import models into the store, run the parameter service, launch a local cluster."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

from coordinator.cli.common import (
    API_KEY_OPTION,
    CLIENT_CERTS_DIR,
    CLIENT_NAME,
    STORE_DEFAULT,
    STORE_HELP,
    _client,
    _fail,
    _store,
    explain,
)
from coordinator.cli.jobs import jobs
from coordinator.cli.models import models
from coordinator.cli.security import api_keys, certs, health
from coordinator.config import CoordinatorConfig
from coordinator.store.models import ModelStore, default_store
from shardline.cli_options import (
    configure_logging,
    endpoint_option,
    examples,
    log_level_option,
    memory_option,
    typer_app,
    version_option,
)

app = typer_app("shardline coordinator: import models, launch a local cluster or serve one, and use it (generate, "
                "embed, status, models, jobs).")


@app.callback()
def _root(version: bool = version_option()) -> None:
    """shardline coordinator."""


app.add_typer(certs, name="certs")
app.add_typer(api_keys, name="api-keys")
app.command("health", epilog=examples("coordinator health --endpoint 127.0.0.1:50051",
                                      "coordinator health --endpoint node1:50051 --certs-dir ./certs"))(health)
RESULT_CACHE_HELP = ("MiB of answers to repeated deterministic requests (greedy, or seeded by the caller), "
                     "answered from memory and marked cached")
PREFIX_CACHE_HELP = ("prompts that share a prefix (a system prompt, a chat history) reuse its KV blocks on every "
                     "stage instead of computing them again")
METRICS_HELP = "serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port; printed)"
# security options, shared by the server commands (README "Security")
CERTS_HELP = "TLS on every link with this certificates directory (ca.crt, node.crt, node.key: `coordinator certs`)"
TOKEN_HELP = "without TLS: a file holding the cluster token every process of the cluster sends"
INSECURE_HELP = "allow serving on a non-loopback address without TLS and authentication (warns at start)"
API_KEYS_HELP = "a JSON file of hashed API keys with roles (`coordinator api-keys create`); without it the " \
    "public API takes any caller"
LOG_PROMPTS_HELP = "the request log (one INFO line per request) also writes each prompt; off: counts and timings only"
CLIENT_CERTS_HELP = "with --certs-dir: 'required' makes public API clients present a certificate from the CA"
CLUSTER_PORT_HELP = "with --certs-dir: the port workers register on (mutual TLS only)"
HTTP_PORT_HELP = "the OpenAI-compatible HTTP API's port, on --host (0 = a free one; or $SHARDLINE_HTTP_PORT)"
HTTP_HELP = "serve the OpenAI-compatible HTTP API beside the gRPC port (--no-http: gRPC only)"


SOURCES = "'smollm2' or 'minilm' (built in), a .gguf file, a Hugging Face directory, or --random FAMILY"


@app.command("import", epilog=examples("coordinator import smollm2", "coordinator import minilm",
                                       "coordinator import ./SmolLM2-360M-Instruct --name smollm2-360m",
                                       "coordinator import --random llama --layers 8 --tokenizer smollm2 --name tiny"))
def import_(
    source: str = typer.Argument("", help="'smollm2' or 'minilm' (built in), a .gguf file, or a Hugging Face "
                                 "directory"),
    name: str = typer.Option("", "--name", help="name of the model in the store (needed with --random)",
                             show_default="the built-in's name, or the file's or directory's"),
    overwrite: bool = typer.Option(False, help="replace a model of the same name in the store"),
    store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT),
    random: str = typer.Option("", "--random", help="random weights for this family (llama, gpt2)"),
    config: Path | None = typer.Option(None, help="with --random: a JSON file of config fields"),
    hidden: int = typer.Option(256, help="with --random: hidden size"),
    layers: int = typer.Option(4, help="with --random: number of layers"),
    heads: int = typer.Option(0, help="with --random: attention heads (0 = hidden / 64)"),
    kv_heads: int = typer.Option(0, help="with --random: key/value heads (0 = heads)"),
    intermediate: int = typer.Option(0, help="with --random: MLP size (0 = 4 x hidden)"),
    vocab: int = typer.Option(0, help="with --random: vocabulary size [1024, or the --tokenizer's size]"),
    tokenizer: str = typer.Option("", help="with --random: borrow this stored model's tokenizer (e.g. smollm2), so "
                                  "the model serves text"),
    positions: int = typer.Option(2048, help="with --random: maximum positions"),
    seed: int = typer.Option(0, help="with --random: seed of the weights"),
) -> None:
    """Convert a model into the store: config, tokenizer, safetensors and a sha256 manifest."""
    from coordinator.store.importer import (
        BUILTIN,
        BUILTIN_ENCODER,
        BorrowedTokenizer,
        ImportFailed,
        builtin_encoder_dir,
        builtin_gguf,
        import_gguf,
        import_hf_dir,
        import_random,
        random_config,
    )

    logging.basicConfig(level=logging.WARNING)
    target = _store(store)
    if random and source:
        _fail("give either SOURCE or --random, not both")
    if not random and source not in (BUILTIN, BUILTIN_ENCODER):
        if not source:
            _fail(f"give SOURCE: {SOURCES}")
        if not Path(source).exists():
            _fail(f"{source} does not exist; give {SOURCES}")
        if not (source.endswith(".gguf") or Path(source).is_dir()):
            _fail(f"{source} is not a .gguf file or a directory; give {SOURCES}")
    if not name:
        if random:
            _fail("a --random model needs a --name")
        name = source if source in (BUILTIN, BUILTIN_ENCODER) else Path(source.rstrip("/")).stem
    if target.has(name) and not overwrite:
        _fail(f"the store {target.root} already holds a model named {name!r}: give another --name, or --overwrite "
              "to replace it")
    try:
        if tokenizer and not random:
            _fail("--tokenizer goes with --random (other imports bring their own tokenizer)")
        if random:
            borrowed = BorrowedTokenizer.of(target, tokenizer) if tokenizer else None
            fields = {**(borrowed.fields() if borrowed else {}), **(json.loads(config.read_text()) if config else {})}
            vocab = vocab or (borrowed.size if borrowed else 1024)
            if borrowed:
                borrowed.check(vocab)
            dims = dict(hidden=hidden, layers=layers, vocab=vocab, positions=positions)
            dims.update({k: v for k, v in dict(heads=heads, kv_heads=kv_heads, intermediate=intermediate).items() if v})
            manifest = import_random(target, name, random_config(random, **dims, **fields), seed=seed,
                                     tokenizer_dir=borrowed.source if borrowed else None)
        elif source == BUILTIN:
            manifest = import_gguf(target, builtin_gguf(), name)
        elif source == BUILTIN_ENCODER:
            manifest = import_hf_dir(target, builtin_encoder_dir(), name)
        elif source.endswith(".gguf"):
            manifest = import_gguf(target, Path(source), name)
        else:
            manifest = import_hf_dir(target, Path(source), name)
    except (ImportFailed, ValueError, OSError, json.JSONDecodeError) as exc:
        _fail(str(exc))
        return
    print(f"imported {manifest.name}: {manifest.family}, {manifest.num_layers} layers, {len(manifest.tensors)} "
          f"tensors, {manifest.total_size_bytes / 2**20:.1f} MiB -> {target.path(manifest.name)}")


@app.command(epilog=examples("coordinator parameters --port 50052",
                             "coordinator serve --parameters 127.0.0.1:50052   (a coordinator that uses it)"))
def parameters(store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT),
               host: str = typer.Option("127.0.0.1", help="address to listen on"),
               port: int = typer.Option(50052, help="port (0 = a free one)"),
               certs_dir: Path | None = typer.Option(None, help=CERTS_HELP),
               cluster_token_file: Path | None = typer.Option(None, help=TOKEN_HELP),
               insecure: bool = typer.Option(False, help=INSECURE_HELP),
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


WIRE_DTYPE_HELP = ("the dtype hidden states travel between stages in: float32, float16, bfloat16, or int8 (a scale "
                   "per row); each stage converts on receipt (README \"Compressed activations and weights\")")
QUANTIZE_HELP = "int8: weight-only int8 quantization of the layers' linear weights at load (about half the memory)"


def _config(store: Path | None, **fields: object) -> CoordinatorConfig:
    from coordinator.config import CoordinatorConfig

    return CoordinatorConfig(store=store or default_store(), **fields)  # type: ignore[arg-type]


def _resolve_model(model: str, store: Path | None) -> tuple[Path | None, str]:
    """--model is a name in the store, or a store directory of one model."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        return path.parent, path.name
    return store, model


async def _ensure_model(store: ModelStore, model: str) -> None:
    from coordinator.store.importer import (
        BUILTIN,
        BUILTIN_ENCODER,
        builtin_encoder_dir,
        builtin_gguf,
        import_gguf,
        import_hf_dir,
    )

    if store.has(model):
        return
    if model == BUILTIN:
        print(f"importing the built-in SmolLM2-135M-Instruct into {store.root} (once)", flush=True)
        await asyncio.to_thread(import_gguf, store, builtin_gguf(), model)
    elif model == BUILTIN_ENCODER:
        print(f"importing the built-in all-MiniLM-L6-v2 into {store.root} (once)", flush=True)
        await asyncio.to_thread(import_hf_dir, store, builtin_encoder_dir(), model)
    else:
        _fail(f"model {model!r} is not in the store {store.root} (models: {store.models() or 'none'}); "
              "add it with `coordinator import`")


@app.command(epilog=examples("coordinator launch", "coordinator launch --model smollm2 --workers 3 --port 50061",
                             "coordinator launch --model smollm2 --model minilm --workers 1",
                             "coordinator launch --secure --host 0.0.0.0 --log-level DEBUG"))
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
           certs_dir: Path | None = typer.Option(None, help=CERTS_HELP),
           client_certs: str = typer.Option("optional", help=CLIENT_CERTS_HELP),
           cluster_port: int = typer.Option(50053, min=1, max=65535, help=CLUSTER_PORT_HELP),
           api_keys_file: Path | None = typer.Option(None, "--api-keys", help=API_KEYS_HELP),
           insecure: bool = typer.Option(False, help=INSECURE_HELP),
           result_cache_mb: float = typer.Option(0, min=0, help=RESULT_CACHE_HELP, show_default="0: off"),
           prefix_cache: bool = typer.Option(True, help=PREFIX_CACHE_HELP),
           metrics_port: int | None = typer.Option(None, min=0, max=65535, help=METRICS_HELP + "; each worker "
                                                   "gets the next port (0: a free one each)", show_default="off"),
           http_port: int = typer.Option(8000, min=0, max=65535, envvar="SHARDLINE_HTTP_PORT", show_envvar=False,
                                         help=HTTP_PORT_HELP),
           http: bool = typer.Option(True, help=HTTP_HELP),
           log_level: str = log_level_option(),
           log_prompts: bool = typer.Option(False, help=LOG_PROMPTS_HELP),
           wire_dtype: str = typer.Option("", help=WIRE_DTYPE_HELP, show_default="float32"),
           quantize: str = typer.Option("", help=QUANTIZE_HELP, show_default="none"),
           calibrate: bool = typer.Option(False, help="calibrate the workers and plan layer ranges by measured "
                                          "time, not bytes (README \"Planning for mixed machines\")"),
           worker_compute_threads: int = typer.Option(0, min=0, help="torch's compute threads of each worker "
                                                      "process (shard-worker serve --compute-threads); 0 = torch's "
                                                      "default", show_default="0"),
           exit_when_ready: bool = typer.Option(False, help="stop once ready (for timing start-up)")) -> None:
    """Start a whole cluster on this machine: coordinator and parameter service, and shard workers as child
    processes (restarted if they die), each loaded with its planned layers; serve until Ctrl-C / SIGTERM,
    which drains the streams in flight and stops every child. Its processes prove they belong with a random
    cluster token (or, with --secure / --certs-dir, certificates): no other process can drive its workers.
    The plan (which layers each worker holds) is checked and printed before any worker starts."""
    configure_logging(log_level)
    names = []
    for m in model:
        store, name = _resolve_model(m, store)
        names.append(name)
    try:
        deployments = _deployments(names, replicas)
        config = _config(store, model=names[0], workers=workers, host=host, port=port, deployments=deployments,
                         micro_batch_groups=micro_batch_groups, drain_seconds=drain_seconds, metrics_port=metrics_port,
                         rebalance_on_join=rebalance_on_join, certs_dir=certs_dir, client_certs=client_certs,
                         cluster_port=cluster_port, api_keys=api_keys_file, insecure=insecure,
                         result_cache_mb=result_cache_mb, http=http, http_port=http_port, log_prompts=log_prompts,
                         prefix_cache=prefix_cache, wire_dtype=wire_dtype, quantize=quantize, calibrate=calibrate)
    except ValueError as exc:
        _fail(str(exc))
        return
    _check_ports(config)
    asyncio.run(_launch(config, worker_memory_mb, spares, exit_when_ready, secure,
                        "DEBUG" if log_level.upper() == "DEBUG" else "WARNING",
                        ("--compute-threads", str(worker_compute_threads)) if worker_compute_threads else ()))


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


async def _drain(drain: Any, grace_s: float, signals: Any) -> None:
    """Drain (within `grace_s`), unless a second signal says stop now."""
    print(f"draining: no new requests; the streams in flight have {grace_s:.0f} s to finish "
          "(signal again to stop now)", flush=True)
    draining = asyncio.ensure_future(drain(grace_s))
    now = asyncio.ensure_future(signals.second.wait())
    await asyncio.wait({draining, now}, return_when=asyncio.FIRST_COMPLETED)
    for task in (draining, now):
        task.cancel()


async def _launch(config: CoordinatorConfig, worker_memory_mb: int, spares: int, exit_when_ready: bool,
                  secure: bool = False, worker_log_level: str = "WARNING",
                  worker_extra: tuple[str, ...] = ()) -> None:
    from coordinator.cli.launcher import LaunchSecurity, LocalCluster, preflight_plan
    from coordinator.fleet.planner import PlanDoesNotFit
    from shardline.server import Signals

    signals = Signals()
    for spec in config.initial_deployments():
        await _ensure_model(ModelStore(config.store), spec.model)
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
    cluster = LocalCluster(config, worker_memory_mb, spares, (*security.worker_args, *worker_extra),
                           worker_log_level=worker_log_level)
    failed = ""
    gateway = None
    try:
        gateway = await _start_http(config, config.port)  # answers 503 until the cluster serves
        starting = asyncio.ensure_future(cluster.start(say=lambda line: print(line, flush=True)))
        stopping = asyncio.ensure_future(signals.first.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            print("stopped before ready", flush=True)
            return
        stopping.cancel()
        try:
            seconds = starting.result()
        except (RuntimeError, ValueError, OSError) as exc:
            failed = str(exc)
            return
        fleet = cluster.coordinator.fleet if cluster.coordinator else None
        keys = [d.key for d in fleet.deployments.values()] if fleet is not None else [config.model]
        print(f"ready in {seconds:.1f} s: {len(cluster.processes)} workers serving {', '.join(keys)} on "
              f"{config.host}:{config.port}" + (f", {spares} spares" if spares else ""), flush=True)
        for line in cluster.metrics_lines():
            print(line, flush=True)
        if gateway is not None:
            print(f"OpenAI-compatible HTTP API on {gateway.url} (try: curl {gateway.url}/models)", flush=True)
        if not exit_when_ready:
            endpoint = f"{config.host}:{config.port}"
            flags = f" --certs-dir {config.certs_dir}" if config.certs_dir is not None else ""
            key = ""  # the key from its file, in the environment: never on a command line (ps shows those)
            if secure and security.private is not None and config.api_keys == security.private / "api-keys.json":
                key = f"SHARDLINE_API_KEY=$(cat {security.private / 'admin.key'}) "
            if fleet is not None and fleet.find("").task == "embed":
                print(f'try: python -c "from shardline.client import Client; '
                      f"print(Client('{endpoint}').embed(['hello world']))\"")
            else:
                print(f'try: {key}coordinator generate "The capital of France is" --endpoint {endpoint}{flags}')
            print("serving; Ctrl-C to stop", flush=True)
            await signals.first.wait()
            await _drain(cluster.drain, config.drain_seconds, signals)
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


@app.command(epilog=examples("coordinator serve --model smollm2 --workers 2",
                             "coordinator serve --config deploy/cluster.example.toml --log-level DEBUG",
                             "shard-worker serve --coordinator 127.0.0.1:50051   (on each worker host)"))
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
          certs_dir: Path | None = typer.Option(None, help=CERTS_HELP),
          client_certs: str | None = typer.Option(None, help=CLIENT_CERTS_HELP, show_default="optional"),
          cluster_port: int | None = typer.Option(None, min=0, max=65535, help=CLUSTER_PORT_HELP,
                                                  show_default="50053"),
          cluster_token_file: Path | None = typer.Option(None, help=TOKEN_HELP),
          api_keys_file: Path | None = typer.Option(None, "--api-keys", help=API_KEYS_HELP),
          insecure: bool | None = typer.Option(None, "--insecure", help=INSECURE_HELP),
          metrics_port: int | None = typer.Option(None, min=0, max=65535, help=METRICS_HELP, show_default="off"),
          result_cache_mb: float | None = typer.Option(None, min=0, help=RESULT_CACHE_HELP, show_default="0: off"),
          prefix_cache: bool | None = typer.Option(None, "--prefix-cache/--no-prefix-cache",
                                                   help=PREFIX_CACHE_HELP, show_default="on"),
          http_port: int | None = typer.Option(None, min=0, max=65535, envvar="SHARDLINE_HTTP_PORT",
                                               show_envvar=False, help=HTTP_PORT_HELP, show_default="8000"),
          http: bool | None = typer.Option(None, "--http/--no-http", help=HTTP_HELP, show_default="on"),
          log_level: str = log_level_option(),
          log_prompts: bool | None = typer.Option(None, "--log-prompts", help=LOG_PROMPTS_HELP, show_default="off"),
          wire_dtype: str | None = typer.Option(None, help=WIRE_DTYPE_HELP, show_default="--dtype"),
          quantize: str | None = typer.Option(None, help=QUANTIZE_HELP, show_default="none"),
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
    flags = {k: v for k, v in given.items() if v is not None}
    if "model" in flags:
        resolved_store, flags["model"] = _resolve_model(str(flags["model"]), store)
        if resolved_store is not None:
            flags["store"] = resolved_store
    flags.setdefault("workers", 1)
    try:
        if config_file is not None:
            config = load_config(config_file, **flags)
        else:
            config = _config(flags.pop("store", None), **flags)  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
        return

    _check_ports(config)

    async def run() -> None:
        from coordinator.api.server import start_coordinator
        from shardline.server import Signals

        signals = Signals()
        await _ensure_model(ModelStore(config.store), config.model)
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
            gateway = await _start_http(config, coordinator.server.port)
            if gateway is not None:
                print(f"OpenAI-compatible HTTP API on {gateway.url}", flush=True)
            await signals.first.wait()
            await _drain(coordinator.fleet.drain, config.drain_seconds, signals)
        finally:
            if gateway is not None:  # first: no HTTP request starts on a coordinator that is going away
                await gateway.stop()
            await coordinator.stop()

    asyncio.run(run())


@app.command(epilog=examples('coordinator generate "The capital of France is"',
                             'coordinator generate "Write a haiku" --chat --temperature 0.7 --max-tokens 40',
                             'coordinator generate "Once upon a time" --model smollm2@2 --endpoint 10.0.0.5:50051'))
def generate(prompt: str = typer.Argument(..., help="the prompt"),
             model: str = typer.Option("", help="the model (NAME or NAME@VERSION) when the cluster serves several",
                                       show_default="the cluster's default"),
             endpoint: str = endpoint_option(),
             max_tokens: int = typer.Option(64, help="tokens to generate at most"),
             temperature: float = typer.Option(1.0, help="0 = greedy"),
             top_k: int = typer.Option(0, help="0 = no limit"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
             seed: int | None = typer.Option(None, help="same seed, same text"),
             stop: list[str] = typer.Option([], help="stop sequence (repeatable)"),
             min_tokens: int = typer.Option(0, help="end-of-sequence and stop sequences count only after this "
                                            "many tokens"),
             ignore_eos: bool = typer.Option(False, help="run to --max-tokens past the end-of-sequence token"),
             chat: bool = typer.Option(False, help="send the prompt as a user message (chat template)"),
             timeout: float = typer.Option(300, help="deadline in seconds"),
             api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
             client_name: str = CLIENT_NAME) -> None:
    """Stream generated text to stdout."""
    from shardline.errors import ShardlineError

    params = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                  min_tokens=min_tokens, ignore_eos=ignore_eos, model=model)
    with _client(endpoint, 300, api_key, certs_dir, client_name) as client:
        try:
            chunks = (client.chat([{"role": "user", "content": prompt}], stream=True, timeout=timeout, **params)
                      if chat else client.generate(prompt, stream=True, timeout=timeout, **params))
            for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except ShardlineError as exc:
            _fail(explain(exc, endpoint))


@app.command(epilog=examples("coordinator embed \"A man is eating food.\" \"A man is riding a horse.\"",
                             "coordinator embed --file sentences.txt --truncate --model minilm > vectors.jsonl"))
def embed(texts: list[str] = typer.Argument(None, help="the texts (or --file)", show_default=False),
          file: Path | None = typer.Option(None, "--file", help="read the texts from this file, one a line"),
          model: str = typer.Option("", help="the encoder (NAME or NAME@VERSION) when the cluster serves several",
                                    show_default="the cluster's default"),
          truncate: bool = typer.Option(False, help="cut a text longer than the model's positions to them (and "
                                        "say how many were); without it such a text is refused"),
          pooling: str = typer.Option("mean", help="mean or cls"),
          normalize: bool = typer.Option(True, help="unit-length vectors"),
          endpoint: str = endpoint_option(),
          timeout: float = typer.Option(300, help="deadline in seconds"),
          api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
          client_name: str = CLIENT_NAME) -> None:
    """Embed texts with an encoder model such as minilm: one JSON line per text on stdout (index, embedding);
    the tokens processed, and the texts truncated, on stderr."""
    from shardline.errors import ShardlineError

    given = list(texts or [])
    if file is not None:
        try:
            given += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"{file}: {exc}")
    if not given:
        _fail("give the texts to embed, or --file FILE (one text a line)")
    with _client(endpoint, timeout, api_key, certs_dir, client_name) as client:
        try:
            found = client.embeddings(given, pooling=pooling, normalize=normalize, model=model, timeout=timeout,
                                      truncate=truncate)
        except ShardlineError as exc:
            _fail(explain(exc, endpoint))
            return
        except ValueError as exc:
            _fail(str(exc))
            return
    for i, vector in enumerate(found.vectors):
        sys.stdout.write(json.dumps({"index": i, "embedding": [round(float(x), 6) for x in vector]}) + "\n")
    cut = f"; {found.truncated} truncated to the model's positions" if found.truncated else ""
    print(f"{len(given)} embeddings of {found.vectors.shape[1]} floats, {found.tokens} tokens{cut}", file=sys.stderr)


@app.command(epilog=examples("coordinator status", "coordinator status --endpoint 10.0.0.5:50051"))
def status(endpoint: str = endpoint_option(),
           timeout: float = typer.Option(10, help="deadline in seconds"),
           api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
           client_name: str = CLIENT_NAME) -> None:
    """Workers, their layer ranges, memory, sessions and state, as a table; then each deployment (model
    version): its replicas, their chains of workers, streams and requests, and its last events."""
    from coordinator.cli.models import deployment_lines

    s = _cluster_status(endpoint, timeout, api_key, certs_dir, client_name)
    print(f"model {s.model}: {s.state}{' - ' + s.message if s.message else ''}; {s.active_sessions} active sessions")
    if s.recoveries:
        print(f"recoveries: {s.recoveries}; the last took {s.last_recovery_ms / 1000:.2f} s: {s.last_recovery}")
    entries, held, most, hits, misses = s.cache
    print(f"jobs: {s.jobs_off or f'{s.jobs_unfinished} unfinished, {s.job_items_running} items running'}; "
          + (f"result cache: {entries} entries, {held / 2**20:.1f} of {most / 2**20:.0f} MiB, {hits} hits, "
             f"{misses} misses" if most else "result cache: off (result_cache_mb)"))
    if not s.workers:
        print("no worker has registered yet: the cluster is starting (or its workers cannot reach it)")
    else:
        for line in worker_lines(s.workers):
            print(line)
    for line in deployment_lines(s):
        print(line)


def _cluster_status(endpoint: str, timeout: float, api_key: str | None, certs_dir: Path | None,
                    client_name: str) -> Any:
    """The cluster's status, or the command ends with one line saying why not."""
    from shardline.errors import ShardlineError

    with _client(endpoint, timeout, api_key, certs_dir, client_name) as client:
        try:
            return client.cluster_status()
        except ShardlineError as exc:
            _fail(explain(exc, endpoint))
            raise  # pragma: no cover - _fail exits


def worker_lines(workers: list[Any]) -> list[str]:
    """`status`'s tables: each worker (a lost one says so, not a stale heartbeat), then each stage's load."""
    lines = [f"{'worker':<22} {'state':<10} {'layers':<10} {'weights':>9} {'RSS':>9} {'offered':>9} "
             f"{'sessions':>8} {'KV cache':>9} {'heartbeat':>9}"]
    for w in workers:
        layers = f"[{w.start_layer}, {w.end_layer})" if w.end_layer else "-"
        if w.state == "lost" or not w.rss_bytes:  # no answer to the status call: nothing measured to show
            measured = f"{'-':>9} {'-':>9} {w.memory_budget_bytes / 2**20:>5.0f} MiB {'-':>8} {'-':>9}"
        else:
            measured = (f"{w.weight_bytes / 2**20:>5.0f} MiB {w.rss_bytes / 2**20:>5.0f} MiB "
                        f"{w.memory_budget_bytes / 2**20:>5.0f} MiB {w.sessions:>8} "
                        f"{w.kv_cache_bytes / 2**20:>5.1f} MiB")
        heartbeat = f"{'lost':>9}" if w.state == "lost" else f"{w.last_heartbeat_age_ms / 1000:>7.1f} s"
        lines.append(f"{w.address:<22} {w.state:<10} {layers:<10} {measured} {heartbeat}"
                     + (f"  {w.last_error}" if w.last_error else ""))
    lines.append(f"\n{'stage':<22} {'busy':>9} {'idle':>9} {'busy %':>7} {'queue':>6} {'in':>10} {'out':>10} "
                 f"{'tokens/s':>9}")
    for w in workers:
        if w.state == "lost":
            continue
        up = w.busy_ms + w.idle_ms
        lines.append(f"{w.address:<22} {w.busy_ms / 1000:>7.1f} s {w.idle_ms / 1000:>7.1f} s "
                     f"{100 * w.busy_ms / up if up else 0:>6.1f}% {w.queue_depth:>6} {w.bytes_in / 2**20:>6.1f} MiB "
                     f"{w.bytes_out / 2**20:>6.1f} MiB {w.tokens_per_second:>9.1f}")
    return lines + device_lines(workers)


def device_lines(workers: list[Any]) -> list[str]:
    """`status`'s device table: where each worker computes, in what dtype, and its device memory (a CPU
    worker's: the host's RAM); none when no worker said (older workers)."""
    shown = [w for w in workers if getattr(w, "device", "")]
    if not shown:
        return []
    lines = [f"\n{'worker':<22} {'device':<8} {'dtype':<9} {'engine':<9} {'free / total memory':>21}  name"]
    for w in shown:
        memory = (f"{w.device_memory_free_bytes / 2**30:>6.1f} / {w.device_memory_total_bytes / 2**30:>6.1f} GiB"
                  if w.device_memory_total_bytes else "-")
        lines.append(f"{w.address:<22} {w.device:<8} {w.dtype or '-':<9} {w.engine or 'torch':<9} {memory:>21}  "
                     f"{w.device_name}")
    return lines


@app.command("drain-worker", epilog=examples("coordinator drain-worker 127.0.0.1:41234"))
def drain_worker(address: str = typer.Argument(..., help="HOST:PORT the worker registered with"),
                 endpoint: str = endpoint_option(),
                 timeout: float = typer.Option(600, help="deadline in seconds"),
                 api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
                 client_name: str = CLIENT_NAME) -> None:
    """Move a worker's layers to a spare (or re-plan onto the others) without failing a request; the worker
    then holds no stage and can be stopped."""
    from shardline.errors import ShardlineError

    with _client(endpoint, timeout, api_key, certs_dir, client_name) as client:
        try:
            print(client.drain_worker(address))
        except ShardlineError as exc:
            _fail(explain(exc, endpoint))


@app.command(epilog=examples("coordinator rebalance"))
def rebalance(endpoint: str = endpoint_option(),
              timeout: float = typer.Option(600, help="deadline in seconds"),
              api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
              client_name: str = CLIENT_NAME) -> None:
    """Re-plan onto up to the configured number of workers, folding in spares; streams migrate by replay. With
    calibrations: the fastest set of current and spare workers (the explicit re-plan when one joins)."""
    from shardline.errors import ShardlineError

    with _client(endpoint, timeout, api_key, certs_dir, client_name) as client:
        try:
            print(client.rebalance())
        except ShardlineError as exc:
            _fail(explain(exc, endpoint))


@app.command(epilog=examples("coordinator plan", "coordinator plan --explain --endpoint 10.0.0.5:50051"))
def plan(explain_: bool = typer.Option(False, "--explain", help="per stage: the worker's measured time per layer, "
                                       "its layers, the predicted compute and hop times, memory used and offered"),
         endpoint: str = endpoint_option(),
         timeout: float = typer.Option(10, help="deadline in seconds"),
         api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
         client_name: str = CLIENT_NAME) -> None:
    """A running coordinator's plan of every replica: which worker holds which layers, on what basis (measured
    time, or weight bytes and why); with --explain, why each range. `coordinator rebalance` re-plans."""
    s = _cluster_status(endpoint, timeout, api_key, certs_dir, client_name)
    replicas = [r for d in s.deployments for r in d.replicas]
    if not replicas:
        print(f"nothing is planned: {s.state}{' - ' + s.message if s.message else ''}")
    for r in replicas:
        print(f"{r.name}: {r.state}; planned by {r.plan_basis or 'nothing yet'}")
        for line in plan_lines(r.plan, explain_):
            print(line)


def plan_lines(stages: Any, explained: bool) -> list[str]:
    """`coordinator plan`'s table: each stage's worker and layers; explained, why (measured and predicted)."""
    head = f"  {'worker':<22} {'layers':<10}"
    if explained:
        head += (f" {'s/layer':>9} {'threads':>7} {'compute':>9} {'hop':>9} {'stage':>9} {'RTT':>9} "
                 f"{'bandwidth':>12} {'weights':>11} {'offered':>11}")
    lines = [head] if stages else []
    for p in stages:
        line = f"  {p.worker:<22} {f'[{p.start_layer}, {p.end_layer})':<10}"
        if explained:
            measured = p.seconds_per_layer > 0
            spl = f"{p.seconds_per_layer * 1000:>6.2f} ms" if measured else f"{'-':>9}"
            bandwidth = f"{p.bandwidth_bytes_per_s / 2**20:>7.0f} MiB/s" if p.bandwidth_bytes_per_s else f"{'-':>12}"
            def ms(seconds: float, measured: bool = measured) -> str:
                return f"{seconds * 1000:>6.2f} ms" if measured else f"{'-':>9}"

            line += (f" {spl} {p.threads or '-':>7} {ms(p.compute_s)} {ms(p.hop_s)} "
                     f"{ms(p.compute_s + p.hop_s)} {ms(p.rtt_s)} {bandwidth} "
                     f"{p.weight_bytes / 2**20:>7.1f} MiB {p.memory_budget_bytes / 2**20:>7.0f} MiB")
        lines.append(line)
    return lines


@app.command(epilog=examples("coordinator http --endpoint 127.0.0.1:50051 --port 8000",
                             "curl http://127.0.0.1:8000/v1/models"))
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
         log_level: str = log_level_option()) -> None:
    """Run the OpenAI-compatible HTTP API alone, in front of a coordinator elsewhere (`serve` and `launch`
    start one beside theirs: --http-port). Callers' `Authorization: Bearer` keys go on to the coordinator."""
    from coordinator.api.http_gateway import GatewaySettings, exposure_checked, start_gateway
    from shardline.limits import is_host_port
    from shardline.server import Signals
    from shardline.tls import ClientTLS, TLSFilesError

    configure_logging(log_level)
    if not is_host_port(endpoint):
        _fail(f"--endpoint must be HOST:PORT, got {endpoint!r}")
    if (tls_cert is None) != (tls_key is None):
        _fail("give --tls-cert and --tls-key together (HTTPS), or neither")
    tls = ClientTLS.from_certs_dir(certs_dir, client_name) if certs_dir is not None else None
    settings = GatewaySettings(endpoint, host, port, tls, tls_cert, tls_key, max_body_bytes=max_body_bytes,
                               timeout_s=timeout)

    async def run() -> None:
        signals = Signals()
        try:
            await exposure_checked(settings, insecure)
            gateway = await start_gateway(settings)
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


def _check_ports(config: CoordinatorConfig) -> None:
    """Before anything starts: the ports this coordinator will listen on are free (one line if not)."""
    import socket

    ports = [("--port", config.port)] + ([("--cluster-port", config.cluster_port)] if config.certs_dir else []) \
        + ([("--http-port", config.http_port)] if config.http else []) \
        + ([("--parameters-port", config.parameters_port)] if not config.parameters_address else [])
    if config.metrics_port is not None:
        ports.append(("--metrics-port", config.metrics_port))
    for flag, port in ports:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
            try:
                s.bind((config.host, port))
            except OSError as exc:
                why = "is in use (another cluster?)" if exc.errno == errno.EADDRINUSE else \
                    f"cannot be used ({exc.strerror})"
                _fail(f"cannot listen on {config.host}:{port}: the port {why}; choose another with {flag}")


async def _start_http(config: CoordinatorConfig, port: int) -> Any:
    """The OpenAI-compatible HTTP gateway beside the coordinator (None with --no-http); a port or exposure
    problem ends the command with one line."""
    from coordinator.api.http_gateway import start_beside

    try:
        return await start_beside(config, port)
    except OSError as exc:
        _fail(f"{exc}; choose another port with --http-port, or turn HTTP off with --no-http")
    except ValueError as exc:
        _fail(f"{exc} (or turn HTTP off with --no-http)")


app.add_typer(models, name="models")
app.add_typer(jobs, name="jobs")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
