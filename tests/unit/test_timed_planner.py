"""The planner for mixed machines: given measured speeds and links, its ranges are the best contiguous split
(checked against a brute force over every split), balanced to within a layer's time, within memory."""

from __future__ import annotations

import itertools
import math

import pytest

from coordinator.fleet.planner import PlanDoesNotFit
from coordinator.fleet.timed_planner import WorkerSpeed, compute_weights, explain, hop_s, split_by_time
from coordinator.store.models import Manifest, TensorInfo

MIB = 1024 * 1024
ACT = 4 * MIB  # a step's activation bytes


def stage_times(ranges, weights, speeds, activation=ACT):
    return [speeds[k].seconds_per_layer * sum(weights[a:b]) + hop_s(speeds, k, activation)
            for k, (a, b) in enumerate(ranges)]


def brute_force(weights, memory, speeds, budgets, activation=ACT):
    """The smallest largest-stage time over every contiguous split that fits (None: none fits)."""
    n, stages = len(weights), len(speeds)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        ranges = list(itertools.pairwise([0, *cuts, n]))
        if any(sum(memory[a:b]) > budgets[k] for k, (a, b) in enumerate(ranges)):
            continue
        worst = max(stage_times(ranges, weights, speeds, activation))
        best = worst if best is None else min(best, worst)
    return best


FAST, SLOW = WorkerSpeed(0.010), WorkerSpeed(0.030)
LAN = dict(rtt_s=0.0005, bandwidth_bytes_per_s=1e9)   # 4 MiB: 4.2 ms
WAN = dict(rtt_s=0.020, bandwidth_bytes_per_s=50e6)   # 4 MiB: 94 ms
BIG = 10**12

