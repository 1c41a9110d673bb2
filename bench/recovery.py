"""Recovery time after SIGKILL of a worker, with and without a spare, against baselines from the same run.

SmolLM2-135M on `coordinator launch`'s LocalCluster (3 worker processes, fp32). 16 greedy streams of 48
tokens run; once each has 4 tokens, the process of the middle stage is killed with SIGKILL. Measured:
  - the gap from the kill to the next token of every stream (max and median over the 16 streams);
  - the breakdown: notice (kill -> recovery starts), detect (probe), plan, load, then replay (recovery done
    -> the last stream's next token);
  - baselines, same run: the streams' median gap between two tokens undisturbed, and the cold deployment
    of the same cluster (start -> ready).
Every stream must produce exactly the tokens of the undisturbed run (checked), or the run fails.

    python bench/recovery.py [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402

NEW = 48
CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos",
          "Quito", "Seoul", "Dublin", "Athens", "Prague"]
PROMPTS = [f"The history of the city of {c} began" for c in CITIES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_streams(endpoint: str, kill_at: int = 0, kill: object = None) -> tuple[list[list[int]],
                                                                                    list[list[float]], float]:
    """16 greedy streams; each token's arrival time (perf_counter); SIGKILL via `kill` once every stream
    has `kill_at` tokens. Returns tokens, arrival times and the kill time."""
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    times: list[list[float]] = [[] for _ in PROMPTS]
    killed = 0.0
    async with AsyncClient(endpoint, timeout=600) as client:
        async def one(i: int) -> None:
            async for chunk in await client.generate(PROMPTS[i], stream=True, max_tokens=NEW, temperature=0):
                now = time.perf_counter()
                for t in chunk.token_ids:
                    tokens[i].append(t)
                    times[i].append(now)

        async def fire() -> None:
            nonlocal killed
            if not kill_at:
                return
            while min(len(t) for t in tokens) < kill_at:
                await asyncio.sleep(0.005)
            killed = time.perf_counter()
            kill()  # type: ignore[operator]

        await asyncio.gather(*(one(i) for i in range(len(PROMPTS))), fire())
    return tokens, times, killed


async def scenario(store: Path, spares: int) -> dict[str, float]:
    port = free_port()
    config = CoordinatorConfig(store=store, model="smollm2", workers=3, port=port, micro_batch_groups=1,
                               rebalance_on_join=False, probe_timeout_ms=1000)
    cluster = LocalCluster(config, worker_memory_mb=1024, spares=spares)
    try:
        cold = await cluster.start(say=lambda line: None)
        endpoint = f"127.0.0.1:{port}"
        await run_streams(endpoint)  # warm-up
        reference, ref_times, _ = await run_streams(endpoint)
        gaps = [b - a for ts in ref_times for a, b in zip(ts, ts[1:], strict=False)]
        c = cluster.coordinator.fleet.first  # type: ignore[union-attr]
        victim_address = c.assignment[1].address
        victim = next(p for p in cluster.processes if p.address == victim_address)
        tokens, times, killed = await run_streams(endpoint, 4, lambda: os.kill(victim.process.pid, signal.SIGKILL))
        if tokens != reference:
            raise SystemExit("replayed tokens differ from the undisturbed run")
        if [len(t) for t in tokens] != [NEW] * len(PROMPTS):
            raise SystemExit("a stream ended early: the comparison would be unfair")
        after = [next(t for t in ts if t > killed) - killed for ts in times]
        p = c.last_recovery_phases
        return dict(cold=cold, gap=statistics.median(gaps), max=max(after), median=statistics.median(after),
                    notice=p["began"] - killed, detect=p["detected"] - p["began"], plan=p["planned"] - p["detected"],
                    load=p["loaded"] - p["planned"], replay=killed + max(after) - p["serving"],
                    workers=len(c.assignment))
    finally:
        await cluster.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="shardline-bench-"))
    if not ModelStore(store).has("smollm2"):
        import_gguf(ModelStore(store), builtin_gguf(), "smollm2")
    print("| case | kill -> next token of every stream (max / median) | notice | detect | plan | load | replay "
          "| chain after | undisturbed token gap (same run) | cold deploy (same run) | recovery / cold deploy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spares, label in ((1, "with a spare"), (0, "no spare (re-plan onto 2)")):
        r = await scenario(store, spares)
        print(f"| {label} | {r['max']:.2f} s / {r['median']:.2f} s | {r['notice']:.2f} s | {r['detect']:.2f} s "
              f"| {r['plan']:.3f} s | {r['load']:.2f} s | {r['replay']:.2f} s | {r['workers']:.0f} workers "
              f"| {r['gap'] * 1000:.0f} ms | {r['cold']:.1f} s | {r['max'] / r['cold']:.2f}x |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
