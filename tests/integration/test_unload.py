"""UnloadShard on real servers: a worker gives back every byte it held for its model (weights, KV cache,
sessions) and is EMPTY and not serving afterwards; steps in flight finish or fail cleanly, later ones are
FAILED_PRECONDITION; unloading another model than the one held, or during a LoadShard, is refused; unloading
twice is harmless; and the process's RSS actually drops."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.fleet.registry import WorkerRecord
from coordinator.fleet.worker_calls import unload_shard
from coordinator.store.importer import import_random, random_config
from coordinator.store.models import ModelStore
from coordinator.store.parameters.server import start_parameter_server
from shard_worker.server import start_worker
from shardline.errors import FailedPrecondition
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2
from tests.helpers import Chain, error_of, load, seq, worker_stub

MODEL = "tiny-llama"
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
MiB = 2**20


def unload(address: str, model: str = "") -> worker_pb2.UnloadShardResponse:
    return worker_stub(address).UnloadShard(worker_pb2.UnloadShardRequest(model=model), timeout=60)


def status(address: str) -> worker_pb2.GetStatusResponse:
    return worker_stub(address).GetStatus(worker_pb2.GetStatusRequest(), timeout=30)


def serving(address: str) -> int:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return health.Check(health_pb2.HealthCheckRequest(service="shardline.v1.ShardWorker"), timeout=10).status


def test_unload_frees_the_shard_and_its_sessions(workers, parameters):
    (worker,) = workers(1)
    address = worker.address
    load(address, MODEL, 0, 6, parameters.address)
    chain = Chain([address])
    before = chain.greedy("s1", [1, 2, 3, 4], 3)
    loaded = status(address)
    assert loaded.state == worker_pb2.WORKER_STATE_READY and loaded.sessions == 1 and loaded.weight_bytes > 0
    assert serving(address) == health_pb2.HealthCheckResponse.SERVING

    with pytest.raises(grpc.RpcError) as other:  # another model named: refused, nothing unloaded
        unload(address, "tiny-gpt2")
    assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'tiny-llama'" in other.value.details() and "tiny-gpt2" in other.value.details()
    assert status(address).state == worker_pb2.WORKER_STATE_READY

    reply = unload(address, MODEL)
    assert reply.freed_weight_bytes == loaded.weight_bytes
    assert reply.sessions_ended >= 1
    after = status(address)
    assert after.state == worker_pb2.WORKER_STATE_EMPTY
    assert (after.weight_bytes, after.sessions, after.kv_cache_bytes, after.model) == (0, 0, 0, "")
    assert serving(address) == health_pb2.HealthCheckResponse.NOT_SERVING

    response = chain.step([seq("s2", 0, 2)], [1, 2])
    assert error_of(response).code == FAILED_PRECONDITION and "no shard is loaded" in error_of(response).message

    for model in ("", MODEL, "tiny-gpt2"):  # holding nothing: ok, zeros, whatever is named
        again = unload(address, model)
        assert (again.freed_weight_bytes, again.sessions_ended) == (0, 0)

    # the worker loads again and computes what it computed before
    load(address, MODEL, 0, 6, parameters.address)
    assert chain.greedy("s3", [1, 2, 3, 4], 3) == before


def test_the_coordinator_call_unloads_and_maps_errors(loop, workers, parameters):
    (worker,) = workers(1)
    load(worker.address, MODEL, 0, 3, parameters.address)
    weight_bytes = status(worker.address).weight_bytes
    with pytest.raises(FailedPrecondition, match="holds model 'tiny-llama'"):
        loop.run(unload_shard(WorkerRecord("w1", worker.address, 0, 0.0), "tiny-gpt2", 30, LinkSettings()))
    reply = loop.run(unload_shard(WorkerRecord("w1", worker.address, 0, 0.0), MODEL, 30, LinkSettings()))
    assert (reply.freed_weight_bytes, reply.sessions_ended) == (weight_bytes, 0)
    assert status(worker.address).state == worker_pb2.WORKER_STATE_EMPTY


def test_open_streams_and_steps_in_flight_survive_an_unload(workers, parameters):
    """Steps queued before the unload finish on the old runtime (or fail cleanly); later ones on the same,
    still open stream are FAILED_PRECONDITION; nothing is INTERNAL and the server goes on."""
    (worker,) = workers(1)
    address = worker.address
    load(address, MODEL, 0, 6, parameters.address)
    requests: queue.Queue[worker_pb2.ForwardRequest | None] = queue.Queue()

    def feed() -> Iterator[worker_pb2.ForwardRequest]:
        while (request := requests.get()) is not None:
            yield request

    def step(step_id: int, session: str) -> worker_pb2.ForwardRequest:
        return worker_pb2.ForwardRequest(step_id=step_id, sequences=[seq(session, 0, 16)],
                                         token_ids=list(range(16)), start_layer=0)

    responses = worker_stub(address).Forward(feed(), timeout=120)
    requests.put(step(0, "first"))
    first = next(responses)
    assert not first.HasField("error") and not first.sequence_errors and len(first.token_ids) == 1
    for i in range(1, 41):  # a burst in flight while the unload arrives
        requests.put(step(i, f"burst-{i}"))
    reply = unload(address)
    assert reply.sessions_ended >= 1
    requests.put(step(100, "late"))
    requests.put(None)
    results = {r.step_id: error_of(r) for r in responses}
    assert set(results) == {*range(1, 41), 100}
    assert {e.code for e in results.values()} <= {0, FAILED_PRECONDITION}, results
    assert results[100].code == FAILED_PRECONDITION and "no shard is loaded" in results[100].message
    assert status(address).state == worker_pb2.WORKER_STATE_EMPTY
    load(address, MODEL, 0, 6, parameters.address)  # and the worker is usable again
    assert len(Chain([address]).greedy("again", [1, 2, 3], 2)) == 2


# -- a model large enough for memory to be measured ------------------------------------------------------

@pytest.fixture(scope="module")
def big(loop, tmp_path_factory):
    """A ~200 MB random llama in its own store and parameter service."""
    store = ModelStore(tmp_path_factory.mktemp("unload-store"))
    config = random_config("llama", hidden=1024, layers=4, heads=16, kv_heads=4, intermediate=2048, vocab=8192)
    import_random(store, "big-llama", config, seed=3)
    server = loop.run(start_parameter_server(store))
    yield server
    loop.run(server.stop(0))


def test_rss_drops_after_unload_and_an_unload_mid_load_is_refused(loop, big):
    worker = loop.run(start_worker())
    address = worker.address
    try:
        empty_rss = status(address).rss_bytes
        request = worker_pb2.LoadShardRequest(model="big-llama", start_layer=0, end_layer=4,
                                              parameters_address=big.address, max_step_tokens=256)
        progress = worker_stub(address).LoadShard(request, timeout=300)
        next(progress)  # the load has begun: it fetches ~200 MB and measures a step before it ends
        with pytest.raises(grpc.RpcError) as busy:
            unload(address)
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "LoadShard is in progress" in busy.value.details()
        assert list(progress)[-1].phase == worker_pb2.LOAD_PHASE_READY
        chain = Chain([address])
        assert len(chain.greedy("s", list(range(64)), 4)) == 4
        loaded = status(address)
        assert loaded.weight_bytes > 180 * MiB and loaded.sessions == 1

        reply = unload(address, "big-llama")
        assert reply.freed_weight_bytes == loaded.weight_bytes and reply.sessions_ended == 1
        unloaded = status(address)
        dropped = loaded.rss_bytes - unloaded.rss_bytes
        print(f"\nRSS: empty {empty_rss / MiB:.0f} MiB, loaded {loaded.rss_bytes / MiB:.0f} MiB (weights "
              f"{loaded.weight_bytes / MiB:.0f} MiB, KV {loaded.kv_cache_bytes / MiB:.1f} MiB), unloaded "
              f"{unloaded.rss_bytes / MiB:.0f} MiB: dropped {dropped / MiB:.0f} MiB")
        assert unloaded.state == worker_pb2.WORKER_STATE_EMPTY and unloaded.weight_bytes == 0
        assert dropped >= loaded.weight_bytes // 2, (loaded.rss_bytes, unloaded.rss_bytes, loaded.weight_bytes)
    finally:
        loop.run(worker.stop(0))
