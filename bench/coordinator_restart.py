"""Time from a coordinator's SIGKILL to the next token of every stream, broken down, with adoption and with a
reload forced; the undisturbed gap between two tokens beside it (same run, same streams).

SmolLM2-135M over 2 worker processes that joined `coordinator serve --config` (fp32). 8 SDK streams of 48
tokens (4 greedy, 4 seeded) run; once each has 4 tokens, the coordinator is SIGKILLed and started again on the
same store at once. The SDK resumes every stream. Measured, per restart:
  - restart: kill -> the new coordinator answers (cluster_status);
  - registration: -> both workers registered again;
  - adoption (or load): -> the replica serves (its chain adopted, or loaded again);
  - resume: -> the last stream's next token;
  - the median and max of kill -> next token over the 8 streams.
"reload forced": the workers drop their shards (UnloadShard) right after the kill, so the new coordinator must
load them again: what adoption saves. "default reconnect": the SDK's channel with gRPC's default reconnect
backoff (1 s, growing) instead of shardline's (0.1 s, at most 1 s). Alternated, ROUNDS of each. Every stream
must end with exactly the undisturbed tokens, or the run fails.

    python bench/coordinator_restart.py [--store DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench.recovery import PROMPTS, free_port  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline import client_channel  # noqa: E402
from shardline.client import AsyncClient, Client  # noqa: E402
from shardline.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

NEW, STREAMS, KILL_AT = 48, 8, 4


def params(i: int) -> dict:
    return {"max_tokens": NEW, "ignore_eos": True, **({"temperature": 0.0} if i % 2 == 0 else
                                                      {"temperature": 0.8, "seed": 7 + i})}


class Watch(threading.Thread):
    """Polls the coordinator every 10 ms from the kill on: when it answers, when both workers are registered,
    when it is ready."""

    def __init__(self, endpoint: str, workers: int) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.workers = endpoint, workers
        self.answered = self.registered = self.ready = 0.0
        self.stop = False

    def run(self) -> None:
        with Client(self.endpoint, timeout=2) as client:
            while not self.stop and not self.ready:
                try:
                    status = client.cluster_status()
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(0.01)
                    continue
                now = time.perf_counter()
                self.answered = self.answered or now
                if len(status.workers) >= self.workers:
                    self.registered = self.registered or now
                if status.ready and self.registered:
                    self.ready = now
                time.sleep(0.01)


async def streams(endpoint: str, kill=None) -> tuple[list[list[int]], list[float], float]:
    """The streams' tokens; each one's gap from the kill to its next token (or its median gap between tokens,
    undisturbed); the kill time."""
    tokens: list[list[int]] = [[] for _ in range(STREAMS)]
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    killed: list[float] = []
    async with AsyncClient(endpoint, timeout=600) as client:
        await client.wait_ready(timeout=600)

        async def one(i: int) -> None:
            async for chunk in await client.generate(PROMPTS[i], stream=True, **params(i)):
                for t in chunk.token_ids:
                    tokens[i].append(t)
                    arrivals[i].append(time.perf_counter())

        async def killer() -> None:
            if kill is None:
                return
            while min(len(t) for t in tokens) < KILL_AT:
                await asyncio.sleep(0.001)
            killed.append(time.perf_counter())
            await asyncio.to_thread(kill)

        await asyncio.gather(*(one(i) for i in range(STREAMS)), killer())
    if not killed:
        return tokens, [statistics.median(b - a for a, b in zip(t, t[1:], strict=False)) for t in arrivals], 0.0
    return tokens, [next(t for t in times if t > killed[0]) - killed[0] for times in arrivals], killed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    store = ModelStore(args.store or tmp / "store")
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    config = tmp / "coordinator.toml"
    config.write_text(f'store = "{store.root}"\nport = {port}\nmodel = "smollm2"\nworkers = 2\n'
                      f'jobs_dir = "{tmp}"\nresult_cache_mb = 0\nhttp = false\n')

    def coordinator() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    processes = [coordinator()]
    try:
        for _ in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "shard_worker.cli", "serve", "--port", "0", "--coordinator", endpoint,
                 "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(endpoint, timeout=30) as client:
            client.wait_ready(timeout=600)
            workers = [w.address for w in client.cluster_status().workers]
        undisturbed, gaps, _ = asyncio.run(streams(endpoint))
        print(f"undisturbed: median gap between two tokens {statistics.median(gaps) * 1000:.0f} ms (8 streams)")
        rows: dict[str, list[tuple[float, ...]]] = {"adopted": [], "default reconnect": [], "reload forced": []}
        ours = client_channel.CHANNEL_OPTIONS
        for _ in range(args.rounds):
            for variant in rows:
                watch = Watch(endpoint, len(workers))
                unloading = [0.0]  # the forced unloads' time: not the restart's, taken out of every figure

                def kill(variant: str = variant, watch: Watch = watch, unloading: list[float] = unloading) -> None:
                    os.killpg(processes[0].pid, signal.SIGKILL)
                    processes[0].wait(10)
                    if variant == "reload forced":
                        began = time.perf_counter()
                        for address in workers:
                            with grpc.insecure_channel(address) as ch:
                                worker_pb2_grpc.ShardWorkerStub(ch).UnloadShard(worker_pb2.UnloadShardRequest(),
                                                                                timeout=30)
                        unloading[0] = time.perf_counter() - began
                    processes[0] = coordinator()
                    watch.start()

                client_channel.CHANNEL_OPTIONS = ours if variant != "default reconnect" else ours[:1]
                tokens, waits, killed = asyncio.run(streams(endpoint, kill))
                client_channel.CHANNEL_OPTIONS = ours
                watch.stop = True
                if tokens != undisturbed:
                    raise SystemExit(f"{variant}: a stream's tokens differ from the undisturbed run's")
                killed += unloading[0]
                waits = [w - unloading[0] for w in waits]
                last = killed + max(waits)
                rows[variant].append((watch.answered - killed, watch.registered - watch.answered,
                                      watch.ready - watch.registered, last - watch.ready,
                                      statistics.median(waits), max(waits)))
        print("variant            restart  register  adopt/load  resume   next token: median   max   (s)")
        for variant, runs in rows.items():
            for r in runs:
                print(f"{variant:<17}  {r[0]:7.2f}  {r[1]:8.2f}  {r[2]:10.2f}  {r[3]:6.2f}  {r[4]:19.2f}  {r[5]:5.2f}")
    finally:
        for p in processes:
            p.kill()


if __name__ == "__main__":
    main()
