"""`coordinator`: import models into the store, run the parameter service, launch a local cluster, and use
it. This module is the command table: each command's name, its function (in the module of its role) and
its examples, in the order `coordinator --help` lists them."""

from __future__ import annotations

from coordinator.cli.cluster import drain_worker, plan, rebalance, status
from coordinator.cli.importing import import_
from coordinator.cli.inference import embed, generate
from coordinator.cli.jobs import jobs
from coordinator.cli.launch import launch
from coordinator.cli.models import models
from coordinator.cli.security import api_keys, certs, health
from coordinator.cli.standalone import http, parameters, serve
from shardline.cli_options import examples, typer_app, version_option

app = typer_app("shardline coordinator: import models, launch a local cluster or serve one, and use it (generate, "
                "embed, status, models, jobs).",
                epilog=examples("coordinator launch", 'coordinator generate "The capital of France is" --temperature 0',
                                "coordinator status", "coordinator <command> --help"))


@app.callback()
def _root(version: bool = version_option()) -> None:
    """shardline coordinator."""


app.add_typer(certs, name="certs")
app.add_typer(api_keys, name="api-keys")
app.command("health", epilog=examples("coordinator health --endpoint 127.0.0.1:50051",
                                      "coordinator health --endpoint node1:50051 --certs-dir ./certs"))(health)
app.command("import", epilog=examples("coordinator import smollm2", "coordinator import minilm",
                                      "coordinator import ./SmolLM2-360M-Instruct --name smollm2-360m",
                                      "coordinator import --random llama --layers 8 --tokenizer smollm2 "
                                      "--name tiny"))(import_)
app.command(epilog=examples("coordinator parameters --port 50052", "coordinator serve --parameters "
                            "127.0.0.1:50052   (a coordinator that uses it)"))(parameters)
app.command(epilog=examples("coordinator launch", "coordinator launch --model smollm2 --workers 3 --port 50061",
                            "coordinator launch --model smollm2 --model minilm --workers 1",
                            "coordinator launch --secure --host 0.0.0.0 --log-level DEBUG"))(launch)
app.command(epilog=examples("coordinator serve --model smollm2 --workers 2",
                            "coordinator serve --config deploy/cluster.example.toml --log-level DEBUG",
                            "shard-worker serve --coordinator 127.0.0.1:50051   (on each worker host)"))(serve)
app.command(epilog=examples('coordinator generate "The capital of France is"',
                            'coordinator generate "Write a haiku" --chat --temperature 0.7 --max-tokens 40',
                            'coordinator generate "Once upon a time" --model smollm2@2 '
                            '--endpoint 10.0.0.5:50051'))(generate)
app.command(epilog=examples("coordinator embed \"A man is eating food.\" \"A man is riding a horse.\"",
                            "coordinator embed --file sentences.txt --truncate --model minilm > vectors.jsonl"))(embed)
app.command(epilog=examples("coordinator status", "coordinator status --endpoint 10.0.0.5:50051"))(status)
app.command("drain-worker", epilog=examples("coordinator drain-worker 127.0.0.1:41234"))(drain_worker)
app.command(epilog=examples("coordinator rebalance"))(rebalance)
app.command(epilog=examples("coordinator plan", "coordinator plan --explain --endpoint 10.0.0.5:50051"))(plan)
app.command(epilog=examples("coordinator http --endpoint 127.0.0.1:50051 --port 8000",
                            "curl http://127.0.0.1:8000/v1/models"))(http)
app.add_typer(models, name="models")
app.add_typer(jobs, name="jobs")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
