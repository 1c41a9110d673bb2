"""`coordinator`: import models into the store, run the parameter service, launch a local cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import typer

from coordinator.store import ModelStore, default_store

app = typer.Typer(add_completion=False, no_args_is_help=True, help="shardline coordinator")
STORE_HELP = "model store directory (default: the per-user cache, or $SHARDLINE_STORE)"


def _store(store: Path | None) -> ModelStore:
    return ModelStore(store or default_store())


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


@app.command("import")
def import_(
    source: str = typer.Argument("", help="'smollm2' (built in), a .gguf file, or a Hugging Face directory"),
    name: str = typer.Option(..., "--name", help="name of the model in the store"),
    store: Path | None = typer.Option(None, help=STORE_HELP),
    random: str = typer.Option("", "--random", help="random weights for this family (llama, gpt2)"),
    config: Path | None = typer.Option(None, help="with --random: a JSON file of config fields"),
    hidden: int = typer.Option(256, help="with --random: hidden size"),
    layers: int = typer.Option(4, help="with --random: number of layers"),
    heads: int = typer.Option(0, help="with --random: attention heads (0 = hidden / 64)"),
    kv_heads: int = typer.Option(0, help="with --random: key/value heads (0 = heads)"),
    intermediate: int = typer.Option(0, help="with --random: MLP size (0 = 4 x hidden)"),
    vocab: int = typer.Option(1024, help="with --random: vocabulary size"),
    positions: int = typer.Option(2048, help="with --random: maximum positions"),
    seed: int = typer.Option(0, help="with --random: seed of the weights"),
) -> None:
    """Convert a model into the store: config, tokenizer, safetensors and a sha256 manifest."""
    from coordinator.importer import (
        BUILTIN,
        ImportFailed,
        builtin_gguf,
        import_gguf,
        import_hf_dir,
        import_random,
        random_config,
    )

    logging.basicConfig(level=logging.WARNING)
    target = _store(store)
    try:
        if random:
            if source:
                _fail("give either SOURCE or --random, not both")
            fields = json.loads(config.read_text()) if config else {}
            dims = dict(hidden=hidden, layers=layers, vocab=vocab, positions=positions)
            dims.update({k: v for k, v in dict(heads=heads, kv_heads=kv_heads, intermediate=intermediate).items() if v})
            manifest = import_random(target, name, random_config(random, **dims, **fields), seed=seed)
        elif source == BUILTIN:
            manifest = import_gguf(target, builtin_gguf(), name)
        elif source.endswith(".gguf"):
            manifest = import_gguf(target, Path(source), name)
        elif source and Path(source).is_dir():
            manifest = import_hf_dir(target, Path(source), name)
        elif source:
            _fail(f"{source}: not 'smollm2', a .gguf file or a directory")
            return
        else:
            _fail("give SOURCE ('smollm2', a .gguf file or a Hugging Face directory) or --random FAMILY")
            return
    except (ImportFailed, ValueError, OSError, json.JSONDecodeError) as exc:
        _fail(str(exc))
        return
    print(f"imported {manifest.name}: {manifest.family}, {manifest.num_layers} layers, {len(manifest.tensors)} "
          f"tensors, {manifest.total_size_bytes / 2**20:.1f} MiB -> {target.path(manifest.name)}")


@app.command()
def models(store: Path | None = typer.Option(None, help=STORE_HELP)) -> None:
    """List the models in the store."""
    target = _store(store)
    for name in target.models():
        m = target.manifest(name)
        print(f"{name:<24} {m.family:<8} {m.num_layers:>4} layers {m.total_size_bytes / 2**20:>10.1f} MiB")


@app.command()
def parameters(store: Path | None = typer.Option(None, help=STORE_HELP),
               host: str = typer.Option("127.0.0.1", help="address to listen on"),
               port: int = typer.Option(50052, help="port (0 = a free one)")) -> None:
    """Run the parameter service alone: it streams each worker the tensors of its layers."""
    from coordinator.launcher import wait_for_signal
    from coordinator.parameters.server import start_parameter_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        server = await start_parameter_server(_store(store), host, port)
        print(f"parameter service listening on {server.address}", flush=True)
        await wait_for_signal()
        await server.stop()

    asyncio.run(run())


@app.command()
def launch(model: str = typer.Option("smollm2", help="model name in the store, or a store directory"),
           workers: int = typer.Option(3, min=1, help="number of shard workers"),
           host: str = typer.Option("127.0.0.1", help="address every server listens on"),
           store: Path | None = typer.Option(None, help=STORE_HELP),
           prompt: str = typer.Option("The capital of France is", help="greedy-generate this once ready "
                                      "('' for none)"),
           max_tokens: int = typer.Option(16, min=1, help="tokens to generate for --prompt"),
           exit_after_prompt: bool = typer.Option(False, help="stop once the prompt is answered")) -> None:
    """Start a whole cluster on this machine: parameter service and shard workers, each loaded with its
    planned layers; then serve until Ctrl-C / SIGTERM, which stops every child."""
    logging.basicConfig(level=logging.WARNING)
    model_path = Path(model)
    if model_path.is_dir() and (model_path / "manifest.json").is_file():
        target, model = ModelStore(model_path.parent), model_path.name
    else:
        target = _store(store)
    asyncio.run(_launch(target, model, workers, host, prompt, max_tokens, exit_after_prompt))


async def _launch(store: ModelStore, model: str, workers: int, host: str, prompt: str, max_tokens: int,
                  exit_after_prompt: bool) -> None:
    from coordinator.importer import BUILTIN, builtin_gguf, import_gguf
    from coordinator.launcher import LocalCluster

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not store.has(model):
        if model != BUILTIN:
            _fail(f"model {model!r} is not in the store {store.root} (models: {store.models() or 'none'}); "
                  "add it with `coordinator import`")
        print(f"importing the built-in SmolLM2-135M-Instruct into {store.root} (once)", flush=True)
        await asyncio.to_thread(import_gguf, store, builtin_gguf(), model)
    cluster = LocalCluster(store, model, workers, host)
    try:
        starting = asyncio.ensure_future(cluster.start(say=lambda line: print(line, flush=True)))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            print("stopped before ready", flush=True)
            return
        stopping.cancel()
        seconds = starting.result()
        print(f"ready in {seconds:.1f} s: {len(cluster.stages)} workers serving {model}", flush=True)
        if prompt:
            await _generate(store, model, cluster.addresses, prompt, max_tokens)
        if not exit_after_prompt:
            print("serving; Ctrl-C to stop", flush=True)
            await stop.wait()
    finally:
        print("stopping workers", flush=True)
        with contextlib.suppress(Exception):
            await cluster.stop()


async def _generate(store: ModelStore, model: str, addresses: list[str], prompt: str, max_tokens: int) -> None:
    from transformers import AutoTokenizer

    from coordinator.chain import ChainClient

    path = store.path(model)
    if not (path / "tokenizer_config.json").is_file():
        print(f"(model {model} has no tokenizer: skipping --prompt)", flush=True)
        return
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt)["input_ids"]
    stop_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
    chain = ChainClient(addresses)
    out: list[int] = []
    shown = ""
    print(f"> {prompt}", end="", flush=True)
    try:
        async for token in chain.greedy("launch-prompt", ids, max_tokens, stop_ids):
            out.append(token)
            text = str(tokenizer.decode(out, skip_special_tokens=True))
            print(text[len(shown):], end="", flush=True)
            shown = text
        print(flush=True)
        await chain.end_session("launch-prompt")
    finally:
        await chain.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
