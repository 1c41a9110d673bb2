"""Mutual TLS against plaintext: what the cluster's certificates cost, both measured in the same run.

1. The activation hop: the real `StageStream` against an edge-only worker server (bench/hop.py's
   EdgeOnlyWorker, behind the worker's own Guard), plaintext with a cluster token against mutual TLS with
   a node certificate; 2 KB one at a time (latency) and 16 MB with 4 in flight (bandwidth), interleaved.
2. Generation: SmolLM2-135M over 2 local worker processes (fp32, greedy, `ignore_eos`, one micro-batch
   group, as `coordinator launch` runs it) through the real coordinator and the Python SDK. The plaintext
   cluster secures its internal links with a cluster token (what `launch` does by default); the TLS cluster
   has a throwaway CA and node certificate on every link (worker <-> worker, coordinator <-> worker,
   parameter service, registry) and the SDK talks TLS to the public port. Same layout on both sides; the
   clusters run one after the other, alternating (plain, tls, plain, tls, ...), never both at once.

    python bench/tls.py [--store DIR] [--rounds N] [--hop-runs N] [--single TOKENS] [--many TOKENS]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.generate import PROMPTS, free_port  # noqa: E402
from bench.hop import EdgeOnlyWorker, timed  # noqa: E402
from coordinator.cli.certs import create_ca, create_node  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.auth import Access, ClusterIdentity, Guard, Rules, new_token  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402
from shardline.codec import from_numpy  # noqa: E402
from shardline.server import bind, new_server  # noqa: E402
from shardline.stream import LinkSettings, StageStream  # noqa: E402
from shardline.tls import write_private  # noqa: E402
from shardline.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

SIDES = ("plaintext", "mTLS")
SERVICE = worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name
HOP_CASES = [("2 KB, one at a time (latency)", 512, 1, 400), ("16 MB, 4 in flight (bandwidth)", 4096 * 1024, 4, 24)]


@dataclass(frozen=True)
class Side:
    """How one side's processes prove they belong: a cluster token file (plaintext) or certificates (mTLS)."""

    identity: ClusterIdentity
    token_file: Path | None = None

    def config(self, store_dir: Path, workers: int) -> CoordinatorConfig:
        tls = self.identity.certs_dir
        return CoordinatorConfig(store=store_dir, model="smollm2", workers=workers, port=free_port(),
                                 micro_batch_groups=1, certs_dir=tls, cluster_port=free_port() if tls else 0,
                                 cluster_token_file=self.token_file)

    @property
    def worker_args(self) -> tuple[str, ...]:
        tls = self.identity.certs_dir
        return ("--certs-dir", str(tls)) if tls else ("--cluster-token-file", str(self.token_file))


def sides(root: Path) -> dict[str, Side]:
    certs = root / "certs"
    create_ca(certs)
    create_node(certs, ["localhost", "127.0.0.1"])
    token = root / "cluster.token"
    write_private(token, new_token().encode())
    return {"plaintext": Side(ClusterIdentity.from_files(None, token), token),
            "mTLS": Side(ClusterIdentity(certs_dir=certs))}


# ---- 1. the activation hop -------------------------------------------------------------------------------




async def edge_server(identity: ClusterIdentity) -> tuple[Any, int]:
    """The edge-only worker behind the Guard a real worker has, plaintext or TLS by `identity`."""
    server = new_server(Guard(Rules({SERVICE: Access.CLUSTER}), identity))
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(EdgeOnlyWorker(), server)
    port = bind(server, "127.0.0.1", 0, identity.server_credentials())
    await server.start()
    return server, port


async def hop(ids: dict[str, ClusterIdentity], runs: int) -> list[tuple[str, ...]]:
    servers, links = {}, {}
    for side in SIDES:
        servers[side], port = await edge_server(ids[side])
        links[side] = StageStream(f"127.0.0.1:{port}", LinkSettings(identity=ids[side]))
    rows = []
    try:
        for label, floats, in_flight, count in HOP_CASES:
            hidden = from_numpy(np.random.default_rng(0).standard_normal((1, floats), dtype=np.float32))
            sequence = worker_pb2.SequenceSlice(session_id="s", start_position=0, num_tokens=1)

            def send(link: StageStream, sequence: Any = sequence, hidden: Any = hidden) -> Awaitable[Any]:
                # a request of its own per step: the stream stamps its step id into it
                return link.step(worker_pb2.ForwardRequest(sequences=[sequence], start_layer=1), hidden)

            seconds: dict[str, list[float]] = {side: [] for side in SIDES}
            for side in SIDES:  # warm up (and, for TLS, the handshake)
                await timed(lambda s=side: send(links[s]), 5, in_flight)
            for _ in range(runs):  # interleaved
                for side in SIDES:
                    seconds[side].append(await timed(lambda s=side: send(links[s]), count, in_flight))
            plain, tls = (statistics.median(seconds[side]) for side in SIDES)
            if in_flight == 1:
                runs_cell = " / ".join(", ".join(f"{s / count * 1e6:.0f}" for s in seconds[side]) for side in SIDES)
                rows.append((f"hop: {label}", f"{plain / count * 1e6:.0f} µs/round trip",
                             f"{tls / count * 1e6:.0f} µs/round trip", f"{tls / plain:.2f}x the time", runs_cell))
            else:
                mb = len(hidden.data) * count / 1e6
                runs_cell = " / ".join(", ".join(f"{mb / s:.0f}" for s in seconds[side]) for side in SIDES)
                rows.append((f"hop: {label}", f"{mb / plain:.0f} MB/s", f"{mb / tls:.0f} MB/s",
                             f"{plain / tls:.2f}x the bandwidth", runs_cell))
    finally:
        for side in SIDES:
            await links[side].close()
            await servers[side].stop(0)
    return rows


