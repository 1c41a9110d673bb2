"""A change of one replica's chain: the first deployment, a heal, a drain, a rebalance.

The replica (coordinator/fleet/replica.py) runs one change at a time, under its lock. A change probes what
the replica's own workers and the pool's free ones hold, picks an assignment (stage -> worker) among them
(coordinator/fleet/assignment.py), loads what is missing (free workers first, while the old chain still
serves when it can), then installs the new chain and rewinds every running stream, which replays from the
coordinator's token ids. It ends with a new chain installed, with the old chain untouched (ChangeRefused),
or with the replica in state "failed" and every stream told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Protocol

from coordinator.config import CoordinatorConfig, DeploymentSpec
from coordinator.fleet.assignment import candidates, choose, timed_plans
from coordinator.fleet.calibration import Calibrations, TimedPlans, explain_unmeasured
from coordinator.fleet.membership import Assignment, LoadedShard
from coordinator.fleet.planner import PlanDoesNotFit, StagePlan
from coordinator.fleet.registry import UNPLANNABLE, Registry, WorkerRecord
from coordinator.fleet.states import ReplicaState, WorkerState
from coordinator.fleet.timed_planner import StageExplanation
from coordinator.fleet.worker_calls import chain_capacity, load_shard, probe, set_peers
from coordinator.metrics import CoordinatorMetrics
from coordinator.serving.chain import ChainClient, end_sessions
from coordinator.serving.driver import Scheduler
from coordinator.serving.pipeline import Pipeline
from coordinator.store.models import Manifest
from shardline.codec import dtype_to_enum
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2
from shardline.wire_dtype import link_dtypes, quantization_enum, wire_dtype_to_enum

LOAD_ATTEMPTS = 3


class ChangeRefused(Exception):
    """A change (drain, rebalance) that cannot be made; the running chain was not touched."""


class Services(Protocol):
    """What a change uses of what the replicas share (coordinator/fleet/replica.py Shared)."""

    registry: Registry
    parameters_address: str
    links: LinkSettings
    metrics: CoordinatorMetrics
    calibrations: Calibrations | None

    def say(self, text: str, /) -> None: ...
    def spawn(self, work: Awaitable[None], name: str, /) -> asyncio.Task[None]: ...


class Rechained(Protocol):
    """What a change uses of the replica whose chain it changes (coordinator/fleet/replica.py Replica): the
    chain and its bookkeeping, which the change rewrites, and the replica's own moves (its state, its claims on
    workers, failing, opening the gate)."""

    name: str
    spec: DeploymentSpec
    manifest: Manifest
    message: str
    assignment: list[WorkerRecord]
    stages: list[StagePlan]
    plan: list[StageExplanation]
    plan_basis: str
    _basis: str
    pipeline: Pipeline
    scheduler: Scheduler | None
    progress: dict[str, int]
    loading_bytes: int
    recoveries: int
    last_recovery_ms: int
    last_recovery: str
    last_recovery_phases: dict[str, float]

    @property
    def shared(self) -> Services: ...
    @property
    def config(self) -> CoordinatorConfig: ...
    def owns(self, worker: WorkerRecord) -> bool: ...
    def free_workers(self, excluded: set[str] | None = None) -> list[WorkerRecord]: ...
    def describe(self) -> str: ...
    def _set_state(self, state: ReplicaState, message: str = "") -> None: ...
    def _claim(self, workers: list[WorkerRecord]) -> None: ...
    def _release_unused(self) -> None: ...
    def _cannot_serve(self, why: str) -> None: ...
    def _open_gate(self, first: bool) -> None: ...


async def change_chain(replica: Rechained, reason: str, *, first: Assignment | None, heal: bool,
                       drain: WorkerRecord | None, rebalance: bool) -> None:
    """One change, run under the replica's lock."""
    began = time.perf_counter()
    retired = heal or first is not None
    if retired:
        await retire_chain(replica.pipeline)
        replica._set_state(ReplicaState.RECOVERING if heal else ReplicaState.DEPLOYING,
                           reason if heal else f"planning {replica.spec.key} onto {replica.spec.workers} workers")
        if heal:
            replica.shared.say(f"{replica.name} recovering: {reason}")
    excluded: set[str] = set()  # workers whose load failed during this change
    registry = replica.shared.registry
    detected = planned = began
    target: Assignment = []
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        mine = [w for w in registry.live() if replica.owns(w) or not w.owner]
        loaded = stale_marked(await probe(mine, replica.config.probe_timeout_ms / 1000, replica.shared.links),
                              mine, replica.config)
        for worker in mine:
            if worker.worker_id not in loaded and worker.state not in UNPLANNABLE:
                worker.state, worker.last_error = WorkerState.LOST, "did not answer the probe"
        detected = time.perf_counter()
        dead = [w for w in replica.assignment if w.worker_id not in loaded]
        if first is not None or rebalance:  # lazily, once per (worker, model, dtype): the plan balances time
            await _calibrate(replica, [w for w, _ in first] if first is not None else
                             [w for w in mine if w.worker_id in loaded and w.worker_id not in excluded],
                             loaded, retry=rebalance)
        chosen = None
        if rebalance and first is None and (plans := _timed(replica)) is not None:
            # up to MAX_CHOICES full planner runs (~10 ms each for big models): off the event loop
            pool = candidates(replica.assignment, dead, _free(replica, excluded, drain), loaded, excluded)
            chosen = await asyncio.to_thread(plans.choose, pool, replica.spec.workers)
        try:
            target, basis = choose(replica.assignment, replica.stages, _free(replica, excluded, drain), dead, loaded,
                                   excluded, owner=replica.name, spec=replica.spec, manifest=replica.manifest,
                                   plans=_timed(replica), first=first, drain=drain, rebalance=rebalance,
                                   chosen=chosen)
        except PlanDoesNotFit as exc:
            # workers whose load failed are left out: their failure is the reason, not the arithmetic
            why = f"loading failed on {len(excluded)} workers ({replica.message}); without them: {exc}" \
                if excluded else str(exc)
            if not retired:
                raise ChangeRefused(why) from None  # the running chain serves on, untouched
            replica._cannot_serve(f"the live workers cannot hold {replica.spec.key}: {why}")
            return
        if basis is not None:
            replica._basis = basis
        replica._claim([w for w, _ in target])
        planned = time.perf_counter()
        if not retired and target == list(zip(replica.assignment, replica.stages, strict=True)):
            replica.shared.say(f"{reason}: nothing to change; {replica.describe()}")
            return
        ok, retired = await _load(replica, target, loaded, retired, excluded)
        replaced = [w for w, _ in target if registry.workers.get(w.worker_id) is not w
                    or not replica.owns(w) or w.state in UNPLANNABLE]
        if ok and replaced:  # one restarted and registered again while this change ran: probe again
            ok, replica.message = False, f"worker {replaced[0].address} registered again during the change"
        lost = [w for w, _ in target if w.state == WorkerState.LOST]
        if ok and lost:  # marked lost while the others loaded: never installed as ready (probe again)
            excluded.update(w.worker_id for w in lost)
            ok, replica.message = False, f"worker {lost[0].address} was marked lost during the change"
        if ok:
            break
        if attempt == LOAD_ATTEMPTS:
            if not retired:
                raise ChangeRefused(f"loading failed {LOAD_ATTEMPTS} times: {replica.message}")
            replica._cannot_serve(f"loading failed {LOAD_ATTEMPTS} times: {replica.message}")
            return
        await asyncio.sleep(0.5 * 2 ** attempt)
    loaded_at = time.perf_counter()
    joined = len({w.worker_id for w, _ in target} - {w.worker_id for w in replica.assignment})
    await _install(replica, target, counted=heal)
    took = time.perf_counter() - began
    if heal:
        replica.recoveries += 1
        replica.shared.metrics.recovered(replica.spec.name, replica.name, took, joined)
        replica.last_recovery_ms = int(took * 1000)
        replica.last_recovery_phases = dict(began=began, detected=detected, planned=planned, loaded=loaded_at,
                                            serving=began + took)
        replica.last_recovery = (f"{reason}: recovered in {took:.2f} s (detect {detected - began:.2f} s, "
                                 f"plan {planned - detected:.2f} s, load {loaded_at - planned:.2f} s); "
                                 f"{replica.describe()}")
        replica.shared.say(replica.last_recovery)
    elif first is None:
        replica.shared.say(f"{reason}: done in {took:.2f} s; {replica.describe()}")


