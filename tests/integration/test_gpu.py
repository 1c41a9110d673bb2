"""CUDA stages (shard_worker/device.py): SmolLM2 over a CPU worker and a GPU worker, and over two GPU workers,
gives transformers' greedy tokens on the same device and dtype; a random Llama of 9 GB in bfloat16 splits over
three GPU workers whose budgets cannot hold it in two; --engine deepspeed gives the torch engine's tokens.
Skipped without a CUDA device (tests/conftest.py); not yet run on one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shard_worker.device import DeviceSettings
from shard_worker.engine import deepspeed_installed
from shard_worker.server import start_worker
from shardline.v1 import tensor_pb2, worker_pb2
from tests.helpers import Chain, load, worker_stub

pytestmark = pytest.mark.gpu

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
STEPS = 8
CUDA = torch.device("cuda", 0)
HALVES = [(0, 15), (15, 30)]


@pytest.fixture()
def started(loop):
    servers = []

    def start(settings: DeviceSettings, memory_budget_bytes: int = 0):
        server = loop.run(start_worker(memory_budget_bytes=memory_budget_bytes, device=settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        loop.run(server.stop(0))


def reference(path, dtype: torch.dtype, device: torch.device) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        with torch.no_grad():
            out.append(model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                      do_sample=False)[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def run_chain(servers, parameters, tokenizer, tag: str) -> list[list[int]]:
    for server, (a, b) in zip(servers, HALVES, strict=True):
        load(server.address, "smollm2", a, b, parameters.address)
    chain = Chain([s.address for s in servers])
    return [chain.greedy(f"{tag}-{i}", tokenizer(p)["input_ids"], STEPS) for i, p in enumerate(PROMPTS)]


def test_smollm2_over_a_cpu_and_a_gpu_worker_matches_transformers(smollm2_store, parameters, started):
    path = smollm2_store.path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32: the CPU stage's hidden states cross to the GPU stage (moved to its device at the boundary)
    servers = [started(DeviceSettings(dtype="float32")), started(DeviceSettings(CUDA, "float32"))]
    tokens = run_chain(servers, parameters, tokenizer, "mixed")
    assert tokens == reference(path, torch.float32, torch.device("cpu"))
    assert tokens == reference(path, torch.float32, CUDA)


def test_smollm2_over_two_gpu_workers_matches_transformers_in_bfloat16(smollm2_store, parameters, started):
    path = smollm2_store.path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    servers = [started(DeviceSettings(CUDA, "bfloat16")) for _ in range(2)]
    tokens = run_chain(servers, parameters, tokenizer, "gpu")
    for server in servers:
        status = worker_stub(server.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
        assert (status.device.device, status.device.dtype) == ("cuda:0", tensor_pb2.DTYPE_BFLOAT16)
        assert 0 < status.device.memory_free_bytes < status.device.memory_total_bytes
        stage = server.servicer.shard.runtime.stage
        assert {p.device.type for p in stage.modules.parameters()} == {"cuda"}  # weights straight on the GPU
    assert tokens == reference(path, torch.bfloat16, CUDA)


@pytest.mark.skipif(not deepspeed_installed(), reason="needs pip install 'shardline[deepspeed]'")
def test_the_deepspeed_engine_gives_the_torch_engines_tokens(smollm2_store, parameters, started):
    path = smollm2_store.path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch_engine = [started(DeviceSettings(CUDA, "float16")) for _ in range(2)]
    expected = run_chain(torch_engine, parameters, tokenizer, "torch")
    deepspeed = [started(DeviceSettings(CUDA, "float16", engine="deepspeed")) for _ in range(2)]
    assert run_chain(deepspeed, parameters, tokenizer, "deepspeed") == expected


BIG = "random-llama-9gb"


@pytest.mark.slow  # writes and loads 9 GB: minutes, not the default 300 s
@pytest.mark.timeout(1800)
def test_a_random_llama_of_9_gb_in_bfloat16_splits_over_three_gpu_workers(store, parameters, started):
    """The planner cannot fit it in two workers' budgets (it says how many MiB are missing) and fits it in
    three; the three stages on the GPU give transformers' last-position logits (bfloat16: within 5% of their
    largest magnitude; a random model's logits are too flat to compare greedy tokens) and generate."""
    from coordinator.fleet.planner import PlanDoesNotFit, plan
    from coordinator.store.importer import import_random, random_config

    if not store.has(BIG):  # 24 layers of 4096 wide: 4.5 billion parameters, 9 GB in bfloat16
        import_random(store, BIG, random_config("llama", hidden=4096, layers=24, heads=32, kv_heads=8,
                                                intermediate=11008, vocab=32000, positions=4096),
                      seed=3, dtype=torch.bfloat16)
    manifest = store.manifest(BIG)
    assert manifest.total_size_bytes >= 8 * 2**30
    budget = int(manifest.total_size_bytes * 0.45)  # weights of a third, and room for KV and activations
    with pytest.raises(PlanDoesNotFit, match="MiB missing"):
        plan(manifest, 2, [budget] * 2)
    stages = plan(manifest, 3, [budget] * 3)
    servers = [started(DeviceSettings(CUDA, "bfloat16"), budget) for _ in stages]
    for server, stage in zip(servers, stages, strict=True):
        load(server.address, BIG, stage.start, stage.end, parameters.address)
        status = worker_stub(server.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
        assert status.weight_bytes <= budget and status.device.device == "cuda:0"
    prompt = [1, 450, 7483, 310, 3444, 338]
    chain = Chain([s.address for s in servers])
    ours = torch.from_numpy(chain.logits("big-logits", 0, prompt))[-1].float()
    assert len(chain.greedy("big-greedy", prompt, STEPS)) == STEPS
    for server in servers:
        stage = server.servicer.shard.runtime.stage
        assert {p.device.type for p in stage.modules.parameters()} == {"cuda"}  # weights straight on the GPU
    model = AutoModelForCausalLM.from_pretrained(store.path(BIG), dtype=torch.bfloat16).to(CUDA).eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompt], device=CUDA)).logits[0, -1].float().cpu()
    del model
    torch.cuda.empty_cache()
    assert (ours - expected).abs().max() <= 0.05 * expected.abs().max()
