"""Keys cannot see each other through the caches (issue 28.3): with per-key caches (the default), key B's
first request for a prompt key A already sent is a miss, never `cached`; with `cache_scope = "shared"` it is a
hit. Real coordinator with API keys on port 0, in-process workers."""

from __future__ import annotations

import json

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.auth import hash_key, new_api_key
from shardline.client import Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = [5, 17, 99, 3, 42, 8, 7]
GREEDY = dict(max_tokens=4, temperature=0)


@pytest.mark.parametrize("scope, b_sees_a", [("key", False), ("shared", True)])
def test_a_key_never_hears_cached_for_another_keys_prompt(loop, store, parameters, workers, tmp_path, scope, b_sees_a):
    keys = {name: new_api_key() for name in ("a", "b")}
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"name": n, "role": "client", "sha256": hash_key(k)}
                                              for n, k in keys.items()]}))
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http=False,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               api_keys=keys_file, result_cache_mb=1, cache_scope=scope, jobs_dir=tmp_path)
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in workers(2):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    try:
        with Client(coordinator.address, api_key=keys["a"], timeout=120) as a, \
                Client(coordinator.address, api_key=keys["b"], timeout=120) as b:
            a.wait_ready(timeout=120)
            first = a.generate(PROMPT, **GREEDY)
            assert not first.cached and a.generate(PROMPT, **GREEDY).cached  # A's own answer is A's to reuse
            theirs = b.generate(PROMPT, **GREEDY)
            assert theirs.cached is b_sees_a and theirs.token_ids == first.token_ids
            assert b.generate(PROMPT, **GREEDY).cached  # and B's own, once B sent it
    finally:
        loop.run(coordinator.stop())
