"""`shard-worker serve`: one shard worker on the address it is told."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import typer

from shard_worker.allocator import give_back_freed_memory
from shard_worker.device import DeviceSettings, check_dtype, parse_device, set_compute_threads
from shard_worker.engine import check_engine
from shard_worker.server import serve_forever
from shardline import tracing
from shardline.auth import ClusterIdentity
from shardline.cli_options import (
    configure_logging,
    examples,
    hidden_alias,
    log_level_option,
    memory_option,
    typer_app,
    version_option,
)
from shardline.limits import MemoryBoundTooSmall
from shardline.server import Keepalive, check_exposure
from shardline.stream import LinkSettings

app = typer_app("shardline shard worker: hosts a contiguous range of a model's layers for a coordinator.",
                epilog=examples("shard-worker serve --coordinator 127.0.0.1:50051", "shard-worker serve --help"))


@app.callback()
def _root(version: bool = version_option()) -> None:
    """shardline shard worker."""


@app.command(epilog=examples("shard-worker serve --coordinator 10.0.0.1:50051 --host 0.0.0.0 --advertise 10.0.0.7",
                             "shard-worker serve --coordinator 10.0.0.1:50053 --certs-dir ./certs",
                             "shard-worker serve --coordinator 127.0.0.1:50051 --worker-memory-mb 2048"))
def serve(host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(0, min=0, max=65535, help="port (0 = a free one, printed on start)"),
          log_level: str = log_level_option(),
          coordinator: str = typer.Option("", help="HOST:PORT of a coordinator to register with (standbys: "
                                          "A,B); it then sends this worker its shard"),
          advertise: str = typer.Option("", help="host the coordinator reaches this worker on",
                                        show_default="--host"),
          worker_memory_mb: int = memory_option(),
          memory_budget_mb: int | None = hidden_alias("--memory-budget-mb"),
          step_timeout_ms: int = typer.Option(60_000, min=100, help="deadline of a step passed on to the next "
                                              "stage, when the sender gives none"),
          keepalive_ms: int = typer.Option(20_000, min=1000, help="ping idle connections this often"),
          leave_timeout_s: float = typer.Option(120, min=0, help="on SIGTERM, how long to wait for the "
                                                "coordinator to hand this worker's stage over"),
          certs_dir: Path | None = typer.Option(None, help="TLS on every link with this certificates directory "
                                                "(ca.crt, node.crt, node.key): only nodes of the cluster may call"),
          cluster_token_file: Path | None = typer.Option(None, help="without TLS: a file holding the cluster "
                                                         "token; only callers that send it may drive this worker"),
          insecure: bool = typer.Option(False, help="allow serving on a non-loopback address without TLS"),
          otlp_endpoint: str = typer.Option("", help="export a span per traced step with OTLP/gRPC to this "
                                            "collector (http://HOST:4317)",
                                            show_default="$OTEL_EXPORTER_OTLP_ENDPOINT, else off"),
          metrics_port: int | None = typer.Option(None, min=0, max=65535, help="serve Prometheus metrics at "
                                                  "http://HOST:PORT/metrics on --host (0 = a free one, printed)",
                                                  show_default="off"),
          device: str = typer.Option("cpu", help="where the stage runs: cpu, cuda (= cuda:0) or cuda:N"),
          dtype: str = typer.Option("", help="compute dtype: float32, bfloat16 or float16; it wins over the "
                                    "dtype a LoadShard asks for", show_default="the LoadShard's, else float32"),
          engine: str = typer.Option("torch", help="stage engine: torch, or deepspeed (CUDA only; needs "
                                     "shardline's deepspeed extra installed)"),
          tp: int = typer.Option(1, help="tensor-parallel GPUs of one stage (--engine deepspeed; only 1 so far)"),
          compute_threads: int = typer.Option(0, min=0, help="torch's compute threads in this process "
                                              "(torch.set_num_threads); 0 = torch's default", show_default="0"),
          parent_pid: int = typer.Option(0, help="exit when this process is gone (used by the launcher)")) -> None:
    """Serve the ShardWorker API; a coordinator (or the launcher) then sends it a shard to load."""
    configure_logging(log_level)
    if memory_budget_mb is not None:  # the flag's old name
        worker_memory_mb = worker_memory_mb or memory_budget_mb
    try:
        settings = device_settings(device, dtype, engine, tp)  # before anything starts: one line if it cannot run
        identity = ClusterIdentity.from_files(certs_dir, cluster_token_file)
        check_exposure(host, identity.tls, identity.tls, insecure, "shard worker")
        tracing.configure(otlp_endpoint, "shardline-worker")
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    if worker_memory_mb and settings.device.type == "cpu":  # the bound is the process's: RSS must follow use
        give_back_freed_memory()  # before the server's threads start (allocator.py: ~5% of decode speed)
    if compute_threads:
        set_compute_threads(compute_threads)  # the intended count, which every worker thread is given
    if settings.device.type == "cuda":  # this thread's current device: not a context on cuda:0 as well
        import torch

        torch.cuda.set_device(settings.device)
    try:
        links = LinkSettings(step_timeout_ms=step_timeout_ms, keepalive=Keepalive(time_ms=keepalive_ms),
                             identity=identity)
        asyncio.run(serve_forever(host, port, parent_pid, coordinator, advertise, worker_memory_mb * 2**20, links,
                                  leave_timeout_s, metrics_port, settings))
    except KeyboardInterrupt:
        pass
    except (OSError, MemoryBoundTooSmall) as exc:  # a metrics port taken, a memory bound below the runtime: one line
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None


def device_settings(device: str, dtype: str, engine: str, tp: int) -> DeviceSettings:
    """--device, --dtype, --engine and --tp, checked (DeviceError, a ValueError, names what is missing)."""
    where = parse_device(device)
    if dtype:
        check_dtype(where, dtype)
    check_engine(engine, where, tp)
    return DeviceSettings(where, dtype, engine, tp)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
