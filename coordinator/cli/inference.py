"""`coordinator generate` and `coordinator embed`: a request to a running cluster, its answer on stdout (the
SDK's client)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from coordinator.cli.common import API_KEY_OPTION, CLIENT_CERTS_DIR, CLIENT_NAME, _client, _fail, explain
from shardline.cli_options import endpoint_option


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
            _fail(explain(exc, endpoint, certs_dir))


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
            _fail(explain(exc, endpoint, certs_dir))
            return
        except ValueError as exc:
            _fail(str(exc))
            return
    for i, vector in enumerate(found.vectors):
        sys.stdout.write(json.dumps({"index": i, "embedding": [round(float(x), 6) for x in vector]}) + "\n")
    cut = f"; {found.truncated} truncated to the model's positions" if found.truncated else ""
    print(f"{len(given)} embeddings of {found.vectors.shape[1]} floats, {found.tokens} tokens{cut}", file=sys.stderr)
