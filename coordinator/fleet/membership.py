"""Pure choices about membership: which spare takes a leaving worker's layers, and how to describe a chain."""

from __future__ import annotations

from coordinator.fleet.planner import StagePlan
from coordinator.fleet.registry import LoadedShard, WorkerRecord

__all__ = ["Assignment", "LoadedShard", "choose_replacements", "describe", "held_chain", "tiling"]

Assignment = list[tuple[WorkerRecord, StagePlan]]


def choose_replacements(current: Assignment, leaving: list[WorkerRecord], spares: list[WorkerRecord],
                        loaded: dict[str, LoadedShard], model: str, digest: str = "") -> Assignment | None:
    """The same stages, with each leaving worker's stage moved to a spare: one that already holds exactly
    that stage if there is one, else the spare with the smallest budget that fits it. None when some stage
    finds no spare (the caller re-plans)."""
    free = list(spares)
    out: Assignment = []
    for worker, stage in current:
        if worker not in leaving:
            out.append((worker, stage))
            continue
        want = LoadedShard(model, stage.start, stage.end, digest)
        holding = [w for w in free if loaded.get(w.worker_id) == want]
        fitting = sorted((w for w in free if w.memory_budget_bytes >= stage.weight_bytes),
                         key=lambda w: w.memory_budget_bytes)
        choices = holding or fitting
        if not choices:
            return None
        pick = choices[0]
        free.remove(pick)
        out.append((pick, stage))
    return out


def held_chain(workers: list[WorkerRecord], loaded: dict[str, LoadedShard], model: str, digest: str,
               costs: list[int]) -> Assignment | None:
    """These workers as the chain their shards already form, when they hold layers of this model's weights
    (same name, same digest) that tile all its layers, one stage each (a coordinator that restarted adopts
    them without fetching a byte); else None. `costs`: bytes per layer (planner.layer_costs)."""
    held = sorted(((loaded.get(w.worker_id), w) for w in workers), key=lambda p: p[0].start if p[0] else -1)
    out: Assignment = []
    at = 0
    for shard, worker in held:
        if shard is None or shard.stale or (shard.model, shard.digest) != (model, digest) or shard.start != at:
            return None
        out.append((worker, StagePlan(shard.start, shard.end, sum(costs[shard.start:shard.end]))))
        at = shard.end
    return out if out and at == len(costs) else None


def tiling(pool: list[WorkerRecord], model: str, digest: str, costs: list[int], stages: int) -> Assignment | None:
    """`stages` workers of `pool` whose shards held at registration (WorkerRecord.held) tile this model's
    weights, in layer order: the chain a restarted coordinator adopts; None if the pool holds no such chain.
    Each worker that holds layer 0 is tried as the first; the rest follow greedily, range by range."""
    holders = [w for w in pool if w.held is not None and not w.held.stale
               and (w.held.model, w.held.digest) == (model, digest)]
    for first in (w for w in holders if w.held is not None and w.held.start == 0):
        chain, at = [first], first.held.end if first.held is not None else 0
        while at < len(costs):
            following = next((w for w in holders if w not in chain and w.held is not None and w.held.start == at),
                             None)
            if following is None:
                break
            chain.append(following)
            at = following.held.end if following.held is not None else at
        if at == len(costs) and len(chain) == stages:
            return held_chain(chain, {w.worker_id: w.held for w in chain if w.held is not None}, model, digest,
                              costs)
    return None


def describe(workers: list[WorkerRecord], stages: list[StagePlan]) -> str:
    return "chain " + " -> ".join(f"{w.address} [{s.start}, {s.end})" for w, s in zip(workers, stages, strict=True))
