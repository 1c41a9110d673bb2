"""The prefix cache across requests: prompts that share a prefix reuse its KV on every stage, with the tokens
they get without the cache; a stage that lost the prefix is healed by the full prefill; eviction under memory
pressure changes no output; a prefix reference that does not fit its session is refused by name."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from coordinator.serving.prefix import chain_hashes
from shard_worker.server import start_worker
from shardline.client import AsyncClient, Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2
from tests.helpers import Chain, decode_tensor, error_of, load, seq, to_numpy, worker_stub

BLOCK = 8  # 600 = 75 blocks: the question starts on a block boundary
SYSTEM = 600
STAGES = 3
MiB = 2**20


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 128) for _ in range(n)]  # tiny-llama: vocabulary 128, 0 is its end of sequence


def status(server) -> worker_pb2.GetStatusResponse:
    return worker_stub(server.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)


def counters(servers) -> list[tuple[int, int]]:
    return [(s.metrics.prefill_tokens, s.metrics.prefix_tokens_reused) for s in map(status, servers)]


def start_cluster(loop, store, parameters, budget: int = 2**30, **config):
    settings = CoordinatorConfig(store=store.root, model="tiny-llama", workers=STAGES, port=0,
                                 parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                                 kv_block_tokens=BLOCK, **config)
    coordinator = loop.run(start_coordinator(settings))
    servers = [loop.run(start_worker(memory_budget_bytes=budget)) for _ in range(STAGES)]
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for server in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=server.address,
                                                                      memory_budget_bytes=budget))
    return coordinator, servers


def stop_cluster(loop, coordinator, servers) -> None:
    for server in servers:
        loop.run(server.stop(0))
    loop.run(coordinator.stop())


@pytest.fixture()
def cluster(loop, store, parameters):
    coordinator, servers = start_cluster(loop, store, parameters)
    with Client(coordinator.address, timeout=120) as client:
        client.wait_ready(timeout=120)
        yield coordinator, servers, client
    stop_cluster(loop, coordinator, servers)


def without_cache(coordinator, client, prompts: list[list[int]], **params) -> list[list[int]]:
    """The tokens each prompt gets with the prefix cache off (what `prefix_cache = false` runs)."""
    scheduler = coordinator.fleet.first.scheduler.policy
    scheduler.prefix_cache, index, scheduler.prefixes = False, scheduler.prefixes, None
    try:
        return [list(client.generate(p, **params).token_ids) for p in prompts]
    finally:
        scheduler.prefix_cache, scheduler.prefixes = True, index


def test_a_shared_system_prompt_is_computed_once_and_changes_no_token(cluster):
    coordinator, servers, client = cluster
    system, questions = ids(1, SYSTEM), [ids(2, 20), ids(3, 17)]
    prompts = [system + q for q in questions]
    params = dict(max_tokens=12, temperature=0, ignore_eos=True)
    reference = without_cache(coordinator, client, prompts, **params)
    sampled = dict(max_tokens=12, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    reference_sampled = without_cache(coordinator, client, prompts[1:], **sampled)

    first = list(client.generate(prompts[0], **params).token_ids)
    before = counters(servers)
    second = list(client.generate(prompts[1], **params).token_ids)
    after = counters(servers)
    assert [first, second] == reference and len(first) == len(second) == 12
    for (p0, r0), (p1, r1) in zip(before, after, strict=True):  # every stage: only the question was computed
        assert (p1 - p0, r1 - r0) == (len(questions[1]), SYSTEM), (before, after)
    assert list(client.generate(prompts[1], **sampled).token_ids) == reference_sampled[0]  # seeded: identical
    held = [status(s).metrics for s in servers]
    assert all(m.prefix_blocks >= SYSTEM // BLOCK and m.prefix_cache_bytes > 0 for m in held), held
    assert all(status(s).kv_cache_bytes == 0 for s in servers)  # prefixes are not sessions: counted apart


def test_a_stage_that_lost_the_prefix_is_healed_by_the_full_prefill(cluster):
    coordinator, servers, client = cluster
    system = ids(4, SYSTEM)
    prompts = [system + ids(5, 12), system + ids(6, 9)]
    params = dict(max_tokens=10, temperature=0, ignore_eos=True)
    reference = without_cache(coordinator, client, prompts, **params)
    assert list(client.generate(prompts[0], **params).token_ids) == reference[0]
    # the middle stage loses its prefixes (as a restart would lose them); the coordinator does not know
    runtime = servers[1].servicer.shard.runtime
    servers[1].servicer.compute.submit(runtime.prefix.clear).result(10)  # on its compute thread
    before = counters(servers)
    assert list(client.generate(prompts[1], **params).token_ids) == reference[1]
    after = counters(servers)
    index = coordinator.fleet.first.scheduler.policy.prefixes
    assert index.misses == 1
    # the first stage computed the question, then (replayed) the whole prompt; the middle one the whole prompt
    assert after[0][0] - before[0][0] == 9 + SYSTEM + 9 and after[1][0] - before[1][0] == SYSTEM + 9
    assert after[1][1] == before[1][1]


def test_eviction_under_memory_pressure_keeps_outputs_identical(loop, store, parameters):
    """Workers with a small budget: long concurrent requests need the blocks the prefix store holds."""
    coordinator, servers = start_cluster(loop, store, parameters, budget=16 * MiB, max_step_tokens=256,
                                         prefill_chunk_tokens=128, kv_reserve_tokens=0)
    try:
        with Client(coordinator.address, timeout=120) as client:
            client.wait_ready(timeout=120)
            capacity = min(status(s).kv.blocks_total for s in servers) * BLOCK
            # the measured headroom of a 256-token step varies from 4 to 10 MiB between runs (peak RSS of a
            # process that has run other tests): the budget leaves 6-12 MiB of KV, the prompts follow it
            assert 2 * SYSTEM < capacity < 65_000, capacity
            system = ids(7, SYSTEM)
            prompts = [system + ids(8, 15), system + ids(9, 15)]
            params = dict(max_tokens=8, temperature=0, ignore_eos=True)
            reference = without_cache(coordinator, client, prompts, **params)
            assert list(client.generate(prompts[0], **params).token_ids) == reference[0]
            # enough different long prompts at once to fill every stage's KV twice over
            length = min(1500, capacity // 2)
            long_prompts = [ids(100 + i, length) for i in range(2 * capacity // length + 2)]
            long_reference = without_cache(coordinator, client, long_prompts[:2], **params)

            async def together():
                async with AsyncClient(coordinator.address, timeout=300) as aclient:
                    return await asyncio.gather(*(aclient.generate(p, **params) for p in long_prompts))

            results = asyncio.run(together())
            assert [list(r.token_ids) for r in results[:2]] == long_reference
            assert all(len(r.token_ids) == 8 for r in results)
            assert all(status(s).metrics.prefix_evictions > 0 for s in servers)
            assert list(client.generate(prompts[1], **params).token_ids) == reference[1]
            assert list(client.generate(prompts[0], **params).token_ids) == reference[0]
    finally:
        stop_cluster(loop, coordinator, servers)


def test_prefix_references_that_do_not_fit_the_session_are_refused_by_name(parameters, workers):
    (worker,) = workers(1)
    load(worker.address, "tiny-llama", 0, 6, parameters.address, kv_block_tokens=BLOCK)
    chain = Chain([worker.address])
    prompt = ids(10, 4 * BLOCK)
    hashes = chain_hashes(prompt, BLOCK)

    def with_prefix(session: str, start: int, blocks: list[bytes], tokens: int, count: int = 2):
        s = seq(session, start, count)
        s.prefix_blocks.extend(blocks)
        s.prefix_tokens = tokens
        return s

    def refused(slice_: worker_pb2.SequenceSlice, tokens: list[int]) -> tuple[int, str]:
        error = error_of(chain.step([slice_], tokens))
        return error.code, error.message

    assert not chain.step([with_prefix("a", 0, hashes, 0, len(prompt))], prompt).sequence_errors

    code, message = refused(with_prefix("b", 8, hashes[:1], 16), [1, 2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "prefix_tokens is 16" in message
    code, message = refused(with_prefix("b", 16, hashes[:1], 16), [1, 2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "prefix_blocks names 1" in message
    code, message = refused(with_prefix("b", 8, hashes * 3, 8), [1, 2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "prefix_blocks names 12 blocks" in message
    code, message = refused(with_prefix("a", 32, hashes, 32), [1, 2])  # an existing session
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "only a new session" in message
    code, message = refused(with_prefix("c", 8, [b"\x01" * 16], 8), [1, 2])
    assert code == grpc.StatusCode.NOT_FOUND.value[0] and "prefix_blocks[0] is not held" in message
    code, message = refused(with_prefix("c", 8, [b""], 8), [1, 2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "prefix_blocks[0] is 0 bytes" in message
    # a new session past the prefix gets the logits the whole prompt gets
    whole = chain.logits("d", 0, prompt + [5, 6])[-2:]
    response = chain.step([with_prefix("e", 32, hashes, 32)], [5, 6], worker_pb2.OUTPUT_KIND_LOGITS)
    assert not response.sequence_errors
    assert abs(to_numpy(decode_tensor(response.tensor)) - whole).max() < 1e-4



@pytest.mark.slow
def test_smollm2_chat_with_a_long_system_prompt_gives_the_same_tokens_from_the_cache(smollm2_cluster):
    """The real model (whose attention depends on every cached key, unlike a tiny random one): greedy and
    seeded chats sharing a long system prompt, without and with the cache."""
    coordinator, servers = smollm2_cluster
    system = ("You are a careful assistant for a library. " + " ".join(
        f"Rule {i}: answer politely, cite the shelf number, and never invent a title that is not listed." for i in
        range(40)))
    chats = [[("system", system), ("user", q)] for q in ("Where are the atlases?", "Do you lend maps at night?")]
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        for params in (dict(max_tokens=16, temperature=0), dict(max_tokens=16, temperature=0.8, seed=5)):
            scheduler = coordinator.fleet.first.scheduler.policy
            scheduler.prefix_cache, index, scheduler.prefixes = False, scheduler.prefixes, None
            try:
                reference = [list(client.chat(c, **params).token_ids) for c in chats]
            finally:
                scheduler.prefix_cache, scheduler.prefixes = True, index
            before = counters(servers)
            assert [list(client.chat(c, **params).token_ids) for c in chats] == reference
            after = counters(servers)
            assert all(r1 - r0 > 500 for (_, r0), (_, r1) in zip(before, after, strict=True)), (before, after)
