"""One pipeline replica of a deployment: its state, the workers it owns, and the changes asked of its chain.

Every change is one routine (`_change`, the change itself in coordinator/fleet/rechain.py), run one at a time
per replica: the first deployment (onto the workers placement gave it), healing after a dead worker or a
broken link, draining a worker, rebalancing onto spares. A worker belongs to at most one replica
(`WorkerRecord.owner`); claiming one is synchronous, so two replicas never take the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator.config import CoordinatorConfig, DeploymentSpec
from coordinator.fleet.calibration import Calibrations
from coordinator.fleet.membership import Assignment, describe
from coordinator.fleet.planner import StagePlan
from coordinator.fleet.rechain import ChangeRefused, change_chain
from coordinator.fleet.registry import UNPLANNABLE, Registry, WorkerRecord
from coordinator.fleet.states import REPLICA_TRANSITIONS, ReplicaState, WorkerState
from coordinator.fleet.states import moved as check_move
from coordinator.fleet.timed_planner import StageExplanation
from coordinator.fleet.worker_calls import unload_shard
from coordinator.metrics import CoordinatorMetrics
from coordinator.serving.driver import Scheduler
from coordinator.serving.pipeline import Pipeline
from coordinator.serving.streams import Stream
from coordinator.store.models import Manifest
from shardline.errors import FailedPrecondition, ShardlineError, Unavailable
from shardline.stream import LinkSettings

log = logging.getLogger(__name__)
# a failed replica retries with the pool unchanged after this many times its back-off (1 s doubling to 60 s)
RETRY_ALONE_FACTOR = 5.0


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
        self._retry_alone_after = 0.0  # ... and, with the pool unchanged, no sooner than this
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
        """A failed replica tries again once its back-off has passed and the pool changed, or, with the pool as
        it was, once a longer back-off has (what failed may have been passing: a parameter service that
        stalled, a worker that was busy)."""
        now = time.monotonic()
        return now >= self._retry_after and (membership != self._failed_with or now >= self._retry_alone_after)

    def cannot_place(self, why: str, membership: tuple[str, ...]) -> None:
        """Placement found workers, but not the memory: the replica fails with the missing MiB (it is placed
        again when the membership changes)."""
        self._failed_with = membership
        self._retry_alone_after = time.monotonic() + RETRY_ALONE_FACTOR * self._backoff_s
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
                self._trigger_heal("trying again after a failed recovery")
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
        results = await asyncio.gather(*(unload_shard(w, self.spec.model, timeout, self.shared.links)
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
                await change_chain(self, reason, first=first, heal=heal, drain=drain, rebalance=rebalance)
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
                    self._retry_alone_after = time.monotonic() + RETRY_ALONE_FACTOR * self._backoff_s
                    self._backoff_s = min(60.0, self._backoff_s * 2)
                elif self.state == ReplicaState.READY:
                    self._backoff_s = 1.0

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

    def _open_gate(self, first: bool) -> None:
        """A new chain is installed: it serves; the first time, it takes queued work from its siblings."""
        self._failed_with = ()
        self.pipeline.resume()
        self._set_state(ReplicaState.READY)
        if first:
            self.shared.joined(self)
