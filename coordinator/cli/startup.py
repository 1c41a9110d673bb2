"""What the commands that start servers share (`parameters`, `launch`, `serve`): their options' help, the
config from their flags, the checks before anything starts (the ports free, the model in the store: a built-in
is imported once), the OpenAI-compatible HTTP API beside the coordinator, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any

from coordinator.cli.common import _fail
from coordinator.config import CoordinatorConfig, checked, database_name
from coordinator.store.models import ModelStore, default_store

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
WIRE_DTYPE_HELP = ("the dtype hidden states travel between stages in: float32, float16, bfloat16, or int8 (a scale "
                   "per row); each stage converts on receipt (README \"Compressed activations and weights\")")
QUANTIZE_HELP = "int8: weight-only int8 quantization of the layers' linear weights at load (about half the memory)"


def coordinator_config(store: Path | None, **fields: object) -> CoordinatorConfig:
    """The coordinator's config from a command's flags (in the default store unless one is given)."""
    return checked(lambda: CoordinatorConfig(store=store or default_store(), **fields))  # type: ignore[arg-type]


def resolve_model(model: str, store: Path | None) -> tuple[Path | None, str]:
    """--model is a name in the store, or a store directory of one model."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        return path.parent, path.name
    return store, model


async def ensure_model(store: ModelStore, model: str) -> None:
    """The model is in the store before serving: a built-in is imported once; another one ends the command."""
    if store.has(model):  # before the importer's imports (torch): a restart comes back sooner
        return
    from coordinator.store.importer import (
        BUILTIN,
        BUILTIN_ENCODER,
        builtin_encoder_dir,
        builtin_gguf,
        import_gguf,
        import_hf_dir,
    )

    began = time.perf_counter()
    if model == BUILTIN:
        print(f"importing the built-in SmolLM2-135M-Instruct into {store.root} (once): dequantizing its GGUF "
              "file", flush=True)
        await asyncio.to_thread(import_gguf, store, builtin_gguf(), model, ImportLines())
    elif model == BUILTIN_ENCODER:
        print(f"importing the built-in all-MiniLM-L6-v2 into {store.root} (once)", flush=True)
        await asyncio.to_thread(import_hf_dir, store, builtin_encoder_dir(), model, ImportLines())
    else:
        _fail(f"model {model!r} is not in the store {store.root} (models: {store.models() or 'none'}); "
              "add it with `coordinator import`")
    print(f"  imported in {time.perf_counter() - began:.1f} s", flush=True)


class ImportLines:
    """An import's progress as launch shows loading: a line at each quarter of the bytes written."""

    def __init__(self) -> None:
        self.shown = 0

    def __call__(self, written: int, total: int) -> None:
        percent = 100 * written // total if total else 100
        if percent // 25 > self.shown // 25:
            self.shown = percent
            print(f"  writing its weights: {percent:3d}% of {total / 2**20:.0f} MiB", flush=True)


async def drain_unless_stopped(drain: Any, grace_s: float, signals: Any) -> None:
    """Drain (within `grace_s`), unless a second signal says stop now."""
    print(f"draining: no new requests; the streams in flight have {grace_s:.0f} s to finish "
          "(signal again to stop now)", flush=True)
    draining = asyncio.ensure_future(drain(grace_s))
    now = asyncio.ensure_future(signals.second.wait())
    await asyncio.wait({draining, now}, return_when=asyncio.FIRST_COMPLETED)
    for task in (draining, now):
        task.cancel()


def free_port(host: str) -> int:
    """A port free on `host` now: for a port `launch` owns that its workers must know before it listens."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def bind_error(host: str, port: int) -> OSError | None:
    """Why `port` on `host` cannot be listened on now (None: it can), binding as servers do."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc
    return None


def port_free(host: str, port: int) -> bool:
    return bind_error(host, port) is None


def jobs_held(directory: Path) -> bool:
    """Whether another coordinator runs the jobs of `directory` now (it holds their lock)."""
    import fcntl

    lock = directory / "jobs.lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def check_jobs_db(url: str) -> str:
    """Why the shared jobs database cannot be used (one line naming it), or "" when it answers."""
    try:
        import psycopg

        from coordinator.jobs.postgres import JobsUnavailable, PostgresJobs
    except ImportError as exc:
        return f"--jobs-db needs psycopg ({exc}): install shardline's ha extra (pip install '.[ha]')"
    try:
        PostgresJobs(url).close()  # connects, and creates the tables the first time
    except JobsUnavailable as exc:
        return exc.message
    except psycopg.Error as exc:  # it answered, and refused (no right to create the tables, say)
        return f"the jobs database {database_name(url)} refused: {' '.join(str(exc).split())}"
    return ""


def check_ports(config: CoordinatorConfig) -> None:
    """Before anything starts: the ports this coordinator will listen on are free (one line if not)."""
    ports = [("--port", config.port)] + ([("--cluster-port", config.cluster_port)] if config.certs_dir else []) \
        + ([("--http-port", config.http_port)] if config.http else []) \
        + ([("--parameters-port", config.parameters_port)] if not config.parameters_address else [])
    if config.metrics_port is not None:
        ports.append(("--metrics-port", config.metrics_port))
    for flag, port in ports:
        exc = bind_error(config.host, port) if port else None
        if exc is not None:
            why = "is in use (another cluster?)" if exc.errno == errno.EADDRINUSE else \
                f"cannot be used ({exc.strerror})"
            _fail(f"cannot listen on {config.host}:{port}: the port {why}; choose another with {flag}")


async def start_http(config: CoordinatorConfig, port: int, *standbys: int) -> Any:
    """The OpenAI-compatible HTTP gateway beside the coordinator (None with --no-http); a port or exposure
    problem ends the command with one line."""
    from coordinator.api.http_launch import start_beside

    try:
        return await start_beside(config, port, *standbys)
    except OSError as exc:
        _fail(f"{exc}; choose another port with --http-port, or turn HTTP off with --no-http")
    except ValueError as exc:
        _fail(f"{exc} (or turn HTTP off with --no-http)")
