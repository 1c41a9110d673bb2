"""A fleet on one pool of workers: two models, two replicas of one, the balancer, version swap under load,
unload while requests run, autoscaling, and the admin API's bad input. Small random models (token ids in
and out), with transformers as the oracle."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import AsyncClient, Client
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2
from tests.chaos import on_loop, streams
from tests.helpers import worker_stub

PROMPTS = [[5, 17, 99, 3], [42, 8], [7, 7, 7, 7, 7, 7, 7, 120], [1, 2, 3], [60, 61], [99], [12, 34, 56], [100, 3]]
LONG = dict(max_tokens=40, temperature=0, ignore_eos=True)


class Pool:
    """Worker servers for this module, in process; `started` maps address -> server."""

    def __init__(self, loop):
        self.loop, self.started = loop, {}

    def __call__(self, n):
        new = [self.loop.run(start_worker()) for _ in range(n)]
        self.started.update((w.address, w) for w in new)
        return new


@pytest.fixture(scope="module")
def pool(loop):
    workers = Pool(loop)
    yield workers
    for w in workers.started.values():
        loop.run(w.stop(0))


@pytest.fixture(scope="module")
def versioned_store(store):
    from coordinator.store.importer import import_random, random_config

    if not store.has("tiny-llama-v2"):  # a different random Llama: version 2 of tiny-llama
        import_random(store, "tiny-llama-v2", random_config("llama", hidden=64, layers=6, heads=4, kv_heads=2,
                                                            vocab=128, intermediate=128), seed=11)
    return store


@pytest.fixture(scope="module")
def fleet(loop, versioned_store, parameters, pool, tmp_path_factory):
    """tiny-llama with 2 replicas of 2 stages and tiny-gpt2 with 1, on a pool of 8 workers (2 spare); its run-time
    changes kept apart from the shared store's."""
    config = CoordinatorConfig(
        store=versioned_store.root, workers=2, port=0, parameters_address=parameters.address,
        jobs_dir=tmp_path_factory.mktemp("fleet-state"),
        heartbeat_timeout_ms=3_600_000, probe_timeout_ms=1000, max_active_streams=4, unload_grace_s=30,
        deployments=[dict(name="tiny-llama", replicas=2), dict(name="tiny-gpt2", replicas=1)])
    coordinator = loop.run(start_coordinator(config))
    register(coordinator, pool(8))
    with Client(coordinator.address, timeout=120) as client:
        client.wait_ready(timeout=120)
    yield coordinator
    loop.run(coordinator.stop())


def register(coordinator, servers):
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))


def greedy(store, model, prompt, n):
    hf = AutoModelForCausalLM.from_pretrained(store.path(model), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def oracle(versioned_store):
    cache = {}

    def expected(model, prompt, n=LONG["max_tokens"]):
        key = (model, tuple(prompt), n)
        if key not in cache:
            cache[key] = greedy(versioned_store, model, prompt, n)
        return cache[key]

    return expected


def test_two_models_and_two_replicas_on_one_pool(fleet, oracle):
    replicas = fleet.fleet.deployments["tiny-llama@1"].replicas
    with Client(fleet.address, timeout=60) as client:
        models = {m.name: m for m in client.list_models()}
        assert set(models) == {"tiny-llama", "tiny-gpt2"}
        llama, gpt2 = models["tiny-llama"], models["tiny-gpt2"]
        assert (llama.task, llama.replicas, llama.replicas_ready, llama.versions, llama.is_default) == (
            "generate", 2, 2, ("1",), True)
        assert (gpt2.replicas, gpt2.ready, gpt2.context_tokens) == (1, True, 256)
        workers = [w.address for d in fleet.fleet.deployments.values() for r in d.replicas for w in r.assignment]
        assert len(set(workers)) == len(workers) == 6  # every worker in at most one stage
        served = [r.served for r in replicas]
        for prompt in PROMPTS[:4]:  # one at a time: the balancer alternates between two idle replicas
            result = client.generate(prompt, model="tiny-llama", max_tokens=12, temperature=0, ignore_eos=True)
            assert result.token_ids == oracle("tiny-llama", prompt, 12)
        assert [r.served - s for r, s in zip(replicas, served, strict=True)] == [2, 2]
        result = client.generate(PROMPTS[0], model="tiny-gpt2@1", max_tokens=12, temperature=0, ignore_eos=True)
        assert result.token_ids == oracle("tiny-gpt2", PROMPTS[0], 12)


def test_concurrent_streams_spread_over_both_replicas(fleet, oracle):
    replicas = fleet.fleet.deployments["tiny-llama@1"].replicas
    before = [r.served for r in replicas]
    tokens = asyncio.run(streams(fleet.address, PROMPTS * 2, model="tiny-llama", **LONG))
    assert tokens == [oracle("tiny-llama", p) for p in PROMPTS * 2]
    spread = [r.served - b for r, b in zip(replicas, before, strict=True)]
    assert sum(spread) == 16 and min(spread) >= 6, spread  # least outstanding work: close to even
    with Client(fleet.address) as client:
        status = client.cluster_status()
    (llama,) = [d for d in status.deployments if d.name == "tiny-llama"]
    assert [r.requests > 0 for r in llama.replicas] == [True, True]
    by_address = {w.address: w for w in status.workers}
    for replica in replicas:  # each replica's workers did work
        assert all(by_address[w.address].tokens_per_second > 0 for w in replica.assignment)
        assert all(by_address[w.address].replica == replica.name for w in replica.assignment)


def test_bad_requests_for_models_and_scaling(fleet):
    live = fleet.fleet.registry.live()
    free = [w for w in live if not w.owner]
    with Client(fleet.address, timeout=30) as client:
        with pytest.raises(NotFound, match="served: tiny-gpt2 .*tiny-llama"):
            client.generate([1, 2], model="no-such-model")
        with pytest.raises(NotFound, match="no version '9'.*its versions: 1"):
            client.generate([1, 2], model="tiny-llama@9")
        with pytest.raises(InvalidArgument, match="replicas must be >= 0"):
            client.scale_model("tiny-llama", -1)
        with pytest.raises(InvalidArgument, match=f"the pool has {len(live)}"):
            client.scale_model("tiny-llama", len(live) // 2 + 1)
        with pytest.raises(NotFound, match="not served here"):
            client.scale_model("nope", 1)
        with pytest.raises(FailedPrecondition, match=f"needs {len(free) + 1} workers and {len(free)} are free.*MiB"):
            client.load_model("big", source="tiny-llama", workers=len(free) + 1)
        with pytest.raises(NotFound, match="not in the store"):
            client.load_model("ghost")
        with pytest.raises(InvalidArgument, match="names no version"):
            client.promote_model("tiny-llama")
        with pytest.raises(FailedPrecondition, match="already loaded"):
            client.load_model("tiny-llama")
        with pytest.raises(InvalidArgument, match="is not a name"):
            client.load_model("bad name!")
    with pytest.raises(FailedPrecondition, match="generates text and does not embed"):
        _infer(fleet.address, "tiny-llama")


def _infer(address, model):
    from shardline.errors import from_rpc_error

    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))
    try:
        stub.Infer(coordinator_pb2.InferRequest(model=model, texts=["x"]), timeout=10)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


