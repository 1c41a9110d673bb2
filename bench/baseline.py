"""A whole-model baseline in a process of its own, driven over stdin/stdout (one JSON object a line), so a
benchmark can compare the cluster's worker processes against the same number of whole-model processes, pinned
to the same cores with the same threads. Started by `bench.common.Baseline`; not run by hand.

    python -m bench.baseline --model DIR --kind causal|encoder [--threads N] [--cpus 0,1]

Operations (each answers {"seconds": ..., ...}; "seconds" is the work alone, timed in this process):
  generate: {"prompts": [...], "new": N}: one static batch (left padding), greedy, exactly N new tokens each;
  prefill: {"batches": [[[ids...], ...], ...]}: one forward per batch, logits of the last position only
           (`logits_to_keep=1`, what a cluster's last stage computes), then the argmax token of each row
           (answered as "tokens");
  embed: {"texts": [...], "batch": 32, "out": FILE}: sentence-transformers' way (sort by length, mean pooling,
         unit length); the vectors go to FILE (numpy .npy);
  cpu: this process's CPU seconds so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

READY = "baseline ready"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--kind", choices=("causal", "encoder"), default="causal")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpus", default="", help="pin every thread of this process to these cores")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # before torch starts its threads
    import numpy as np
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loader = AutoModelForCausalLM if args.kind == "causal" else AutoModel
    model = loader.from_pretrained(args.model, dtype=torch.float32).eval()

    def generate(prompts: list[str], new: int) -> dict[str, Any]:
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        began = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - began
        return {"seconds": seconds, "tokens": int(out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)}

    def prefill(batches: list[list[list[int]]]) -> dict[str, Any]:
        tokens = []
        began = time.perf_counter()
        for ids in batches:
            logits = model(torch.tensor(ids), logits_to_keep=1).logits
            tokens.append(logits[:, -1].argmax(-1))
        seconds = time.perf_counter() - began
        return {"seconds": seconds, "tokens": [t.tolist() for t in tokens]}

    def embed(texts: list[str], batch: int, out: str) -> dict[str, Any]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.empty((len(texts), model.config.hidden_size), np.float32)
        began = time.perf_counter()
        for k in range(0, len(order), batch):
            idx = order[k: k + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            vectors[idx] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
        seconds = time.perf_counter() - began
        np.save(out, vectors)
        return {"seconds": seconds}

    def cpu() -> dict[str, Any]:
        t = os.times()
        return {"seconds": 0.0, "cpu": t.user + t.system, "threads": torch.get_num_threads()}

    ops: dict[str, Callable[..., dict[str, Any]]] = {"generate": generate, "prefill": prefill, "embed": embed,
                                                     "cpu": cpu}
    print(READY, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = ops[request.pop("op")]
        with torch.inference_mode():
            reply = op(**request)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