async def retire_chain(pipeline: Pipeline) -> None:
    """Close the gate and the chain: steps in flight fail at once (their streams are rewound at install)."""
    pipeline.suspend()
    old = pipeline.retire()
    if old is not None:
        await old.close()


def _free(replica: Rechained, excluded: set[str], drain: WorkerRecord | None) -> list[WorkerRecord]:
    """The pool's free workers a change may take: not excluded, not the one it drains."""
    return [w for w in replica.free_workers(excluded) if w is not drain]


def _timed(replica: Rechained) -> TimedPlans | None:
    return timed_plans(replica.shared.calibrations, replica.manifest, replica.spec.model, replica.config)


def stale_marked(loaded: dict[str, LoadedShard], workers: list[WorkerRecord],
                 c: CoordinatorConfig) -> dict[str, LoadedShard]:
    """`loaded`, with each shard loaded otherwise than this configuration asks (another dtype, quantization or
    KV block size: the configuration changed across a restart) marked stale, so that it is loaded again."""
    by_id = {w.worker_id: w for w in workers}
    out = {}
    for worker_id, shard in loaded.items():
        worker = by_id.get(worker_id)
        wanted = (worker.device.dtype or c.dtype if worker is not None else c.dtype,
                  int(quantization_enum(c.quantize)), c.kv_block_tokens if shard.form[2] else 0)  # 0: no KV
        out[worker_id] = replace(shard, stale=True) if shard.model and shard.form != wanted else shard
    return out