def test_version_swap_under_load(fleet, pool, oracle):
    register(fleet, pool(2))  # room for version 2 beside everything that serves
    params = dict(max_tokens=200, temperature=0, ignore_eos=True)
    promoted = {}

    async def run():
        async with AsyncClient(fleet.address, timeout=120) as client:
            counts, ended = [0] * len(PROMPTS), [0.0] * len(PROMPTS)

            async def one(i, prompt):
                out = []
                async for chunk in await client.generate(prompt, stream=True, model="tiny-llama", **params):
                    out += chunk.token_ids
                    counts[i] = len(out)
                ended[i] = time.monotonic()
                return out

            async def load_v2():  # once all 8 streams run on version 1
                while min(counts) < 2:
                    await asyncio.sleep(0.005)
                with Client(fleet.address, timeout=120) as admin:
                    promoted["message"] = await asyncio.to_thread(
                        admin.load_model, "tiny-llama", version="2", source="tiny-llama-v2", replicas=1, promote=True)
                promoted["at"] = time.monotonic()

            *tokens, _ = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)), load_v2())
            return tokens, ended

    first, ended = asyncio.run(run())
    assert promoted["at"] < min(ended)  # v2 was loaded and promoted while all 8 ran
    assert first == [oracle("tiny-llama", p, 200) for p in PROMPTS]  # all 8 finished on v1, with v1's tokens
    assert fleet.fleet.defaults["tiny-llama"] == "2", promoted["message"]
    with Client(fleet.address, timeout=60) as client:
        after = client.generate(PROMPTS[0], model="tiny-llama", **LONG)
        assert after.token_ids == oracle("tiny-llama-v2", PROMPTS[0])
        assert after.token_ids != oracle("tiny-llama", PROMPTS[0])
        pinned = client.generate(PROMPTS[0], model="tiny-llama@1", **LONG)
        assert pinned.token_ids == oracle("tiny-llama", PROMPTS[0])
        models = [m for m in client.list_models() if m.name == "tiny-llama"]
        assert sorted((m.version, m.is_default) for m in models) == [("1", False), ("2", True)]
        assert models[0].versions == ("1", "2")


