"""Sentence embeddings: all-MiniLM-L6-v2 split over 2 worker processes (through the coordinator's Infer)
against the same model whole in the same number of processes, 2 (each embeds half of the sentences, at the same
time), in the same run; plus each embedding's cosine to the reference. The one-process figure is printed too,
for comparison with the earlier, unfair table (two processes against one).

Every process has torch's default threads and OMP_WAIT_POLICY=PASSIVE, as the launcher gives its workers. The
baseline does what sentence-transformers does: sort by length, batches of 32, mean pooling, unit length; the
sorted batches are dealt to the two processes in turn, so they get the same work.

    python bench/embeddings.py [--store DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import Baseline, free_port, result, table  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_encoder_dir, import_hf_dir  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402

WORDS = ("model shard worker stream layer cache token batch pipeline gradient network machine server request "
         "latency memory weight tensor the a of to and in quickly slowly large small every").split()
ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # as the launcher starts its workers


def sentences(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) + "." for _ in range(n)]


def whole(processes: list[Baseline], texts: list[str], tmp: Path, batch: int = 32) -> tuple[float, np.ndarray]:
    """Embed `texts` with the processes at once (sorted batches dealt in turn); wall seconds and vectors."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[k: k + batch] for k in range(0, len(order), batch)]
    shares = [[i for b in batches[p::len(processes)] for i in b] for p in range(len(processes))]
    began = time.perf_counter()
    for p, (process, share) in enumerate(zip(processes, shares, strict=True)):
        process.send("embed", texts=[texts[i] for i in share], batch=batch, out=str(tmp / f"{p}.npy"))
    for process in processes:
        process.receive()
    seconds = time.perf_counter() - began
    out = np.empty((len(texts), 384), np.float32)
    for p, share in enumerate(shares):
        out[share] = np.load(tmp / f"{p}.npy")
    return seconds, out


async def main(store_dir: Path, rounds: int) -> None:
    store = ModelStore(store_dir)
    if not store.has("minilm"):
        import_hf_dir(store, builtin_encoder_dir(), "minilm")
    path = store.path("minilm")
    texts = sentences(256)
    processes = [Baseline(path, kind="encoder", env=ENV) for _ in range(2)]
    config = CoordinatorConfig(store=store_dir, model="minilm", workers=2, port=free_port(), infer_micro_batch=32)
    cluster = LocalCluster(config)
    await cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with AsyncClient(f"127.0.0.1:{config.port}", timeout=600) as client:
                await client.embed(texts[:32])
                await asyncio.to_thread(whole, processes, texts[:64], Path(tmp))
                runs: dict[str, list[float]] = {"one": [], "two": [], "ours": []}
                for _ in range(rounds):  # interleaved
                    seconds, expected = await asyncio.to_thread(whole, processes[:1], texts, Path(tmp))
                    runs["one"].append(len(texts) / seconds)
                    seconds, expected = await asyncio.to_thread(whole, processes, texts, Path(tmp))
                    runs["two"].append(len(texts) / seconds)
                    began = time.perf_counter()
                    ours = await client.embed(texts)
                    runs["ours"].append(len(texts) / (time.perf_counter() - began))
    finally:
        await cluster.stop()
        for process in processes:
            process.close()
    cosine = (ours * expected).sum(axis=1)
    one, two, mine = (statistics.median(runs[k]) for k in ("one", "two", "ours"))
    print(f"256 sentences, medians of {rounds} interleaved rounds")
    print(table(["all-MiniLM-L6-v2", "whole model, 2 processes", "split over 2 workers", "ratio",
                 "(whole model, 1 process: ratio)", "min cosine"],
                [["256 sentences", f"{two:.0f} sentences/s", f"{mine:.0f} sentences/s", f"**{mine / two:.2f}x**",
                  f"{one:.0f} sentences/s: {mine / one:.2f}x", f"{cosine.min():.6f}"]]))
    result("embeddings", "256 sentences, 2 workers vs 2 whole-model processes", f"{two:.0f} sent/s",
           f"{mine:.0f} sent/s", f"{mine / two:.2f}x", ">= 0.8x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.store:
        asyncio.run(main(args.store, args.rounds))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp), args.rounds))
