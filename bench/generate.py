"""Generation throughput against plain transformers, measured in the same run on the same machine.

SmolLM2-135M over 3 local worker processes (fp32, greedy, 64 new tokens), through the real coordinator and
the Python SDK, against `transformers` `generate` in this process (on a thread, so the in-process
coordinator keeps answering heartbeats) while the cluster idles:
  - one stream vs generate with batch size 1;
  - 16 concurrent streams vs generate on the same 16 prompts as one static batch;
  - time to first token for a 512-token prompt vs a transformers forward over the same 512 tokens that
    computes the logits of the last position only (`logits_to_keep=1`), as the cluster's last stage does;
    before issue 13 the baseline computed all 512 positions' logits, which flattered the cluster.

Both sides produce exactly 64 tokens per prompt (`min_new_tokens` / `ignore_eos`; checked). The user's path
(`coordinator launch` as a subprocess, the baseline in a process of its own) is bench/user_path.py.

    python bench/generate.py [--store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.common import first_token_seconds, free_port, generate_exactly, long_prompts, result  # noqa: E402
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore  # noqa: E402

NEW = 64
CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos",
          "Quito", "Seoul", "Dublin", "Athens", "Nairobi"]
PROMPTS = [f"The history of the city of {c} began" for c in CITIES]


def hf_generate(model, tokenizer, prompts: list[str]) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return time.perf_counter() - began, (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)


def hf_prefill(model, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    with torch.no_grad():
        model(ids, logits_to_keep=1)  # the cluster computes the last position's logits only
    return time.perf_counter() - began


async def main(store_dir: Path, groups: int) -> None:
    store = ModelStore(store_dir)
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    path = store.path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    longs = long_prompts(6)  # one per run and side: no prefix a cache could reuse

    config = CoordinatorConfig(store=store_dir, model="smollm2", workers=3, port=free_port(),
                               micro_batch_groups=groups)
    cluster = LocalCluster(config)
    await cluster.start()
    endpoint = f"127.0.0.1:{config.port}"
    try:
        await generate_exactly(endpoint, PROMPTS[:2], NEW)  # warm up both
        await asyncio.to_thread(hf_generate, model, tokenizer, PROMPTS[:2])
        rows = []
        for label, prompts in (("1 stream", PROMPTS[:1]), ("16 concurrent streams", PROMPTS)):
            hf_runs, our_runs = [], []
            for _ in range(2):  # interleaved
                seconds, tokens = await asyncio.to_thread(hf_generate, model, tokenizer, prompts)
                hf_runs.append(tokens / seconds)
                seconds, tokens = await generate_exactly(endpoint, prompts, NEW)
                our_runs.append(tokens / seconds)
            hf, ours = statistics.median(hf_runs), statistics.median(our_runs)
            rows.append((label, f"{hf:.1f} tok/s", f"{ours:.1f} tok/s", f"{ours / hf:.2f}x"))
            result("generate (cluster in process)", f"{label}, {groups or 'one per stage'} group(s)",
                   f"{hf:.1f} tok/s", f"{ours:.1f} tok/s", f"{ours / hf:.2f}x")
        hf_t = statistics.median([await asyncio.to_thread(hf_prefill, model, torch.tensor([ids])) for ids in longs[:3]])
        our_t = statistics.median([await first_token_seconds(endpoint, ids) for ids in longs[3:]])
        rows.append((f"time to first token, {len(longs[0])}-token prompt", f"{hf_t * 1000:.0f} ms prefill",
                     f"{our_t * 1000:.0f} ms", f"{our_t / hf_t:.2f}x the time"))
        result("generate (cluster in process)", f"time to first token, {len(longs[0])} tokens",
               f"{hf_t * 1000:.0f} ms", f"{our_t * 1000:.0f} ms", f"{our_t / hf_t:.2f}x the time", "<= 1.1x")
    finally:
        await cluster.stop()
    print(f"micro-batch groups: {groups or 'one per stage'}")
    print("| case | transformers (same run) | shardline, 3 workers | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--groups", type=int, default=0, help="micro-batch groups (0 = one per stage)")
    args = parser.parse_args()
    if args.store:
        asyncio.run(main(args.store, args.groups))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp), args.groups))
