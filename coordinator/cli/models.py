"""`coordinator models`: the store's models (without a subcommand), and what a running cluster serves:
list, load, unload, scale, promote (the admin API's model management, through the SDK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from coordinator.cli.common import (
    API_KEY_OPTION,
    CLIENT_CERTS_DIR,
    CLIENT_NAME,
    STORE_DEFAULT,
    STORE_HELP,
    _connected,
    _fail,
    _store,
)
from shardline.cli_options import endpoint_option, examples, typer_app

models = typer_app("The store's models (without a command); with a command, what a running cluster serves.",
                   invoke_without_command=True, no_args_is_help=False)
NEGATIVE_OK = {"ignore_unknown_options": True}  # `scale NAME -1` reaches the server (which says why not)


@models.callback(epilog=examples("coordinator models", "coordinator models --store /data/shardline",
                                 "coordinator models list"))
def store_models(ctx: typer.Context,
                 store: Path | None = typer.Option(None, help=STORE_HELP, show_default=STORE_DEFAULT)) -> None:
    """List the models in the store; `coordinator models list` lists what a running cluster serves."""
    if ctx.invoked_subcommand is not None:
        return
    for line in store_table(_store(store)):
        typer.echo(line)


def store_table(store: Any) -> list[str]:
    """The store's models under a header: SIZE is the files', LOADED what the workers hold together (a tied
    embedding is loaded twice: by the first stage as input embedding and by the last as output head)."""
    from coordinator.fleet.planner import layer_costs

    names = store.models()
    if not names:
        where = "is empty" if store.root.is_dir() else "does not exist yet"
        return [f"no models: the store {store.root} {where} (add one with `coordinator import smollm2`, or "
                "`coordinator launch` imports it)"]
    header = ("NAME", "FAMILY", "LAYERS", "SIZE", "LOADED")
    rows, tied = [], False
    for name in names:
        m = store.manifest(name)
        loaded = sum(layer_costs(m))
        tied = tied or loaded != m.total_size_bytes
        rows.append((name, m.family, str(m.num_layers), f"{m.total_size_bytes / 2**20:.1f} MiB",
                     f"{loaded / 2**20:.1f} MiB" + (" *" if loaded != m.total_size_bytes else "")))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in [header, *rows]]
    lines.append(f"store: {store.root} (what a running cluster serves: `coordinator models list`)")
    if tied:
        lines.append("* LOADED is more than SIZE: the tied embedding is loaded twice, by the first stage (input "
                     "embedding) and by the last (output head), as plans count it")
    return lines


@models.command("list", epilog=examples("coordinator models list", "coordinator models list --endpoint 10.0.0.5:50051"))
def list_(endpoint: str = endpoint_option(),
          timeout: float = typer.Option(10, help="deadline in seconds"),
          api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
          client_name: str = CLIENT_NAME) -> None:
    """What the cluster serves: each model version, its task, replicas ready/wanted and state ('*': the
    version a request naming only NAME gets)."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        served = client.list_models()
    for line in model_table(served):
        typer.echo(line)


def model_table(served: list[Any]) -> list[str]:
    """ListModels' models as aligned lines under a header."""
    if not served:
        return ["no model is served (load one with `coordinator models load NAME`)"]
    header = ("NAME", "VERSION", "DEFAULT", "TASK", "REPLICAS", "STATE", "CONTEXT")
    rows = [(m.name, m.version, "*" if m.is_default else "", m.task, f"{m.replicas_ready}/{m.replicas}", m.state,
             str(m.context_tokens)) for m in sorted(served, key=lambda m: (m.name, m.version))]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


@models.command(epilog=examples("coordinator models load smollm2-360m --workers 2",
                                "coordinator models load smollm2@2 --source smollm2-v2 --promote",
                                "coordinator models load smollm2 --min-replicas 1 --max-replicas 3"))
