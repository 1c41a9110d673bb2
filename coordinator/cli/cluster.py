"""`coordinator status`, `plan`, `drain-worker` and `rebalance`: a running cluster's workers, replicas and
plan (tables.py lays out the tables), and moving layers between its workers (the admin API, through the SDK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from coordinator.cli.common import API_KEY_OPTION, CLIENT_CERTS_DIR, CLIENT_NAME, _client, _fail, explain
from coordinator.cli.tables import deployment_lines, plan_lines, worker_lines
from shardline.cli_options import endpoint_option


def status(endpoint: str = endpoint_option(),
           timeout: float = typer.Option(10, help="deadline in seconds"),
           api_key: str | None = API_KEY_OPTION, certs_dir: Path | None = CLIENT_CERTS_DIR,
           client_name: str = CLIENT_NAME) -> None:
    """Workers, their layer ranges, memory, sessions and state, as a table; then each deployment (model
    version): its replicas, their chains of workers, streams and requests, and its last events."""
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
            _fail(explain(exc, endpoint, certs_dir))
            raise  # pragma: no cover - _fail exits


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
            _fail(explain(exc, endpoint, certs_dir))


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
            _fail(explain(exc, endpoint, certs_dir))


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
