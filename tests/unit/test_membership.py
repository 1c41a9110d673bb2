"""Which spare takes a leaving worker's layers (pure)."""

from __future__ import annotations

from coordinator.fleet.membership import LoadedShard, choose_replacements
from coordinator.fleet.planner import StagePlan
from coordinator.fleet.registry import WorkerRecord

MiB = 2**20


def worker(n: int, budget_mib: int) -> WorkerRecord:
    return WorkerRecord(f"w{n}", f"10.0.0.{n}:5000", budget_mib * MiB, 0.0)


STAGES = [StagePlan(0, 10, 200 * MiB), StagePlan(10, 20, 150 * MiB)]


def test_a_spare_already_holding_the_stage_wins_then_the_smallest_that_fits():
    a, b = worker(1, 300), worker(2, 300)
    big, small, holding = worker(3, 1000), worker(4, 160), worker(5, 2000)
    current = list(zip([a, b], STAGES, strict=True))
    loaded = {"w5": LoadedShard("m", 10, 20)}
    assert choose_replacements(current, [b], [big, small, holding], loaded, "m") == [(a, STAGES[0]),
                                                                                     (holding, STAGES[1])]
    assert choose_replacements(current, [b], [big, small], {}, "m") == [(a, STAGES[0]), (small, STAGES[1])]
    # a shard of another model does not count as holding the stage
    assert choose_replacements(current, [b], [big, holding], {"w5": LoadedShard("other", 10, 20)}, "m")[1][0] is big


def test_no_fitting_spare_means_none_and_each_spare_serves_once():
    a, b = worker(1, 300), worker(2, 300)
    current = list(zip([a, b], STAGES, strict=True))
    assert choose_replacements(current, [b], [worker(3, 100)], {}, "m") is None
    assert choose_replacements(current, [a, b], [worker(3, 1000)], {}, "m") is None
    both = choose_replacements(current, [a, b], [worker(3, 1000), worker(4, 1000)], {}, "m")
    assert both is not None and {w.worker_id for w, _ in both} == {"w3", "w4"}


def test_workers_that_hold_a_tiling_of_the_same_weights_are_adopted_as_the_chain_they_form():
    from coordinator.fleet.membership import held_chain

    a, b, c = worker(1, 300), worker(2, 300), worker(3, 300)
    costs = [10] * 6
    loaded = {"w1": LoadedShard("m", 3, 6, "d"), "w2": LoadedShard("m", 0, 3, "d")}
    # registered in any order: the chain follows the layers they hold
    assert held_chain([a, b], loaded, "m", "d", costs) == [(b, StagePlan(0, 3, 30)), (a, StagePlan(3, 6, 30))]
    assert held_chain([a, b], loaded, "m", "other weights", costs) is None  # re-imported since: load again
    assert held_chain([a, b], loaded, "n", "d", costs) is None
    assert held_chain([a, b, c], {**loaded, "w3": LoadedShard("", 0, 0)}, "m", "d", costs) is None  # c holds none
    assert held_chain([b], loaded, "m", "d", costs) is None  # [0, 3) alone does not cover the model
    gap = {"w1": LoadedShard("m", 4, 6, "d"), "w2": LoadedShard("m", 0, 3, "d")}
    assert held_chain([a, b], gap, "m", "d", costs) is None
    overlap = {"w1": LoadedShard("m", 2, 6, "d"), "w2": LoadedShard("m", 0, 3, "d")}
    assert held_chain([a, b], overlap, "m", "d", costs) is None
