"""Pure choices about membership: which spare takes a leaving worker's layers, and how to describe a chain."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.fleet.planner import StagePlan
from coordinator.fleet.registry import WorkerRecord

Assignment = list[tuple[WorkerRecord, StagePlan]]


@dataclass(frozen=True)
class LoadedShard:
    """What a worker reports it holds (model "" when it holds nothing)."""

    model: str
    start: int
    end: int


def choose_replacements(current: Assignment, leaving: list[WorkerRecord], spares: list[WorkerRecord],
                        loaded: dict[str, LoadedShard], model: str) -> Assignment | None:
    """The same stages, with each leaving worker's stage moved to a spare: one that already holds exactly
    that stage if there is one, else the spare with the smallest budget that fits it. None when some stage
    finds no spare (the caller re-plans)."""
    free = list(spares)
    out: Assignment = []
    for worker, stage in current:
        if worker not in leaving:
            out.append((worker, stage))
            continue
        want = LoadedShard(model, stage.start, stage.end)
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


def describe(workers: list[WorkerRecord], stages: list[StagePlan]) -> str:
    return "chain " + " -> ".join(f"{w.address} [{s.start}, {s.end})" for w, s in zip(workers, stages, strict=True))
