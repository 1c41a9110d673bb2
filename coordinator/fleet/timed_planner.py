"""The planner for mixed machines (pure): contiguous layer ranges, one per worker in the order given, that
minimise the largest predicted stage time (compute + the hop out of the stage), within every worker's memory,
and the explanation of each range.

A stage's predicted time for one planned step is `seconds_per_layer * (its layers' compute weights) + hop`,
where a worker's seconds per layer is measured on it (a calibration of one layer of the model at the planned
dtype and step shape), and its hop goes from its worker to the next stage's: the one-way latency (half the
larger of the two workers' measured round trips) plus the step's activation bytes over the smaller of their
measured bandwidths (each link is measured from the coordinator: the path between two workers is bounded by
both). The last stage sends only token ids back to the coordinator: its own link's latency alone. Every
decoder layer of a family weighs 1; the head (norm + LM head matmul, run for each sequence's last token) adds
its parameters' share of a layer's on the last layer; the embedding is a row lookup (no matmul) and adds
nothing. Workers are kept in the order given (the registration order): the planner chooses ranges, not an
order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.fleet.planner import PlanDoesNotFit, StagePlan, best_split, layer_costs, split_layers
from coordinator.store.models import Manifest


@dataclass(frozen=True)
class WorkerSpeed:
    """What a worker offers, measured: seconds per layer of the planned step, and its link."""

    seconds_per_layer: float
    rtt_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf

    def hop_s(self, nbytes: float) -> float:
        return self.rtt_s / 2 + (nbytes / self.bandwidth_bytes_per_s if nbytes else 0.0)


def hop_s(speeds: list[WorkerSpeed], k: int, nbytes: float) -> float:
    """The hop out of stage k: to stage k + 1 (the slower of the two workers' links carries `nbytes`), or, from
    the last stage, back to the coordinator (latency alone)."""
    if k == len(speeds) - 1:
        return speeds[k].hop_s(0.0)
    a, b = speeds[k], speeds[k + 1]
    return WorkerSpeed(0.0, max(a.rtt_s, b.rtt_s), min(a.bandwidth_bytes_per_s, b.bandwidth_bytes_per_s)).hop_s(nbytes)


@dataclass(frozen=True)
class StageExplanation:
    """Why a stage holds its range: its worker, what was measured there, what the plan predicts."""

    worker: str
    start: int
    end: int
    seconds_per_layer: float   # 0: not measured (a plan by bytes)
    compute_s: float
    hop_s: float
    weight_bytes: int
    budget_bytes: int

    @property
    def stage_s(self) -> float:
        return self.compute_s + self.hop_s


def compute_weights(manifest: Manifest, sequences: int = 1, tokens: int = 1) -> list[float]:
    """Relative compute of each layer for a step of `sequences` x `tokens`: 1 per layer, and on the last the
    head's share (its parameters over a layer's, for one token in `tokens`: logits are for last tokens)."""
    n = manifest.num_layers
    layer_bytes = sum(t.size_bytes for t in manifest.tensors if t.part == "layer") / max(1, n)
    head_bytes = sum(t.size_bytes for t in manifest.tensors if t.part == "head")
    head_bytes += sum(t.size_bytes for t in manifest.tensors if t.name in manifest.head_shares)
    weights = [1.0] * n
    if layer_bytes > 0:
        weights[-1] += head_bytes / layer_bytes / max(1, tokens)
    return weights


def split_by_time(weights: list[float], memory: list[int], speeds: list[WorkerSpeed], activation_bytes: float,
                  budgets: list[int]) -> list[tuple[int, int]]:
    """Contiguous ranges, one per worker (in order), minimising the largest predicted stage time within the
    budgets. `weights`: each layer's compute weight; `memory`: each layer's bytes (embedding on the first,
    head on the last); `activation_bytes`: what one step sends over a hop. PlanDoesNotFit names what is
    missing (as the byte planner does)."""
    n, stages = len(weights), len(speeds)
    if len(memory) != n or len(budgets) != stages:
        raise ValueError("one memory cost per layer and one budget per worker")
    split_layers(memory, stages, budgets)  # raises PlanDoesNotFit, with the missing MiB, when nothing fits
    wsum, msum = [0.0], [0]
    for w, m in zip(weights, memory, strict=True):
        wsum.append(wsum[-1] + w)
        msum.append(msum[-1] + m)
    hops = [hop_s(speeds, i, activation_bytes) for i in range(stages)]

    def stage_time(s: int, j: int, i: int) -> float:
        if msum[i] - msum[j] > budgets[s]:
            return math.inf
        return speeds[s].seconds_per_layer * (wsum[i] - wsum[j]) + hops[s]

    best, ranges = best_split(n, stages, stage_time)
    if math.isinf(best):  # pragma: no cover - split_layers found a fitting split above
        raise PlanDoesNotFit("no contiguous split fits the workers' memory")
    return ranges


def explain(names: list[str], ranges: list[tuple[int, int]], memory: list[int], weights: list[float],
            speeds: list[WorkerSpeed | None], activation_bytes: float, budgets: list[int]) -> list[StageExplanation]:
    """Each stage's worker, measured speed, layers, predicted compute and hop, memory used and offered (a
    worker without a measurement predicts 0 s)."""
    out = []
    last = len(ranges) - 1
    for k, ((a, b), name, speed, budget) in enumerate(zip(ranges, names, speeds, budgets, strict=True)):
        spl = speed.seconds_per_layer if speed is not None else 0.0
        following = speeds[k + 1] if k < last else None
        if speed is None:
            hop = 0.0
        elif following is not None:
            hop = hop_s([speed, following], 0, activation_bytes)
        else:  # the last stage (latency alone), or the next worker unmeasured (this worker's link alone)
            hop = speed.hop_s(activation_bytes if k < last else 0.0)
        out.append(StageExplanation(name, a, b, spl, spl * sum(weights[a:b]), hop, sum(memory[a:b]), budget))
    return out


def plan_by_time(manifest: Manifest, names: list[str], speeds: list[WorkerSpeed], budgets: list[int],
                 activation_bytes: float, sequences: int = 1,
                 tokens: int = 1) -> tuple[list[StagePlan], list[StageExplanation]]:
    """The plan over these workers (in order) for a step of `sequences` x `tokens`, and its explanation."""
    memory, weights = layer_costs(manifest), compute_weights(manifest, sequences, tokens)
    ranges = split_by_time(weights, memory, speeds, activation_bytes, budgets)
    return ([StagePlan(a, b, sum(memory[a:b])) for a, b in ranges],
            explain(names, ranges, memory, weights, list(speeds), activation_bytes, budgets))
