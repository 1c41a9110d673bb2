"""`coordinator import`: convert a model into the store (a built-in, a .gguf file, a Hugging Face directory,
or random weights): its config, tokenizer, safetensors and a sha256 manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from coordinator.cli.common import STORE_DEFAULT, STORE_HELP, _fail, _store

SOURCES = "'smollm2' or 'minilm' (built in), a .gguf file, a Hugging Face directory, or --random FAMILY"


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
    if target.has(name):  # refused before any work while a coordinator serves it (and again as it is replaced)
        from coordinator.store.served import ModelInUse, replacing

        try:
            with replacing(target.root, name):
                pass
        except ModelInUse as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"cannot lock {name!r} in the store {target.root} to replace it: {exc.strerror or exc}")
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
