"""A shard worker's Prometheus metrics (README "Metrics"; the endpoint itself is shardline/metrics.py).

A worker serves one stage at a time, so its series carry no stage label: Prometheus's `instance` tells the
workers apart, and `shardline:stage_info` says which layers of which model each one holds now.

Almost everything is read at scrape time from what the runtime counts anyway (shard_worker/runtime.py:
`Metrics`, plain attribute increments on the compute thread and the event loop): busy and bubble seconds,
steps, token rows, bytes in and out, KV memory and sessions. The one observation on the hot path is the step
histogram, once per step. Counters stay monotonic across shard loads: the `Metrics` of every runtime this
worker ever ran are summed (a few hundred bytes per load; a worker loads a shard when it joins a chain).

Bubble, precisely: compute-thread idle time during which the stage held at least one live session, i.e. a
stream that had already reached this stage and had not ended was somewhere else in the pipeline (upstream,
downstream, or at the coordinator between two steps) while this stage waited for it. Idle time with no live
session is not a bubble (there was no work anywhere for this stage). Measured on the compute thread itself at
each step's start and at each EndSession, so it needs no lock and no guess; it lags by at most the current idle
stretch (at most a session sweep, 5 s, once sessions are live), never counts twice. A stream's first step
(its prefill upstream) is invisible to a stage it has not reached yet, and an abandoned session (no
EndSession) counts until its TTL expires it. Encoders keep no sessions: their bubble is always 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shard_worker.runtime import Metrics, StageRuntime
from shard_worker.weights import ShardSpec
from shardline.metrics import PREFIX, MetricsServer


class HeldShard(Protocol):
    """What the worker holds, as metrics read it (shard_worker/lifecycle.py's Shard)."""

    @property
    def spec(self) -> ShardSpec: ...

    @property
    def runtime(self) -> StageRuntime: ...

    @property
    def weight_bytes(self) -> int: ...


class Observed(Protocol):
    """The worker as metrics read it at scrape time (its ShardLifecycle; metrics never import it)."""

    @property
    def shard(self) -> HeldShard | None: ...

    @property
    def state(self) -> str: ...

    @property
    def memory_budget_bytes(self) -> int: ...

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 30.0)
SUMMED = ("busy_s", "bubble_s", "steps", "tokens", "bytes_in", "bytes_out", "sessions_expired", "prefill_tokens",
          "prefix_reused", "prefix_evictions")


class WorkerMetrics:
    """Every metric of one worker, in a registry of its own (never the process-global one)."""

    def __init__(self, worker: Observed) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.step_seconds = Histogram(f"{PREFIX}stage_step_duration_seconds", "Compute time of one step on this "
                                      "stage (every sequence of a micro-batch, on the compute thread)",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.fenced = Counter(f"{PREFIX}worker_fenced_calls", "Control calls refused because they came from a "
                              "replaced coordinator (another epoch) or were meant for the process this address had "
                              "before (shardline/fencing.py)", ["rpc"], registry=self.registry)
        self.retired: list[Metrics] = []  # the runtimes of shards this worker held before (see the module doc)
        self.server: MetricsServer | None = None
        self.registry.register(StageCollector(worker, self.retired))

    def retire(self, metrics: Metrics) -> None:
        """A runtime is being dropped (unload, or a new load): keep counting what it did. Call before the
        worker lets go of it, so that a scrape in between sees it once (the collector drops duplicates)."""
        self.retired.append(metrics)


class StageCollector(Collector):
    """The worker's stage, read at scrape time (on the HTTP server's thread: plain reads, no lock)."""

    def __init__(self, worker: Observed, retired: list[Metrics]) -> None:
        self.worker, self.retired = worker, retired

    def collect(self) -> Iterator[Metric]:
        shard = self.worker.shard  # first, then the retired list: a runtime moving between them is seen
        current = shard.runtime.metrics if shard is not None else None
        every = {id(m): m for m in [*self.retired, *([current] if current is not None else [])]}
        total = {name: sum(getattr(m, name) for m in every.values()) for name in SUMMED}
        yield from counters(total)
        yield from gauges(self.worker, shard)


def counters(total: dict[str, float]) -> Iterator[Metric]:
    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}{name}", doc, value=total[key])

    yield counter("stage_busy_seconds", "Compute-thread time spent in steps", "busy_s")
    yield counter("stage_bubble_seconds", "Compute-thread idle time while a stream this stage serves was elsewhere "
                  "in the pipeline (upstream, downstream or at the coordinator): see README \"Metrics\"", "bubble_s")
    yield counter("stage_steps", "Steps computed (micro-batches)", "steps")
    yield counter("stage_tokens", "Token rows computed (prompt chunks and decode tokens of every sequence)", "tokens")
    yield counter("stage_received_bytes", "Bytes of the steps received from the previous hop (the coordinator for "
                  "the first stage)", "bytes_in")
    yield counter("stage_sent_bytes", "Bytes sent on to the next hop (hidden states to the next stage, or the "
                  "answer back)", "bytes_out")
    yield counter("stage_sessions_expired", "Sessions freed because no step came for their TTL", "sessions_expired")
    yield counter("stage_prefill_tokens", "Prompt positions computed (README \"Prefix cache\")", "prefill_tokens")
    yield counter("stage_prefix_reused_tokens", "Prompt positions copied from the prefix cache instead of computed",
                  "prefix_reused")
    yield counter("stage_prefix_evicted_blocks", "Prefix cache blocks evicted to make room for sessions",
                  "prefix_evictions")


def gauges(worker: Observed, shard: HeldShard | None) -> Iterator[Metric]:
    info = GaugeMetricFamily(f"{PREFIX}stage_info", "1, labelled with what this worker holds now (model and "
                             "layers [start_layer, end_layer)) and its state", labels=["model", "start_layer",
                                                                                         "end_layer", "state"])
    if shard is not None:
        info.add_metric([shard.spec.model, str(shard.spec.start), str(shard.spec.end), worker.state], 1)
    else:
        info.add_metric(["", "", "", worker.state], 1)
    yield info

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}{name}", doc, value=value)

    runtime = shard.runtime if shard is not None else None
    queued = sessions = used = total = block_bytes = 0
    if runtime is not None:
        queued, sessions = runtime.metrics.queued, len(runtime.sessions)
        used, total, block_bytes = runtime.pool.blocks_used, runtime.pool.blocks_total, runtime.pool.layout.block_bytes
    yield gauge("stage_queue_depth", "Steps queued for or running on the compute thread", queued)
    yield gauge("stage_sessions", "Live sessions (streams with a KV cache on this stage)", sessions)
    yield gauge("stage_kv_cache_used_bytes", "KV cache memory held by sessions", used * block_bytes)
    yield gauge("stage_kv_cache_capacity_bytes", "KV cache memory this stage can hold (budget - weights - "
                "activation headroom)", total * block_bytes)
    yield gauge("stage_kv_cache_used_blocks", "KV blocks held by sessions", used)
    yield gauge("stage_kv_cache_capacity_blocks", "KV blocks this stage can hold", total)
    yield gauge("stage_weight_bytes", "Bytes of the weights this stage holds", shard.weight_bytes if shard else 0)
    yield gauge("stage_memory_budget_bytes", "Memory this worker offers (weights + activations + KV cache)",
                worker.memory_budget_bytes)
