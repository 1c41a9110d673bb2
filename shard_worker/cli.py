"""`shard-worker serve`: one shard worker on the address it is told."""

from __future__ import annotations

import asyncio
import logging

import typer

from shard_worker.server import serve_forever

app = typer.Typer(add_completion=False, no_args_is_help=True, help="shardline shard worker")


@app.callback()
def _root() -> None:
    """shardline shard worker."""


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(0, help="port (0 = a free one, printed on start)"),
          log_level: str = typer.Option("INFO", help="logging level"),
          coordinator: str = typer.Option("", help="HOST:PORT of a coordinator to register with; it then sends "
                                          "this worker its shard"),
          advertise: str = typer.Option("", help="host the coordinator reaches this worker on (default: --host)"),
          memory_budget_mb: int = typer.Option(0, help="memory offered for weights (default: 80% of available)"),
          parent_pid: int = typer.Option(0, help="exit when this process is gone (used by the launcher)")) -> None:
    """Serve the ShardWorker API; a coordinator (or the launcher) then sends it a shard to load."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve_forever(host, port, parent_pid, coordinator, advertise, memory_budget_mb * 2**20))
    except KeyboardInterrupt:
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
