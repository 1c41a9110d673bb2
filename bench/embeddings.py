"""Sentence embeddings: all-MiniLM-L6-v2 split over 2 worker processes (through the coordinator's Infer)
against the same model whole in this process, same run; plus each embedding's cosine to the reference.

The baseline does what sentence-transformers does: sort by length, batches of 32, mean pooling, unit length.

    python bench/embeddings.py [--store DIR]
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
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from bench.generate import free_port  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.importer import builtin_encoder_dir, import_hf_dir  # noqa: E402
from coordinator.launcher import LocalCluster  # noqa: E402
from coordinator.store import ModelStore  # noqa: E402
from shardline.client import AsyncClient  # noqa: E402

WORDS = ("model shard worker stream layer cache token batch pipeline gradient network machine server request "
         "latency memory weight tensor the a of to and in quickly slowly large small every").split()


def sentences(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) + "." for _ in range(n)]


def whole(tokenizer, model, texts: list[str], batch: int = 32) -> np.ndarray:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    with torch.no_grad():
        for k in range(0, len(order), batch):
            idx = order[k: k + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
            out[idx] = pooled.numpy()
    return out


async def main(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    if not store.has("minilm"):
        import_hf_dir(store, builtin_encoder_dir(), "minilm")
    path = store.path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    texts = sentences(256)
    config = CoordinatorConfig(store=store_dir, model="minilm", workers=2, port=free_port(), infer_micro_batch=32)
    cluster = LocalCluster(config)
    await cluster.start()
    try:
        async with AsyncClient(f"127.0.0.1:{config.port}", timeout=600) as client:
            await client.embed(texts[:32])
            await asyncio.to_thread(whole, tokenizer, model, texts[:32])
            ours_runs, base_runs = [], []
            for _ in range(3):  # interleaved
                began = time.perf_counter()
                expected = await asyncio.to_thread(whole, tokenizer, model, texts)
                base_runs.append(len(texts) / (time.perf_counter() - began))
                began = time.perf_counter()
                ours = await client.embed(texts)
                ours_runs.append(len(texts) / (time.perf_counter() - began))
    finally:
        await cluster.stop()
    cosine = (ours * expected).sum(axis=1)
    base, mine = statistics.median(base_runs), statistics.median(ours_runs)
    print("| 256 sentences | whole model, one process | split over 2 workers | ratio | min cosine |")
    print("|---|---:|---:|---:|---:|")
    print(f"| all-MiniLM-L6-v2 | {base:.0f} sentences/s | {mine:.0f} sentences/s | {mine / base:.2f}x | "
          f"{cosine.min():.6f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    if args.store:
        asyncio.run(main(args.store))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp)))