# ---- 2. generation through a real cluster ----------------------------------------------------------------

async def generate(client: AsyncClient, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    began = time.perf_counter()
    results = await asyncio.gather(*(client.generate(p, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                                     for p in prompts))
    return time.perf_counter() - began, sum(len(r.token_ids) for r in results)


async def one_cluster(store_dir: Path, side: Side, workers: int, single: int,
                      many: int) -> dict[str, tuple[float, int]]:
    """Start a cluster, warm it up, run one stream and 16 concurrent streams, stop it; seconds and tokens."""
    config = side.config(store_dir, workers)
    cluster = LocalCluster(config, worker_args=side.worker_args)
    out: dict[str, tuple[float, int]] = {}
    try:
        began = time.perf_counter()
        await cluster.start()
        out["ready"] = (time.perf_counter() - began, 0)
        async with AsyncClient(f"127.0.0.1:{config.port}", timeout=600, tls=config.certs_dir) as client:
            await generate(client, PROMPTS[:2], 4)  # warm up
            out["1 stream"] = await generate(client, PROMPTS[:1], single)
            out["16 streams"] = await generate(client, PROMPTS[:16], many)
    finally:
        await cluster.stop()
    return out


async def clusters(store_dir: Path, by_side: dict[str, Side], rounds: int, workers: int, single: int,
                   many: int) -> list[tuple[str, ...]]:
    rates: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], set[int]] = {}
    ready: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in SIDES:  # one cluster at a time, alternating
            measured = await one_cluster(store_dir, by_side[side], workers, single, many)
            ready[side].append(measured.pop("ready")[0])
            print(f"  round {r + 1}, {side}: ready in {ready[side][-1]:.1f} s; " + ", ".join(
                f"{case}: {n} tokens in {s:.2f} s = {n / s:.1f} tok/s" for case, (s, n) in measured.items()),
                flush=True)
            for case, (seconds, n) in measured.items():
                rates.setdefault((case, side), []).append(n / seconds)
                tokens.setdefault((case, side), set()).add(n)
    rows = []
    for case, new, streams in (("1 stream", single, 1), ("16 streams", many, 16)):
        counts = {side: tokens[(case, side)] for side in SIDES}
        assert counts["plaintext"] == counts["mTLS"] == {new * streams}, counts
        print(f"  {case}: tokens per run, plaintext {sorted(counts['plaintext'])}, mTLS {sorted(counts['mTLS'])} "
              "(equal: checked)")
        plain, tls = (statistics.median(rates[(case, side)]) for side in SIDES)
        runs_cell = " / ".join(", ".join(f"{x:.1f}" for x in rates[(case, side)]) for side in SIDES)
        rows.append((f"generate, {workers} workers: {case} x {new} tokens each", f"{plain:.1f} tok/s",
                     f"{tls:.1f} tok/s", f"{tls / plain:.2f}x the throughput", runs_cell))
    plain, tls = (statistics.median(ready[side]) for side in SIDES)
    rows.append((f"{workers}-worker cluster: start to ready (weights over the link)", f"{plain:.1f} s",
                 f"{tls:.1f} s", f"{tls / plain:.2f}x the time",
                 " / ".join(", ".join(f"{x:.1f}" for x in ready[side]) for side in SIDES)))
    return rows


async def main(store_dir: Path, args: argparse.Namespace) -> None:
    store = ModelStore(store_dir)
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        by_side = sides(Path(tmp))
        rows = await hop({name: side.identity for name, side in by_side.items()}, args.hop_runs)
        for row in rows:
            print(f"  {row[0]}: plaintext {row[1]}, mTLS {row[2]} (runs {row[4]})", flush=True)
        rows += await clusters(store_dir, by_side, args.rounds, args.workers, args.single, args.many)
    print("| case | plaintext | mutual TLS | ratio (TLS / plaintext) | runs (plaintext / TLS) |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="clusters started per side, alternating")
    parser.add_argument("--hop-runs", type=int, default=5, help="interleaved runs per hop case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--single", type=int, default=64, help="new tokens of the single stream")
    parser.add_argument("--many", type=int, default=32, help="new tokens of each of the 16 concurrent streams")
    args = parser.parse_args()
    if args.store:
        asyncio.run(main(args.store, args))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp), args))
