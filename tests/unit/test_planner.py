from __future__ import annotations

import itertools

import pytest

from coordinator.fleet.planner import PlanDoesNotFit, split_layers


def brute_force(costs, stages):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs, stages", [
    ([5, 1, 1, 1, 1, 1, 1, 5], 3), ([1] * 30, 3), ([9, 1, 1, 1, 1, 9], 2), ([3, 7, 2, 8, 1, 1, 6], 4), ([4], 1),
])
def test_split_is_contiguous_complete_and_optimal(costs, stages):
    ranges = split_layers(costs, stages)
    assert len(ranges) == stages and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    assert max(sum(costs[a:b]) for a, b in ranges) == brute_force(costs, stages)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PlanDoesNotFit, match="cannot split 2 layers into 3 stages"):
        split_layers([1, 1], 3)


def test_budgets_shape_the_split():
    costs = [4, 4, 4, 4, 4, 4]
    assert split_layers(costs, 2) == [(0, 3), (3, 6)]
    assert split_layers(costs, 2, budgets=[8, 100]) == [(0, 2), (2, 6)]


def test_a_plan_that_cannot_fit_names_the_missing_memory():
    mib = 1024 * 1024
    with pytest.raises(PlanDoesNotFit, match="offer 6.0 MiB: 2.0 MiB missing"):
        split_layers([2 * mib] * 4, 2, budgets=[3 * mib, 3 * mib])
    with pytest.raises(PlanDoesNotFit, match=r"worker 0 needs 5.0 MiB for layers \[0, 1\).*1.0 MiB missing"):
        split_layers([5 * mib, 1 * mib, 1 * mib], 2, budgets=[4 * mib, 10 * mib])
