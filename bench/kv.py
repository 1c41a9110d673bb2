"""KV memory and overload, measured on SmolLM2-135M (fp32, greedy) through worker processes on this machine.

decode  64 concurrent streams (64 new tokens each, ignore_eos, so both sides produce exactly 64 x 64 tokens)
        against `transformers` `generate` on the same 64 prompts as one static batch, in the same run, with
        one worker (one compute process on each side) and with three; plus each worker's peak RSS next to
        its weights + reported KV capacity + headroom.
burst   500 requests of mixed lengths at once against workers with a small memory budget: completed,
        refused (RESOURCE_EXHAUSTED), errors, p50/p99 latency of the completed, KV preemptions and each
        worker's peak RSS against its budget.

    python bench/kv.py [decode|burst|all] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.generate import NEW, free_port, hf_generate  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402
from shardline.errors import ResourceExhausted  # noqa: E402
from shardline.limits import process_bound  # noqa: E402
from shardline.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

STREAMS = 64
TOPICS = ["city", "river", "mountain", "forest", "library", "harbor", "market", "bridge"]
PLACES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid"]
PROMPTS = [f"The history of the {t} of {p} began" for t in TOPICS for p in PLACES]


class PeakRss:
    """Samples the RSS of some processes every 50 ms; `peak[pid]` is the largest seen."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = {p.pid: 0 for p in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(5)
        return self.peak


async def ours_generate(endpoint: str, prompts: list[str]) -> tuple[float, int]:
    async with AsyncClient(endpoint, timeout=900) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(client.generate(p, max_tokens=NEW, temperature=0, ignore_eos=True)
                                         for p in prompts))
        return time.perf_counter() - began, sum(len(r.token_ids) for r in results)


def print_memory(cluster: LocalCluster, peak: dict[int, int]) -> None:
    """Per worker: peak RSS next to what it planned (weights, KV capacity, headroom) and its budget."""
    print("| stage | peak RSS | weights | KV capacity | headroom | budget |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for p in cluster.processes:
        with grpc.insecure_channel(p.address) as ch:
            s = worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
        mib = 2**20
        rows.append(f"| [{s.start_layer}, {s.end_layer}) | {peak[p.process.pid] / mib:.0f} MiB | "
                    f"{s.weight_bytes / mib:.0f} MiB | {s.kv.capacity_bytes / mib:.0f} MiB "
                    f"({s.kv.capacity_tokens} tokens) | {s.kv.headroom_bytes / mib:.0f} MiB | "
                    f"{s.kv.memory_budget_bytes / mib:.0f} MiB |")
    print("\n".join(rows))


async def decode(store_dir: Path) -> None:
    path = store_dir / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    await asyncio.to_thread(hf_generate, model, tokenizer, PROMPTS[:2])  # warm up
    for workers in (1, 3):
        config = CoordinatorConfig(store=store_dir, model="smollm2", workers=workers, port=free_port(),
                                   micro_batch_groups=1)
        cluster = LocalCluster(config)
        await cluster.start()
        endpoint = f"127.0.0.1:{config.port}"
        try:
            await ours_generate(endpoint, PROMPTS[:2])
            peak = PeakRss([p.process.pid for p in cluster.processes])
            hf_runs, our_runs = [], []
            for _ in range(2):  # interleaved
                seconds, tokens = await asyncio.to_thread(hf_generate, model, tokenizer, PROMPTS[:STREAMS])
                assert tokens == STREAMS * NEW, tokens
                hf_runs.append(tokens / seconds)
                seconds, tokens = await ours_generate(endpoint, PROMPTS[:STREAMS])
                assert tokens == STREAMS * NEW, tokens
                our_runs.append(tokens / seconds)
            hf, ours = statistics.median(hf_runs), statistics.median(our_runs)
            print(f"\n{STREAMS} streams x {NEW} tokens, {workers} worker(s): transformers static batch "
                  f"{hf:.1f} tok/s, shardline {ours:.1f} tok/s, ratio {ours / hf:.2f}x "
                  f"(runs: hf {[round(x, 1) for x in hf_runs]}, ours {[round(x, 1) for x in our_runs]})")
            print_memory(cluster, peak.stop())
        finally:
            await cluster.stop()


async def burst(store_dir: Path, budget_mb: int, requests: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(store_dir / "smollm2")
    rng = random.Random(0)
    words = "the a river city stone light north market old new bridge song winter road".split()
    plans = []
    for _ in range(requests):
        n = rng.choice([16, 64, 256, 768])
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(n)))["input_ids"][:n]
        plans.append((tokenizer.decode(ids), rng.choice([8, 32, 64])))
    config = CoordinatorConfig(store=store_dir, model="smollm2", workers=3, port=free_port(), micro_batch_groups=1)
    # --budget-mb is the shard's memory; --worker-memory-mb bounds the whole process, its runtime included
    cluster = LocalCluster(config, worker_memory_mb=process_bound(budget_mb * 2**20) // 2**20)
    await cluster.start()
    endpoint = f"127.0.0.1:{config.port}"
    latencies: list[float] = []
    refused = errors = 0
    try:
        peak = PeakRss([p.process.pid for p in cluster.processes])

        async def one(client: AsyncClient, prompt: str, max_tokens: int) -> None:
            nonlocal refused, errors
            began = time.perf_counter()
            try:
                await client.generate(prompt, max_tokens=max_tokens, temperature=0)
                latencies.append(time.perf_counter() - began)
            except ResourceExhausted:
                refused += 1
            except Exception as exc:  # noqa: BLE001 - counted and shown
                errors += 1
                print("error:", type(exc).__name__, exc)

        began = time.perf_counter()
        async with AsyncClient(endpoint, timeout=1800) as client:
            await asyncio.gather(*(one(client, p, m) for p, m in plans))
        wall = time.perf_counter() - began
        scheduler = cluster.coordinator.fleet.first.scheduler.policy if cluster.coordinator else None
        latencies.sort()
        p50 = latencies[len(latencies) // 2] if latencies else 0
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0
        print(f"\nburst of {requests} requests (prompts of 16-768 tokens, 8-64 new), workers with "
              f"--worker-memory-mb {budget_mb}: completed {len(latencies)}, refused {refused}, errors {errors}; "
              f"p50 {p50:.1f} s, p99 {p99:.1f} s; wall {wall:.0f} s; "
              f"preemptions {scheduler.preempted if scheduler else '?'}")
        print_memory(cluster, peak.stop())
    finally:
        await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="all", choices=["decode", "burst", "all"])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--budget-mb", type=int, default=480)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()

    def run(store_dir: Path) -> None:
        store = ModelStore(store_dir)
        if not store.has("smollm2"):
            import_gguf(store, builtin_gguf(), "smollm2")
        if args.what in ("decode", "all"):
            asyncio.run(decode(store_dir))
        if args.what in ("burst", "all"):
            asyncio.run(burst(store_dir, args.budget_mb, args.requests))

    if args.store:
        run(args.store)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))


if __name__ == "__main__":
    main()
