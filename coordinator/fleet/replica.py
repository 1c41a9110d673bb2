"""One pipeline replica of a deployment: the chain of workers it runs on, and every change to that chain.

Every change is one routine, `_change`, run one at a time per replica: the first deployment (onto the
workers placement gave it), healing after a dead worker or a broken link, draining a worker, rebalancing
onto spares. It picks an assignment (stage -> worker) among its own workers and the pool's free ones, loads
what is missing (free workers first, while the old chain still serves when it can), then installs the new
chain and rewinds every running stream, which replays from the coordinator's token ids. A worker belongs to
at most one replica (`WorkerRecord.owner`); claiming one is synchronous, so two replicas never take the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.fleet.calibration import Calibrations, TimedPlans, explain_unmeasured
from coordinator.fleet.deployments import DeploymentSpec
from coordinator.fleet.membership import Assignment, LoadedShard, choose_replacements, describe
from coordinator.fleet.placement import choose_workers, fit
from coordinator.fleet.planner import PlanDoesNotFit, StagePlan
from coordinator.fleet.registry import UNPLANNABLE, Registry, WorkerRecord
from coordinator.fleet.states import REPLICA_TRANSITIONS, ReplicaState, WorkerState
from coordinator.fleet.states import moved as check_move
from coordinator.fleet.timed_planner import StageExplanation
from coordinator.fleet.worker_calls import chain_capacity, load_shard, probe, set_peers, unload_shard
from coordinator.metrics import CoordinatorMetrics
from coordinator.serving.chain import ChainClient, end_sessions
from coordinator.serving.driver import Scheduler
from coordinator.serving.pipeline import Pipeline
from coordinator.serving.streams import Stream
from coordinator.store.models import Manifest
from shardline.codec import dtype_to_enum
from shardline.errors import FailedPrecondition, ShardlineError, Unavailable
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2
from shardline.wire_dtype import link_dtypes, quantization_enum, wire_dtype_to_enum

log = logging.getLogger(__name__)
LOAD_ATTEMPTS = 3


class ChangeRefused(Exception):
    """A change (drain, rebalance) that cannot be made; the running chain was not touched."""


@dataclass
class Shared:
    """What every replica of the coordinator shares: the config, the pool, the links and the parameter
    service; `changed` is called after every state change (the fleet updates health and wakes waiters);
    `evacuate` takes the streams of a replica that cannot serve and returns those no sibling took."""

    config: CoordinatorConfig
    registry: Registry
    parameters_address: str
    links: LinkSettings
    say: Callable[[str], None]
    changed: Callable[[], None]
    evacuate: Callable[[Replica, list[Stream]], list[Stream]]
    spawn: Callable[[Awaitable[None], str], asyncio.Task[None]]
    membership: Callable[[], tuple[str, ...]]  # live and free workers: a failed replica retries when it changes
    joined: Callable[[Replica], None]          # a replica serves for the first time (it takes queued work)
    metrics: CoordinatorMetrics                # recoveries here, queue times and preemptions in the scheduler
    calibrations: Calibrations | None = None   # measured workers: plans balance time (None: bytes only)


class Replica:
    def __init__(self, spec: DeploymentSpec, index: int, manifest: Manifest, shared: Shared) -> None:
        self.spec, self.index, self.manifest, self.shared = spec, index, manifest, shared
        self.name = f"{spec.key}/r{index}"
        self.state, self.message = ReplicaState.WAITING, ""
        self.assignment: list[WorkerRecord] = []   # stage i is served by assignment[i]
        self.stages: list[StagePlan] = []
        self.plan: list[StageExplanation] = []   # why each stage holds its range (coordinator plan --explain)
        self.plan_basis = ""                     # "time (...)" or "bytes (why not time)"
        self._basis = ""                         # the basis of the assignment being installed
        self.pipeline = Pipeline(self.heal, shared.links)
        self.scheduler: Scheduler | None = None
        self.progress: dict[str, int] = {}
        self.loading_bytes = 0
        self._failed_with: tuple[str, ...] = ()
        self._rebalanced_with: tuple[str, ...] = ()
        self.recoveries, self.last_recovery_ms, self.last_recovery = 0, 0, ""
        self.last_recovery_phases: dict[str, float] = {}  # time.perf_counter() at each phase of the last one
        self.draining = False  # takes no new requests (a scale-down, an unload, the coordinator's drain)
        self.retired = False   # unloaded: it holds no worker and serves nothing any more
        self.served = 0        # requests routed here, in all
        self.infers = 0        # Infer calls in flight (they hold no stream, but a drain waits for them)
        self.freed_bytes = 0   # weight bytes its workers freed when it was retired
        self._retiring = False  # retire() has begun: no change of the chain starts any more
        self._broken = False    # its chain failed while it retired: its streams leave without the grace
        self._retry_after = 0.0  # a failed replica is placed or healed again no sooner than this
        self._backoff_s = 1.0
        self._lock = asyncio.Lock()     # one change of the chain at a time
        self._queued = 0                # changes asked for and not finished
        self._changes: set[asyncio.Task[None]] = set()
        self._healing: asyncio.Task[None] | None = None
        self._healing_epoch = -1
        self._heal_pending = False  # the latest heal waits for the lock and has not probed yet

    @property
    def ready(self) -> bool:
        return self.state == ReplicaState.READY

    @property
    def busy(self) -> bool:
        """A change of the chain is queued or running (counted from the moment it is asked for, so the
        fleet never places a replica twice)."""
        return self._queued > 0 or self._lock.locked()

    @property
    def outstanding(self) -> int:
        """The work this replica owes: tokens still to produce or to prefill, over its running and queued
        streams (the balancer sends a request to the replica that owes least)."""
        if self.scheduler is None:
            return 0
        return sum(len(x.pending) + max(0, x.max_tokens - x.produced) for x in self.scheduler.policy.streams()
                   if not x.done)

    @property
    def queued(self) -> int:
        return len(self.scheduler.policy.waiting) if self.scheduler is not None else 0

    @property
    def running(self) -> int:
        return self.scheduler.policy.active if self.scheduler is not None else 0

    @property
    def interactive(self) -> int:
        """Interactive streams running (not jobs' items: they are stored, and run again after a restart)."""
        return self.scheduler.policy.interactive_active if self.scheduler is not None else 0

    @property
    def config(self) -> CoordinatorConfig:
        return self.shared.config

    def _set_state(self, state: ReplicaState, message: str = "") -> None:
        check_move(f"replica {self.name}", REPLICA_TRANSITIONS, self.state, state)
        self.state, self.message = state, message
        self.shared.changed()

    @property
    def failed_with(self) -> tuple[str, ...]:
        """The membership the last failure saw (a failed replica retries once it changes)."""
        return self._failed_with

    def may_retry(self, membership: tuple[str, ...]) -> bool:
        """A failed replica tries again once the pool changed and its back-off has passed."""
        return membership != self._failed_with and time.monotonic() >= self._retry_after

    def cannot_place(self, why: str, membership: tuple[str, ...]) -> None:
        """Placement found workers, but not the memory: the replica fails with the missing MiB (it is placed
        again when the membership changes)."""
        self._failed_with = membership
        if (self.state, self.message) != (ReplicaState.FAILED, why):
            self.shared.say(f"error: {self.name}: {why}")
            self._set_state(ReplicaState.FAILED, why)

    def wait_for_workers(self, why: str) -> None:
        if (self.state, self.message) != (ReplicaState.WAITING, why):
            self._set_state(ReplicaState.WAITING, why)

    def owns(self, worker: WorkerRecord) -> bool:
        return worker.owner == self.name

    def free_workers(self, excluded: set[str] | None = None) -> list[WorkerRecord]:
        return [w for w in self.shared.registry.live() if not w.owner and w.state not in UNPLANNABLE
                and w.worker_id not in (excluded or ())]

    def _claim(self, workers: list[WorkerRecord]) -> None:
        for worker in workers:
            worker.owner = self.name

    def _release_unused(self) -> None:
        """Workers this replica claimed but does not run on go back to the pool."""
        for worker in self.shared.registry.workers.values():
            if self.owns(worker) and worker not in self.assignment:
                worker.owner, worker.stage = "", None
                if worker.state != WorkerState.LOST and worker.state not in UNPLANNABLE:
                    worker.state = WorkerState.SPARE

    async def stop(self) -> None:
        if self._healing is not None:
            self._healing.cancel()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.pipeline.chain is not None:
            await self.pipeline.chain.close()

    # -- what the fleet asks of a replica ---------------------------------------------------------------
    def deploy(self, chain: Assignment) -> asyncio.Task[None]:
        """The first deployment onto the workers placement gave it (claimed at once)."""
        self._claim([w for w, _ in chain])
        for worker, stage in chain:
            worker.stage = stage
        self._set_state(ReplicaState.DEPLOYING, f"placed on {len(chain)} workers")
        return self._queue("deploy", f"deploying {self.name}", first=chain)

    def worker_lost(self, why: str) -> None:
        self._trigger_heal(why)

    def membership_changed(self) -> None:
        """A worker joined or came back: retry a failed replica; fold a spare into a narrow chain (policy)."""
        if self.busy or self.draining or self.retired or not self.assignment:
            return  # a replica without a chain is placed by the fleet
        live = self.shared.registry.live()
        if self.state == ReplicaState.FAILED:
            if self.may_retry(self.shared.membership()):
                self._trigger_heal("the pool changed after a failed recovery")
            return
        free = self.free_workers()
        if (self.config.rebalance_on_join and len(self.assignment) < self.spec.workers and free
                and tuple(w.worker_id for w in live) != self._rebalanced_with):
            self._rebalanced_with = tuple(w.worker_id for w in live)  # one try per membership
            self._queue("rebalance onto a worker that joined", "rebalance", rebalance=True)

    def _trigger_heal(self, reason: str, epoch: int | None = None) -> asyncio.Task[None]:
        """One heal at a time. A failure from a newer epoch than the latest heal's, or news without an epoch
        (a worker reported dead, or registered again) once that heal has begun probing, queues one more."""
        task = self._healing
        if self._retiring:  # leaving: nothing to heal; its streams wait at the closed gate and move on now
            self.pipeline.suspend()
            self._broken = True
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done  # type: ignore[return-value]
        if task is not None and not task.done():
            if epoch is not None and epoch <= self._healing_epoch:
                return task
            if epoch is None and self._heal_pending:
                return task  # it has not probed yet: it will see what this news is about
        self.pipeline.suspend()  # no further steps into the broken chain
        self._healing_epoch = self.pipeline.epoch if epoch is None else epoch
        self._heal_pending = True
        task = self._healing = self._queue(reason, f"recovery of {self.name}", heal=True, epoch=epoch)
        return task

    async def heal(self, epoch: int, error: BaseException) -> None:
        """The pipeline's report of a failed step in `epoch`: heal once per epoch, then return (the streams
        are rewound by then, or moved or failed if this replica cannot serve)."""
        if epoch < self.pipeline.epoch:
            return  # the chain was retired since that step was sent
        await asyncio.shield(self._trigger_heal(str(error), epoch))

    async def drain_worker(self, record: WorkerRecord) -> str:
        """Hand a worker's stage over (to a free worker, or by re-planning); it then holds no stage."""
        previous, record.state = record.state, WorkerState.DRAINING
        # a task of its own, settled however it ends: a caller that goes away changes nothing
        task = self._queue(f"draining worker {record.address}", drain=record)

        def settle(done: asyncio.Task[None]) -> None:
            if done.cancelled() or done.exception() is not None or record in self.assignment:
                if record.state == WorkerState.DRAINING:
                    record.state = previous
            else:
                record.state, record.stage, record.owner = WorkerState.DRAINED, None, ""

        task.add_done_callback(settle)
        try:
            await asyncio.shield(task)
        except ChangeRefused as exc:
            raise FailedPrecondition(f"cannot drain worker {record.address}: {exc}") from None
        if record in self.assignment:
            raise Unavailable(f"worker {record.address} could not be drained: {self.message}")
        return f"worker {record.address} drained: {self.describe()}"

    async def rebalance(self) -> str:
        try:
            await asyncio.shield(self._queue("rebalance requested", rebalance=True))
        except ChangeRefused as exc:
            raise FailedPrecondition(f"cannot rebalance {self.name}: {exc}") from None
        return self.describe()

    def describe(self) -> str:
        return f"{self.name}: {describe(self.assignment, self.stages)}" if self.assignment else \
            f"{self.name}: {self.state}"

    def _queue(self, reason: str, name: str = "", **kind: Any) -> asyncio.Task[None]:
        """Ask for a change: counted at once (see `busy`), run in order under the lock. With a `name` it is a
        supervised background task (a refusal is logged); without, a refusal reaches whoever awaits it."""
        self._queued += 1
        work = self._change(reason, **kind)
        task = self.shared.spawn(work, name) if name else asyncio.ensure_future(work)
        self._changes.add(task)

        def done(_: asyncio.Task[None]) -> None:  # also when cancelled before it ever ran
            self._queued -= 1
            self._changes.discard(task)

        task.add_done_callback(done)
        return task

    async def retire(self, grace_s: float) -> str:
        """Take no new requests, let those in flight finish within `grace_s`, move the rest to a sibling by
        replay (or fail them), then unload every worker and give them back to the pool."""
        if self._retiring:
            return f"{self.name} is already leaving"
        self.draining = self._retiring = True
        self.shared.changed()
        deadline = time.monotonic() + grace_s
        while self.infers or self.scheduler is not None and self.scheduler.policy.busy:
            if time.monotonic() >= deadline or self._broken:  # a broken chain finishes nothing: move on
                break
            await asyncio.sleep(0.05)
        for task in list(self._changes):  # a deploy or heal in progress is abandoned, not waited for
            task.cancel()
        if self._changes:
            await asyncio.wait(list(self._changes), timeout=self.config.probe_timeout_ms / 1000 * 5)
        async with self._lock:
            left = 0
            if self.scheduler is not None:
                streams = self.scheduler.policy.evacuate(failure=False)
                left = len(streams)
                for stream in self.shared.evacuate(self, streams):  # planned: not counted as failures
                    stream.stop(Unavailable(f"{self.spec.key} was unloaded before this request finished"))
            self.pipeline.fail(Unavailable(f"{self.name} is retired"))
            if self.pipeline.chain is not None:
                await self.pipeline.chain.close()
            workers, self.assignment, self.stages = self.assignment, [], []
            self.freed_bytes = await self._unload(workers)
            self.retired = True
            if self.scheduler is not None:
                await self.scheduler.close(f"{self.spec.key} was unloaded")
            self._set_state(ReplicaState.RETIRED,
                            f"unloaded; {self.freed_bytes / 2**20:.1f} MiB freed on {len(workers)} workers")
        moved = f", {left} streams moved on by replay" if left else ""
        return f"{self.name} retired{moved}: {self.message}"

    async def _unload(self, workers: list[WorkerRecord]) -> int:
        """Unload the replica's shards and give the workers back; returns the weight bytes freed."""
        timeout = self.config.probe_timeout_ms / 1000 * 5
        registry = self.shared.registry.workers
        # a record replaced since (its worker restarted and may serve someone else now) is not unloaded
        workers = [w for w in workers if registry.get(w.worker_id) is w and w.owner in ("", self.name)]
        results = await asyncio.gather(*(unload_shard(w.address, self.spec.model, timeout, self.shared.links)
                                         for w in workers), return_exceptions=True)
        freed = 0
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("unloading %s from %s: %s", self.spec.model, worker.address, result)
            else:
                freed += result.freed_weight_bytes
        self._release_unused()
        return freed

    # -- the one routine that changes the chain -----------------------------------------------------------
    async def _change(self, reason: str, *, first: Assignment | None = None, heal: bool = False,
                      epoch: int | None = None, drain: WorkerRecord | None = None, rebalance: bool = False) -> None:
        """Never leaves the gate closed while the state says the replica serves: it ends with a new chain
        installed, with the old chain untouched (ChangeRefused), or in state "failed" with every stream told."""
        async with self._lock:
            if self.retired or self._retiring:
                return
            if heal:
                self._heal_pending = False
                if epoch is not None and epoch < self.pipeline.epoch:
                    return  # another change retired that chain while this one waited for its turn
            try:
                await self._change_locked(reason, first=first, heal=heal, drain=drain, rebalance=rebalance)
            except (asyncio.CancelledError, ChangeRefused):
                raise
            except Exception:
                log.exception("changing the chain of %s (%s) failed", self.name, reason)
                self._cannot_serve(f"internal error while {reason}; the coordinator log has the details")
                raise
            finally:
                for worker in self.shared.registry.live():  # loaded for a chain that was not installed
                    if worker.state == WorkerState.LOADING and self.owns(worker) and worker not in self.assignment:
                        worker.state = WorkerState.SPARE
                self._release_unused()
                if self.state == ReplicaState.FAILED:  # the pool as it is now that this replica let go of its claims,
                    self._failed_with = self.shared.membership()  # and a pause before the next try
                    self._retry_after = time.monotonic() + self._backoff_s
                    self._backoff_s = min(60.0, self._backoff_s * 2)
                elif self.state == ReplicaState.READY:
                    self._backoff_s = 1.0

    async def _retire_chain(self) -> None:
        """Close the gate and the chain: steps in flight fail at once (their streams are rewound at install)."""
        self.pipeline.suspend()
        old = self.pipeline.retire()
        if old is not None:
            await old.close()

    async def _change_locked(self, reason: str, *, first: Assignment | None, heal: bool,
                             drain: WorkerRecord | None, rebalance: bool) -> None:
        began = time.perf_counter()
        retired = heal or first is not None
        if retired:
            await self._retire_chain()
            self._set_state(ReplicaState.RECOVERING if heal else ReplicaState.DEPLOYING,
                            reason if heal else f"planning {self.spec.key} onto {self.spec.workers} workers")
            if heal:
                self.shared.say(f"{self.name} recovering: {reason}")
        excluded: set[str] = set()  # workers whose load failed during this change
        registry = self.shared.registry
        detected = planned = began
        target: Assignment = []
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            mine = [w for w in registry.live() if self.owns(w) or not w.owner]
            loaded = await probe(mine, self.config.probe_timeout_ms / 1000, self.shared.links)
            for worker in mine:
                if worker.worker_id not in loaded and worker.state not in UNPLANNABLE:
                    worker.state, worker.last_error = WorkerState.LOST, "did not answer the probe"
            detected = time.perf_counter()
            dead = [w for w in self.assignment if w.worker_id not in loaded]
            if first is not None or rebalance:  # lazily, once per (worker, model, dtype): the plan balances time
                await self._calibrate([w for w, _ in first] if first is not None else
                                      [w for w in mine if w.worker_id in loaded and w.worker_id not in excluded],
                                      loaded, retry=rebalance)
            chosen = None
            if rebalance and first is None and (plans := self._timed()) is not None:
                # up to MAX_CHOICES full planner runs (~10 ms each for big models): off the event loop
                chosen = await asyncio.to_thread(plans.choose, self._candidates(dead, loaded, excluded, drain),
                                                 self.spec.workers)
            try:
                target = self._choose(dead, loaded, excluded, first=first, drain=drain, rebalance=rebalance,
                                      chosen=chosen)
            except PlanDoesNotFit as exc:
                # workers whose load failed are left out: their failure is the reason, not the arithmetic
                why = f"loading failed on {len(excluded)} workers ({self.message}); without them: {exc}" \
                    if excluded else str(exc)
                if not retired:
                    raise ChangeRefused(why) from None  # the running chain serves on, untouched
                self._cannot_serve(f"the live workers cannot hold {self.spec.key}: {why}")
                return
            self._claim([w for w, _ in target])
            planned = time.perf_counter()
            if not retired and target == list(zip(self.assignment, self.stages, strict=True)):
                self.shared.say(f"{reason}: nothing to change; {self.describe()}")
                return
            ok, retired = await self._load(target, loaded, retired, excluded)
            replaced = [w for w, _ in target if registry.workers.get(w.worker_id) is not w
                        or not self.owns(w) or w.state in UNPLANNABLE]
            if ok and replaced:  # one restarted and registered again while this change ran: probe again
                ok, self.message = False, f"worker {replaced[0].address} registered again during the change"
            if ok:
                break
            if attempt == LOAD_ATTEMPTS:
                if not retired:
                    raise ChangeRefused(f"loading failed {LOAD_ATTEMPTS} times: {self.message}")
                self._cannot_serve(f"loading failed {LOAD_ATTEMPTS} times: {self.message}")
                return
            await asyncio.sleep(0.5 * 2 ** attempt)
        loaded_at = time.perf_counter()
        joined = len({w.worker_id for w, _ in target} - {w.worker_id for w in self.assignment})
        await self._install(target, counted=heal)
        took = time.perf_counter() - began
        if heal:
            self.recoveries += 1
            self.shared.metrics.recovered(self.spec.name, self.name, took, joined)
            self.last_recovery_ms = int(took * 1000)
            self.last_recovery_phases = dict(began=began, detected=detected, planned=planned, loaded=loaded_at,
                                             serving=began + took)
            self.last_recovery = (f"{reason}: recovered in {took:.2f} s (detect {detected - began:.2f} s, "
                                  f"plan {planned - detected:.2f} s, load {loaded_at - planned:.2f} s); "
                                  f"{self.describe()}")
            self.shared.say(self.last_recovery)
        elif first is None:
            self.shared.say(f"{reason}: done in {took:.2f} s; {self.describe()}")

    def _candidates(self, dead: list[WorkerRecord], loaded: dict[str, LoadedShard], excluded: set[str],
                    drain: WorkerRecord | None) -> list[WorkerRecord]:
        """A rebalance's candidates: the chain's usable workers first, then the free ones that answered."""
        usable = [w for w in self.assignment if w not in dead and w.worker_id not in excluded]
        free = [w for w in self.free_workers(excluded) if w is not drain]
        return usable + [w for w in free if w.worker_id in loaded]

    def _choose(self, dead: list[WorkerRecord], loaded: dict[str, LoadedShard], excluded: set[str], *,
                first: Assignment | None, drain: WorkerRecord | None, rebalance: bool,
                chosen: tuple[list[WorkerRecord], str] | None = None) -> Assignment:
        free = [w for w in self.free_workers(excluded) if w is not drain]
        stages = self.spec.workers
        if first is not None:
            placed = [w for w, _ in first if self.owns(w) and w.state not in UNPLANNABLE]
            if len(placed) == len(first) and all(w.worker_id in loaded and w.worker_id not in excluded
                                                 for w in placed):
                return self._fit(placed)  # placement chose the workers (by memory); the ranges follow their speeds
            # a placed worker is gone or failed to load: place again among the others and the free ones
            others = [w for w in placed if w.worker_id in loaded and w.worker_id not in excluded]
            placing = choose_workers(self.manifest, stages, others + [w for w in free if w not in placed])
            return self._fit([w for w, _ in placing])
        usable = [w for w in self.assignment if w not in dead and w.worker_id not in excluded]
        if rebalance:  # the explicit re-plan: with calibrations, the fastest set of current and spare workers
            workers, note = chosen if chosen is not None else \
                (self._candidates(dead, loaded, excluded, drain)[:stages], "")
            assignment = self._fit(workers)
            if note:
                self._basis += f"; {note}"
            return assignment
        leaving = [w for w in self.assignment if w not in usable or w is drain]
        current = list(zip(self.assignment, self.stages, strict=True))
        if not current:
            raise PlanDoesNotFit("this replica has no chain to heal (the fleet places it again)")
        replaced = choose_replacements(current, leaving, free, loaded, self.spec.model)
        if replaced is not None:
            return replaced
        # not enough free workers: re-plan onto the workers that stay (and whatever free ones there are)
        staying = ([w for w in usable if w is not drain] + free)[:stages]
        if not staying:
            raise PlanDoesNotFit("no live worker is left to take the layers")
        return self._fit(staying)

    def _timed(self) -> TimedPlans | None:
        c = self.shared.calibrations
        if c is None:
            return None
        return TimedPlans(c, self.manifest, self.spec.model, self.config.dtype, self.config.wire_dtype,
                          self.config.calibration_tolerance, self.config.calibration_min_gain_ms / 1000)

    async def _calibrate(self, workers: list[WorkerRecord], loaded: dict[str, LoadedShard], retry: bool) -> None:
        """Calibrate those of `workers` that hold no shard (timing runs on a worker's compute thread: a serving
        worker's steps would wait); one that serves is planned by bytes, its basis saying why."""
        c = self.shared.calibrations
        if c is None:
            return
        model, dtype = self.spec.model, self.config.dtype
        free = []
        for w in workers:
            shard = loaded.get(w.worker_id)
            if shard is not None and shard.model:
                c.note_serving(w, model, dtype, f"{shard.model} layers [{shard.start}, {shard.end})")
            else:
                free.append(w)
        await c.ensure(free, model, self.manifest.family, dtype, retry=retry)

    def _fit(self, workers: list[WorkerRecord]) -> Assignment:
        """A split over exactly these workers: by time where all are calibrated, else by bytes."""
        plans = self._timed()
        if plans is None:
            stages, self._basis = fit(self.manifest, workers), "bytes (calibration is off)"
        else:
            stages, self._basis = plans.fit(workers)
        return list(zip(workers, stages, strict=True))

    async def _load(self, target: Assignment, loaded: dict[str, LoadedShard], retired: bool,
                    excluded: set[str]) -> tuple[bool, bool]:
        """Load every stage whose worker does not hold it already: first the workers outside the chain, while
        it still serves; then the chain's own, once it is retired (no step may reach a worker mid-load).
        Returns (ok, retired); on failure the reason is in .message and the workers are in `excluded`."""
        model = self.spec.model
        todo = [(w, s) for w, s in target if loaded.get(w.worker_id) != LoadedShard(model, s.start, s.end)]
        outside = [(w, s) for w, s in todo if w not in self.assignment]
        in_chain = [(w, s) for w, s in todo if w in self.assignment]
        self.loading_bytes = sum(s.weight_bytes for _, s in todo)
        self.progress = {}
        for batch in (outside, in_chain):
            if not batch:
                continue
            if batch is in_chain and not retired:
                await self._retire_chain()
                retired = True
                self._set_state(ReplicaState.RECOVERING, "moving the chain's layers: requests wait for it")
            for worker, stage in batch:
                worker.state, worker.stage, worker.last_error = WorkerState.LOADING, stage, ""
            c = self.config
            links = link_dtypes(len(target), c.wire_dtype or c.dtype, c.link_wire_dtypes)  # stage i -> i + 1
            link_of = {s.start: i for i, (_, s) in enumerate(target)}
            results = await asyncio.gather(*(
                load_shard(w, model, s, self.shared.parameters_address, dtype_to_enum(c.dtype), c.load_timeout_s,
                           self.shared.links, self.progress, self._kv_request(links[link_of[s.start]]))
                for w, s in batch),
                return_exceptions=True)
            failed = []
            for (worker, _), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if worker.state != WorkerState.LOST:  # marked lost meanwhile: it stays out of the pool
                        worker.state = WorkerState.FAILED
                    worker.last_error = str(result)
                    excluded.add(worker.worker_id)
                    failed.append(f"{worker.address}: {result}")
            if failed:
                self.message = "; ".join(failed)
                self.shared.say(f"error: loading {self.spec.key} failed: {self.message}")
                return False, retired
        return True, retired

    async def _install(self, target: Assignment, counted: bool) -> None:
        """The new chain: install it, rewind every stream (replay), free the old sessions, open the gate."""
        self.pipeline.suspend()
        old_workers = {w.address for w in self.assignment}
        self.assignment = [w for w, _ in target]
        self.stages = [s for _, s in target]
        self._explain()
        for worker, stage in target:
            worker.state, worker.stage = WorkerState.READY, stage
        self._release_unused()
        links = self.shared.links
        old_chain = self.pipeline.install(ChainClient([w.address for w in self.assignment], links))
        first = self.scheduler is None
        if self.scheduler is None:
            c = self.config
            self.scheduler = Scheduler(self.pipeline, groups=c.micro_batch_groups or len(self.assignment),
                                       max_active=c.max_active_streams, max_queued=c.max_queued_streams,
                                       prefill_chunk=c.prefill_chunk_tokens, max_step_tokens=c.max_step_tokens,
                                       reserve_tokens=c.kv_reserve_tokens, background_share=c.job_step_share,
                                       metrics=self.shared.metrics.streams(self.spec.name),
                                       prefix_cache=c.prefix_cache)
        stale = self.scheduler.policy.rewind(counted)
        if old_chain is not None:
            await old_chain.close()
        # the old sessions are freed before the new chain's capacity is read: the replay starts on empty
        # caches, and the budget the scheduler starts from is the one the workers have (bounded)
        everyone = sorted(old_workers | {w.address for w in self.assignment})
        ending = asyncio.ensure_future(end_sessions(everyone, stale, links))
        await asyncio.wait({ending}, timeout=2.0)  # a worker that does not answer holds nothing we can free
        if not ending.done():
            self.shared.spawn(asyncio.wait_for(ending, None), "freeing replayed sessions")
        chain = [w.address for w in self.assignment]
        timeout = self.config.probe_timeout_ms / 1000
        # every stage learns the plan's workers (its routes may name only these) before a step is sent; a
        # stage that missed it refuses routes with FAILED_PRECONDITION, which heals like a lost stage
        untold, capacity = await asyncio.gather(set_peers(chain, timeout, links), chain_capacity(chain, timeout, links))
        if untold:
            await set_peers(untold, timeout, links, peers=chain)
        self.scheduler.policy.set_capacity(capacity)
        self._failed_with = ()
        self.pipeline.resume()
        self._set_state(ReplicaState.READY)
        if first:
            self.shared.joined(self)

    def _explain(self) -> None:
        """The installed plan's explanation (a chain kept by a heal is explained with what is measured)."""
        plans = self._timed()
        self.plan = plans.explain(self.assignment, self.stages) if plans is not None else \
            explain_unmeasured(self.manifest, self.assignment, self.stages)
        self.plan_basis = self._basis or "bytes"
        if self.plan and self.plan_basis.startswith("time"):
            self.shared.say(f"{self.name} planned by time: " + "; ".join(
                f"{s.worker} [{s.start}, {s.end}) {s.stage_s * 1000:.1f} ms" for s in self.plan))

    def _kv_request(self, wire_dtype: str = "") -> worker_pb2.LoadShardRequest:
        c = self.config
        return worker_pb2.LoadShardRequest(wire_dtype=wire_dtype_to_enum(wire_dtype or c.dtype),
                                           quantize=quantization_enum(c.quantize),
                                           max_step_tokens=c.max_step_tokens,
                                           max_step_sequences=min(c.max_active_streams, c.max_step_tokens),
                                           prefill_chunk_tokens=c.prefill_chunk_tokens,
                                           kv_block_tokens=c.kv_block_tokens,
                                           session_ttl_ms=int(c.session_ttl_s * 1000))

    def _cannot_serve(self, why: str) -> None:
        """Healing is impossible for now: the streams move to a sibling replica by replay, or fail with the
        reason; a worker that joins later triggers another attempt. The gate stays closed (state "failed")."""
        error: ShardlineError = Unavailable(why)
        old = self.pipeline.fail(error)
        if old is not None:
            self.shared.spawn(old.close(), "closing the old chain")
        self._failed_with = self.shared.membership()
        self.shared.say(f"error: {self.name}: {why}")
        if self.scheduler is not None:
            for stream in self.shared.evacuate(self, self.scheduler.policy.evacuate(failure=True)):
                stream.stop(error)
        self._set_state(ReplicaState.FAILED, why)
