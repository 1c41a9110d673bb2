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


def test_a_shard_loaded_otherwise_than_the_configuration_asks_is_stale_and_never_adopted():
    from coordinator.config import CoordinatorConfig
    from coordinator.fleet.membership import held_chain
    from coordinator.fleet.rechain import stale_marked
    from coordinator.fleet.registry import WorkerDevice
    from shardline.v1 import worker_pb2

    none = int(worker_pb2.WEIGHT_QUANTIZATION_NONE)
    a, b = worker(1, 300), worker(2, 300)
    b.device = WorkerDevice(dtype="bfloat16")  # its own --dtype: what it runs, whatever is asked
    loaded = {"w1": LoadedShard("m", 0, 3, "d", ("float32", none, 16)),
              "w2": LoadedShard("m", 3, 6, "d", ("bfloat16", none, 16))}
    config = CoordinatorConfig(model="m", store="/tmp")
    assert not any(s.stale for s in stale_marked(loaded, [a, b], config).values())
    assert held_chain([a, b], stale_marked(loaded, [a, b], config), "m", "d", [10] * 6) is not None
    for changed in (dict(dtype="float16"), dict(quantize="int8"), dict(kv_block_tokens=32)):
        marked = stale_marked(loaded, [a, b], config.model_copy(update=changed))
        assert marked["w1"].stale, changed
        assert held_chain([a, b], marked, "m", "d", [10] * 6) is None
    encoder = {"w1": LoadedShard("e", 0, 6, "d", ("float32", none, 0))}  # no KV: nothing to compare
    assert not stale_marked(encoder, [a], config)["w1"].stale


def test_placement_puts_a_replica_on_the_workers_whose_shards_tile_it_and_waits_for_them_a_moment():
    """After a restart: 2 replicas of 2 stages, their 4 holders registered in any order, and a fifth worker
    holding nothing: each replica gets a chain of holders (never two stage-0 holders together), and while the
    adoption window lasts, a replica whose holders are not all back waits rather than load elsewhere."""
    from coordinator.fleet.membership import tiling
    from coordinator.fleet.placement import Wanted, place
    from coordinator.store.models import Manifest, TensorInfo

    tensors = [TensorInfo(f"l{i}", "F32", [4], 16, "s", "layer", i, "f", 0) for i in range(4)]
    manifest = Manifest("m", "llama", 4, tensors)
    digest = manifest.digest
    held = {1: (0, 2), 2: (0, 2), 3: (2, 4), 4: (2, 4)}
    pool = [worker(5, 300)]
    for n in (3, 1, 4, 2):  # registration order: stage 1 first
        w = worker(n, 300)
        w.held = LoadedShard("m", *held[n], digest)
        pool.append(w)
    assert tiling(pool, "m", "other", [16] * 4, 2) is None
    wanted = [Wanted("m@1#1", manifest, 2, "m"), Wanted("m@1#2", manifest, 2, "m")]
    placement = place(wanted, pool)
    chains = [[(w.worker_id, s.start, s.end) for w, s in chain] for _, chain in placement.placed]
    assert len(chains) == 2 and all([start for _, start, _ in c] == [0, 2] for c in chains), chains
    assert {w for c in chains for w, _, _ in c} == {"w1", "w2", "w3", "w4"}  # the spare w5 loads nothing
    back = [w for w in pool if w.worker_id in ("w5", "w1")]  # only one holder back yet
    assert place(wanted[:1], back, adopting=True).waiting  # it waits for the others
    assert place(wanted[:1], back, adopting=False).placed  # after the window: placed, and loaded
