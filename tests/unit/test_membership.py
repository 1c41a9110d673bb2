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
