"""A real pipeline on 2 pinned cores: SmolLM2-135M split in 2 stages (15 + 15 layers), each stage a worker
process pinned to its own core with one compute thread, against the whole model in one process pinned to one
core with one thread, in the same run, interleaved rounds, medians.

The work is a stream of M micro-batches, each B new sequences of L prompt tokens (random ids, seeded): a
prefill that ends with the logits of each sequence's last position and its greedy token, on both sides (the
baseline passes `logits_to_keep=1`; the last stage computes only those rows). Every micro-batch's tokens are
compared between the two sides.

- whole model: the M micro-batches one after another in the baseline process (pinned to core 0, 1 thread);
- pipeline, one at a time: the same micro-batches through the 2 workers, each waiting for the previous one
  (what the split costs without pipelining: two computes in series plus two hops);
- pipeline, streamed: all M sent at once through the chain client, so stage 0 computes micro-batch k+1 while
  stage 1 computes k. The ideal is 2x the whole model (each stage does half the work, both cores busy);
- the machine's own ceiling: two whole-model processes, one pinned to each core, each computing the M
  micro-batches at the same time (data parallel, nothing shared but the machine). If 2 cores do not give 2x
  there (shared caches, memory bandwidth, or virtual cores on one physical core), no pipeline can.

The workers are started by the launcher's `LocalCluster` (so exactly as `coordinator launch` runs them) with
OMP_NUM_THREADS=1, then every thread of stage i's process is pinned to core i. The coordinator and the driver
(this process) are pinned to core 0, beside stage 0: their CPU seconds during the run are reported. Each stage's
busy and bubble seconds come from its own /metrics (shard_worker/metrics.py).

    python bench/pipeline.py [--rounds 3] [--micro-batches 32] [--batch 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["OMP_NUM_THREADS"] = "1"  # the workers' compute threads (spawned workers take this environment)

from bench.common import Baseline, cpu_seconds, free_port, pin, result, scrape, table  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.serving.chain import ChainClient, end_sessions  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shardline.v1 import worker_pb2  # noqa: E402

BUSY, BUBBLE = "shardline:stage_busy_seconds", "shardline:stage_bubble_seconds"
DRIVER_CORE = 0


def micro_batches(m: int, b: int, length: int, vocab: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(100, vocab) for _ in range(length)] for _ in range(b)] for _ in range(m)]


class Pipeline:
    def __init__(self, cluster: LocalCluster) -> None:
        assert cluster.coordinator is not None
        fleet = cluster.coordinator.fleet
        replica = fleet.replicas[0]
        self.addresses = [w.address for w in replica.assignment]
        self.layers = [f"[{s.start}, {s.end})" for s in replica.stages]
        self.links = fleet.shared.links
        self.chain = ChainClient(self.addresses, self.links)
        by_address = {p.address: p for p in cluster.processes}
        self.pids = [by_address[a].process.pid for a in self.addresses]
        self.urls = [by_address[a].metrics_url for a in self.addresses]
        self.round = 0

    def pin(self) -> None:
        for core, pid in enumerate(self.pids):
            pin(pid, {core})
        pin(os.getpid(), {DRIVER_CORE})

    def metrics(self) -> list[dict[str, float]]:
        return [scrape(url, BUSY, BUBBLE) for url in self.urls]

    async def run(self, batches: list[list[list[int]]], streamed: bool) -> tuple[float, list[list[int]], dict]:
        self.round += 1
        sessions: list[str] = []

        def step(k: int, batch: list[list[int]]):  # type: ignore[no-untyped-def]
            seqs = []
            for j, ids in enumerate(batch):
                sid = f"p{self.round}m{k}s{j}"
                sessions.append(sid)
                seqs.append(worker_pb2.SequenceSlice(session_id=sid, start_position=0, num_tokens=len(ids)))
            return self.chain.step(seqs, [t for ids in batch for t in ids])

        before, cpu0 = self.metrics(), [cpu_seconds(p) for p in (*self.pids, os.getpid())]
        began = time.perf_counter()
        if streamed:
            replies = await asyncio.gather(*(step(k, b) for k, b in enumerate(batches)))
        else:
            replies = [await step(k, b) for k, b in enumerate(batches)]
        seconds = time.perf_counter() - began
        cpu1 = [cpu_seconds(p) for p in (*self.pids, os.getpid())]
        await end_sessions(self.addresses, sessions, self.links)  # also closes each stage's bubble account
        after = self.metrics()
        stats = {"busy": [(a[BUSY] - b[BUSY]) / seconds for a, b in zip(after, before, strict=True)],
                 "bubble": [(a[BUBBLE] - b[BUBBLE]) / seconds for a, b in zip(after, before, strict=True)],
                 "cpu": [(c1 - c0) / seconds for c0, c1 in zip(cpu0, cpu1, strict=True)]}
        return seconds, [list(r.token_ids) for r in replies], stats


def both_cores(processes: list[Baseline], batches: list[list[list[int]]]) -> float:
    """Wall seconds for every process to compute all of `batches`, at the same time."""
    began = time.perf_counter()
    for p in processes:
        p.send("prefill", batches=batches)
    for p in processes:
        p.receive()
    return time.perf_counter() - began


async def main(args: argparse.Namespace) -> None:
    store = ModelStore(args.store or default_store())
    path = store.path("smollm2")
    config = CoordinatorConfig(store=store.root, model="smollm2", workers=2, port=free_port(), micro_batch_groups=1,
                               metrics_port=0)
    cluster = LocalCluster(config)
    baseline = Baseline(path, threads=1, cpus="0")
    other = Baseline(path, threads=1, cpus="1")  # for the machine's ceiling: one whole model on each core
    await cluster.start()
    try:
        pipe = Pipeline(cluster)
        pipe.pin()
        vocab = 49152
        warm = micro_batches(2, args.batch, args.tokens, vocab, seed=1)
        await pipe.run(warm, streamed=True)
        baseline.call("prefill", batches=warm)
        other.call("prefill", batches=warm)
        batches = micro_batches(args.micro_batches, args.batch, args.tokens, vocab, seed=0)
        rows: dict[str, list[float]] = {"whole": [], "serial": [], "streamed": [], "both": []}
        stats: list[dict] = []
        mismatched = 0
        for r in range(args.rounds):
            reply = await asyncio.to_thread(baseline.call, "prefill", batches=batches)
            rows["whole"].append(reply["seconds"])
            rows["both"].append(await asyncio.to_thread(both_cores, [baseline, other], batches))
            seconds, tokens, _ = await pipe.run(batches, streamed=False)
            rows["serial"].append(seconds)
            seconds, streamed_tokens, s = await pipe.run(batches, streamed=True)
            rows["streamed"].append(seconds)
            stats.append(s)
            expected: list[list[int]] = reply["tokens"]  # type: ignore[assignment]
            mismatched += sum(x != y for got in (tokens, streamed_tokens) for a, b in zip(got, expected, strict=True)
                              for x, y in zip(a, b, strict=True))
            print(f"round {r + 1}: whole {rows['whole'][-1]:.2f} s, one at a time {rows['serial'][-1]:.2f} s, "
                  f"streamed {seconds:.2f} s", flush=True)
    finally:
        await cluster.stop()
        baseline.close()
        other.close()
    m = args.micro_batches
    whole, serial, streamed, both = (statistics.median(rows[k]) for k in ("whole", "serial", "streamed", "both"))
    mid = stats[sorted(range(len(stats)), key=lambda i: rows["streamed"][i])[len(stats) // 2]]
    speedup = whole / streamed
    busy = " / ".join(f"{b:.2f}" for b in mid["busy"])
    bubble = " / ".join(f"{b:.2f}" for b in mid["bubble"])
    print(f"SmolLM2-135M, 2 stages {' + '.join(pipe.layers)}; M = {m} micro-batches of {args.batch} x "
          f"{args.tokens} tokens; medians of {args.rounds} rounds; tokens differing from the whole model: "
          f"{mismatched} of {args.rounds * 2 * m * args.batch}")
    print(table(["", "seconds", "micro-batches/s", "vs whole model"], [
        ["whole model, 1 process on core 0, 1 thread", f"{whole:.2f}", f"{m / whole:.2f}", "1.00x"],
        ["2 stages, one micro-batch at a time", f"{serial:.2f}", f"{m / serial:.2f}", f"{whole / serial:.2f}x"],
        [f"2 stages, {m} streamed", f"{streamed:.2f}", f"{m / streamed:.2f}", f"**{speedup:.2f}x** "
         f"({speedup / 2:.2f} of the ideal 2x)"],
        [f"ceiling: 2 whole-model processes, one per core, {m} each at once", f"{both:.2f}", f"{2 * m / both:.2f}",
         f"{2 * whole / both:.2f}x"]]))
    print(f"the pipeline reaches {speedup / (2 * whole / both):.2f} of what 2 whole-model processes get from the 2 "
          "cores")
    print(f"streamed run (median round): busy per stage (of wall) {busy}; bubble per stage {bubble}; CPU cores: "
          f"stage 0 {mid['cpu'][0]:.2f}, stage 1 {mid['cpu'][1]:.2f}, coordinator + driver (core {DRIVER_CORE}) "
          f"{mid['cpu'][2]:.2f}")
    result("pipeline", f"2 pinned cores, {m} micro-batches streamed", f"{m / whole:.2f} mb/s",
           f"{m / streamed:.2f} mb/s", f"{speedup:.2f}x (ideal 2x)", ">= 1.8x")
    result("pipeline", "bubble per stage (of wall)", "", bubble, f"busy {busy}", "")
    result("pipeline", "ceiling: 2 whole-model processes on 2 cores", f"{m / whole:.2f} mb/s",
           f"{2 * m / both:.2f} mb/s", f"{2 * whole / both:.2f}x", "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
