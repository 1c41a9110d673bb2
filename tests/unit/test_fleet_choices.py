"""The fleet's pure choices: placement of every deployment on one pool, naming (name@version), replica
bounds, and the autoscaler's decisions."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig, DeploymentSpec, defaults_of
from coordinator.fleet.autoscaler import Pressure, decide
from coordinator.fleet.deployments import check_replicas, resolve
from coordinator.fleet.placement import Wanted, choose_workers, interleave, place
from coordinator.fleet.planner import MiB, PlanDoesNotFit
from coordinator.fleet.registry import LoadedShard, WorkerRecord
from coordinator.store.models import Manifest, TensorInfo
from shardline.errors import InvalidArgument, NotFound


def manifest(name: str, layers: int, layer_mib: int) -> Manifest:
    tensors = [TensorInfo(f"l{i}", "F32", [1], layer_mib * MiB, "", "layer", i, "m.safetensors", 0)
               for i in range(layers)]
    return Manifest(name, "llama", layers, tensors)


def workers(*budgets_mib: int) -> list[WorkerRecord]:
    return [WorkerRecord(f"w{i}", f"127.0.0.1:{9000 + i}", b * MiB, 0.0) for i, b in enumerate(budgets_mib)]


def test_every_deployment_is_placed_at_once_each_worker_in_one_stage():
    a, b = manifest("a", 4, 100), manifest("b", 4, 50)
    pool = workers(300, 300, 150, 150, 150, 150)
    wanted = interleave([[Wanted("a@1", a, 2)] * 2, [Wanted("b@1", b, 2)]])
    assert [w.key for w in wanted] == ["a@1", "b@1", "a@1"]
    result = place(wanted, pool)
    used = [w.worker_id for _, chain in result.placed for w, _ in chain]
    assert len(used) == len(set(used)) == 6 and not result.unplaced
    for want, chain in result.placed:
        assert all(stage.weight_bytes <= worker.memory_budget_bytes for worker, stage in chain)
        assert [s.start for _, s in chain][0] == 0 and chain[-1][1].end == want.manifest.num_layers
    # b (200 MiB) takes the smallest workers that hold it: the large ones stay for a
    (b_chain,) = [chain for want, chain in result.placed if want.key == "b@1"]
    assert {w.memory_budget_bytes for w, _ in b_chain} == {150 * MiB}


def test_what_cannot_fit_is_reported_per_deployment_with_the_missing_mib():
    big, small = manifest("big", 4, 200), manifest("small", 2, 10)
    result = place([Wanted("big@1", big, 2), Wanted("small@1", small, 1)], workers(300, 300, 50))
    assert [w.key for w, _ in result.placed] == ["small@1"]
    assert "big@1 (800.0 MiB of weights on 2 workers)" in result.unplaced["big@1"]
    assert "200.0 MiB missing" in result.unplaced["big@1"]
    missing = "needs 3 workers and 1 are free, offering 10.0 MiB: 10.0 MiB and 2 workers missing"
    with pytest.raises(PlanDoesNotFit, match=missing):
        choose_workers(small, 3, workers(10))


def test_while_adopting_a_worker_holding_a_wanted_models_layers_is_placed_nothing_else():
    """Just after a start (standby takeover, restart), the holder of a's first stage registers first: b (which
    would fit on it) waits rather than take it, and a waits for its other holder; without `adopting`, b takes it."""
    a, b = manifest("a", 4, 10), manifest("b", 2, 10)
    (holder,) = workers(300)
    holder.held = LoadedShard("a", 0, 2, a.digest)
    wanted = [Wanted("a@1", a, 2, "a"), Wanted("b@1", b, 1, "b")]
    adopting = place(wanted, [holder], adopting=True)
    assert adopting.placed == [] and "a@1" in adopting.waiting
    assert [w.key for w, _ in place(wanted, [holder], adopting=False).placed] == ["b@1"]


def test_names_versions_and_defaults():
    versions, defaults = {"llama": ["1", "2"], "bert": ["1"]}, {"llama": "2", "bert": "1"}
    assert resolve("llama", versions, defaults, "bert") == "llama@2"
    assert resolve("llama@1", versions, defaults, "bert") == "llama@1"
    assert resolve("", versions, defaults, "bert") == "bert@1"
    with pytest.raises(NotFound, match=r"no version '3'; its versions: 1, 2 \(default 2\)"):
        resolve("llama@3", versions, defaults, "bert")
    with pytest.raises(NotFound, match=r"'gpt' is not served here; served: bert \(versions 1\), llama"):
        resolve("gpt", versions, defaults, "bert")
    specs = [DeploymentSpec.model_validate(d) for d in (
        {"name": "m", "version": "1"}, {"name": "m", "version": "2", "default": True}, {"name": "n"})]
    assert defaults_of(specs) == {"m": "2", "n": "1"}


def test_config_checks_deployments():
    with pytest.raises(ValueError, match="listed twice: m@1"):
        CoordinatorConfig(deployments=[{"name": "m"}, {"name": "m"}])
    with pytest.raises(ValueError, match="more than one default"):
        CoordinatorConfig(deployments=[{"name": "m", "version": "1", "default": True},
                                       {"name": "m", "version": "2", "default": True}])
    with pytest.raises(ValueError, match="outside min_replicas"):
        CoordinatorConfig(deployments=[{"name": "m", "replicas": 5, "max_replicas": 3}])
    config = CoordinatorConfig(workers=4)
    (only,) = config.initial_deployments()
    assert (only.key, only.replicas, only.workers) == ("smollm2@1", 1, 4)


def test_replica_counts_are_bounded_by_the_pool():
    check_replicas(0, 4, 2, "m@1")
    check_replicas(2, 4, 2, "m@1")
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        check_replicas(-1, 4, 2, "m@1")
    with pytest.raises(InvalidArgument, match="3 replicas of 2 workers need 6 workers; the pool has 4"):
        check_replicas(3, 4, 2, "m@1")


def test_the_autoscaler_adds_after_a_sustained_queue_and_removes_after_idling():
    spec = DeploymentSpec.model_validate(dict(name="m", replicas=1, min_replicas=1, max_replicas=3, target_queue=2,
                                              scale_up_after_s=5, scale_down_after_s=30))
    p = Pressure()
    assert decide(spec, 1, 1, queued=5, running=4, now=0, pressure=p) is None  # long, but not for long yet
    assert decide(spec, 1, 1, queued=5, running=4, now=4, pressure=p) is None
    assert decide(spec, 1, 1, queued=1, running=4, now=4.5, pressure=p) is None  # it dipped: the clock restarts
    assert decide(spec, 1, 1, queued=5, running=4, now=5, pressure=p) is None
    target, why = decide(spec, 1, 1, queued=5, running=4, now=10, pressure=p)
    assert target == 2 and "5 streams queued over 1 replicas" in why
    assert decide(spec, 3, 3, queued=90, running=4, now=20, pressure=Pressure(high_since=0)) is None  # at max
    assert decide(spec, 2, 1, queued=90, running=4, now=20, pressure=Pressure(high_since=0)) is None  # placing
    idle = Pressure()
    assert decide(spec, 2, 2, queued=0, running=0, now=100, pressure=idle) is None
    target, why = decide(spec, 2, 2, queued=0, running=0, now=130, pressure=idle)
    assert (target, why) == (1, "idle for 30 s")
    assert decide(spec, 1, 1, queued=0, running=0, now=500, pressure=Pressure(idle_since=0)) is None  # at min
    assert decide(spec, 0, 0, queued=0, running=0, now=0, pressure=Pressure())[0] == 1  # below min
