"""The planner: pure functions from layer costs and workers' memory budgets to contiguous half-open layer
ranges, one per worker, in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from coordinator.store.models import Manifest

MiB = 1024 * 1024


class PlanDoesNotFit(ValueError):
    """No contiguous split fits the workers' budgets; the message says how much memory is missing."""


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


def best_split(n: int, stages: int, score: Callable[[int, int, int], float]) -> tuple[float, list[tuple[int, int]]]:
    """Contiguous ranges minimising the largest score(stage, start, end) (exact DP, O(S * L^2))."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], score(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges: list[tuple[int, int]] = []
    end = n
    for s in range(stages, 0, -1):
        ranges.append((cut[s][end], end))
        end = cut[s][end]
    return best[stages][n], ranges[::-1]


def split_layers(costs: list[int], stages: int, budgets: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges, one per stage, minimising the largest stage's cost; with budgets, every stage's
    cost must also fit its worker's budget, or PlanDoesNotFit says how much is missing."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise PlanDoesNotFit(f"cannot split {n} layers into {stages} stages (need 1 <= stages <= {n})")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(j: int, i: int) -> int:
        return prefix[i] - prefix[j]

    if budgets is None:
        return best_split(n, stages, lambda s, j, i: cost(j, i))[1]
    if len(budgets) != stages:
        raise ValueError("one budget per stage")
    total, offered = prefix[-1], sum(budgets)
    if total > offered:
        raise PlanDoesNotFit(f"the model needs {total / MiB:.1f} MiB of weights but the {stages} workers offer "
                             f"{offered / MiB:.1f} MiB: {(total - offered) / MiB:.1f} MiB missing")
    overflow, ranges = best_split(n, stages, lambda s, j, i: cost(j, i) - budgets[s])
    if overflow > 0:
        worst = max(range(stages), key=lambda s: cost(*ranges[s]) - budgets[s])
        a, b = ranges[worst]
        raise PlanDoesNotFit(
            f"no contiguous split fits: at best worker {worst} needs {cost(a, b) / MiB:.1f} MiB for layers "
            f"[{a}, {b}) but offers {budgets[worst] / MiB:.1f} MiB: {overflow / MiB:.1f} MiB missing")
    inf = float("inf")
    return best_split(n, stages, lambda s, j, i: cost(j, i) if cost(j, i) <= budgets[s] else inf)[1]


def plan(manifest: Manifest, stages: int, budgets: list[int] | None = None) -> list[StagePlan]:
    costs = layer_costs(manifest)
    return [StagePlan(a, b, sum(costs[a:b])) for a, b in split_layers(costs, stages, budgets)]
