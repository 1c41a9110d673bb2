"""Where a worker computes (shard_worker/device.py): a worker's --dtype wins over LoadShard's, SmolLM2 in
bfloat16 on CPU over two workers gives transformers' bfloat16 tokens, and a worker reports its device,
memory and dtype in GetStatus and at registration, which the cluster status shows."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.api.server import start_coordinator
from coordinator.cli.tables import device_lines
from coordinator.config import CoordinatorConfig
from shard_worker.device import DeviceSettings
from shard_worker.registration import Registration
from shard_worker.server import start_worker
from shardline.client import Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2, worker_pb2
from tests.helpers import Chain, load, worker_stub

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
STEPS = 8
SMALL_STEPS = dict(max_step_tokens=64, prefill_chunk_tokens=32, max_step_sequences=4)  # a quick headroom probe


@pytest.fixture()
def bf16_workers(loop):
    servers = [loop.run(start_worker(device=DeviceSettings(dtype="bfloat16"))) for _ in range(2)]
    yield servers
    for server in servers:
        loop.run(server.stop(0))


def test_smollm2_bfloat16_on_cpu_matches_transformers(smollm2_store, parameters, bf16_workers):
    # the LoadShard asks for float32: the workers' --dtype bfloat16 wins
    for server, (a, b) in zip(bf16_workers, [(0, 15), (15, 30)], strict=True):
        load(server.address, "smollm2", a, b, parameters.address, dtype=tensor_pb2.DTYPE_FLOAT32, **SMALL_STEPS)
    for server in bf16_workers:
        status = worker_stub(server.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
        device = status.device
        assert (device.device, device.dtype, device.engine) == ("cpu", tensor_pb2.DTYPE_BFLOAT16, "torch")
        assert status.wire_dtype == tensor_pb2.DTYPE_BFLOAT16  # the wire follows the compute dtype
        assert 0 < device.memory_free_bytes <= device.memory_total_bytes and device.name
    path = smollm2_store.path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    chain = Chain([s.address for s in bf16_workers])
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                      do_sample=False)[0, len(ids):].tolist()
        assert chain.greedy(f"bf16-{i}", ids, STEPS) == expected, prompt


def test_registration_reports_the_device_and_status_shows_it(loop, store, parameters):
    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               max_step_tokens=64, prefill_chunk_tokens=32, http=False)
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker(device=DeviceSettings(dtype="bfloat16"))) for _ in range(2)]
    registrations = [Registration(coordinator.address, s.address, 2**30, device=DeviceSettings(dtype="bfloat16"),
                                  fence=s.servicer.fence) for s in servers]

    async def register() -> list[asyncio.Task[None]]:
        return [asyncio.create_task(r.run()) for r in registrations]

    tasks = loop.run(register())
    try:
        with Client(coordinator.address) as client:
            deadline = time.monotonic() + 120
            while not (status := client.cluster_status()).ready and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status.ready, status.message
            assert {w.address for w in status.workers} == {s.address for s in servers}
            for w in status.workers:
                assert (w.device, w.dtype, w.engine) == ("cpu", "bfloat16", "torch")
                assert 0 < w.device_memory_free_bytes <= w.device_memory_total_bytes and w.device_name
            assert client.generate([5, 17, 99], max_tokens=3, temperature=0).token_ids  # it serves in bf16
            lines = device_lines(status.workers)
            assert len(lines) == 3 and all(" cpu " in line and "bfloat16" in line for line in lines[1:])

        registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
        for bad, named in ((dict(device="tpu:0"), "device.device"), (dict(dtype=tensor_pb2.DTYPE_INT8), "device.dtype"),
                           (dict(engine="tensorrt"), "device.engine"), (dict(memory_free_bytes=-1), "device.memory")):
            with pytest.raises(grpc.RpcError) as err:
                registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(
                    address="127.0.0.1:1", memory_budget_bytes=2**30, device=tensor_pb2.DeviceInfo(**bad)), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details()
    finally:
        for task in tasks:
            loop.loop.call_soon_threadsafe(task.cancel)
        for server in servers:
            loop.run(server.stop(0))
        loop.run(coordinator.stop())
