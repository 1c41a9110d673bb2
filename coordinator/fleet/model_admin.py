"""Model management at run time (the admin API): load a version onto free workers, promote it, scale a
deployment, unload one. Each change runs as a task of the fleet's own: a caller that goes away (a deadline,
a cancelled RPC) never leaves a change half done. The bookkeeping (which deployments exist, the defaults)
changes synchronously, so the lock is held only across short awaits; loading and draining happen outside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from coordinator.config import CoordinatorConfig, DeploymentSpec, split_name
from coordinator.fleet.deployments import Deployment, check_replicas
from coordinator.fleet.durable import FleetState
from coordinator.fleet.placement import Wanted, place
from coordinator.fleet.registry import UNPLANNABLE, Registry
from coordinator.fleet.states import ReplicaState
from coordinator.store.models import ModelStore
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from coordinator.fleet.replica import Replica

log = logging.getLogger(__name__)
T = TypeVar("T")


class Administered(Protocol):
    """What model management uses of the fleet (coordinator/fleet/fleet.py Fleet): its bookkeeping, and the
    calls that place, add and remove deployments and replicas."""

    config: CoordinatorConfig
    store: ModelStore
    registry: Registry
    deployments: dict[str, Deployment]
    defaults: dict[str, str]
    changed: asyncio.Event
    say: Callable[[str], None]
    durable: FleetState

    def find(self, requested: str) -> Deployment: ...
    async def deployment_of(self, spec: DeploymentSpec) -> Deployment: ...
    def add(self, deployment: Deployment, default: bool = True) -> None: ...
    def remove(self, deployment: Deployment) -> None: ...
    def new_replica(self, deployment: Deployment) -> Replica: ...
    def place_pending(self) -> None: ...
    def notify(self) -> None: ...


class ModelAdmin:
    def __init__(self, fleet: Administered) -> None:
        self.fleet = fleet
        self._lock = asyncio.Lock()  # the bookkeeping of one change at a time (short: never across a load)
        self._tasks: set[asyncio.Task[object]] = set()

    async def _detached(self, work: Awaitable[T]) -> T:
        """Run `work` as a task of the fleet's: the caller may go away, the change goes on to its end."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
        return await asyncio.shield(task)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def pool_size(self) -> int:
        return len([w for w in self.fleet.registry.live() if w.state not in UNPLANNABLE])

    def _check_fits(self, wanted: list[Wanted], key: str) -> None:
        free = [w for w in self.fleet.registry.live() if not w.owner and w.state not in UNPLANNABLE]
        placement = place(wanted, free)
        if key in placement.unplaced:
            raise FailedPrecondition(placement.unplaced[key])

    def named(self, requested: str) -> Deployment:
        """The deployment an admin call names: `name@version`, or `name` for its default version."""
        name, version = split_name(requested)
        if not name:
            raise InvalidArgument("model is empty: give NAME or NAME@VERSION")
        fleet = self.fleet
        exact = fleet.deployments.get(requested) if version else None
        loading = [d for d in fleet.deployments.values() if d.spec.name == name] if name not in fleet.defaults else []
        if exact is not None:  # also one still loading: it can be unloaded or scaled before it serves
            return exact
        if len(loading) == 1 and not version:
            return loading[0]
        return fleet.find(requested if version else name)

    # -- load and promote ------------------------------------------------------------------------------
    async def load(self, spec: DeploymentSpec, promote: bool, timeout_s: float) -> Deployment:
        """Deploy a model version onto free workers while everything else serves; returns once a replica is
        ready (or raises, having unloaded what it placed). With `promote` (or for a new name) it then
        becomes the name's default."""
        return await self._detached(self._load(spec, promote, timeout_s))

    async def _load(self, spec: DeploymentSpec, promote: bool, timeout_s: float) -> Deployment:
        fleet = self.fleet
        began = time.perf_counter()
        async with self._lock:
            if spec.key in fleet.deployments:
                raise FailedPrecondition(f"{spec.key} is already loaded ({fleet.deployments[spec.key].state}); "
                                         "scale it, or unload it first")
            if not fleet.store.has(spec.model):
                raise NotFound(f"model {spec.model!r} is not in the store (models: "
                               f"{', '.join(fleet.store.models()) or 'none'})")
            deployment = await fleet.deployment_of(spec)
            spec = deployment.spec
            check_replicas(spec.replicas, self.pool_size(), spec.workers, spec.key)
            self._check_fits([Wanted(spec.key, deployment.manifest, spec.workers)] * spec.replicas, spec.key)
            fleet.add(deployment, default=False)  # a name's default moves only once this one serves
        deployment.note(f"loaded with {spec.replicas} replicas")
        fleet.say(f"loading {spec.key} ({spec.model}) with {spec.replicas} replicas of {spec.workers} workers")
        fleet.place_pending()
        try:
            await self._until_ready(deployment, timeout_s - (time.perf_counter() - began))
            if deployment.unloading:
                raise FailedPrecondition(f"{deployment.key} was unloaded while it loaded")
            # committed before it is acknowledged, with the replicas it has now (a scale during the load counts)
            fleet.durable.deployed(spec.model_copy(update={"replicas": len(deployment.live)}))
        except BaseException:
            try:  # never acknowledged: a scale recorded during the load goes too
                fleet.durable.unloaded(spec.key)
            except Exception:  # noqa: BLE001 - the load's own error is the answer
                log.exception("%s: its failed load could not be recorded", spec.key)
            if not deployment.unloading:
                await self._unload(deployment, 0)
            raise
        deployment.loaded_in_s = time.perf_counter() - began
        if promote or spec.name not in fleet.defaults:
            self._promote(deployment)
        return deployment

    async def _until_ready(self, deployment: Deployment, timeout_s: float) -> None:
        """A replica ready and none still loading (one that waits for workers is placed later); or why not,
        within `timeout_s`."""
        fleet = self.fleet
        deadline = time.monotonic() + timeout_s
        while not deployment.ready_replicas or any(r.state in (ReplicaState.DEPLOYING, ReplicaState.RECOVERING)
                                                   for r in deployment.live):
            if deployment.unloading or fleet.deployments.get(deployment.key) is not deployment:
                raise FailedPrecondition(f"{deployment.key} was unloaded while it loaded")
            if any(r.state == ReplicaState.FAILED for r in deployment.live) and not deployment.ready_replicas:
                raise FailedPrecondition(f"{deployment.key} could not be deployed: {deployment.message}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{deployment.key} is not ready after {timeout_s:.0f} s: {deployment.state} "
                                  f"({deployment.message})")
            waiting = asyncio.ensure_future(fleet.changed.wait())
            await asyncio.wait({waiting}, timeout=min(left, 1.0))
            waiting.cancel()
            fleet.place_pending()

    def promote(self, requested: str) -> str:
        return self._promote(self.named(requested))

    def _promote(self, deployment: Deployment) -> str:
        """Atomic: requests routed after this line use the new default; those in flight finish where they are."""
        if not deployment.ready_replicas:
            raise FailedPrecondition(f"{deployment.key} has no ready replica ({deployment.state}): it cannot "
                                     "become the default")
        fleet, name = self.fleet, deployment.spec.name
        previous = fleet.defaults.get(name, "")
        fleet.durable.promoted(name, deployment.spec.version)
        fleet.defaults[name] = deployment.spec.version
        was = f"version {previous}" if previous else "none"
        deployment.note(f"promoted to default of {name} (was {was})")
        fleet.say(f"{deployment.key} is now the default of {name!r} (was {was})")
        fleet.notify()
        return previous

    # -- unload ----------------------------------------------------------------------------------------
    async def unload(self, requested: str, grace_s: float) -> tuple[str, int]:
        async with self._lock:
            deployment = self.named(requested)
            name = deployment.spec.name
            others = [d for d in self.fleet.deployments.values() if d.spec.name == name and d is not deployment]
            if others and self.fleet.defaults.get(name) == deployment.spec.version:
                raise FailedPrecondition(f"{deployment.key} is the default version of {name!r}: promote another "
                                         f"version first ({', '.join(d.key for d in others)})")
            if deployment.unloading:
                raise FailedPrecondition(f"{deployment.key} is being unloaded already")
            self.fleet.durable.unloaded(deployment.key)
            deployment.unloading = True  # from here on no request is routed to it
        return await self._detached(self._unload(deployment, grace_s))

    async def _unload(self, deployment: Deployment, grace_s: float) -> tuple[str, int]:
        fleet = self.fleet
        deployment.unloading = True
        leaving = [r for r in deployment.replicas if not r.retired]
        for replica in leaving:  # all at once: none hands its streams to a sibling that is leaving too
            replica.draining = True
        fleet.notify()
        try:
            results = await asyncio.gather(*(r.retire(grace_s) for r in leaving), return_exceptions=True)
        finally:
            fleet.remove(deployment)
        messages = [str(r) for r in results]
        freed = sum(r.freed_bytes for r in deployment.replicas)
        fleet.say(f"unloaded {deployment.key}: {freed / 2**20:.1f} MiB freed")
        fleet.place_pending()
        return "; ".join(messages) or f"{deployment.key} had no replica", freed

    # -- scale -----------------------------------------------------------------------------------------
    async def scale(self, requested: str, replicas: int, reason: str = "requested", grace_s: float | None = None,
                    autoscaler: bool = False) -> str:
        async with self._lock:
            deployment = self.named(requested)
            spec, live = deployment.spec, deployment.live
            check_replicas(replicas, self.pool_size(), spec.workers, spec.key)
            if spec.autoscaled and not autoscaler and not spec.min_replicas <= replicas <= spec.max_replicas:
                raise InvalidArgument(f"{spec.key} is autoscaled between {spec.min_replicas} and "
                                      f"{spec.max_replicas} replicas; {replicas} is outside")
            if replicas == len(live):
                return f"{spec.key} already has {replicas} replicas"
            deployment.note(f"scaled {len(live)} -> {replicas} replicas ({reason})")
            self.fleet.say(f"{spec.key}: scaling {len(live)} -> {replicas} replicas ({reason})")
            if replicas > len(live):
                more = replicas - len(live)
                self._check_fits([Wanted(spec.key, deployment.manifest, spec.workers)] * more, spec.key)
                self.fleet.durable.deployed(spec.model_copy(update={"replicas": replicas}))  # once it can be
                for _ in range(more):
                    self.fleet.new_replica(deployment)
                self.fleet.place_pending()
                return f"{spec.key}: {more} replicas added, placing and loading"
            # the newest, least ready replicas leave first, drained: their streams finish or move by replay
            leaving = sorted(live, key=lambda r: (r.ready, -r.index))[: len(live) - replicas]
            self.fleet.durable.deployed(spec.model_copy(update={"replicas": replicas}))
            for replica in leaving:
                replica.draining = True
        grace = self.fleet.config.unload_grace_s if grace_s is None else grace_s
        return await self._detached(self._retire(deployment, leaving, grace))

    async def _retire(self, deployment: Deployment, leaving: list[Replica], grace_s: float) -> str:
        self.fleet.notify()
        results = await asyncio.gather(*(r.retire(grace_s) for r in leaving), return_exceptions=True)
        deployment.replicas = [r for r in deployment.replicas if not r.retired]
        self.fleet.notify()
        self.fleet.place_pending()
        return "; ".join(str(r) for r in results)
