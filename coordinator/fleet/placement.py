"""Placement: which free workers each wanted replica gets, for every deployment at once (pure).

Each wanted replica takes `stages` workers of the pool, each worker in at most one stage, and a contiguous
split of its model that fits those workers' budgets. Replicas are placed in the order given (a deployment's
first replica before anyone's second, so every model gets served before any gets a second copy); a replica
takes the smallest workers that hold it, leaving the large ones to the models that need them. What cannot be
placed is reported per deployment, with the missing MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from coordinator.fleet.membership import tiling
from coordinator.fleet.planner import MiB, PlanDoesNotFit, StagePlan, layer_costs, split_layers
from coordinator.fleet.registry import WorkerRecord
from coordinator.store.models import Manifest


@dataclass(frozen=True)
class Wanted:
    """One replica to place: its deployment, the model's manifest and its number of stages."""

    key: str
    manifest: Manifest
    stages: int
    model: str = ""  # its name in the store: workers holding its layers already are placed first (adoption)


@dataclass
class Placement:
    placed: list[tuple[Wanted, list[tuple[WorkerRecord, StagePlan]]]] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # deployment key -> why (with the missing MiB)
    waiting: dict[str, str] = field(default_factory=dict)   # deployment key -> why it waits to be adopted


def fit(manifest: Manifest, workers: list[WorkerRecord]) -> list[StagePlan]:
    """A split of the model over exactly these workers, in order, or PlanDoesNotFit."""
    costs = layer_costs(manifest)
    ranges = split_layers(costs, len(workers), [w.memory_budget_bytes for w in workers])
    return [StagePlan(a, b, sum(costs[a:b])) for a, b in ranges]


def choose_workers(manifest: Manifest, stages: int, free: list[WorkerRecord]) -> list[tuple[WorkerRecord, StagePlan]]:
    """`stages` of the free workers that hold the model: the smallest that do (in registration order within
    the chain), or PlanDoesNotFit with the missing MiB."""
    total = sum(layer_costs(manifest))
    if len(free) < stages:
        offered = sum(w.memory_budget_bytes for w in free)
        raise PlanDoesNotFit(f"it needs {stages} workers and {len(free)} are free, offering {offered / MiB:.1f} MiB: "
                             f"{max(0, total - offered) / MiB:.1f} MiB and {stages - len(free)} workers missing")
    by_size = sorted(free, key=lambda w: w.memory_budget_bytes)
    order = {w.worker_id: i for i, w in enumerate(free)}
    # the smallest window of `stages` workers (by budget) whose split fits; the largest window last
    for first in range(len(by_size) - stages + 1):
        window = by_size[first:first + stages]
        if sum(w.memory_budget_bytes for w in window) < total:
            continue
        chain = sorted(window, key=lambda w: order[w.worker_id])
        try:
            return list(zip(chain, fit(manifest, chain), strict=True))
        except PlanDoesNotFit:
            continue
    largest = sorted(by_size[-stages:], key=lambda w: order[w.worker_id])
    return list(zip(largest, fit(manifest, largest), strict=True))  # raises, saying what is missing


def place(wanted: list[Wanted], free: list[WorkerRecord], adopting: bool = False) -> Placement:
    """Each wanted replica on free workers: first on workers whose shards already tile its model (a restarted
    coordinator adopts them); else by memory. While `adopting` (just after a start), a replica some of whose
    layers a free worker holds waits for the rest of its holders rather than be placed elsewhere, and a worker
    that holds layers some wanted replica would adopt is placed nothing else."""
    out = Placement()
    pool = list(free)
    adoptable = {(w.model, w.manifest.digest) for w in wanted if w.model}
    reserved = [w for w in pool if adopting and w.held is not None and (w.held.model, w.held.digest) in adoptable]
    for want in wanted:
        if want.key in out.unplaced:
            continue  # a deployment whose earlier replica did not fit: its later ones would not either
        costs = layer_costs(want.manifest)
        held = tiling(pool, want.model, want.manifest.digest, costs, want.stages) if want.model else None
        if held is not None:
            for worker, _ in held:
                pool.remove(worker)
            out.placed.append((want, held))
            continue
        if adopting and want.model and any(w.held is not None and (w.held.model, w.held.digest) ==
                                           (want.model, want.manifest.digest) for w in pool):
            out.waiting[want.key] = "waiting for the workers that hold its layers (a restarted coordinator " \
                                    "adopts them)"
            continue
        try:
            chain = choose_workers(want.manifest, want.stages, [w for w in pool if w not in reserved])
        except PlanDoesNotFit as exc:
            need = sum(layer_costs(want.manifest))
            out.unplaced[want.key] = (f"{want.key} ({need / MiB:.1f} MiB of weights on {want.stages} workers) "
                                      f"does not fit the free workers: {exc}")
            continue
        for worker, _ in chain:
            pool.remove(worker)
        out.placed.append((want, chain))
    return out


T = TypeVar("T")


def interleave(per_deployment: list[list[T]]) -> list[T]:
    """Every deployment's first replica, then every second, ...: the order replicas are placed in."""
    out: list[T] = []
    for i in range(max((len(w) for w in per_deployment), default=0)):
        out.extend(w[i] for w in per_deployment if i < len(w))
    return out
