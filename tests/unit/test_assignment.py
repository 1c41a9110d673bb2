"""A replica's next assignment (coordinator/fleet/assignment.py, pure): which worker serves which stage after
a first deployment, a heal, a drain or a rebalance, and the basis its split says."""

from __future__ import annotations

import pytest

from coordinator.config import DeploymentSpec
from coordinator.fleet.assignment import choose, split_over
from coordinator.fleet.membership import LoadedShard
from coordinator.fleet.planner import MiB, PlanDoesNotFit
from coordinator.fleet.registry import WorkerRecord
from coordinator.store.models import Manifest, TensorInfo

SPEC = DeploymentSpec(name="m", workers=2)
MANIFEST = Manifest("m", "llama", 4, [TensorInfo(f"l{i}", "F32", [1], 100 * MiB, "", "layer", i,
                                                 "m.safetensors", 0) for i in range(4)])


def pool(n: int) -> list[WorkerRecord]:
    return [WorkerRecord(f"w{i}", f"127.0.0.1:{9000 + i}", 300 * MiB, 0.0) for i in range(n)]


def answered(*workers: WorkerRecord) -> dict[str, LoadedShard]:
    return {w.worker_id: LoadedShard("", 0, 0) for w in workers}


def test_a_heal_moves_a_dead_workers_stage_to_a_spare_and_keeps_the_chains_basis():
    a, b, spare = pool(3)
    (_, first), (_, second) = split_over(None, MANIFEST, [a, b])[0]
    target, basis = choose([a, b], [first, second], [spare], [b], answered(a, spare), set(), owner="m@1/r0",
                           spec=SPEC, manifest=MANIFEST, plans=None, first=None, drain=None, rebalance=False)
    assert target == [(a, first), (spare, second)]
    assert basis is None  # only stages moved: the split (and its basis) stand


def test_without_a_spare_the_stages_are_planned_again_on_the_workers_that_stay():
    a, b, c = pool(3)
    (_, s0), (_, s1), (_, s2) = split_over(None, MANIFEST, [a, b, c])[0]
    target, basis = choose([a, b, c], [s0, s1, s2], [], [c], answered(a, b), set(), owner="m@1/r0",
                           spec=SPEC, manifest=MANIFEST, plans=None, first=None, drain=None, rebalance=False)
    assert [w for w, _ in target] == [a, b] and basis == "bytes (calibration is off)"
    with pytest.raises(PlanDoesNotFit, match="no chain to heal"):
        choose([], [], [c], [], answered(c), set(), owner="m@1/r0", spec=SPEC, manifest=MANIFEST, plans=None,
               first=None, drain=None, rebalance=False)


def test_a_rebalance_takes_the_chosen_workers_and_its_basis_carries_the_note():
    a, b, spare = pool(3)
    stages = [s for _, s in split_over(None, MANIFEST, [a, b])[0]]
    target, basis = choose([a, b], stages, [spare], [], answered(a, b, spare), set(), owner="m@1/r0", spec=SPEC,
                           manifest=MANIFEST, plans=None, first=None, drain=None, rebalance=True,
                           chosen=([a, spare], "spares left out: w9 is not calibrated"))
    assert [w for w, _ in target] == [a, spare]
    assert basis == "bytes (calibration is off); spares left out: w9 is not calibrated"


def test_a_first_deployment_places_again_around_a_placed_worker_that_failed_to_load():
    a, b, spare = pool(3)
    placed = split_over(None, MANIFEST, [a, b])[0]
    for w in (a, b):
        w.owner = "m@1/r0"
    target, _ = choose([], [], [spare], [], answered(a, b, spare), {b.worker_id}, owner="m@1/r0", spec=SPEC,
                       manifest=MANIFEST, plans=None, first=placed, drain=None, rebalance=False)
    assert [w for w, _ in target] == [a, spare]
