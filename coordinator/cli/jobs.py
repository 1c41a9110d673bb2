"""`coordinator jobs`: submit a job file (JSON Lines, one request per line), follow it, fetch its results,
cancel it (the jobs API, through the SDK)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from coordinator.cli.common import API_KEY_OPTION, CLIENT_CERTS_DIR, CLIENT_NAME, _connected, _fail
from shardline.cli_options import endpoint_option, examples, typer_app

jobs = typer_app("Asynchronous jobs: a file of requests run in the background; results fetched later.",
                 epilog=examples("coordinator jobs submit prompts.jsonl --wait", "coordinator jobs status",
                                 "coordinator jobs results JOB_ID -o out.jsonl"))
ENDPOINT = endpoint_option()
TIMEOUT = typer.Option(30, help="deadline of each call, in seconds")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def describe(s: Any) -> list[str]:
    """A job's status as lines."""
    lines = [f"{s.job_id}  {s.state}  {s.done}/{s.total} done" + (f", {s.failed} failed" if s.failed else "")
             + (f", {s.cancelled} cancelled" if s.cancelled else "") + (f", {s.cached} cached" if s.cached else "")]
    ended = f"; finished {_when(s.finished_at)}; results kept until {_when(s.expires)}" if s.finished_at else ""
    lines.append(f"  models: {', '.join(s.models)}; created {_when(s.created)}{ended}")
    if s.label:
        lines.append(f"  label: {s.label}")
    if s.message:
        lines.append(f"  {s.message}")
    return lines


@jobs.command(epilog=examples("coordinator jobs submit requests.jsonl --wait",
                              "coordinator jobs submit texts.jsonl --model minilm --label nightly"))
def submit(file: Path = typer.Argument(..., help="a JSON Lines file: one request per line (prompt or messages, "
                                       "max_tokens, temperature, seed, ...; or texts for an embedding model)"),
           model: str = typer.Option("", help="the model of lines that name none",
                                      show_default="the cluster's default"),
           label: str = typer.Option("", help="a label shown in listings", show_default="the file's name"),
           wait: bool = typer.Option(False, help="follow the job until it finishes"),
           wait_timeout: float = typer.Option(86400, help="with --wait: give up following after this many seconds "
                                              "(the job goes on)"),
           endpoint: str = ENDPOINT, timeout: float = TIMEOUT, api_key: str | None = API_KEY_OPTION,
           certs_dir: Path | None = CLIENT_CERTS_DIR, client_name: str = CLIENT_NAME) -> None:
    """Store a job; prints its id at once. Every line is checked first: one bad line refuses the job."""
    from shardline.errors import InvalidArgument
    from shardline.jobs import items_from_jsonl

    try:
        items = items_from_jsonl(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{file}: {exc}")
    except InvalidArgument as exc:
        _fail(f"{file}: {exc.message}")
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        job_id = client.submit_job(items, model=model, label=label or file.name)
        typer.echo(job_id)
        if wait:
            _follow(client, job_id, wait_timeout)


def _follow(client: Any, job_id: str, timeout: float) -> None:
    shown = ""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job(job_id)
        line = f"{status.state}: {status.done + status.failed}/{status.total}"
        if line != shown:
            typer.echo(line, err=True)
            shown = line
        if status.finished:
            for out in describe(status):
                typer.echo(out)
            return
        if time.monotonic() >= deadline:
            _fail(f"job {job_id} has not finished after {timeout:.0f} s; it goes on (`coordinator jobs status "
                  f"{job_id}`)")
        time.sleep(0.5)


@jobs.command(epilog=examples("coordinator jobs status", "coordinator jobs status JOB_ID"))
def status(job_id: str = typer.Argument("", help="a job's id", show_default="list your jobs"),
           endpoint: str = ENDPOINT, timeout: float = TIMEOUT, api_key: str | None = API_KEY_OPTION,
           certs_dir: Path | None = CLIENT_CERTS_DIR, client_name: str = CLIENT_NAME) -> None:
    """A job's progress, or (without an id) your jobs, newest first."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        found = [client.get_job(job_id)] if job_id else client.list_jobs()
    if not found:
        typer.echo("no jobs (submit one with `coordinator jobs submit FILE.jsonl`)")
    for s in found:
        for line in describe(s):
            typer.echo(line)


@jobs.command(epilog=examples("coordinator jobs results JOB_ID -o results.jsonl"))
def results(job_id: str = typer.Argument(..., help="the job's id"),
            output: Path | None = typer.Option(None, "--output", "-o", help="write the results here",
                                          show_default="stdout"),
            endpoint: str = ENDPOINT, timeout: float = TIMEOUT, api_key: str | None = API_KEY_OPTION,
            certs_dir: Path | None = CLIENT_CERTS_DIR, client_name: str = CLIENT_NAME) -> None:
    """The job's results as JSON Lines, one per item in order.

    Each line: index, custom_id, state, and text, token_ids, finish_reason, usage (embeddings for infer
    items; error for failed ones)."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        found = client.job_results(job_id)
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in found)
    if output is None:
        sys.stdout.write(lines)
    else:
        output.write_text(lines, encoding="utf-8")
        typer.echo(f"{len(found)} results written to {output}", err=True)


@jobs.command(epilog=examples("coordinator jobs cancel JOB_ID"))
def cancel(job_id: str = typer.Argument(..., help="the job's id"),
           endpoint: str = ENDPOINT, timeout: float = TIMEOUT, api_key: str | None = API_KEY_OPTION,
           certs_dir: Path | None = CLIENT_CERTS_DIR, client_name: str = CLIENT_NAME) -> None:
    """Stop a job: items not finished are cancelled; finished ones keep their results."""
    with _connected(endpoint, timeout, api_key, certs_dir, client_name) as client:
        s = client.cancel_job(job_id)
    for line in describe(s):
        typer.echo(line)