def load(name: str = typer.Argument(..., help="the name requests use (NAME, or NAME@VERSION)"),
         version: str = typer.Option("", help="the version", show_default="1"),
         source: str = typer.Option("", help="the model in the coordinator's store to deploy",
                                     show_default="NAME"),
         replicas: int = typer.Option(1, help="pipeline replicas"),
         workers: int = typer.Option(0, help="stages (workers) of one replica (0 = the coordinator's default)"),
         promote: bool = typer.Option(False, help="once it serves, make it the default version of NAME"),
         min_replicas: int = typer.Option(0, help="autoscaling: the fewest replicas"),
         max_replicas: int = typer.Option(0, help="autoscaling (on when > 0): the most replicas"),
         target_queue: float = typer.Option(0, help="autoscaling: streams waiting per replica that add one (0 = 4)"),
         endpoint: str = endpoint_option(),
         timeout: float = typer.Option(600, help="deadline in seconds (the call returns once a replica serves)"),
         api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
         client_name: str = CLIENT_NAME) -> None:
    """Deploy a model of the coordinator's store as NAME@VERSION on free workers while everything else serves;
    returns once a replica serves."""
    if "@" in name:
        name, _, given = name.partition("@")
        if version and version != given:
            _fail(f"the version is given twice: {name}@{given} and --version {version}")
        version = given
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        message = client.load_model(name, version=version, source=source, replicas=replicas, workers=workers,
                                    promote=promote, min_replicas=min_replicas, max_replicas=max_replicas,
                                    target_queue=target_queue, timeout=timeout)
    typer.echo(message)


@models.command(epilog=examples("coordinator models unload smollm2@2", "coordinator models unload tiny "
                                "--grace-seconds 0"))
def unload(model: str = typer.Argument(..., help="NAME@VERSION (or NAME: its default version)"),
           grace_seconds: float | None = typer.Option(None, help="how long its streams may finish (0: none may); "
                                                      "the rest fail", show_default="the coordinator's unload_grace_s"),
           endpoint: str = endpoint_option(),
           timeout: float = typer.Option(600, help="deadline in seconds"),
           api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
           client_name: str = CLIENT_NAME) -> None:
    """Drain a deployment, then unload it from its workers, which return to the pool."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        message, freed = client.unload_model(model, grace_s=grace_seconds, timeout=timeout)
    typer.echo(message)
    typer.echo(f"freed {freed / 2**20:.1f} MiB")


@models.command(context_settings=NEGATIVE_OK, epilog=examples("coordinator models scale smollm2 3"))
def scale(model: str = typer.Argument(..., help="NAME@VERSION (or NAME: its default version)"),
          replicas: int = typer.Argument(..., help="the number of replicas it should have"),
          grace_seconds: float | None = typer.Option(None, help="scaling down: how long the removed replicas' "
                                                     "streams may finish before they move to another replica "
                                                     "by replay", show_default="the coordinator's unload_grace_s"),
          endpoint: str = endpoint_option(),
          timeout: float = typer.Option(600, help="deadline in seconds (replicas removed are drained first)"),
          api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
          client_name: str = CLIENT_NAME) -> None:
    """Give a deployment this many replicas: new ones go on free workers; removed ones are drained first
    (their streams finish, or move to another replica by replay)."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        typer.echo(client.scale_model(model, replicas, grace_s=grace_seconds, timeout=timeout))


@models.command(epilog=examples("coordinator models promote smollm2@2"))
def promote(model: str = typer.Argument(..., help="NAME@VERSION"),
            endpoint: str = endpoint_option(),
            timeout: float = typer.Option(30, help="deadline in seconds"),
            api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
            client_name: str = CLIENT_NAME) -> None:
    """Make NAME@VERSION the default of NAME, atomically: requests in flight finish on their version."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        previous = client.promote_model(model, timeout=timeout)
    typer.echo(f"{model} is the default (was version {previous})" if previous else f"{model} is the default")