async def _calibrate(replica: Rechained, workers: list[WorkerRecord], loaded: dict[str, LoadedShard],
                     retry: bool) -> None:
    """Calibrate those of `workers` that hold no shard (timing runs on a worker's compute thread: a serving
    worker's steps would wait); one that serves is planned by bytes, its basis saying why."""
    c = replica.shared.calibrations
    if c is None:
        return
    model, dtype = replica.spec.model, replica.config.dtype
    free = []
    for w in workers:
        shard = loaded.get(w.worker_id)
        if shard is not None and shard.model:
            c.note_serving(w, model, dtype, f"{shard.model} layers [{shard.start}, {shard.end})")
        else:
            free.append(w)
    await c.ensure(free, model, replica.manifest.family, dtype, retry=retry)


async def _load(replica: Rechained, target: Assignment, loaded: dict[str, LoadedShard], retired: bool,
                excluded: set[str]) -> tuple[bool, bool]:
    """Load every stage whose worker does not hold it already: first the workers outside the chain, while
    it still serves; then the chain's own, once it is retired (no step may reach a worker mid-load).
    Returns (ok, retired); on failure the reason is in .message and the workers are in `excluded`."""
    model = replica.spec.model
    digest = replica.manifest.digest
    todo = [(w, s) for w, s in target if loaded.get(w.worker_id) != LoadedShard(model, s.start, s.end, digest)]
    outside = [(w, s) for w, s in todo if w not in replica.assignment]
    in_chain = [(w, s) for w, s in todo if w in replica.assignment]
    replica.loading_bytes = sum(s.weight_bytes for _, s in todo)
    replica.progress = {}
    for batch in (outside, in_chain):
        if not batch:
            continue
        if batch is in_chain and not retired:
            await retire_chain(replica.pipeline)
            retired = True
            replica._set_state(ReplicaState.RECOVERING, "moving the chain's layers: requests wait for it")
        gone = [w for w, _ in batch if w.state == WorkerState.LOST]  # marked lost while the first batch loaded
        if gone:
            excluded.update(w.worker_id for w in gone)
            replica.message = f"worker {gone[0].address} was marked lost before its load began"
            return False, retired
        for worker, stage in batch:
            worker.state, worker.stage, worker.last_error = WorkerState.LOADING, stage, ""
        c = replica.config
        links = link_dtypes(len(target), c.wire_dtype or c.dtype, c.link_wire_dtypes)  # stage i -> i + 1
        link_of = {s.start: i for i, (_, s) in enumerate(target)}
        results = await asyncio.gather(*(
            load_shard(w, model, s, replica.shared.parameters_address, dtype_to_enum(c.dtype), c.load_timeout_s,
                       replica.shared.links, replica.progress, load_request(c, links[link_of[s.start]]), digest)
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
            replica.message = "; ".join(failed)
            replica.shared.say(f"error: loading {replica.spec.key} failed: {replica.message}")
            return False, retired
    return True, retired


def load_request(c: CoordinatorConfig, wire_dtype: str = "") -> worker_pb2.LoadShardRequest:
    """What a stage's load asks of the worker beside the shard: the dtype its hidden states leave in, and
    the KV cache's shape."""
    return worker_pb2.LoadShardRequest(wire_dtype=wire_dtype_to_enum(wire_dtype or c.dtype),
                                       quantize=quantization_enum(c.quantize),
                                       max_step_tokens=c.max_step_tokens,
                                       max_step_sequences=min(c.max_active_streams, c.max_step_tokens),
                                       prefill_chunk_tokens=c.prefill_chunk_tokens,
                                       kv_block_tokens=c.kv_block_tokens,
                                       session_ttl_ms=int(c.session_ttl_s * 1000))


async def _install(replica: Rechained, target: Assignment, counted: bool) -> None:
    """The new chain: install it, rewind every stream (replay), free the old sessions, open the gate."""
    replica.pipeline.suspend()
    old_workers = {w.address for w in replica.assignment}
    replica.assignment = [w for w, _ in target]
    replica.stages = [s for _, s in target]
    _explain(replica)
    for worker, stage in target:
        worker.state, worker.stage = WorkerState.READY, stage
    replica._release_unused()
    links = replica.shared.links
    old_chain = replica.pipeline.install(ChainClient([w.address for w in replica.assignment], links))
    first = replica.scheduler is None
    if replica.scheduler is None:
        c = replica.config
        replica.scheduler = Scheduler(replica.pipeline, groups=c.micro_batch_groups or len(replica.assignment),
                                      max_active=c.max_active_streams, max_queued=c.max_queued_streams,
                                      prefill_chunk=c.prefill_chunk_tokens, max_step_tokens=c.max_step_tokens,
                                      reserve_tokens=c.kv_reserve_tokens, background_share=c.job_step_share,
                                      metrics=replica.shared.metrics.streams(replica.spec.name),
                                      prefix_cache=c.prefix_cache)
    stale = replica.scheduler.policy.rewind(counted)
    if old_chain is not None:
        await old_chain.close()
    # the old sessions are freed before the new chain's capacity is read: the replay starts on empty
    # caches, and the budget the scheduler starts from is the one the workers have (bounded)
    everyone = sorted(old_workers | {w.address for w in replica.assignment})
    ending = asyncio.ensure_future(end_sessions(everyone, stale, links))
    await asyncio.wait({ending}, timeout=2.0)  # a worker that does not answer holds nothing we can free
    if not ending.done():
        replica.shared.spawn(asyncio.wait_for(ending, None), "freeing replayed sessions")
    chain = [w.address for w in replica.assignment]
    timeout = replica.config.probe_timeout_ms / 1000
    # every stage learns the plan's workers (its routes may name only these) before a step is sent; a
    # stage that missed it refuses routes with FAILED_PRECONDITION, which heals like a lost stage
    untold, capacity = await asyncio.gather(set_peers(chain, timeout, links), chain_capacity(chain, timeout, links))
    if untold:
        await set_peers(untold, timeout, links, peers=chain)
    replica.scheduler.policy.set_capacity(capacity)
    replica._open_gate(first)


def _explain(replica: Rechained) -> None:
    """The installed plan's explanation (a chain kept by a heal is explained with what is measured)."""
    plans = _timed(replica)
    replica.plan = plans.explain(replica.assignment, replica.stages) if plans is not None else \
        explain_unmeasured(replica.manifest, replica.assignment, replica.stages)
    replica.plan_basis = replica._basis or "bytes"
    if replica.plan and replica.plan_basis.startswith("time"):
        replica.shared.say(f"{replica.name} planned by time: " + "; ".join(
            f"{s.worker} [{s.start}, {s.end}) {s.stage_s * 1000:.1f} ms" for s in replica.plan))
