"""Fleet: replicas against as many whole-model processes, a big model over 4 workers per replica, and a model
version loaded while another deployment serves. Each part measures its baseline in the same run and prints
the ratio. Random Llamas (fp32), driven with token ids through the real coordinator (in this process, as
`coordinator launch` runs it: LocalCluster, one micro-batch group) and the Python SDK.

replicas  A random Llama of ~335 MiB (hidden 640, 10 layers, vocab 32000) served by 1, 2 and 3 replicas of one
          worker each; every worker process computes on one thread (OMP_NUM_THREADS=1). One burst of 24
          concurrent requests (16 prompt token ids, 32 new tokens, ignore_eos). Baseline, same run: as many
          plain Python processes, each running the whole model with transformers on one thread, each
          `generate`-ing its share of the same 24 requests (24/N) as one static batch, all started at once.
          Aggregate tokens/s (all tokens / first start to last end), the ratio, and the balancer's spread
          (requests per replica from cluster_status, over the burst), and the cores this process and the
          workers kept busy over the last burst. Interleaved, medians of --rounds.
big       A random Llama of 1440 MiB (hidden 1536, 14 layers, vocab 8192) over 4 workers per replica (worker
          memory budget 500 MiB: the weights are 2.9x one worker's budget; max_step_tokens 256, so the step
          headroom leaves the stages room for KV), 1 and 2 replicas: time to ready, tokens/s on 8 requests x
          32 tokens, each worker's peak RSS (psutil every 50 ms while loading and while serving, and VmHWM)
          less an empty worker's (one spare that loads nothing, same run) against its budget. Baseline:
          transformers, the whole model in one process, the same 8 requests as one static batch; both sides
          use torch's default threads.
version   fleet-m@1 (the replicas part's model, 1 replica of 2 workers) serves 4 streams in a loop; version 2
          (another random model of the same shape) is loaded onto 2 spare workers with Client.load_model(...,
          promote=True): time to load, time until a request on v2 first succeeds, A's tokens/s in the
          10 s before the load against during it (and after), failed requests (must be 0), and
          the cores this process, A's workers and v2's workers kept busy during the load. Round 2 promotes v1
          back, unloads v2 and loads it again.

    python bench/fleet.py [--part replicas|big|version|all] [--store DIR] [--tiny] [--rounds 2]
                          [--replicas 1,2,3] [--big-replicas 1,2]

`--tiny` runs every part with tiny models and counts (a smoke test; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss  # noqa: E402
from bench.generate import free_port  # noqa: E402
from bench.kv import PeakRss  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import (
    CoordinatorConfig,  # noqa: E402
    DeploymentSpec,  # noqa: E402
)
from coordinator.store.importer import import_random, random_config  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import AsyncClient, Client  # noqa: E402
from shardline.errors import ShardlineError  # noqa: E402
from shardline.limits import process_bound  # noqa: E402

MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    small: dict[str, int]
    big: dict[str, int]
    streams: int = 24          # the replicas part's burst
    new: int = 32              # new tokens per request
    prompt: int = 16           # prompt token ids per request
    big_streams: int = 8
    budget_mb: int = 500       # a big-model worker's shard memory (its --worker-memory-mb adds the runtime)
    max_step_tokens: int = 256  # big part: the largest step, which each stage's headroom is measured with
    steady: int = 4            # the version part's streams
    window: float = 10.0       # the version part's "before" and "after" windows, seconds

    def name(self, kind: str, seed: int = 0) -> str:
        d = self.small if kind == "small" else self.big
        return f"fleet-{kind}-h{d['hidden']}-l{d['layers']}-v{d['vocab']}-s{seed}"


REAL = Sizes(small=dict(hidden=640, layers=10, heads=10, kv_heads=5, intermediate=1792, vocab=32000),
             big=dict(hidden=1536, layers=14, heads=12, kv_heads=4, intermediate=4096, vocab=8192))
TINY = Sizes(small=dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512),
             big=dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=512, vocab=512),
             streams=6, new=8, prompt=8, big_streams=4, budget_mb=420, steady=2, window=3.0)


def ensure(store: ModelStore, name: str, dims: dict[str, int], seed: int) -> Path:
    if not store.has(name):
        import_random(store, name, random_config("llama", **dims), seed=seed)
    return store.path(name)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


@contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """OMP_NUM_THREADS for the processes started inside (workers inherit this process's environment); None:
    torch's default (one thread per core)."""
    before = os.environ.get("OMP_NUM_THREADS")
    if n is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def check_worker_threads(cluster: LocalCluster, want: int | None) -> None:
    """Each worker process got the OMP_NUM_THREADS asked for (it reads it when torch starts)."""
    import psutil

    for p in cluster.processes:
        got = psutil.Process(p.process.pid).environ().get("OMP_NUM_THREADS")
        if got != (None if want is None else str(want)):
            raise SystemExit(f"worker {p.address} has OMP_NUM_THREADS={got}, not {want}")


# -- the baseline: plain processes running the whole model with transformers ----------------------------------
def child(model_dir: str, threads: int) -> None:
    """A baseline process: load the model, say so, then for each job line (JSON: prompts, new) run one static
    batch with `generate` and answer its monotonic start and end (system-wide clock) and the token ids."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    began = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(json.dumps({"loaded_s": time.monotonic() - began, "now": time.monotonic(),
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        ids = torch.tensor(job["prompts"])
        start = time.monotonic()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["new"],
                                 min_new_tokens=job["new"], do_sample=False, pad_token_id=0)
        end = time.monotonic()
        new = out[:, ids.shape[1]:]
        print(json.dumps({"start": start, "end": end, "tokens": int(new.numel()), "ids": new.tolist()}), flush=True)


@dataclass
class Baseline:
    """N baseline processes (each the whole model), alive for several runs."""

    procs: list[asyncio.subprocess.Process]
    loaded_s: list[float]   # from_pretrained
    ready_s: list[float]    # process start to loaded (interpreter, imports, from_pretrained)
    threads: list[int]

    @classmethod
    async def start(cls, model_dir: Path, n: int, threads: int) -> Baseline:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        else:
            env.pop("OMP_NUM_THREADS", None)
        began = time.monotonic()
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir), "--child-threads", str(threads),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env) for _ in range(n)]
        baseline = cls(procs, [], [], [])
        for hello in await asyncio.gather(*(baseline._read(p) for p in procs)):
            baseline.loaded_s.append(hello["loaded_s"])
            baseline.ready_s.append(hello["now"] - began)
            baseline.threads.append(hello["threads"])
        return baseline

    @staticmethod
    async def _read(p: asyncio.subprocess.Process) -> dict[str, Any]:
        assert p.stdout is not None
        while line := await p.stdout.readline():
            if line.startswith(b"{"):
                return dict(json.loads(line))
        raise RuntimeError(f"baseline process {p.pid} exited with {await p.wait()}")

    async def run(self, shares: list[list[list[int]]], new: int) -> tuple[float, int, list[list[int]]]:
        """Every process generates its share at once; (aggregate tokens/s, tokens, ids in share order)."""
        for p, share in zip(self.procs, shares, strict=True):
            assert p.stdin is not None
            p.stdin.write((json.dumps({"prompts": share, "new": new}) + "\n").encode())
            await p.stdin.drain()
        answers = await asyncio.gather(*(self._read(p) for p in self.procs))
        tokens = sum(a["tokens"] for a in answers)
        took = max(a["end"] for a in answers) - min(a["start"] for a in answers)
        return tokens / took, tokens, [ids for a in answers for ids in a["ids"]]

    async def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()


def worker_kv(address: str) -> tuple[int, int]:
    """A worker's measured step headroom and KV capacity, in bytes (its GetStatus, as bench/kv.py reads it)."""
    import grpc

    from shardline.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        s = worker_pb2_grpc.ShardWorkerStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
    return s.kv.headroom_bytes, s.kv.capacity_bytes


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (all their threads)."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def split(items: list[list[int]], n: int) -> list[list[list[int]]]:
    """n contiguous, even shares."""
    size, extra = divmod(len(items), n)
    out, at = [], 0
    for i in range(n):
        take = size + (1 if i < extra else 0)
        out.append(items[at:at + take])
        at += take
    return out


# -- shardline side --------------------------------------------------------------------------------------------
async def burst(endpoint: str, model: str, batch: list[list[int]], new: int) -> tuple[float, int, list[list[int]]]:
    """All requests at once through the SDK; (tokens/s from the first send to the last token, tokens, ids)."""
    async with AsyncClient(endpoint, timeout=1800) as client:
        began = time.monotonic()
        results = await asyncio.gather(*(client.generate(p, model=model, max_tokens=new, temperature=0,
                                                         ignore_eos=True) for p in batch))
        took = time.monotonic() - began
    ids = [list(r.token_ids) for r in results]
    if [len(x) for x in ids] != [new] * len(batch):
        raise SystemExit(f"a request ended early: {[len(x) for x in ids]} tokens, not {new} each")
    return sum(map(len, ids)) / took, sum(map(len, ids)), ids


async def requests_per_replica(endpoint: str, key: str) -> dict[str, int]:
    async with AsyncClient(endpoint, timeout=30) as client:
        status = await client.cluster_status()
    return {r.name: r.requests for d in status.deployments if f"{d.name}@{d.version}" == key for r in d.replicas}


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """How many requests got the same greedy tokens on both sides (random weights: near-ties may flip)."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{same}/{len(a)}"


def cluster(store: Path, deployments: list[dict[str, Any]], budget_mb: int, spares: int = 0,
            **config: Any) -> tuple[LocalCluster, str]:
    port = free_port()
    specs = [DeploymentSpec.model_validate(d) for d in deployments]
    c = CoordinatorConfig(store=store, port=port, micro_batch_groups=1, deployments=specs, **config)
    # --worker-memory-mb bounds a worker's whole process: the shard budget plus its runtime (shardline/limits.py)
    bound_mb = process_bound(budget_mb * 2**20) // 2**20
    return LocalCluster(c, worker_memory_mb=bound_mb, spares=spares), f"127.0.0.1:{port}"


# -- part 1: replicas --------------------------------------------------------------------------------------------
async def part_replicas(store: ModelStore, sizes: Sizes, counts: list[int], rounds: int) -> list[str]:
    name = sizes.name("small")
    path = ensure(store, name, sizes.small, seed=0)
    batch = prompts(sizes.streams, sizes.prompt, sizes.small["vocab"], seed=1)
    key = f"{name}@1"
    rows: list[str] = []
    medians: dict[str, tuple[float, float]] = {}
    for n in counts:
        with omp_threads(1):
            lc, endpoint = cluster(store.root, [dict(name=name, replicas=n, workers=1)], 1024)
            ready = await lc.start(say=lambda line: None)
            baseline = None
            try:
                check_worker_threads(lc, 1)
                baseline = await Baseline.start(path, n, threads=1)
                shares = split(batch, n)
                await burst(endpoint, name, batch[:2 * n], 4)  # warm-up, both sides
                await baseline.run(split(batch[:2 * n], n), 4)
                ours_runs, hf_runs, spreads = [], [], []
                workers = [p.process.pid for p in lc.processes]
                for _ in range(rounds):  # interleaved
                    hf, hf_tokens, hf_ids = await baseline.run(shares, sizes.new)
                    before = await requests_per_replica(endpoint, key)
                    cpu = cpu_seconds([os.getpid()]), cpu_seconds(workers), time.monotonic()
                    rate, tokens, ids = await burst(endpoint, name, batch, sizes.new)
                    cpu = (cpu_seconds([os.getpid()]) - cpu[0], cpu_seconds(workers) - cpu[1],
                           time.monotonic() - cpu[2])
                    after = await requests_per_replica(endpoint, key)
                    if tokens != hf_tokens or tokens != sizes.streams * sizes.new:
                        raise SystemExit(f"token counts differ: ours {tokens}, transformers {hf_tokens}")
                    hf_runs.append(hf)
                    ours_runs.append(rate)
                    spreads.append("/".join(str(after[r] - before.get(r, 0)) for r in sorted(after)))
                hf, ours = statistics.median(hf_runs), statistics.median(ours_runs)
                first = medians.setdefault("first", (hf, ours))
                line = (f"| {n} | {n} process{'es' if n > 1 else ''} x 1 thread, batch {len(shares[0])} | "
                        f"{hf:.1f} tok/s | {ours:.1f} tok/s | {ours / hf:.2f}x | {hf / first[0]:.2f}x / "
                        f"{ours / first[1]:.2f}x | {', '.join(spreads)} | {agreement(hf_ids, ids)} | "
                        f"{', '.join(f'{x:.1f}' for x in hf_runs)} / {', '.join(f'{x:.1f}' for x in ours_runs)} | "
                        f"{cpu[0] / cpu[2]:.2f} / {cpu[1] / cpu[2]:.2f} | {ready:.1f} s |")
                print(line, flush=True)
                rows.append(line)
            finally:
                if baseline is not None:
                    await baseline.close()
                await lc.stop()
    return ["| replicas (1 worker, 1 thread each) | baseline (same run) | transformers | shardline | ratio | "
            f"vs {counts[0]} replica (hf / ours) | requests per replica, each run | same greedy tokens | "
            "runs (hf / ours) | cores busy over the last burst: this process (coordinator, SDK) / workers | "
            "cluster ready |",
            "|---:|---|---:|---:|---:|---:|---|---:|---|---:|---:|", *rows]


# -- part 2: a big model over 4 workers per replica --------------------------------------------------------------
async def part_big(store: ModelStore, sizes: Sizes, counts: list[int], rounds: int) -> list[str]:
    name = sizes.name("big")
    path = ensure(store, name, sizes.big, seed=0)
    manifest = store.manifest(name)
    batch = prompts(sizes.big_streams, sizes.prompt, sizes.big["vocab"], seed=2)
    key = f"{name}@1"
    out = [f"model {name}: {manifest.total_size_bytes / MiB:.0f} MiB of weights = "
           f"{manifest.total_size_bytes / (sizes.budget_mb * MiB):.2f}x one worker's budget of {sizes.budget_mb} MiB"]
    with omp_threads(None):
        baseline = await Baseline.start(path, 1, threads=0)
        try:
            await baseline.run([batch[:2]], 4)  # warm-up
            out.append(f"baseline: one process, {baseline.threads[0]} threads; process start to loaded "
                       f"{baseline.ready_s[0]:.1f} s (from_pretrained {baseline.loaded_s[0]:.1f} s)")
            for n in counts:
                # one spare that never loads anything: what an empty worker process holds, in the same run
                lc, endpoint = cluster(store.root, [dict(name=name, replicas=n, workers=4)], sizes.budget_mb,
                                       spares=1, max_step_tokens=sizes.max_step_tokens)
                starting = asyncio.create_task(lc.start(say=lambda line: None))
                while not lc.processes and not starting.done():
                    await asyncio.sleep(0.02)
                loading = PeakRss([p.process.pid for p in lc.processes])
                serving = None
                try:
                    ready = await starting
                    load_peaks = loading.stop()
                    serving = PeakRss([p.process.pid for p in lc.processes])
                    check_worker_threads(lc, None)
                    await burst(endpoint, name, batch[:2], 4)  # warm-up
                    ours_runs, hf_runs = [], []
                    for _ in range(rounds):
                        hf, hf_tokens, hf_ids = await baseline.run([batch], sizes.new)
                        before = await requests_per_replica(endpoint, key)
                        rate, tokens, ids = await burst(endpoint, name, batch, sizes.new)
                        after = await requests_per_replica(endpoint, key)
                        if tokens != hf_tokens:
                            raise SystemExit(f"token counts differ: ours {tokens}, transformers {hf_tokens}")
                        hf_runs.append(hf)
                        ours_runs.append(rate)
                    spread = "/".join(str(after[r] - before.get(r, 0)) for r in sorted(after))
                    serve_peaks = serving.stop()
                    # VmHWM: the worker resets it when it measures its step headroom (after loading the weights)
                    phases = {p.address: (load_peaks[p.process.pid], serve_peaks[p.process.pid],
                                          peak_rss(p.process.pid)) for p in lc.processes}
                    hwm = {a: max(x) for a, x in phases.items()}
                    async with AsyncClient(endpoint, timeout=30) as client:
                        status = await client.cluster_status()
                    spare = [w.address for w in status.workers if not w.replica]
                    if len(spare) != 1 or any(w.weight_bytes for w in status.workers if not w.replica):
                        raise SystemExit(f"expected one empty spare, got {spare}")
                    empty = hwm[spare[0]]
                    kv = {w.address: await asyncio.to_thread(worker_kv, w.address) for w in status.workers}
                finally:
                    loading.stop()
                    if serving is not None:
                        serving.stop()
                    if not starting.done():
                        starting.cancel()
                    await lc.stop()
                hf, ours = statistics.median(hf_runs), statistics.median(ours_runs)
                out += ["", f"{n} replica(s) x 4 workers: ready in {ready:.1f} s (transformers process start to "
                        f"loaded {baseline.ready_s[0]:.1f} s); {sizes.big_streams} requests x {sizes.new} tokens: "
                        f"transformers {hf:.1f} tok/s, shardline {ours:.1f} tok/s, ratio {ours / hf:.2f}x "
                        f"(runs: hf {', '.join(f'{x:.1f}' for x in hf_runs)} / ours "
                        f"{', '.join(f'{x:.1f}' for x in ours_runs)}); requests per replica (last run) {spread}; "
                        f"same greedy tokens {agreement(hf_ids, ids)}",
                        f"an empty worker process (the spare, same run): peak RSS {empty / MiB:.0f} MiB",
                        "| replica | layers | weights | step headroom | KV capacity | peak RSS loading / serving | "
                        "peak - empty worker | budget | within budget |",
                        "|---|---|---:|---:|---:|---:|---:|---:|---|"]
                for w in sorted(status.workers, key=lambda w: (w.replica, w.start_layer)):
                    if not w.replica:
                        continue
                    peak, (headroom, capacity) = hwm[w.address], kv[w.address]
                    at_load, at_serve, _ = phases[w.address]
                    out.append(f"| {w.replica} | [{w.start_layer}, {w.end_layer}) | {w.weight_bytes / MiB:.0f} MiB | "
                               f"{headroom / MiB:.0f} MiB | {capacity / MiB:.0f} MiB | {at_load / MiB:.0f} / "
                               f"{at_serve / MiB:.0f} MiB | "
                               f"{(peak - empty) / MiB:.0f} MiB | {w.memory_budget_bytes / MiB:.0f} MiB | "
                               f"{'yes' if peak - empty <= w.memory_budget_bytes else 'NO'} |")
                print("\n".join(out[-(len(status.workers) + 5):]), flush=True)
        finally:
            await baseline.close()
    return out


# -- part 3: a version load while another deployment serves ------------------------------------------------------
@dataclass
class Steady:
    """`n` streams, each sending one request after another to `model`; token arrival times are kept."""

    endpoint: str
    model: str
    batch: list[list[int]]
    new: int
    arrivals: list[float] = field(default_factory=list)
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    stopping: bool = False

    async def loop(self, client: AsyncClient, i: int) -> None:
        while not self.stopping:
            prompt = self.batch[(i + self.completed) % len(self.batch)]
            got = 0
            try:
                async for chunk in await client.generate(prompt, model=self.model, max_tokens=self.new,
                                                         temperature=0, ignore_eos=True, stream=True):
                    now = time.monotonic()
                    self.arrivals.extend([now] * len(chunk.token_ids))
                    got += len(chunk.token_ids)
                if got != self.new:
                    self.failed.append(f"{got} tokens, not {self.new}")
                self.completed += 1
            except ShardlineError as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")

    def rate(self, a: float, b: float) -> float:
        return sum(a <= t < b for t in self.arrivals) / (b - a)


async def first_success(endpoint: str, model: str, prompt: list[int], since: float) -> tuple[float, int]:
    """Send a 1-token request to `model` every 0.1 s until one succeeds; (seconds from `since`, refusals)."""
    refused = 0
    async with AsyncClient(endpoint, timeout=120) as client:
        while True:
            try:
                await client.generate(prompt, model=model, max_tokens=1, temperature=0, ignore_eos=True)
                return time.monotonic() - since, refused
            except ShardlineError:
                refused += 1
                await asyncio.sleep(0.1)


async def part_version(store: ModelStore, sizes: Sizes, rounds: int) -> list[str]:
    v1, v2 = sizes.name("small", 0), sizes.name("small", 1)
    ensure(store, v1, sizes.small, seed=0)
    ensure(store, v2, sizes.small, seed=1)
    batch = prompts(16, sizes.prompt, sizes.small["vocab"], seed=3)
    rows = []
    with omp_threads(1):
        lc, endpoint = cluster(store.root, [dict(name="fleet-m", version="1", source=v1, replicas=1, workers=2)],
                               1024, spares=2)
        ready = await lc.start(say=lambda line: None)
        steady = Steady(endpoint, "fleet-m@1", batch, sizes.new)
        admin = Client(endpoint, timeout=600)
        try:
            check_worker_threads(lc, 1)
            status = await asyncio.to_thread(admin.cluster_status)  # not on this loop: it serves the coordinator
            a_workers = {w.address for w in status.workers if w.replica}
            async with AsyncClient(endpoint, timeout=600) as client:
                loops = [asyncio.create_task(steady.loop(client, i)) for i in range(sizes.steady)]
                await asyncio.sleep(sizes.window)  # warm-up
                for r in range(1, rounds + 1):
                    await asyncio.sleep(sizes.window)
                    failed_before = len(steady.failed)
                    a_pids = [p.process.pid for p in lc.processes if p.address in a_workers]
                    spare_pids = [p.process.pid for p in lc.processes if p.address not in a_workers]
                    cpu = cpu_seconds([os.getpid()]), cpu_seconds(a_pids), cpu_seconds(spare_pids)
                    t0 = time.monotonic()
                    probe = asyncio.create_task(first_success(endpoint, "fleet-m@2", batch[0], t0))
                    message = await asyncio.to_thread(admin.load_model, "fleet-m", version="2", source=v2,
                                                      replicas=1, workers=2, promote=True, timeout=600)
                    t1 = time.monotonic()
                    cpu = (cpu_seconds([os.getpid()]) - cpu[0], cpu_seconds(a_pids) - cpu[1],
                           cpu_seconds(spare_pids) - cpu[2])
                    busy = " / ".join(f"{c / (t1 - t0):.2f}" for c in cpu)
                    serves, refused = await probe
                    # promoted: a request naming only "fleet-m" goes to version 2
                    before = await requests_per_replica(endpoint, "fleet-m@2")
                    await client.generate(batch[1], model="fleet-m", max_tokens=1, temperature=0, ignore_eos=True)
                    after = await requests_per_replica(endpoint, "fleet-m@2")
                    promoted = sum(after.values()) - sum(before.values()) == 1
                    await asyncio.sleep(sizes.window)
                    t2 = time.monotonic()
                    a_before, a_during, a_after = (steady.rate(t0 - sizes.window, t0), steady.rate(t0, t1),
                                                   steady.rate(t2 - sizes.window, t2))
                    failed = len(steady.failed) - failed_before
                    line = (f"| {r} | {t1 - t0:.2f} s | {serves:.2f} s ({refused} refused before) | "
                            f"{a_before:.1f} tok/s | {a_during:.1f} tok/s | {a_during / a_before:.2f}x | "
                            f"{a_after:.1f} tok/s | {failed} | {'yes' if promoted else 'NO'} | {busy} |")
                    print(line, f"  [{message}]", flush=True)
                    rows.append(line)
                    if r < rounds:  # back to v1 as the default, v2 unloaded: the spares are free again
                        await asyncio.to_thread(admin.promote_model, "fleet-m@1")
                        await asyncio.to_thread(admin.unload_model, "fleet-m@2")
                steady.stopping = True
                await asyncio.gather(*loops)
        finally:
            admin.close()
            await lc.stop()
    for failure in steady.failed:
        print("A failed:", failure)
    return [f"fleet-m@1 ready in {ready:.1f} s; A: {sizes.steady} streams of {sizes.new} tokens, "
            f"{steady.completed} requests completed, {len(steady.failed)} failed",
            "| round | load_model (promote) | until a v2 request succeeds | A before | A during the load | "
            "during / before | A after | A requests failed (this round) | promoted | cores busy during the load: "
            "this process (coordinator, parameter service, SDK) / A's workers / v2's workers |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|", *rows]


async def main(args: argparse.Namespace, store_dir: Path) -> None:
    sizes = TINY if args.tiny else REAL
    store = ModelStore(store_dir)
    report: list[str] = []
    parts = ["replicas", "big", "version"] if args.part == "all" else [args.part]
    if "replicas" in parts:
        counts = [int(x) for x in args.replicas.split(",")]
        report += ["", "## replicas", *(await part_replicas(store, sizes, counts, args.rounds))]
    if "big" in parts:
        counts = [int(x) for x in args.big_replicas.split(",")]
        report += ["", "## big", *(await part_big(store, sizes, counts, args.rounds))]
    if "version" in parts:
        report += ["", "## version", *(await part_version(store, sizes, args.rounds))]
    print("\n".join(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=["replicas", "big", "version", "all"])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny models and counts: a smoke test")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts of the replicas part")
    parser.add_argument("--big-replicas", default="1,2", help="replica counts of the big part")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_threads)
    elif args.store:
        asyncio.run(main(args, args.store))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(args, Path(tmp)))