def test_unload_waits_for_requests_then_frees_every_byte(fleet, oracle):
    deployment = fleet.fleet.deployments["tiny-gpt2@1"]
    workers = [w.address for w in deployment.replicas[0].assignment]
    weights = sum(worker_stub(a).GetStatus(worker_pb2.GetStatusRequest(), timeout=5).weight_bytes for a in workers)
    unloaded = {}

    async def unload():
        unloaded["running"] = deployment.replicas[0].running  # the streams are in flight when it starts
        with Client(fleet.address, timeout=120) as admin:
            unloaded["reply"] = await asyncio.to_thread(admin.unload_model, "tiny-gpt2@1", grace_s=60)

    tokens = asyncio.run(streams(fleet.address, PROMPTS[:4], unload, model="tiny-gpt2", after_tokens=2, **LONG))
    assert unloaded["running"] == 4
    assert tokens == [oracle("tiny-gpt2", p) for p in PROMPTS[:4]]  # it waited for them
    message, freed = unloaded["reply"]
    assert freed == weights > 0, message
    for address in workers:
        status = worker_stub(address).GetStatus(worker_pb2.GetStatusRequest(), timeout=5)
        assert (status.state, status.weight_bytes, status.sessions, status.kv_cache_bytes) == (
            worker_pb2.WORKER_STATE_EMPTY, 0, 0, 0)
    records = [w for w in fleet.fleet.registry.workers.values() if w.address in workers]
    assert [(w.owner, w.state) for w in records] == [("", "spare")] * 2  # back in the pool
    with Client(fleet.address, timeout=30) as client:
        with pytest.raises(NotFound, match="'tiny-gpt2' is not served here"):
            client.generate([1], model="tiny-gpt2")
        with pytest.raises(FailedPrecondition, match="default version of 'tiny-llama': promote another"):
            client.unload_model("tiny-llama@2")


def test_autoscaling_adds_a_replica_under_a_long_queue_and_removes_it_when_idle(fleet, pool, oracle):
    register(fleet, pool(4))  # free workers for the deployment and one more replica, whatever ran before
    with Client(fleet.address, timeout=120) as admin:
        admin.load_model("auto", source="tiny-llama", replicas=1, min_replicas=1, max_replicas=2, target_queue=1,
                         scale_up_after_s=0.3, scale_down_after_s=2)
    deployment = fleet.fleet.deployments["auto@1"]
    many = PROMPTS * 2  # 16 streams, 4 run at a time per replica: the queue stays long
    tokens = asyncio.run(streams(fleet.address, many, model="auto", max_tokens=60, temperature=0, ignore_eos=True))
    assert tokens == [oracle("tiny-llama", p, 60) for p in many]
    assert any("autoscaler" in e and "queued" in e and "1 -> 2" in e for e in deployment.events), deployment.events
    deadline = time.monotonic() + 30
    while len(deployment.live) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(deployment.live) == 1, list(deployment.events)
    assert any("2 -> 1" in e and "idle" in e for e in deployment.events), deployment.events
    with Client(fleet.address) as client:
        (auto,) = [d for d in client.cluster_status().deployments if d.name == "auto"]
    assert (auto.min_replicas, auto.max_replicas, len(auto.replicas)) == (1, 2, 1)
    assert any("idle" in e for e in auto.events)


def test_scaling_down_under_load_moves_the_streams_by_replay(fleet, oracle):
    deployment = fleet.fleet.deployments["tiny-llama@1"]
    leaving = {}

    async def scale_down():  # at once: the removed replica's streams move to the other, mid-generation
        leaving["replica"] = max(deployment.live, key=lambda r: r.index)
        leaving["running"] = leaving["replica"].running
        with Client(fleet.address, timeout=120) as admin:
            leaving["message"] = await asyncio.to_thread(admin.scale_model, "tiny-llama@1", 1, grace_s=0)

    tokens = asyncio.run(streams(fleet.address, PROMPTS, scale_down, model="tiny-llama@1", after_tokens=3, **LONG))
    assert tokens == [oracle("tiny-llama", p) for p in PROMPTS]  # the same tokens: replay, not a restart
    assert leaving["running"] > 0 and "moved on by replay" in leaving["message"], leaving
    assert leaving["replica"].retired and len(deployment.live) == 1
    assert leaving["replica"] not in deployment.replicas
    with Client(fleet.address) as client:
        client.scale_model("tiny-llama@1", 2)  # back to two, placed on free workers
    deadline = time.monotonic() + 60
    while len(deployment.ready_replicas) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(deployment.ready_replicas) == 2


@pytest.mark.chaos  # in the default suite: it passed 20 runs in a row (make test-chaos)
def test_a_dead_worker_of_one_replica_fails_nothing(fleet, oracle, loop, pool):
    register(fleet, pool(1))  # a spare for the replica that loses a worker
    replica = fleet.fleet.deployments["tiny-llama@1"].replicas[1]
    victim = replica.assignment[1].address
    tokens = asyncio.run(streams(fleet.address, PROMPTS * 2,
                                 on_loop(loop, lambda: asyncio.ensure_future(pool.started[victim].stop(0))),
                                 model="tiny-llama@1", after_tokens=3, **LONG))
    assert tokens == [oracle("tiny-llama", p) for p in PROMPTS * 2]
    assert victim not in [w.address for w in replica.assignment]
    assert fleet.fleet.worker(victim).state == "lost"
    with Client(fleet.address) as client:  # a lost worker is healed around, never drained (lost -> draining)
        assert "was lost" in client.drain_worker(victim)
    assert fleet.fleet.worker(victim).state == "drained"