CASES = {
    # name: (weights, memory, speeds, budgets)
    "equal speeds split evenly": ([1.0] * 12, [1] * 12, [WorkerSpeed(0.01)] * 3, [BIG] * 3),
    "a 3x faster worker takes 3x the layers": ([1.0] * 16, [1] * 16, [SLOW, FAST], [BIG] * 2),
    "slow first, fast middle, slow last": ([1.0] * 20, [1] * 20, [SLOW, FAST, SLOW], [BIG] * 3),
    "the head weighs on the last stage": ([1.0] * 11 + [4.0], [1] * 12, [FAST, FAST], [BIG] * 2),
    "a slow link makes its stage lighter": ([1.0] * 24, [1] * 24,
                                            [WorkerSpeed(0.01, **WAN), WorkerSpeed(0.01, **LAN)], [BIG] * 2),
    "links and speeds together": ([1.0] * 18 + [2.5], [1] * 19,
                                  [WorkerSpeed(0.02, **LAN), WorkerSpeed(0.007, **WAN), WorkerSpeed(0.012, **LAN),
                                   WorkerSpeed(0.009, **LAN)], [BIG] * 4),
    "memory holds the fast worker back": ([1.0] * 12, [10] * 12, [FAST, SLOW], [40, BIG]),
    "memory and speed on four workers": ([1.0] * 14, [3] * 13 + [9], [SLOW, FAST, FAST, SLOW], [15, 21, 99, 24]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_split_is_the_best_contiguous_one(case):
    weights, memory, speeds, budgets = CASES[case]
    ranges = split_by_time(weights, memory, speeds, ACT, budgets)
    n = len(weights)
    assert len(ranges) == len(speeds) and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    assert all(sum(memory[a:b]) <= budgets[k] for k, (a, b) in enumerate(ranges))
    assert max(stage_times(ranges, weights, speeds)) == pytest.approx(brute_force(weights, memory, speeds, budgets))


@pytest.mark.parametrize("case", [c for c in CASES if "memory" not in c and "together" not in c])
def test_stage_times_are_balanced_to_within_one_layer(case):
    """Unconstrained by memory, no stage is more than one layer's time (of the slowest worker, for the
    heaviest layer) above another. ("links and speeds together" is not: a 94 ms hop alone is longer than
    the others' balanced stages, which then need not balance against it.)"""
    weights, memory, speeds, budgets = CASES[case]
    times = stage_times(split_by_time(weights, memory, speeds, ACT, budgets), weights, speeds)
    one_layer = max(s.seconds_per_layer for s in speeds) * max(weights)
    assert max(times) - min(times) <= one_layer + 1e-12


def test_the_direction_follows_the_measured_speeds():
    weights, memory, speeds, budgets = CASES["a 3x faster worker takes 3x the layers"]
    assert split_by_time(weights, memory, speeds, ACT, budgets) == [(0, 4), (4, 16)]
    weights, memory, speeds, budgets = CASES["a slow link makes its stage lighter"]
    (a0, b0), (a1, b1) = split_by_time(weights, memory, speeds, ACT, budgets)
    assert b0 - a0 < b1 - a1


@pytest.mark.parametrize("seed", range(30))
def test_random_cases_against_the_brute_force(seed):
    import random

    rng = random.Random(seed)
    n, stages = rng.randint(2, 9), rng.randint(1, 4)
    stages = min(stages, n)
    weights = [rng.choice([1.0, 1.0, 1.0, 2.0, 0.5]) for _ in range(n)]
    memory = [rng.randint(1, 9) for _ in range(n)]
    speeds = [WorkerSpeed(rng.uniform(0.001, 0.05), rng.uniform(0, 0.01), rng.choice([1e7, 1e8, 1e9, math.inf]))
              for _ in range(stages)]
    budgets = [rng.randint(5, 40) for _ in range(stages)]
    best = brute_force(weights, memory, speeds, budgets)
    if best is None:
        with pytest.raises(PlanDoesNotFit, match="MiB missing"):
            split_by_time(weights, memory, speeds, ACT, budgets)
        return
    ranges = split_by_time(weights, memory, speeds, ACT, budgets)
    assert all(sum(memory[a:b]) <= budgets[k] for k, (a, b) in enumerate(ranges))
    assert max(stage_times(ranges, weights, speeds)) == pytest.approx(best)


def test_a_plan_that_cannot_fit_names_the_missing_mib_per_worker():
    with pytest.raises(PlanDoesNotFit, match="offer 6.0 MiB: 2.0 MiB missing"):
        split_by_time([1.0] * 4, [2 * MIB] * 4, [FAST, SLOW], ACT, [3 * MIB, 3 * MIB])
    with pytest.raises(PlanDoesNotFit, match=r"worker 0 needs 5.0 MiB for layers \[0, 1\).*1.0 MiB missing"):
        split_by_time([1.0] * 3, [5 * MIB, MIB, MIB], [FAST, SLOW], ACT, [4 * MIB, 10 * MIB])


def test_the_explanation_says_why():
    weights, memory, speeds = [1.0] * 8, [MIB] * 8, [WorkerSpeed(0.02, **LAN), WorkerSpeed(0.01, **LAN)]
    ranges = split_by_time(weights, memory, speeds, ACT, [BIG, BIG])
    rows = explain(["a:1", "b:2"], ranges, memory, weights, list(speeds), ACT, [BIG, BIG])
    assert [(r.worker, r.start, r.end) for r in rows] == [("a:1", 0, 2), ("b:2", 2, 8)]
    assert rows[0].compute_s == pytest.approx(0.04) and rows[1].compute_s == pytest.approx(0.06)
    assert rows[0].hop_s == pytest.approx(0.00025 + ACT / 1e9) and rows[1].hop_s == pytest.approx(0.00025)
    assert rows[0].weight_bytes == 2 * MIB and rows[0].seconds_per_layer == 0.02


def test_compute_weights_put_the_head_on_the_last_layer():
    def t(name, part, layer, size):
        return TensorInfo(name, "F32", [size], size, "", part, layer, "m.safetensors", 0)

    m = Manifest("m", "llama", 2, [t("emb", "embed", -1, 800), t("l0", "layer", 0, 100), t("l1", "layer", 1, 100),
                                   t("norm", "head", -1, 1), t("lm_head", "head", -1, 199)])
    assert compute_weights(m) == [1.0, 3.0]
    assert compute_weights(m, sequences=1, tokens=4) == [1.0, 1.5]  # logits for one token in four
    tied = Manifest("m", "llama", 2, [t("emb", "embed", -1, 200), t("l0", "layer", 0, 100),
                                      t("l1", "layer", 1, 100)], head_shares=["emb"])
    assert compute_weights(tied) == [1.0, 3.0]


def _manifest(layers=8, layer_bytes=MIB):
    tensors = [TensorInfo(f"l{i}", "F32", [1], layer_bytes, "", "layer", i, "m.safetensors", 0) for i in range(layers)]
    return Manifest("m", "llama", layers, tensors)


@pytest.mark.parametrize("slow_s, fast_s, expected, basis", [
    (0.0105, 0.0100, [(0, 4), (4, 8)], "kept"),          # 5% apart: noise, the byte split stays
    (0.0300, 0.0100, [(0, 2), (2, 8)], "slowest stage"),  # 3x apart: planned by time
])
def test_timed_plans_keep_the_byte_split_within_the_noise(tmp_path, slow_s, fast_s, expected, basis):
    from coordinator.fleet.calibration import Calibration, Calibrations, StepShape, TimedPlans
    from coordinator.fleet.registry import WorkerRecord
    from coordinator.store.models import ModelStore
    from shardline.stream import LinkSettings

    calibrations = Calibrations(ModelStore(tmp_path), LinkSettings(), StepShape(sequences=1, tokens=1))
    workers = [WorkerRecord(f"w{i}", f"h:{i}", 100 * MIB, 0.0) for i in (1, 2)]
    plans = TimedPlans(calibrations, _manifest(), "m", "float32", "")
    stages, why = plans.fit(workers)
    assert [(s.start, s.end) for s in stages] == [(0, 4), (4, 8)] and "not calibrated yet" in why
    for w, spl in zip(workers, (slow_s, fast_s), strict=True):
        calibrations.known[(w.worker_id, "m", "float32")] = Calibration(WorkerSpeed(spl), 1024, 1)
    stages, why = plans.fit(workers)
    assert [(s.start, s.end) for s in stages] == expected and basis in why and why.startswith("time")
    calibrations.failed[(workers[0].worker_id, "m", "float32")] = "deadline exceeded"
    del calibrations.known[(workers[0].worker_id, "m", "float32")]
    assert "calibrating worker h:1 failed: deadline exceeded" in plans.fit(workers)[1]


def test_rebalance_chooses_the_fastest_workers(tmp_path):
    from coordinator.fleet.calibration import Calibration, Calibrations, StepShape, TimedPlans
    from coordinator.fleet.registry import WorkerRecord
    from coordinator.store.models import ModelStore
    from shardline.stream import LinkSettings

    calibrations = Calibrations(ModelStore(tmp_path), LinkSettings(), StepShape(sequences=1, tokens=1))
    workers = [WorkerRecord(f"w{i}", f"h:{i}", 100 * MIB, 0.0) for i in (1, 2, 3)]
    for w, spl in zip(workers, (0.03, 0.01, 0.01), strict=True):
        calibrations.known[(w.worker_id, "m", "float32")] = Calibration(WorkerSpeed(spl), 1024, 1)
    plans = TimedPlans(calibrations, _manifest(), "m", "float32", "")
    assert plans.choose(workers, 2) == (workers[1:], "")
    assert plans.choose(workers[:2], 2) == (workers[:2], "")


def _calibrated(tmp_path, speeds, layers=8):
    from coordinator.fleet.calibration import Calibration, Calibrations, StepShape, TimedPlans
    from coordinator.fleet.registry import WorkerRecord
    from coordinator.store.models import ModelStore
    from shardline.stream import LinkSettings

    calibrations = Calibrations(ModelStore(tmp_path), LinkSettings(), StepShape(sequences=1, tokens=1))
    workers = [WorkerRecord(f"w{i}", f"h:{i}", 100 * MIB, 0.0) for i in range(len(speeds))]
    for w, spl in zip(workers, speeds, strict=True):
        if spl is not None:
            calibrations.known[(w.worker_id, "m", "float32")] = Calibration(WorkerSpeed(spl), 1024, 1)
    return calibrations, workers, TimedPlans(calibrations, _manifest(layers), "m", "float32", "")


def test_rebalance_choice_is_bounded_for_big_models(tmp_path):
    import time

    # 80 layers, 4 stages, 16 candidates: every combination (1,820 planner runs) took 18.7 s on the event loop
    speeds = [0.02] * 4 + [0.02 - 0.0005 * i for i in range(12)]
    _, workers, plans = _calibrated(tmp_path, speeds, layers=80)
    began = time.perf_counter()
    chosen, _ = plans.choose(workers, 4)
    assert time.perf_counter() - began < 0.5
    assert {"w15", "w14"} <= {w.worker_id for w in chosen}  # the fastest spares were compared


def test_rebalance_keeps_the_current_set_within_the_noise(tmp_path):
    # a spare 1% faster than a current worker: moving layers and replaying every stream is not worth it
    _, workers, plans = _calibrated(tmp_path, [0.0100, 0.0100, 0.0099])
    assert plans.choose(workers, 2) == (workers[:2], "")
    _, workers, plans = _calibrated(tmp_path, [0.0300, 0.0100, 0.0100])  # 3x: the spare replaces it
    assert plans.choose(workers, 2) == (workers[1:], "")


def test_rebalance_says_which_spares_failed_calibration(tmp_path):
    calibrations, workers, plans = _calibrated(tmp_path, [0.03, 0.01, None, 0.01])
    calibrations.failed[("w2", "m", "float32")] = "deadline exceeded"
    chosen, note = plans.choose(workers, 2)
    assert chosen == [workers[1], workers[3]]  # the calibrated spare is still compared
    assert "calibrating worker h:2 failed: deadline exceeded" in note


def test_a_plan_by_bytes_is_explained(tmp_path):
    from coordinator.cli.tables import plan_lines
    from coordinator.fleet.calibration import explain_unmeasured
    from coordinator.fleet.placement import fit
    from coordinator.fleet.registry import WorkerRecord
    from shardline.client import PlanStage

    # calibration off (the default): `coordinator plan --explain` still shows ranges, workers and bytes
    workers = [WorkerRecord(f"w{i}", f"h:{i}", 100 * MIB, 0.0) for i in (1, 2)]
    manifest = _manifest()
    rows = explain_unmeasured(manifest, workers, fit(manifest, workers))
    assert [(r.worker, r.start, r.end, r.weight_bytes) for r in rows] == [("h:1", 0, 4, 4 * MIB),
                                                                          ("h:2", 4, 8, 4 * MIB)]
    stages = [PlanStage(r.worker, r.start, r.end, 0.0, 0.0, 0.0, r.weight_bytes, r.budget_bytes, 0.0, 0.0, 0)
              for r in rows]
    lines = plan_lines(stages, True)
    assert "[0, 4)" in lines[1] and "4.0 MiB" in lines[1] and "0.00 ms" not in lines[1] and " - " in lines[1]


def test_failed_calibrations_expire_and_serving_workers_are_named(tmp_path, monkeypatch):
    import asyncio

    from coordinator.fleet import calibration as cal

    # a real failure: the store holds no model "m", so every attempt fails reading its config (no worker
    # is dialled); the clock is the only thing replaced, and each attempt stamps the time it failed at
    calibrations, workers, plans = _calibrated(tmp_path, [None])
    key = ("w0", "m", "float32")
    now = [1000.0]
    monkeypatch.setattr(cal.time, "monotonic", lambda: now[0])

    def attempt(retry: bool = False) -> float:
        asyncio.run(calibrations.ensure(workers, "m", "llama", "float32", retry=retry))
        return calibrations.failed_at[key]

    assert attempt() == 1000.0 and "m" in calibrations.failed[key]
    now[0] += 1
    assert attempt() == 1000.0  # kept a while: not tried again
    now[0] += 1
    assert attempt(retry=True) == 1002.0  # an explicit rebalance tries again
    now[0] += cal.RETRY_FAILED_S + 1
    assert attempt() == now[0]  # and so does time
    assert "calibrating worker h:0 failed" in plans.fit(workers)[1]
    calibrations, workers, plans = _calibrated(tmp_path, [None])
    calibrations.note_serving(workers[0], "m", "float32", "m layers [0, 4)")
    assert "it serves m layers [0, 4)" in plans.fit(workers)[1]


def test_the_hop_is_bounded_by_both_workers_links():
    # bytes out of stage 0 go worker 0 -> worker 1: the slower link (and the longer round trip) of the two
    speeds = [WorkerSpeed(0.01, **LAN), WorkerSpeed(0.01, **WAN), WorkerSpeed(0.01, **LAN)]
    assert hop_s(speeds, 0, ACT) == pytest.approx(0.010 + ACT / 50e6)  # not worker 0's own fast link
    assert hop_s(speeds, 1, ACT) == pytest.approx(0.010 + ACT / 50e6)
    assert hop_s(speeds, 2, ACT) == pytest.approx(0.00025)  # the last stage: token ids back, latency alone
    rows = explain(["a", "b", "c"], [(0, 1), (1, 2), (2, 3)], [1] * 3, [1.0] * 3, list(speeds), ACT, [BIG] * 3)
    assert [r.hop_s for r in rows] == pytest.approx([hop_s(speeds, k, ACT) for k in range(3)])
