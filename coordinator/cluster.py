"""The cluster as the coordinator sees it: registered workers, the chain they form, and every change to it.

Every change of membership is one routine, `_change`, run one at a time: the first deployment, healing after
a dead worker or a broken link, draining a worker, and rebalancing onto spares. It picks an assignment
(stage -> worker), loads what is missing (spares first, while the old chain still serves when it can), then
installs the new chain and rewinds every running stream, which replays from the coordinator's token ids.
Workers that register while the cluster serves become spares and disturb nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from coordinator.chain import ChainClient, end_sessions
from coordinator.config import CoordinatorConfig
from coordinator.membership import Assignment, LoadedShard, choose_replacements, describe
from coordinator.pipeline import Pipeline
from coordinator.planner import PlanDoesNotFit, StagePlan, plan
from coordinator.registry import UNPLANNABLE, Registry, WorkerRecord
from coordinator.scheduler import Scheduler
from coordinator.store import ModelStore
from coordinator.textmodel import TextModel, TokenModel
from coordinator.worker_calls import chain_capacity, load_shard, probe, set_peers, status
from shardline.auth import ClusterIdentity
from shardline.codec import dtype_to_enum
from shardline.errors import FailedPrecondition, NotFound, Unavailable
from shardline.server import Keepalive
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)
LOAD_ATTEMPTS = 3


class ChangeRefused(Exception):
    """A change (drain, rebalance) that cannot be made; the running chain was not touched."""


class Cluster:
    def __init__(self, config: CoordinatorConfig, store: ModelStore, parameters_address: str,
                 set_serving: Callable[[bool], Awaitable[None]], say: Callable[[str], None] = log.info,
                 identity: ClusterIdentity | None = None) -> None:
        identity = identity or ClusterIdentity()
        self.config, self.store, self.parameters_address = config, store, parameters_address
        self.manifest = store.manifest(config.model)
        self.registry = Registry(config.heartbeat_timeout_ms / 1000)
        self._set_serving, self.say = set_serving, say
        self.links = LinkSettings(step_timeout_ms=config.step_timeout_ms,
                                  keepalive=Keepalive(config.keepalive_time_ms, config.keepalive_timeout_ms),
                                  identity=identity)
        self.state, self.message = "waiting for workers", f"0 of {config.workers} workers registered"
        self.assignment: list[WorkerRecord] = []   # stage i is served by assignment[i]
        self.stages: list[StagePlan] = []
        self.pipeline = Pipeline(self.heal, self.links)
        self.scheduler: Scheduler | None = None
        self.text: TokenModel | None = None  # a TextModel when the store has the model's tokenizer
        self.progress: dict[str, int] = {}
        self.loading_bytes = 0
        self._failed_with: tuple[str, ...] = ()
        self._rebalanced_with: tuple[str, ...] = ()
        self.changed = asyncio.Event()  # set on every state change (the launcher waits on it)
        self.recoveries, self.last_recovery_ms, self.last_recovery = 0, 0, ""
        self.last_recovery_phases: dict[str, float] = {}  # time.perf_counter() at each phase of the last one
        self.draining = False
        self._lock = asyncio.Lock()     # one change of membership at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._healing: asyncio.Task[None] | None = None
        self._healing_epoch = -1
        self._heal_pending = False  # the latest heal waits for the lock and has not probed yet
        self._monitor: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def deployed(self) -> list[WorkerRecord]:
        return list(self.assignment)

    async def start(self) -> None:
        path = self.store.path(self.config.model)
        if (path / "tokenizer_config.json").is_file():
            self.text = await asyncio.to_thread(TextModel, path)
        else:
            self.text = TokenModel(path, self.config.model)
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        for task in (self._monitor, self._healing, *self._tasks):
            if task is not None:
                task.cancel()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.pipeline.chain is not None:
            await self.pipeline.chain.close()

    def _set_state(self, state: str, message: str = "") -> None:
        self.state, self.message = state, message
        self.changed.set()
        self.changed = asyncio.Event()

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

    def serving(self, model: str) -> tuple[Scheduler, TokenModel]:
        """The scheduler and text model for a request, or why there are none. While the cluster recovers,
        requests are accepted: they wait at the pipeline's gate within their deadline."""
        if model and model != self.config.model:
            raise NotFound(f"model {model!r} is not served here (this cluster serves {self.config.model!r})")
        if self.draining:
            raise Unavailable("the coordinator is draining: it finishes the requests in flight and takes no new "
                              "ones; retry on another coordinator")
        if self.state not in ("ready", "recovering") or self.scheduler is None:
            detail = f" ({self.message})" if self.message else ""
            raise Unavailable(f"the cluster is not ready: {self.state}{detail}")
        if self.text is None:
            raise Unavailable("the cluster is starting")
        return self.scheduler, self.text

    @property
    def is_encoder(self) -> bool:
        return self.manifest.family == "bert"

    # -- membership ------------------------------------------------------------------------------------
    def register(self, address: str, memory_budget_bytes: int) -> WorkerRecord:
        replaced = next((w for w in self.assignment if w.address == address), None)
        record = self.registry.register(address, memory_budget_bytes)
        if self.assignment:
            record.state = "spare"  # it waits to be needed; the running chain is not touched
        self.say(f"worker {address} registered ({memory_budget_bytes / 2**20:.0f} MiB offered)"
                 + (" as a spare" if self.assignment else ""))
        if replaced is not None:  # a worker that restarted at the same address holds nothing any more
            self._trigger_heal(f"worker {address} registered again (it restarted)")
        self._maybe_deploy()
        return record

    def report_dead(self, address: str, why: str) -> None:
        """Someone who knows (the launcher that saw the process exit) says a worker is gone: heal now."""
        for worker in list(self.registry.workers.values()):
            if worker.address == address and worker.state != "lost":
                worker.state, worker.last_error = "lost", why
                if worker in self.assignment:
                    self._trigger_heal(f"worker {address}: {why}")

    def heartbeat(self, worker_id: str) -> bool:
        """A registered worker's sign of life; False if this coordinator does not know it."""
        known = self.registry.heartbeat(worker_id)
        if known:
            self._maybe_deploy()  # a worker that came back may complete the set
        return known

    def _maybe_deploy(self) -> None:
        """Deploy once enough workers have registered; after a failed heal, try again with who is there;
        with the rebalance policy on, fold in spares when the chain is narrower than configured."""
        if self._lock.locked() or self.draining:
            return
        live = [w for w in self.registry.live() if w.state not in UNPLANNABLE]
        if self.state == "failed" and tuple(w.worker_id for w in self.registry.live()) == self._failed_with:
            return  # nothing changed since the last attempt failed
        if not self.assignment:
            if len(live) < self.config.workers:
                self._set_state("waiting for workers", f"{len(live)} of {self.config.workers} workers registered")
                return
            self._spawn(self._change("deploy", first=True), "deployment")
        elif self.state == "failed":
            self._trigger_heal("a worker joined after a failed recovery")
        elif (self.config.rebalance_on_join and len(self.assignment) < self.config.workers
              and len(live) > len(self.assignment) and tuple(w.worker_id for w in live) != self._rebalanced_with):
            self._rebalanced_with = tuple(w.worker_id for w in live)  # one try per membership
            self._spawn(self._change("rebalance onto a worker that joined", rebalance=True), "rebalance")

    def _trigger_heal(self, reason: str, epoch: int | None = None) -> asyncio.Task[None]:
        """One heal at a time. A failure from a newer epoch than the latest heal's, or news without an epoch
        (a worker reported dead, or registered again) once that heal has begun probing, queues one more."""
        task = self._healing
        if task is not None and not task.done():
            if epoch is not None and epoch <= self._healing_epoch:
                return task
            if epoch is None and self._heal_pending:
                return task  # it has not probed yet: it will see what this news is about
        self.pipeline.suspend()  # no further steps into the broken chain
        self._healing_epoch = self.pipeline.epoch if epoch is None else epoch
        self._heal_pending = True
        task = self._healing = self._spawn(self._change(reason, heal=True, epoch=epoch), "recovery")
        return task

    async def heal(self, epoch: int, error: BaseException) -> None:
        """The pipeline's report of a failed step in `epoch`: heal once per epoch, then return (the streams
        are rewound by then, or failed if the cluster cannot serve)."""
        if epoch < self.pipeline.epoch:
            return  # the chain was retired since that step was sent
        await asyncio.shield(self._trigger_heal(str(error), epoch))

    async def drain_worker(self, address: str) -> str:
        """Hand a worker's stage over (to a spare, or by re-planning); it then holds no stage."""
        record = next((w for w in self.registry.workers.values() if w.address == address), None)
        if record is None:
            raise NotFound(f"no worker at {address} is registered here")
        if record not in self.assignment:
            record.state, record.stage = "drained", None
            return f"worker {address} held no stage; it takes no new one"
        previous, record.state = record.state, "draining"
        try:
            # a task of its own: a caller that goes away does not cancel a change half done
            await asyncio.shield(self._spawn_change(f"draining worker {address}", drain=record))
        except ChangeRefused as exc:
            record.state = previous
            raise FailedPrecondition(f"cannot drain worker {address}: {exc}") from None
        if record in self.assignment:
            raise Unavailable(f"worker {address} could not be drained: {self.message}")
        record.state, record.stage = "drained", None
        return f"worker {address} drained: {describe(self.assignment, self.stages)}"

    async def rebalance(self) -> str:
        try:
            await asyncio.shield(self._spawn_change("rebalance requested", rebalance=True))
        except ChangeRefused as exc:
            raise FailedPrecondition(f"cannot rebalance: {exc}") from None
        return describe(self.assignment, self.stages)

    def _spawn_change(self, reason: str, **kind: Any) -> asyncio.Task[None]:
        """A change whose refusal reaches the caller (ChangeRefused) instead of the log."""
        task = asyncio.create_task(self._change(reason, **kind))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the one routine that changes the chain -----------------------------------------------------------
    async def _change(self, reason: str, *, first: bool = False, heal: bool = False, epoch: int | None = None,
                      drain: WorkerRecord | None = None, rebalance: bool = False) -> None:
        """Never leaves the gate closed while the state says the cluster serves: it ends with a new chain
        installed, with the old chain untouched (ChangeRefused), or in state "failed" with every stream told."""
        async with self._lock:
            if heal:
                self._heal_pending = False
                if epoch is not None and epoch < self.pipeline.epoch:
                    return  # another change retired that chain while this one waited for its turn
            try:
                await self._change_locked(reason, first=first, heal=heal, drain=drain, rebalance=rebalance)
            except (asyncio.CancelledError, ChangeRefused):
                raise
            except Exception:
                log.exception("changing the chain (%s) failed", reason)
                self._cannot_serve(f"internal error while {reason}; the coordinator log has the details")
                raise
            finally:
                for worker in self.registry.live():  # loaded for a chain that was not installed
                    if worker.state == "loading" and worker not in self.assignment:
                        worker.state, worker.stage = "spare", None

    async def _retire(self) -> None:
        """Close the gate and the chain: steps in flight fail at once (their streams are rewound at install)."""
        self.pipeline.suspend()
        old = self.pipeline.retire()
        if old is not None:
            await old.close()

    async def _change_locked(self, reason: str, *, first: bool, heal: bool, drain: WorkerRecord | None,
                             rebalance: bool) -> None:
        began = time.perf_counter()
        retired = heal or first
        if retired:
            await self._retire()
            self._set_state("recovering" if heal else "deploying",
                            reason if heal else f"planning {self.config.model} onto {self.config.workers} workers")
            await self._set_serving(False)
            if heal:
                self.say(f"recovering: {reason}")
        excluded: set[str] = set()  # workers whose load failed during this change
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            loaded = await probe(self.registry.live(), self.config.probe_timeout_ms / 1000, self.links)
            for worker in self.registry.live():
                if worker.worker_id not in loaded and worker.state not in UNPLANNABLE:
                    worker.state, worker.last_error = "lost", "did not answer the probe"
            detected = time.perf_counter()
            dead = [w for w in self.assignment if w.worker_id not in loaded]
            spares = [w for w in self.registry.live() if w not in self.assignment and w is not drain
                      and w.state not in UNPLANNABLE and w.worker_id not in excluded]
            try:
                target = self._choose(dead, spares, loaded, excluded, first=first, drain=drain, rebalance=rebalance)
            except PlanDoesNotFit as exc:
                if not retired:
                    raise ChangeRefused(str(exc)) from None  # the running chain serves on, untouched
                self._cannot_serve(f"the live workers cannot hold the model: {exc}")
                return
            planned = time.perf_counter()
            if not retired and target == list(zip(self.assignment, self.stages, strict=True)):
                self.say(f"{reason}: nothing to change; {describe(self.assignment, self.stages)}")
                return
            ok, retired = await self._load(target, loaded, retired, excluded)
            replaced = [w for w, _ in target if self.registry.workers.get(w.worker_id) is not w]
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
        await self._install(target, counted=heal)
        took = time.perf_counter() - began
        if heal:
            self.recoveries += 1
            self.last_recovery_ms = int(took * 1000)
            self.last_recovery_phases = dict(began=began, detected=detected, planned=planned, loaded=loaded_at,
                                             serving=began + took)
            self.last_recovery = (f"{reason}: recovered in {took:.2f} s (detect {detected - began:.2f} s, "
                                  f"plan {planned - detected:.2f} s, load {loaded_at - planned:.2f} s); "
                                  f"{describe(self.assignment, self.stages)}")
            self.say(self.last_recovery)
        elif not first:
            self.say(f"{reason}: done in {took:.2f} s; {describe(self.assignment, self.stages)}")

    def _choose(self, dead: list[WorkerRecord], spares: list[WorkerRecord], loaded: dict[str, LoadedShard],
                excluded: set[str], *, first: bool, drain: WorkerRecord | None, rebalance: bool) -> Assignment:
        usable = [w for w in self.assignment if w not in dead and w.worker_id not in excluded]
        if first or rebalance:
            candidates = (usable + spares)[: self.config.workers]
            stages = plan(self.manifest, len(candidates), [w.memory_budget_bytes for w in candidates])
            return list(zip(candidates, stages, strict=True))
        leaving = [w for w in self.assignment if w not in usable or w is drain]
        current = list(zip(self.assignment, self.stages, strict=True))
        replaced = choose_replacements(current, leaving, spares, loaded, self.config.model)
        if replaced is not None:
            return replaced
        # not enough spares: re-plan onto the workers that stay (and whatever spares there are)
        staying = ([w for w in usable if w is not drain] + spares)[: self.config.workers]
        if not staying:
            raise PlanDoesNotFit("no live worker is left to take the layers")
        stages = plan(self.manifest, len(staying), [w.memory_budget_bytes for w in staying])
        return list(zip(staying, stages, strict=True))

    async def _load(self, target: Assignment, loaded: dict[str, LoadedShard], retired: bool,
                    excluded: set[str]) -> tuple[bool, bool]:
        """Load every stage whose worker does not hold it already: first the workers outside the chain, while
        it still serves; then the chain's own, once it is retired (no step may reach a worker mid-load).
        Returns (ok, retired); on failure the reason is in .message and the workers are in `excluded`."""
        todo = [(w, s) for w, s in target if loaded.get(w.worker_id) != LoadedShard(self.config.model, s.start, s.end)]
        outside = [(w, s) for w, s in todo if w not in self.assignment]
        in_chain = [(w, s) for w, s in todo if w in self.assignment]
        self.loading_bytes = sum(s.weight_bytes for _, s in todo)
        self.progress = {}
        for batch in (outside, in_chain):
            if not batch:
                continue
            if batch is in_chain and not retired:
                await self._retire()
                retired = True
                self._set_state("recovering", "moving the chain's layers: requests wait for it")
                await self._set_serving(False)
            for worker, stage in batch:
                worker.state, worker.stage, worker.last_error = "loading", stage, ""
            c = self.config
            results = await asyncio.gather(*(
                load_shard(w, c.model, s, self.parameters_address, dtype_to_enum(c.dtype), c.load_timeout_s,
                           self.links, self.progress, self._kv_request()) for w, s in batch),
                return_exceptions=True)
            failed = []
            for (worker, _), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    worker.state, worker.last_error = "failed", str(result)
                    excluded.add(worker.worker_id)
                    failed.append(f"{worker.address}: {result}")
            if failed:
                self.message = "; ".join(failed)
                self.say(f"error: loading failed: {self.message}")
                return False, retired
        return True, retired

    async def _install(self, target: Assignment, counted: bool) -> None:
        """The new chain: install it, rewind every stream (replay), free the old sessions, open the gate."""
        self.pipeline.suspend()
        old_workers = {w.address for w in self.assignment}
        self.assignment = [w for w, _ in target]
        self.stages = [s for _, s in target]
        for worker, stage in target:
            worker.state, worker.stage = "ready", stage
        for worker in self.registry.live():
            if worker not in self.assignment and worker.state not in (*UNPLANNABLE, "loading"):
                worker.state, worker.stage = "spare", None
        old_chain = self.pipeline.install(ChainClient([w.address for w in self.assignment], self.links))
        if self.scheduler is None:
            c = self.config
            self.scheduler = Scheduler(self.pipeline, groups=c.micro_batch_groups or len(self.assignment),
                                       max_active=c.max_active_streams, max_queued=c.max_queued_streams,
                                       prefill_chunk=c.prefill_chunk_tokens, max_step_tokens=c.max_step_tokens,
                                       reserve_tokens=c.kv_reserve_tokens)
        stale = self.scheduler.rewind(counted)
        if old_chain is not None:
            await old_chain.close()
        everyone = sorted(old_workers | {w.address for w in self.registry.live()})
        # the old sessions are freed before the new chain's capacity is read: the replay starts on empty
        # caches, and the budget the scheduler starts from is the one the workers have (bounded: 5 s a worker)
        ending = asyncio.ensure_future(end_sessions(everyone, stale, self.links))
        await asyncio.wait({ending}, timeout=2.0)  # a worker that does not answer holds nothing we can free
        if not ending.done():
            self._spawn(asyncio.wait_for(ending, None), "freeing replayed sessions")
        chain = [w.address for w in self.assignment]
        timeout = self.config.probe_timeout_ms / 1000
        # every stage learns the plan's workers (its routes may name only these) before a step is sent; a
        # stage that missed it refuses routes with FAILED_PRECONDITION, which heals like a lost stage
        untold, capacity = await asyncio.gather(set_peers(chain, timeout, self.links),
                                                chain_capacity(chain, timeout, self.links))
        if untold:
            await set_peers(untold, timeout, self.links, peers=chain)
        self.scheduler.set_capacity(capacity)
        self._failed_with = ()
        self._set_state("ready")
        self.pipeline.resume()
        if not self.draining:
            await self._set_serving(True)

    def _kv_request(self) -> worker_pb2.LoadShardRequest:
        c = self.config
        return worker_pb2.LoadShardRequest(max_step_tokens=c.max_step_tokens,
                                           max_step_sequences=min(c.max_active_streams, c.max_step_tokens),
                                           prefill_chunk_tokens=c.prefill_chunk_tokens,
                                           kv_block_tokens=c.kv_block_tokens,
                                           session_ttl_ms=int(c.session_ttl_s * 1000))

    def _cannot_serve(self, why: str) -> None:
        """Healing is impossible for now: the requests in flight fail with the reason; a worker that joins
        later triggers another attempt. The gate stays closed (state "failed" refuses new requests)."""
        old = self.pipeline.fail(Unavailable(why))
        if old is not None:
            self._spawn(old.close(), "closing the old chain")
        self._set_state("failed", why)
        self._failed_with = tuple(w.worker_id for w in self.registry.live())
        self.say(f"error: {why}")
        if self.scheduler is not None:
            self.scheduler.fail_all(Unavailable(why))

    async def _watch(self) -> None:
        """Heartbeat bookkeeping, supervised: a worker of the chain that stops sending them is healed around
        even when no request is running to notice."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_ms / 1000)
            try:
                lost = self.registry.mark_lost()
                gone = [w for w in lost if w in self.assignment]
                if gone:
                    self._trigger_heal(f"worker {gone[0].address} stopped sending heartbeats")
                elif lost or not self.ready:
                    self._maybe_deploy()
            except Exception:  # noqa: BLE001
                log.exception("the membership watch failed once; it goes on")

    # -- drain of the coordinator ------------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Take no new requests; wait up to `grace_s` for the streams in flight to finish."""
        self.draining = True
        await self._set_serving(False)
        deadline = time.monotonic() + grace_s
        while self.scheduler is not None and (self.scheduler.active or self.scheduler.waiting):
            if time.monotonic() >= deadline:
                log.warning("drain: %d streams still running after %.0f s; stopping them", self.scheduler.active,
                            grace_s)
                return
            await asyncio.sleep(0.1)

    # -- status ----------------------------------------------------------------------------------------
    async def worker_status(self, record: WorkerRecord) -> worker_pb2.GetStatusResponse | None:
        if record.state == "lost":
            return None
        return await status(record.address, 2.0, self.links)
