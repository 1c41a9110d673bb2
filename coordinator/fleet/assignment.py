"""A replica's next assignment (stage -> worker), chosen among its own workers and the pool's free ones (pure).

The first deployment keeps the workers placement gave it; a rebalance takes the fastest set of current and
spare workers; a heal or a drain moves each leaving worker's stage to a spare, or re-plans onto the workers
that stay. The ranges follow the workers' measured speeds where every one is calibrated, else their bytes;
each choice says which (its basis).
"""

from __future__ import annotations

from coordinator.config import CoordinatorConfig, DeploymentSpec
from coordinator.fleet.calibration import Calibrations, TimedPlans
from coordinator.fleet.membership import Assignment, LoadedShard, choose_replacements, held_chain
from coordinator.fleet.placement import choose_workers, fit
from coordinator.fleet.planner import PlanDoesNotFit, StagePlan, layer_costs
from coordinator.fleet.registry import UNPLANNABLE, WorkerRecord
from coordinator.store.models import Manifest


def timed_plans(calibrations: Calibrations | None, manifest: Manifest, model: str,
                config: CoordinatorConfig) -> TimedPlans | None:
    """Plans that balance time (None when calibration is off: plans by bytes only)."""
    if calibrations is None:
        return None
    return TimedPlans(calibrations, manifest, model, config.dtype, config.wire_dtype,
                      config.calibration_tolerance, config.calibration_min_gain_ms / 1000)


def split_over(plans: TimedPlans | None, manifest: Manifest, workers: list[WorkerRecord]) -> tuple[Assignment, str]:
    """A split over exactly these workers: by time where all are calibrated, else by bytes; and its basis."""
    if plans is None:
        stages, basis = fit(manifest, workers), "bytes (calibration is off)"
    else:
        stages, basis = plans.fit(workers)
    return list(zip(workers, stages, strict=True)), basis


def candidates(chain: list[WorkerRecord], dead: list[WorkerRecord], free: list[WorkerRecord],
               loaded: dict[str, LoadedShard], excluded: set[str]) -> list[WorkerRecord]:
    """A rebalance's candidates: the chain's usable workers first, then the free ones that answered."""
    usable = [w for w in chain if w not in dead and w.worker_id not in excluded]
    return usable + [w for w in free if w.worker_id in loaded]


def choose(chain: list[WorkerRecord], stages: list[StagePlan], free: list[WorkerRecord], dead: list[WorkerRecord],
           loaded: dict[str, LoadedShard], excluded: set[str], *, owner: str, spec: DeploymentSpec,
           manifest: Manifest, plans: TimedPlans | None, first: Assignment | None, drain: WorkerRecord | None,
           rebalance: bool, chosen: tuple[list[WorkerRecord], str] | None = None) -> tuple[Assignment, str | None]:
    """The next assignment of the replica `owner` that runs `chain` (with `stages`), and the basis of its split
    (None where stages only moved to spares: the chain's basis stands). `free`: the pool's free workers, the
    drained one and `excluded` left out; `dead`: the chain's workers that did not answer the probe."""
    count = spec.workers
    if first is not None:
        placed = [w for w, _ in first if w.owner == owner and w.state not in UNPLANNABLE]
        if len(placed) == len(first) and all(w.worker_id in loaded and w.worker_id not in excluded
                                             for w in placed):
            adopted = held_chain(placed, loaded, spec.model, manifest.digest, layer_costs(manifest))
            if adopted is not None:  # they hold the model's layers already (the coordinator restarted)
                return adopted, "adopted: the workers held these layers of these weights already"
            # placement chose the workers (by memory); the ranges follow their speeds
            return split_over(plans, manifest, placed)
        # a placed worker is gone or failed to load: place again among the others and the free ones
        others = [w for w in placed if w.worker_id in loaded and w.worker_id not in excluded]
        placing = choose_workers(manifest, count, others + [w for w in free if w not in placed])
        return split_over(plans, manifest, [w for w, _ in placing])
    usable = [w for w in chain if w not in dead and w.worker_id not in excluded]
    if rebalance:  # the explicit re-plan: with calibrations, the fastest set of current and spare workers
        workers, note = chosen if chosen is not None else (candidates(chain, dead, free, loaded, excluded)[:count], "")
        assignment, basis = split_over(plans, manifest, workers)
        return assignment, f"{basis}; {note}" if note else basis
    leaving = [w for w in chain if w not in usable or w is drain]
    current = list(zip(chain, stages, strict=True))
    if not current:
        raise PlanDoesNotFit("this replica has no chain to heal (the fleet places it again)")
    replaced = choose_replacements(current, leaving, free, loaded, spec.model, manifest.digest)
    if replaced is not None:
        return replaced, None
    # not enough free workers: re-plan onto the workers that stay (and whatever free ones there are)
    staying = ([w for w in usable if w is not drain] + free)[:count]
    if not staying:
        raise PlanDoesNotFit("no live worker is left to take the layers")
    return split_over(plans, manifest, staying)
