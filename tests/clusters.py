"""Small clusters the integration tests start in-process: a coordinator and its in-process workers, registered
through the WorkerRegistry RPC as real workers register; and a random text model to serve."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc


@contextmanager
def registered(loop: Any, config: CoordinatorConfig, workers: int) -> Iterator[tuple[Any, list[Any]]]:
    """The coordinator of `config` with `workers` workers registered, ready to serve; all stopped after."""
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker()) for _ in range(workers)]
    try:
        registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
        for w in servers:
            registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address,
                                                                          memory_budget_bytes=2**30))
        with Client(coordinator.address, timeout=120) as sdk:
            sdk.wait_ready(timeout=120)
        yield coordinator, servers
    finally:
        for w in servers:
            loop.run(w.stop(0))
        loop.run(coordinator.stop())


def text_llama(store: Any, name: str, tmp_path_factory: Any, seed: int, template: str | None = None) -> None:
    """A small random Llama that speaks text: SmolLM2's tokenizer (and chat template, unless `template`), read
    from the built-in GGUF without importing its weights."""
    from transformers import AutoTokenizer

    from coordinator.store.importer import builtin_gguf, import_random, random_config

    if store.has(name):
        return
    gguf = builtin_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if template:
        tokenizer.chat_template = template
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    import_random(store, name, random_config("llama", hidden=64, layers=2, heads=4, vocab=49152, positions=4096,
                                             bos_token_id=1, eos_token_id=2), seed=seed, tokenizer_dir=tokenizer_dir)
