"""The prefix cache: time to first token of a request whose 1,000-token prefix the cluster has seen, against
the same kind of request cold, on the built-in SmolLM2 over 2 worker processes (as `coordinator launch` runs
them: LocalCluster, one micro-batch group), greedy, through the SDK.

Each round takes a new random 1,000-token prefix P and three 20-token questions:
    off    P' + q0 with the prefix cache turned off (the scheduler as `prefix_cache = false` leaves it)
    cold   P + q1, the cache on but holding nothing of P (it stores P's blocks as it goes)
    warm   P + q2, right after: P's blocks are reused on every stage, only the question is computed
Every request produces exactly one token before it is timed out of the stream (checked), and the workers'
counters (GetStatus) show how many positions each side computed and reused. Medians over the rounds; the
target is warm <= 0.2 x cold.

    python bench/prefix.py [--rounds 5] [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.common import free_port, result  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402
from shardline.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

PREFIX, QUESTION = 1000, 20


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


async def first_token(endpoint: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds to the first token of a streamed greedy request, and that token."""
    async with AsyncClient(endpoint, timeout=600) as client:
        began = time.perf_counter()
        async for chunk in await client.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True, stream=True):
            if chunk.token_ids:
                return time.perf_counter() - began, chunk.token_ids[0]
    raise SystemExit("no token: the comparison is void")


def computed(addresses: list[str]) -> list[tuple[int, int]]:
    """(prefill positions computed, positions reused) per stage."""
    out = []
    for a in addresses:
        m = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(a)).GetStatus(
            worker_pb2.GetStatusRequest(), timeout=10).metrics
        out.append((m.prefill_tokens, m.prefix_tokens_reused))
    return out


async def measure(endpoint: str, cluster: LocalCluster, prompt: list[int], cache: bool) -> tuple[float, str]:
    scheduler = cluster.coordinator.fleet.first.scheduler.policy  # type: ignore[union-attr]
    index = scheduler.prefixes
    if not cache:
        scheduler.prefix_cache, scheduler.prefixes = False, None
    addresses = [p.address for p in cluster.processes]
    before = await asyncio.to_thread(computed, addresses)
    try:
        seconds, _ = await first_token(endpoint, prompt)
    finally:
        scheduler.prefix_cache, scheduler.prefixes = True, index
    after = await asyncio.to_thread(computed, addresses)
    work = ", ".join(f"{a[0] - b[0]}+{a[1] - b[1]}" for a, b in zip(after, before, strict=True))
    return seconds, work


async def main(args: argparse.Namespace) -> None:
    store = ModelStore(args.store)
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    port = free_port()
    config = CoordinatorConfig(store=args.store, model="smollm2", workers=2, port=port, micro_batch_groups=1)
    cluster = LocalCluster(config)
    await cluster.start()
    endpoint = f"127.0.0.1:{port}"
    rng = random.Random(13)
    try:
        await first_token(endpoint, ids(rng, 64))  # warm up
        rows: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
        for r in range(args.rounds):
            prefix, other = ids(rng, PREFIX), ids(rng, PREFIX)
            q0, q1, q2 = ids(rng, QUESTION), ids(rng, QUESTION), ids(rng, QUESTION)
            line = []
            for name, prompt, cache in (("off", other + q0, False), ("cold", prefix + q1, True),
                                        ("warm", prefix + q2, True)):
                seconds, work = await measure(endpoint, cluster, prompt, cache)
                rows[name].append(seconds)
                line.append(f"{name} {seconds * 1000:.0f} ms (computed+reused per stage: {work})")
            print(f"  round {r + 1}: " + "; ".join(line), flush=True)
        off, cold, warm = (statistics.median(rows[k]) for k in ("off", "cold", "warm"))
        print("| time to first token, 1,000-token prefix + 20-token question | median | / cold |\n|---|---:|---:|")
        print(f"| cache off | {off * 1000:.0f} ms | {off / cold:.2f}x |")
        print(f"| cold (cache on, prefix not seen) | {cold * 1000:.0f} ms | 1.00x |")
        print(f"| warm (prefix seen before) | {warm * 1000:.0f} ms | {warm / cold:.2f}x |")
        result("prefix", "TTFT, 1000-token shared prefix + 20", f"{cold * 1000:.0f} ms cold",
               f"{warm * 1000:.0f} ms", f"{warm / cold:.2f}x", "<= 0.2x")
    finally:
        await cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=default_store())
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
