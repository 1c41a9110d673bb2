"""The parameter service sends a worker exactly its shard's bytes, and a corrupted byte is never loaded."""

from __future__ import annotations

import dataclasses
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.store.models import ModelStore
from coordinator.store.parameters.server import start_parameter_server
from shardline.server import CHANNEL_OPTIONS
from shardline.v1 import parameters_pb2, parameters_pb2_grpc, worker_pb2
from tests.helpers import load, seq, worker_stub


def stats(address):
    stub = parameters_pb2_grpc.ParametersStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
    return stub.GetStats(parameters_pb2.GetStatsRequest())


@pytest.mark.parametrize("start, end", [(0, 2), (2, 4), (4, 6), (0, 6)])
def test_worker_receives_exactly_its_layers(store, parameters, workers, start, end):
    manifest = store.manifest("tiny-llama")
    expected = sum(t.size_bytes for t in manifest.tensors
                   if (t.part == "layer" and start <= t.layer < end)
                   or (t.part == "embed" and start == 0) or (t.part == "head" and end == 6))
    (worker,) = workers(1)
    before = stats(parameters.address).bytes_sent
    progress = load(worker.address, "tiny-llama", start, end, parameters.address)
    assert stats(parameters.address).bytes_sent - before == expected
    assert progress[-1].phase == worker_pb2.LOAD_PHASE_READY
    fetching = [p for p in progress if p.phase == worker_pb2.LOAD_PHASE_FETCHING]
    assert fetching[-1].bytes_done == fetching[-1].bytes_total == expected
    status = worker_stub(worker.address).GetStatus(worker_pb2.GetStatusRequest())
    assert status.weight_bytes == expected and status.state == worker_pb2.WORKER_STATE_READY


def test_fetch_unknown_tensor_and_resume_offset(parameters):
    stub = parameters_pb2_grpc.ParametersStub(grpc.insecure_channel(parameters.address, options=CHANNEL_OPTIONS))
    request = parameters_pb2.FetchTensorsRequest(model="tiny-llama",
                                                 tensors=[parameters_pb2.TensorRequest(name="model.nope.weight")])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.FetchTensors(request))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model.nope.weight" in err.value.details()
    name = "model.layers.0.mlp.up_proj.weight"  # 128 x 64 float32 = 32768 bytes
    whole = b"".join(c.data for c in stub.FetchTensors(parameters_pb2.FetchTensorsRequest(
        model="tiny-llama", tensors=[parameters_pb2.TensorRequest(name=name)], chunk_size_bytes=4096)))
    tail = list(stub.FetchTensors(parameters_pb2.FetchTensorsRequest(
        model="tiny-llama", tensors=[parameters_pb2.TensorRequest(name=name, offset_bytes=30000)])))
    assert len(whole) == 32768 and tail[0].offset_bytes == 30000 and b"".join(c.data for c in tail) == whole[30000:]


