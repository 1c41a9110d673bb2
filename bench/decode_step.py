"""One decode step of 16 sequences, in one process with the same torch threads: transformers' model (the
built-in SmolLM2, a left-padded static batch with its DynamicCache, `logits_to_keep=1`, greedy argmax, as
`generate` steps) against shardline's whole-model stage (all 30 layers, built as a worker builds it) stepped
through `StageRuntime.step` exactly as a worker's compute thread runs it (checks, Stage.forward, the head on
the last rows, sampling). Both sides decode the same prompts (seeded lengths 20-100 tokens); their tokens are
compared. Rounds alternate the sides; the prefill is not timed.

    python bench/decode_step.py [--rounds 5] [--steps 32] [--batch 16] [--threads 2] [--profile FILE]

`--profile FILE`: after the rounds, one more round of each side under torch.profiler; the per-op table of
both goes to FILE. Set OMP_WAIT_POLICY (as `coordinator launch` does for workers) in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from coordinator.store.importer import builtin_gguf, import_gguf  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shard_worker.families import FAMILIES  # noqa: E402
from shard_worker.kv_cache import KVPool  # noqa: E402
from shard_worker.runtime import ComputeThread, Slice, StageRuntime, Step  # noqa: E402
from shard_worker.stage import build_stage  # noqa: E402


def model_dir() -> Path:
    store = ModelStore(default_store())
    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    return store.path("smollm2")


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randrange(20, 101))] for _ in range(batch)]


class Transformers:
    """transformers' decode loop as `generate` runs it for a left-padded static batch."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def prefill(self, ids: list[list[int]]) -> list[int]:
        from transformers import DynamicCache

        width = max(len(p) for p in ids)
        pad = self.model.config.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        self.cache = DynamicCache(config=self.model.config)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                         past_key_values=self.cache, logits_to_keep=1, use_cache=True)
        self.token = out.logits[:, -1].argmax(-1)
        return [int(t) for t in self.token]

    @torch.inference_mode()
    def step(self) -> list[int]:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        out = self.model(input_ids=self.token[:, None], attention_mask=self.mask, position_ids=self.positions,
                         past_key_values=self.cache, logits_to_keep=1, use_cache=True)
        self.token = out.logits[:, -1].argmax(-1)
        return [int(t) for t in self.token]


class Shardline:
    """A worker's compute for the whole model: one stage of all layers, its KV pool, its runtime; with
    `thread`, each step runs on a ComputeThread as the worker runs it."""

    def __init__(self, path: Path, thread: bool) -> None:
        family = FAMILIES["llama"]
        config = family.config_class()(**json.loads((path / "config.json").read_text()))
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(file))
        layers = family.num_layers(config)
        names = family.names.stage_tensor_names(config, list(tensors), 0, layers)
        stage = build_stage(family, config, 0, layers, {n: tensors[n] for n in names}, torch.float32)
        self.runtime = StageRuntime(stage, KVPool(stage.kv_layout(16), 1 << 20))
        self.thread = ComputeThread() if thread else None
        self.names: list[str] = []
        self.lengths: list[int] = []
        self.token: list[int] = []
        self.runs = 0

    def _run(self, step: Step) -> list[int]:
        result = self.thread.submit(lambda: self.runtime.step(step)).result() if self.thread else \
            self.runtime.step(step)
        if result.token_ids is None or result.errors:
            raise RuntimeError(f"the step failed: {result.errors}")
        self.lengths = [k + s.count for k, s in zip(self.lengths, step.sequences, strict=True)]
        self.token = result.token_ids
        return self.token

    def prefill(self, ids: list[list[int]]) -> list[int]:
        self.runtime.end_sessions(self.names)
        self.runs += 1
        self.names, self.lengths = [f"r{self.runs}s{i}" for i in range(len(ids))], [0] * len(ids)
        return self._run(Step([Slice(n, 0, len(p)) for n, p in zip(self.names, ids, strict=True)],
                              token_ids=[t for p in ids for t in p]))

    def step(self) -> list[int]:
        return self._run(Step([Slice(n, k, 1) for n, k in zip(self.names, self.lengths, strict=True)],
                              token_ids=self.token))


def decode(side: Any, ids: list[list[int]], steps: int, around: Any = contextlib.nullcontext
           ) -> tuple[float, list[list[int]]]:
    """Prefill (not timed), then `steps` timed decode steps; seconds and each sequence's tokens."""
    tokens = [side.prefill(ids)]
    with around():
        began = time.perf_counter()
        for _ in range(steps):
            tokens.append(side.step())
        seconds = time.perf_counter() - began
    return seconds, [list(col) for col in zip(*tokens, strict=True)]


def profile(side: Any, ids: list[list[int]], steps: int) -> str:
    """torch.profiler over the decode steps alone: per-op CPU time and calls per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    holder: list[Any] = []

    @contextlib.contextmanager
    def around() -> Iterator[None]:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        holder.append(prof)

    decode(side, ids, steps, around)
    events = sorted(holder[0].key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{'op':<52} {'self ms/step':>12} {'calls/step':>10}"]
    lines += [f"{e.key[:52]:<52} {e.self_cpu_time_total / 1e3 / steps:>12.2f} {e.count / steps:>10.0f}"
              for e in events[:30]]
    lines.append(f"{'total':<52} {total / 1e3 / steps:>12.2f} {sum(e.count for e in events) / steps:>10.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--compute-thread", action="store_true", help="shardline's steps on a ComputeThread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = model_dir()
    hf, ours = Transformers(path), Shardline(path, args.compute_thread)
    ids = prompts(args.batch, hf.model.config.vocab_size)
    sides: list[tuple[str, Any]] = [("transformers", hf), ("shardline", ours)]
    for _, side in sides:  # warm up
        decode(side, ids, 2)
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    ratios = []
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, side in order:
            seconds, tokens[name] = decode(side, ids, args.steps)
            times[name].append(seconds / args.steps * 1e3)
        ratios.append(times["shardline"][-1] / times["transformers"][-1])
        print(f"round {r}: transformers {times['transformers'][-1]:.1f} ms/step, shardline "
              f"{times['shardline'][-1]:.1f} ms/step, {ratios[-1]:.2f}x the time", flush=True)
    same = sum(a == b for a, b in zip(tokens["transformers"], tokens["shardline"], strict=True))
    print(f"median: transformers {statistics.median(times['transformers']):.1f} ms/step, shardline "
          f"{statistics.median(times['shardline']):.1f} ms/step, ratio {statistics.median(ratios):.2f}x the time "
          f"({args.batch} sequences, {args.steps} steps, {torch.get_num_threads()} threads); "
          f"{same}/{args.batch} sequences with identical tokens")
    if args.profile:
        args.profile.write_text("\n\n".join(f"== {name}\n{profile(side, ids, args.steps)}" for name, side in sides))


if __name__ == "__main__":
    main()
