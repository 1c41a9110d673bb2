from __future__ import annotations

import itertools

import pytest

from coordinator.planner import split_layers


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
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        split_layers([1, 1], 3)