def test_a_manifest_naming_a_file_outside_its_model_is_refused(loop, store, tmp_path):
    """A store copied from elsewhere cannot make the parameter service read the host's files."""
    outside = ModelStore(tmp_path / "store")
    shutil.copytree(store.path("tiny-llama"), outside.path("tiny-llama"))
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    manifest = outside.manifest("tiny-llama")
    victim = manifest.tensors[0]
    escaped = dataclasses.replace(manifest, tensors=[dataclasses.replace(victim, file="../../secret.bin",
                                                                         offset_bytes=0), *manifest.tensors[1:]])
    (outside.path("tiny-llama") / "manifest.json").write_text(escaped.to_json())
    server = loop.run(start_parameter_server(outside))
    try:
        stub = parameters_pb2_grpc.ParametersStub(grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchTensors(parameters_pb2.FetchTensorsRequest(
                model="tiny-llama", tensors=[parameters_pb2.TensorRequest(name=victim.name)]), timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "outside the model's directory" in err.value.details() and "../../secret.bin" in err.value.details()
    finally:
        loop.run(server.stop(0))


def test_flipped_byte_fails_load_naming_tensor(loop, store, workers, tmp_path):
    corrupt = ModelStore(tmp_path)
    shutil.copytree(store.path("tiny-llama"), corrupt.path("tiny-llama"))
    victim = next(t for t in corrupt.manifest("tiny-llama").tensors if t.layer == 1)
    with open(corrupt.path("tiny-llama") / victim.file, "r+b") as f:
        f.seek(victim.offset_bytes + 17)
        byte = f.read(1)
        f.seek(victim.offset_bytes + 17)
        f.write(bytes([byte[0] ^ 0x01]))
    server = loop.run(start_parameter_server(corrupt))
    try:
        (worker,) = workers(1)
        load(worker.address, "tiny-llama", 2, 4, server.address)  # a good load first: it must be dropped
        with pytest.raises(grpc.RpcError) as err:
            load(worker.address, "tiny-llama", 0, 3, server.address)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert victim.name in err.value.details()
        stub = worker_stub(worker.address)
        status = stub.GetStatus(worker_pb2.GetStatusRequest())
        assert status.state == worker_pb2.WORKER_STATE_FAILED and victim.name in status.last_error
        assert status.weight_bytes == 0
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(worker.address))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        request = worker_pb2.ForwardRequest(step_id=1, sequences=[seq("s", 0, 1)], token_ids=[1], start_layer=0)
        (response,) = stub.Forward(iter([request]), timeout=60)
        assert response.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    finally:
        loop.run(server.stop(0))


@pytest.mark.chaos
def test_a_stalled_parameter_service_fails_the_load_in_time_naming_it_and_frees_the_loader(
        loop, parameters, workers, monkeypatch):
    """The service's link slows to a trickle mid-transfer (20 KB/s: a stall, for a 2 MB shard): the load fails
    within its deadline (here 1 s of grace, as it is 30 s plus the bytes at 2 MB/s), naming the service; the
    worker's loader is free again, and the next LoadShard succeeds."""
    import time

    from shard_worker import weights
    from tests.faults import FaultProxy

    monkeypatch.setattr(weights, "FETCH_GRACE_S", 1.0)
    proxy = loop.run(FaultProxy.start(parameters.address))
    (worker,) = workers(1)
    try:
        proxy.rate_bytes_s = 20_000
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            load(worker.address, "tiny-llama", 0, 6, proxy.address)
        assert time.monotonic() - began < 15
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"parameter service {proxy.address} sent" in err.value.details() and "stalled" in err.value.details()
        proxy.rate_bytes_s = 0
        assert load(worker.address, "tiny-llama", 0, 6, proxy.address)[-1].phase == worker_pb2.LOAD_PHASE_READY
    finally:
        loop.run(proxy.close())


def test_a_load_naming_other_weights_than_the_stores_is_refused_before_a_byte(store, parameters, workers):
    """A deployment's weights are the store's when it began: a store whose model was re-imported since
    (--overwrite) fails the load, so a chain never mixes two versions of the weights."""
    (worker,) = workers(1)
    with pytest.raises(grpc.RpcError) as err:
        load(worker.address, "tiny-llama", 0, 6, parameters.address, weights_digest="0" * 64)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "weights changed since it was loaded" in err.value.details()
    digest = store.manifest("tiny-llama").digest
    assert load(worker.address, "tiny-llama", 0, 6, parameters.address,
                weights_digest=digest)[-1].phase == worker_pb2.LOAD_PHASE_READY
    status = worker_stub(worker.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
    assert status.weights_digest == digest and status.loads == 1  # the refused load fetched nothing


@pytest.mark.chaos
def test_a_replica_whose_load_failed_retries_on_its_own_once_the_service_recovers(
        loop, store, parameters, workers, monkeypatch, tmp_path):
    """The parameter service stalls during the first deployment: the replica fails, naming it. Nothing else
    changes (no worker joins), and once the service flows again the replica retries on its own, with back-off,
    and serves."""
    import time

    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig
    from shard_worker import weights
    from shardline.client import Client
    from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc
    from tests.faults import FaultProxy

    monkeypatch.setattr(weights, "FETCH_GRACE_S", 0.5)
    proxy = loop.run(FaultProxy.start(parameters.address))
    proxy.rate_bytes_s = 20_000
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=1, port=0, http=False,
                               parameters_address=proxy.address, heartbeat_timeout_ms=3_600_000,
                               heartbeat_interval_ms=200, jobs_dir=tmp_path)
    coordinator = loop.run(start_coordinator(config))
    try:
        (worker,) = workers(1)
        coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address)).RegisterWorker(
            coordinator_pb2.RegisterWorkerRequest(address=worker.address, memory_budget_bytes=2**30))
        with Client(coordinator.address, timeout=30) as client:
            deadline = time.monotonic() + 30
            while (status := client.cluster_status()).state != "failed":
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert f"parameter service {proxy.address}" in status.message and "stalled" in status.message
            proxy.rate_bytes_s = 0
            client.wait_ready(timeout=60)
            assert client.generate([1, 2, 3], max_tokens=3, temperature=0).completion_tokens == 3
    finally:
        loop.run(coordinator.stop())
        loop.run(proxy.close())


def test_a_slow_status_at_install_is_asked_again_not_taken_for_no_kv_admission(loop, parameters, workers):
    """The chain's KV capacity is read once a chain is installed: a stage slow to answer GetStatus once is asked
    again with a longer timeout, instead of turning admission off for the chain's life."""
    from coordinator.fleet.worker_calls import chain_capacity
    from shardline.stream import LinkSettings
    from tests.faults import FaultProxy

    (worker,) = workers(1)
    load(worker.address, "tiny-llama", 0, 6, parameters.address)
    proxy = loop.run(FaultProxy.start(worker.address))
    proxy.delay_s = 0.1  # a GetStatus takes 4 delays here (a new connection, then the call): 0.4 s
    try:
        assert loop.run(chain_capacity([proxy.address], 0.3, LinkSettings(), tries=1)) is None
        budget = loop.run(chain_capacity([proxy.address], 0.3, LinkSettings()))
        assert budget is not None and budget.blocks_total > 0
    finally:
        loop.run(proxy.close())
