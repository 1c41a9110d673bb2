"""The fleet: every deployment the coordinator serves, on one pool of workers.

A deployment is one version of a model with a number of pipeline replicas (coordinator/fleet/replica.py). The
fleet owns the pool (the registry), places replicas onto free workers (coordinator/fleet/placement.py), routes
each request to the replica of its deployment that owes the least work, and changes what is deployed at run
time: load, unload, scale and promote, each built on replay (a replica that goes away hands its streams to a
sibling, which re-prefills them from the coordinator's token ids). Autoscaling is coordinator/fleet/autoscaler.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from coordinator.config import CoordinatorConfig, DeploymentSpec, split_name
from coordinator.fleet.autoscaler import autoscale
from coordinator.fleet.calibration import Calibrations, StepShape
from coordinator.fleet.deployments import Deployment, resolve
from coordinator.fleet.durable import FleetState, Forgetful, opened
from coordinator.fleet.model_admin import ModelAdmin
from coordinator.fleet.placement import Wanted, interleave, place
from coordinator.fleet.rechain import ChangeRefused
from coordinator.fleet.registry import UNPLANNABLE, LoadedShard, Registry, WorkerDevice, WorkerRecord
from coordinator.fleet.replica import Replica, Shared
from coordinator.fleet.states import SERVES, ReplicaState, WorkerState
from coordinator.fleet.worker_calls import status
from coordinator.metrics import CoordinatorMetrics, model_label
from coordinator.serving.driver import Scheduler
from coordinator.serving.streams import Stream
from coordinator.serving.textmodel import TokenModel, text_model
from coordinator.store.models import ModelStore
from coordinator.store.served import Served
from shardline.auth import ClusterIdentity
from shardline.errors import FailedPrecondition, NotFound, Unavailable
from shardline.server import Keepalive
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, config: CoordinatorConfig, store: ModelStore, parameters_address: str,
                 set_serving: Callable[[bool], Awaitable[None]], say: Callable[[str], None] = log.info,
                 identity: ClusterIdentity | None = None, metrics: CoordinatorMetrics | None = None,
                 epoch: str = "", durable: FleetState | None = None) -> None:
        self.config, self.store, self.say = config, store, say
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.registry = Registry(config.heartbeat_timeout_ms / 1000, epoch)
        links = LinkSettings(step_timeout_ms=config.step_timeout_ms,
                             keepalive=Keepalive(config.keepalive_time_ms, config.keepalive_timeout_ms),
                             identity=identity or ClusterIdentity(), epoch=self.registry.epoch)
        self.shared = Shared(config, self.registry, parameters_address, links, say, self.notify, self._evacuate,
                             self._spawn, self._membership, self._joined, self.metrics)
        shape = StepShape(config.calibration_sequences, config.calibration_tokens, config.calibration_context_tokens,
                          config.calibration_max_ms)
        self.shared.calibrations = Calibrations(store, links, shape) if config.calibrate else None
        self.deployments: dict[str, Deployment] = {}
        self.served = Served(store.root)  # its models' files are never replaced under it (store/served.py)
        self.defaults: dict[str, str] = {}  # model name -> its default version
        self.primary = ""                   # the name a request without a model means: the first deployed
        self.draining = False
        self.changed = asyncio.Event()      # set on every state change (the launcher and loads wait on it)
        self._set_serving = set_serving
        self._serving_now: bool | None = None
        self._health_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._started = time.monotonic()  # replicas wait a moment for the workers whose shards they adopt
        # run-time changes, committed before acknowledged: given (etcd, shared by standby coordinators), else
        # SQLite beside the jobs
        self.durable: FleetState = durable if durable is not None else \
            opened(config.jobs_dir or config.store, config.initial_deployments()) if config.durable_fleet \
            else Forgetful()
        self.admin = ModelAdmin(self)       # load, unload, scale and promote at run time

    # -- start and stop --------------------------------------------------------------------------------
    async def start(self) -> None:
        configured = self.config.initial_deployments()
        changes = self.durable.changes()
        for spec in changes.applied(configured):
            try:
                self.add(await self.deployment_of(spec))
            except NotFound as exc:
                if spec.key in {s.key for s in configured}:
                    raise
                self.say(f"not restoring {spec.key}, loaded at run time before the restart: {exc}")
        for name, version in changes.defaults.items():
            if f"{name}@{version}" in self.deployments:
                self.defaults[name] = version
        if changes.deployments or changes.defaults:
            self.say(f"restored the run-time changes: serving {', '.join(self.deployments) or 'nothing'} "
                     f"(defaults: {', '.join(f'{n}@{v}' for n, v in self.defaults.items())})")
        self.place_pending()  # says how many workers each deployment waits for
        self._background = [asyncio.create_task(self._watch(), name="membership watch"),
                            asyncio.create_task(self._push_health(), name="health")]
        self._background.append(asyncio.create_task(autoscale(self), name="autoscaler"))

    async def stop(self) -> None:
        self.admin.stop()
        for task in (*self._background, *self._tasks):
            task.cancel()
        try:
            for deployment in list(self.deployments.values()):
                for replica in list(deployment.replicas):
                    await replica.stop()
        finally:
            self.durable.close()
            self.served.close()

    async def deployment_of(self, spec: DeploymentSpec) -> Deployment:
        """The deployment of `spec`, its model's files held (store/served.py) before they are read."""
        if self.store.has(spec.model):
            await self.served.take(spec.model)
        try:
            manifest = self.store.manifest(spec.model)  # NotFound lists the store's models
            path = self.store.path(spec.model)
            text: TokenModel = await asyncio.to_thread(text_model, path) \
                if (path / "tokenizer_config.json").is_file() else TokenModel(path, spec.model)
        except BaseException:
            self._hold_served()  # let go of it again
            raise
        spec = spec.model_copy(update={"workers": spec.workers or self.config.workers})
        return Deployment(spec, manifest, text)

    def add(self, deployment: Deployment, default: bool = True) -> None:
        """Add a deployment and its replicas (placed by the next _maybe_deploy); with `default`, it becomes
        its name's default when marked so or when the name has none."""
        spec = deployment.spec
        self.deployments[spec.key] = deployment
        self._hold_served()
        if default and (spec.default or spec.name not in self.defaults):
            self.defaults[spec.name] = spec.version
        self.primary = self.primary or spec.name
        for _ in range(spec.replicas):
            self.new_replica(deployment)

    def _hold_served(self) -> None:
        """Hold the store's locks of exactly the models the deployments serve (store/served.py)."""
        self.served.hold({d.spec.model for d in self.deployments.values()})

    def remove(self, deployment: Deployment) -> None:
        """An unloaded deployment leaves; its name's default moves to another version, if there is one."""
        if self.deployments.get(deployment.key) is deployment:
            del self.deployments[deployment.key]
            self._hold_served()
        name = deployment.spec.name
        if self.defaults.get(name) == deployment.spec.version:
            rest = [d.spec.version for d in self.deployments.values() if d.spec.name == name and d.ready_replicas]
            if rest:
                self.defaults[name] = rest[0]
            else:
                del self.defaults[name]
        if self.primary == name and name not in self.defaults:
            self.primary = next(iter(self.defaults), "")
        self.notify()

    def new_replica(self, deployment: Deployment) -> Replica:
        index = max((r.index for r in deployment.replicas), default=-1) + 1
        replica = Replica(deployment.spec, index, deployment.manifest, self.shared)
        deployment.replicas.append(replica)
        return replica

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """A background task that is kept, and whose failure is logged rather than lost."""
        async def supervised() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except ChangeRefused as exc:
                log.warning("%s: %s", name, exc)
            except Exception:  # noqa: BLE001
                log.exception("%s failed", name)

        task = asyncio.create_task(supervised(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- state -----------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        wanted = [d for d in self.deployments.values() if d.live]
        if not wanted:
            return "ready" if self.deployments else "nothing deployed"
        states = [d.state for d in wanted]
        for s in ("failed", "waiting for workers", "deploying", "recovering"):
            if s in states:
                return s
        return "ready"

    @property
    def message(self) -> str:
        if self.state == "waiting for workers" and not self.registry.workers:
            return "0 workers registered"
        return "; ".join(d.message for d in self.deployments.values() if d.message)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def settled(self) -> bool:
        """Ready, and no replica still waits for workers, deploys or recovers (what a launch waits for)."""
        return self.ready and all(r.state in (ReplicaState.READY, ReplicaState.FAILED)
                                  for r in self.replicas if not r.draining)

    @property
    def serves_every_name(self) -> bool:
        """Health: every model name's default version that wants replicas has a ready one (a version loaded
        beside it, or a deployment scaled to zero, does not take the coordinator out of service)."""
        defaults = [self.deployments.get(f"{n}@{v}") for n, v in self.defaults.items()]
        return bool(defaults) and all(d is None or not d.live or d.ready_replicas for d in defaults)

    @property
    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas if not r.retired]

    @property
    def first(self) -> Replica:
        """The first replica of the first deployment (what a one-model, one-replica cluster runs)."""
        return next(iter(self.deployments.values())).replicas[0]

    @property
    def recoveries(self) -> int:
        return sum(r.recoveries for d in self.deployments.values() for r in d.replicas)

    @property
    def last_recovery(self) -> tuple[int, str]:
        latest = max(self.replicas, key=lambda r: r.last_recovery_phases.get("serving", 0.0), default=None)
        return (latest.last_recovery_ms, latest.last_recovery) if latest is not None else (0, "")

    @property
    def progress(self) -> tuple[int, int]:
        """Bytes loaded, and to load, over the replicas loading now."""
        loading = [r for r in self.replicas if r.state in (ReplicaState.DEPLOYING, ReplicaState.RECOVERING)]
        return sum(sum(r.progress.values()) for r in loading), sum(r.loading_bytes for r in loading)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
        self._health_wake.set()

    async def _push_health(self) -> None:
        """Health follows the fleet: SERVING while every deployment that wants replicas has a ready one.
        One pusher, so the latest state always wins."""
        while True:
            await self._health_wake.wait()
            self._health_wake.clear()
            on = self.serves_every_name and not self.draining
            if on != self._serving_now:
                try:
                    await self._set_serving(on)
                    self._serving_now = on
                except Exception:  # noqa: BLE001
                    log.exception("updating health failed once")
                    self._health_wake.set()
                    await asyncio.sleep(0.5)

    # -- requests --------------------------------------------------------------------------------------
    def versions(self) -> dict[str, list[str]]:
        """Each served name's versions (a name whose first version is still loading is not served yet)."""
        out: dict[str, list[str]] = {}
        for d in self.deployments.values():
            if not d.unloading and d.spec.name in self.defaults:
                out.setdefault(d.spec.name, []).append(d.spec.version)
        return out

    def label(self, requested: str) -> str:
        """The `model` label of a request that names `requested` in the metrics and the request log."""
        return model_label(requested, self.primary, {d.spec.name for d in self.deployments.values()})

    def find(self, requested: str) -> Deployment:
        """The deployment a request names (`name` = its default version, `name@version`), or NotFound
        listing what exists."""
        name, _ = split_name(requested or self.primary)
        if name not in self.defaults and any(d.spec.name == name for d in self.deployments.values()):
            raise Unavailable(f"model {name!r} is loading: it serves once a replica is ready; retry")
        key = resolve(requested, self.versions(), self.defaults, self.primary)
        return self.deployments[key]

    def route(self, deployment: Deployment) -> tuple[Replica, Scheduler]:
        """The replica of `deployment` a request goes to: of the replicas that serve, the one that owes the
        least work (tokens to produce or prefill, queued or running). The deployment is the one the request
        named when it arrived (its tokenizer encoded the prompt), even if a promotion happened since."""
        candidates = self.serving(deployment)
        replica = min(candidates, key=lambda r: (r.outstanding, r.queued, r.served))
        replica.served += 1
        if replica.scheduler is None:  # pragma: no cover - filtered above
            raise Unavailable(f"{replica.name} has no scheduler yet")
        return replica, replica.scheduler

    def serving(self, deployment: Deployment) -> list[Replica]:
        """The replicas that take requests (ready ones; while none is, those recovering, whose requests wait
        at the gate), or Unavailable saying why there are none."""
        if self.draining:
            raise Unavailable("the coordinator is draining: it finishes the requests in flight and takes no new "
                              "ones; retry on another coordinator")
        candidates = deployment.ready_replicas or [r for r in deployment.live if r.state in SERVES]
        candidates = [r for r in candidates if r.scheduler is not None]
        if not candidates:
            detail = f" ({deployment.message})" if deployment.message else ""
            raise Unavailable(f"{deployment.key} is not ready: {deployment.state}{detail}")
        return candidates

    def _evacuate(self, leaving: Replica, streams: list[Stream]) -> list[Stream]:
        """A replica that cannot serve (or is retired) hands its streams to the sibling that owes least; they
        replay there. Returns the streams nobody took."""
        if not streams:
            return []
        deployment = self.deployments.get(leaving.spec.key)
        siblings = [r for r in deployment.ready_replicas if r is not leaving and r.scheduler is not None] \
            if deployment is not None else []
        if not siblings:
            return streams
        target = min(siblings, key=lambda r: r.outstanding)
        if target.scheduler is None:  # pragma: no cover - filtered above
            return streams
        target.scheduler.policy.adopt(streams)
        self.say(f"{len(streams)} streams of {leaving.name} moved to {target.name}; they replay there")
        return []

    # -- membership ------------------------------------------------------------------------------------
    def register(self, address: str, memory_budget_bytes: int, device: WorkerDevice | None = None,
                 identity: str = "", held: LoadedShard | None = None) -> WorkerRecord:
        same = self.registry.same_worker(address, identity)
        if same is not None:  # its registration's reply was lost: the same process, not a restart
            return self.registry.register(address, memory_budget_bytes, device, identity, held)
        old = next((w for w in self.registry.workers.values() if w.address == address), None)
        owner = self._owner(old) if old is not None else None
        record = self.registry.register(address, memory_budget_bytes, device, identity, held)
        if old is not None:  # the same address again: its process restarted
            self.metrics.reregistrations.inc()
        deployed = any(r.assignment for r in self.replicas)
        if deployed:
            record.state = WorkerState.SPARE  # it waits to be needed; running chains are not touched
        where = f", {device.device} {device.dtype}".rstrip() if device is not None and device.device != "cpu" else ""
        self.say(f"worker {address} registered ({memory_budget_bytes / 2**20:.0f} MiB offered{where})"
                 + (" as a spare" if deployed else ""))
        if owner is not None and old is not None and old in owner.assignment:
            owner.worker_lost(f"worker {address} registered again (it restarted)")
        self.place_pending()
        return record

    def _owner(self, worker: WorkerRecord) -> Replica | None:
        return next((r for r in self.replicas if r.name == worker.owner), None) if worker.owner else None

    def report_dead(self, address: str, why: str) -> None:
        """Someone who knows (the launcher that saw the process exit) says a worker is gone: heal now."""
        for worker in list(self.registry.workers.values()):
            if worker.address == address and worker.state != WorkerState.LOST:
                worker.state, worker.last_error = WorkerState.LOST, why
                owner = self._owner(worker)
                if owner is not None and worker in owner.assignment:
                    owner.worker_lost(f"worker {address}: {why}")

    def heartbeat(self, worker_id: str, identity: str = "", epoch: str = "") -> bool:
        known = self.registry.heartbeat(worker_id, identity, epoch)
        if known:
            self.place_pending()  # a worker that came back may complete a set
        return known

    def place_pending(self) -> None:
        """Place every replica that has no chain yet onto the free workers (all deployments at once); tell
        the others that membership changed (a failed replica retries, a narrow one may grow)."""
        if self.draining:
            return
        pending = [[r for r in d.live if not r.assignment and not r.busy and
                    (r.state != ReplicaState.FAILED or r.may_retry(self._membership()))]
                   for d in self.deployments.values()]
        wanted = [Wanted(r.name, r.manifest, r.spec.workers, r.spec.model) for r in interleave(pending)]
        if wanted:
            by_name = {r.name: r for group in pending for r in group}
            free = [w for w in self.registry.live() if not w.owner and w.state not in UNPLANNABLE]
            adopting = time.monotonic() < self._started + self.config.adoption_wait_s
            placement = place(wanted, free, adopting)
            for want, chain in placement.placed:
                by_name[want.key].deploy(chain)
            for key, reason in placement.waiting.items():
                by_name[key].wait_for_workers(reason)
            left = len(free) - sum(len(chain) for _, chain in placement.placed)
            for want in wanted:
                why = placement.unplaced.get(want.key)
                if why is None:
                    continue
                if left >= want.stages:  # enough workers, not enough memory: that is a failure to report
                    by_name[want.key].cannot_place(why, self._membership())
                else:
                    by_name[want.key].wait_for_workers(f"{left} of {want.stages} workers registered and free")
        for replica in self.replicas:
            if replica.assignment or replica.state == ReplicaState.FAILED:
                replica.membership_changed()

    def _membership(self) -> tuple[str, ...]:
        """Live workers, then the free ones: a failed replica tries again when either changes."""
        live = self.registry.live()
        return (*(w.worker_id for w in live), "|", *(w.worker_id for w in live if not w.owner))

    def _joined(self, replica: Replica) -> None:
        """A replica serves for the first time: it takes half of what waits on each busier sibling."""
        deployment = self.deployments.get(replica.spec.key)
        if deployment is None or replica.scheduler is None or replica.draining:
            return
        for sibling in deployment.ready_replicas:
            if sibling is replica or sibling.scheduler is None:
                continue
            moved = sibling.scheduler.policy.take_waiting(len(sibling.scheduler.policy.waiting) // 2)
            if moved:
                replica.scheduler.policy.adopt(moved, front=False)
                self.say(f"{len(moved)} queued streams of {sibling.name} moved to {replica.name}")

    async def _watch(self) -> None:
        """Heartbeat bookkeeping, supervised: a worker of a chain that stops sending them is healed around
        even when no request is running to notice."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_ms / 1000)
            try:
                lost = self.registry.mark_lost()
                for worker in lost:
                    owner = self._owner(worker)
                    if owner is not None and worker in owner.assignment:
                        owner.worker_lost(f"worker {worker.address} stopped sending heartbeats")
                if lost or not self.ready:
                    self.place_pending()
            except Exception:  # noqa: BLE001
                log.exception("the membership watch failed once; it goes on")

    def worker(self, address: str) -> WorkerRecord:
        record = next((w for w in self.registry.workers.values() if w.address == address), None)
        if record is None:
            raise NotFound(f"no worker at {address} is registered here")
        return record

    async def drain_worker(self, address: str) -> str:
        record = self.worker(address)
        if record.state == WorkerState.LOST:  # nothing to hand over: its replica heals around it (lost -> drained)
            record.state = WorkerState.DRAINED
            return f"worker {address} was lost (no heartbeat): its stage is healed elsewhere; it takes no new one"
        owner = self._owner(record)
        if owner is None:
            record.state, record.stage, record.owner = WorkerState.DRAINED, None, ""
            return f"worker {address} held no stage; it takes no new one"
        return await owner.drain_worker(record)  # also one claimed by a change in progress: it queues behind

    async def rebalance(self) -> str:
        serving = [r for r in self.replicas if r.assignment and not r.draining]
        if not serving:
            raise FailedPrecondition(f"nothing is deployed yet ({self.state})")
        return "; ".join([await r.rebalance() for r in serving])

    async def worker_status(self, record: WorkerRecord) -> worker_pb2.GetStatusResponse | None:
        if record.state == WorkerState.LOST:
            return None
        return await status(record.address, 2.0, self.shared.links)

    # -- the coordinator's drain -----------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Take no new requests; wait up to `grace_s` for the streams in flight to finish."""
        self.draining = True
        self.notify()
        deadline = time.monotonic() + grace_s
        while any(r.interactive or r.queued or r.infers for r in self.replicas):  # not jobs' items
            if time.monotonic() >= deadline:
                log.warning("drain: streams still running after %.0f s; stopping them", grace_s)
                return
            await asyncio.sleep(0.1)
