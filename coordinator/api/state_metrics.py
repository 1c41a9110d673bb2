"""The coordinator's state as Prometheus gauges (queues, running streams, KV blocks per stage, replicas,
workers, the result cache, jobs), read at scrape time from a snapshot taken on the event loop: the hot path
pays nothing for it, and a scrape (on the HTTP server's thread) never reads the fleet while the loop changes
it. The counters and histograms are coordinator/metrics.py's."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.fleet.fleet import Fleet
from coordinator.fleet.states import WorkerState
from coordinator.jobs.runner import JobRunner
from coordinator.metrics import CoordinatorMetrics
from coordinator.serving.result_cache import ResultCache
from shardline.metrics import PREFIX

log = logging.getLogger(__name__)
WORKER_STATES = tuple(s.value for s in WorkerState)
SNAPSHOT_TIMEOUT_S = 5.0


def watch(metrics: CoordinatorMetrics, fleet: Fleet, cache: ResultCache, jobs: JobRunner) -> None:
    """Read the fleet's state at every scrape of `metrics` (call once, on the event loop the fleet runs on)."""
    metrics.registry.register(StateCollector(fleet, cache, jobs, asyncio.get_running_loop()))


@dataclass(frozen=True)
class ReplicaState:
    model: str
    replica: str
    ready: bool
    running: int
    waiting: int
    background: int
    kv_known: bool = False
    kv_used: int = 0                    # blocks held on every stage, and those being freed
    kv_total: int = 0                   # the chain's: its smallest stage's
    stage_blocks: tuple[int, ...] = ()  # each stage's capacity


@dataclass(frozen=True)
class Snapshot:
    replicas: tuple[ReplicaState, ...]
    workers: dict[str, int]
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    jobs_unfinished: int
    job_items_running: int


class StateCollector(Collector):
    """The fleet's state, read at scrape time from a snapshot taken on the event loop."""

    def __init__(self, fleet: Fleet, cache: ResultCache, jobs: JobRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.fleet, self.cache, self.jobs, self.loop = fleet, cache, jobs, loop
        self._jobs = (0, 0)  # the latest job counts (they come from the jobs database, read off the loop)
        self._lock = threading.Lock()  # scrapes that overlap share one snapshot: a flood is one hop at a time
        self._last: tuple[float, Snapshot] | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self._take()
        if snapshot is not None:
            yield from families(snapshot)

    def _take(self) -> Snapshot | None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self.loop:  # scraped from the loop itself: no hop (it would wait for itself); last job counts
            return self.snapshot()
        arrived = time.monotonic()
        with self._lock:
            if self._last is not None and self._last[0] >= arrived:  # taken while this scrape waited: fresh
                return self._last[1]
            began = time.monotonic()
            snapshot = self._hop()
            if snapshot is not None:
                self._last = (began, snapshot)
            return snapshot

    def _hop(self) -> Snapshot | None:
        fresh = self._fresh()
        try:
            future = asyncio.run_coroutine_threadsafe(fresh, self.loop)
        except RuntimeError:  # the loop is closed (the coordinator stopped): the coroutine never started
            fresh.close()
            return None
        try:
            return future.result(SNAPSHOT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a scrape still shows the request metrics
            future.cancel()
            log.warning("metrics: no snapshot of the coordinator's state (%s); this scrape leaves it out",
                        type(exc).__name__)
            return None

    async def _fresh(self) -> Snapshot:
        self._jobs = await self.jobs.counts()
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        """Plain values (call on the event loop)."""
        fleet, cache = self.fleet, self.cache
        workers = dict.fromkeys(WORKER_STATES, 0)
        for worker in fleet.registry.workers.values():
            workers[worker.state] = workers.get(worker.state, 0) + 1
        replicas = tuple(replica_state(d.spec.name, r) for d in fleet.deployments.values() for r in d.replicas
                         if not r.retired)
        return Snapshot(replicas, workers, cache.hits, cache.misses, cache.bytes, *self._jobs)


def replica_state(model: str, replica: Any) -> ReplicaState:
    if replica.scheduler is None:
        return ReplicaState(model, replica.name, replica.ready, 0, 0, 0)
    s = replica.scheduler.policy
    state = ReplicaState(model, replica.name, replica.ready, s.active, len(s.waiting), len(s.background))
    kv = s.kv
    if kv is None:
        return state
    stages = kv.stage_blocks or (kv.blocks_total,) * len(replica.assignment)
    return ReplicaState(state.model, state.replica, state.ready, state.running, state.waiting, state.background,
                        True, kv.held + kv.releasing, kv.blocks_total, tuple(stages))


def families(s: Snapshot) -> Iterator[Metric]:
    """The scrape-time metric families of a snapshot."""
    by_replica = ["model", "replica"]
    by_stage = ["model", "replica", "stage"]
    running = GaugeMetricFamily(f"{PREFIX}num_requests_running", "Streams in each replica's running batch",
                                labels=by_replica)
    waiting = GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Streams queued for admission in each replica, "
                                "by priority (background: job items)", labels=[*by_replica, "priority"])
    ready = GaugeMetricFamily(f"{PREFIX}replica_ready", "1 while the replica serves requests", labels=by_replica)
    usage = GaugeMetricFamily(f"{PREFIX}kv_cache_usage_perc", "KV blocks in use over the chain's capacity (its "
                              "smallest stage's), from 0 to 1", labels=by_replica)
    used = GaugeMetricFamily(f"{PREFIX}kv_cache_used_blocks", "KV blocks in use on each stage as the scheduler "
                             "accounts them (every stage holds the same positions), with those being freed",
                             labels=by_stage)
    capacity = GaugeMetricFamily(f"{PREFIX}kv_cache_capacity_blocks", "KV blocks each stage can hold, as it "
                                 "reported after loading", labels=by_stage)
    for r in s.replicas:
        running.add_metric([r.model, r.replica], r.running)
        waiting.add_metric([r.model, r.replica, "interactive"], r.waiting)
        waiting.add_metric([r.model, r.replica, "background"], r.background)
        ready.add_metric([r.model, r.replica], 1.0 if r.ready else 0.0)
        if r.kv_known:
            usage.add_metric([r.model, r.replica], r.kv_used / r.kv_total if r.kv_total else 0.0)
            for stage, blocks in enumerate(r.stage_blocks):
                used.add_metric([r.model, r.replica, str(stage)], r.kv_used)
                capacity.add_metric([r.model, r.replica, str(stage)], blocks)
    yield from (running, waiting, ready, usage, used, capacity)
    workers = GaugeMetricFamily(f"{PREFIX}workers", "Registered workers by state", labels=["state"])
    for state, n in s.workers.items():
        workers.add_metric([state], n)
    yield workers
    yield CounterMetricFamily(f"{PREFIX}result_cache_hits", "Requests answered from the result cache",
                              value=s.cache_hits)
    yield CounterMetricFamily(f"{PREFIX}result_cache_misses", "Deterministic requests the result cache did not "
                              "hold (with the cache on)", value=s.cache_misses)
    yield GaugeMetricFamily(f"{PREFIX}result_cache_bytes", "Memory the result cache holds", value=s.cache_bytes)
    yield GaugeMetricFamily(f"{PREFIX}jobs_unfinished", "Jobs queued or running", value=s.jobs_unfinished)
    yield GaugeMetricFamily(f"{PREFIX}job_items_running", "Job items in flight", value=s.job_items_running)
