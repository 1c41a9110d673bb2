"""The planner: pure functions from layer costs to contiguous half-open layer ranges."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.store import Manifest


@dataclass(frozen=True)
class StagePlan:
    start: int
    end: int
    weight_bytes: int


def layer_costs(manifest: Manifest) -> list[int]:
    """Bytes each layer brings to its stage; the embedding counts on layer 0, the head (with a tied
    embedding, which the last stage loads too) on the last layer."""
    costs = [0] * manifest.num_layers
    for t in manifest.tensors:
        if t.part == "layer":
            costs[t.layer] += t.size_bytes
        elif t.part == "embed":
            costs[0] += t.size_bytes
        else:
            costs[-1] += t.size_bytes
        if t.name in manifest.head_shares:
            costs[-1] += t.size_bytes
    return costs


def split_layers(costs: list[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges, one per stage, minimising the largest stage's cost (exact DP, O(S * L^2))."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages (need 1 <= stages <= {n})")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max-cost splitting layers [0, i) into s stages; cut[s][i]: where the last starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges: list[tuple[int, int]] = []
    end = n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def plan(manifest: Manifest, stages: int) -> list[StagePlan]:
    costs = layer_costs(manifest)
    return [StagePlan(a, b, sum(costs[a:b])) for a, b in split_layers(costs, stages)]
