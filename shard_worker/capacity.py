"""A stage's KV capacity, planned once after loading: the memory budget minus the weights minus the
activation headroom of the largest step, measured by running that step once.

The measurement resets the process's peak RSS (Linux: /proc/self/clear_refs), runs the largest steps the
coordinator sends (`max_step_tokens` tokens cut into sequences of `prefill_chunk_tokens`, and
`max_step_sequences` one-token sequences, whose logits the last stage computes), and reads the new peak.
It costs a few seconds per load (and so per failover onto a spare that must load).
Elsewhere the RSS growth over the step is used, doubled. Not measured: attention at a long context (CPU
SDPA works through keys in blocks, so its temporaries grow little with the context). On a CUDA stage the
device allocator's peak over the step is used instead (the budget is then device memory).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psutil
import torch

from shard_worker.kv_cache import KVPool
from shard_worker.runtime import KVSettings, Slice, StageRuntime, Step
from shard_worker.stage import Stage
from shard_worker.wire import raw_from_torch
from shardline.errors import ResourceExhausted

log = logging.getLogger(__name__)

HEADROOM_MARGIN = 1.2  # allocator slack on top of the measured peak
# the peak RSS is the process's: two stages measuring at once in one process (tests, benchmarks) would each
# count the other's step, so measurements take turns
_MEASURING = threading.Lock()


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_of(stage: Stage, settings: KVSettings, counts: list[int]) -> int:
    """The memory one step of these sequence lengths (all from position 0) needs beyond its KV."""
    total = sum(counts)
    scratch = StageRuntime(stage, KVPool(stage.kv_layout(settings.block_tokens), 1 << 40), settings)
    sequences = [Slice(f"warmup-{i}", 0, n) for i, n in enumerate(counts)]
    if stage.is_first:
        step = Step(sequences, token_ids=[0] * total)
    else:
        step = Step(sequences, hidden=raw_from_torch(torch.zeros(total, stage.hidden_size, dtype=stage.dtype)))
    # the KV the step writes is KV, not headroom: allocate it, and touch it, before measuring
    caches = [scratch._check_sequence(i, seq, None) for i, seq in enumerate(sequences)]
    for cache in caches:
        for t in (*cache.keys, *cache.values):
            t.zero_()
    scratch.sessions.update({s.session_id: c for s, c in zip(sequences, caches, strict=True)})
    if stage.device.type == "cuda":  # the device's allocator counts exactly what the step takes
        return _cuda_peak_of(scratch, step, sequences)
    before = psutil.Process().memory_info().rss
    exact = _reset_peak()
    scratch.step(step)
    peak = _peak_rss() if exact else None
    after = psutil.Process().memory_info().rss
    scratch.end_sessions([s.session_id for s in sequences])
    return max(0, (peak - before) if peak is not None else 2 * (after - before))


def _cuda_peak_of(scratch: StageRuntime, step: Step, sequences: list[Slice]) -> int:
    device = scratch.stage.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    scratch.step(step)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    scratch.end_sessions([s.session_id for s in sequences])
    return max(0, peak - before)


def measure_headroom(stage: Stage, settings: KVSettings) -> int:
    """Bytes the largest step needs beyond weights and KV (activations, logits, temporaries): the larger of
    a prefill step (max_step_tokens in chunks) and a decode step (max_step_sequences rows, each with its
    logits at the last stage)."""
    if not stage.causal:
        return 0
    chunk, total = settings.prefill_chunk_tokens, settings.max_step_tokens
    # a step never carries more than max_step_sequences sequences, however many chunks max_step_tokens holds
    prefill = [min(chunk, total - start) for start in range(0, total, chunk)][: settings.max_step_sequences]
    decode = [1] * settings.max_step_sequences
    with _MEASURING:
        return int(max(_peak_of(stage, settings, prefill), _peak_of(stage, settings, decode)) * HEADROOM_MARGIN)


def plan_runtime(stage: Stage, weight_bytes: int, budget_bytes: int, settings: KVSettings) -> StageRuntime:
    """The stage's runtime with a KV pool sized to what the budget leaves; refuses a budget that leaves none."""
    layout = stage.kv_layout(settings.block_tokens)
    headroom = measure_headroom(stage, settings)
    free = budget_bytes - weight_bytes - headroom
    blocks = free // layout.block_bytes if stage.causal else 0
    if stage.causal and blocks < 1:
        raise ResourceExhausted(
            f"the memory budget of {budget_bytes / 2**20:.0f} MiB leaves no room for the KV cache: weights take "
            f"{weight_bytes / 2**20:.0f} MiB and the largest step ({settings.max_step_tokens} tokens) "
            f"{headroom / 2**20:.0f} MiB; give the worker more memory or the stage fewer layers")
    log.info("KV capacity: %d blocks of %d positions (%d tokens, %.0f MiB); budget %.0f MiB, weights %.0f MiB, "
             "headroom %.0f MiB", blocks, layout.block_tokens, blocks * layout.block_tokens,
             blocks * layout.block_bytes / 2**20, budget_bytes / 2**20, weight_bytes / 2**20, headroom / 2**20)
    return StageRuntime(stage, KVPool(layout, blocks), settings, headroom, budget_bytes)
