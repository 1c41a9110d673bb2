"""The coordinator's Prometheus metrics (README "Metrics"; the endpoint itself is shardline/metrics.py).

What is counted where, so that every request is counted once whatever protocol brought it:
- requests, at the shared core: coordinator/fleet/requests.py runs every generation and Infer through `Requests`
  (native gRPC, KServe, the HTTP gateway, and job items alike): outcome by model, time to first token, time
  per output token, end-to-end latency, tokens.
- events, where they happen: the scheduler reports each stream's queue time (at its first admission) and each
  preemption (`StreamMetrics`), a replica each recovery and the workers it brought in, the fleet each
  re-registration, the launcher each worker process it restarted.
- state (queues, running streams, KV blocks per stage, replicas, workers, the result cache, jobs) is read at
  scrape time by coordinator/api/state_metrics.py, from a snapshot taken on the event loop.

Labels are bounded: `model` is a deployment's name (a request that names no deployment counts under
"(unknown)", never under the string it sent), `replica` a replica's name, `stage` a stage's index, `code` a
gRPC status name, `finished_reason` stop | length | infer, `priority` interactive | background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

from shardline.errors import ShardlineError
from shardline.metrics import PREFIX

T = TypeVar("T")


class Piece(Protocol):
    """What the metrics read of a generation's piece (coordinator/serving/generation.py Piece)."""

    @property
    def token_ids(self) -> list[int]: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached(self) -> bool: ...


P = TypeVar("P", bound=Piece)
UNKNOWN_MODEL = "(unknown)"  # deployment names start with a letter or digit: this one is never a deployment's
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                 600.0, 1800.0, 3600.0)
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def model_label(requested: str, primary: str, names: Iterable[str]) -> str:
    """The `model` label of a request: the name of the deployment it names (or the default one, `primary`),
    if `names` (the deployments' names) has it, else UNKNOWN_MODEL. Never the raw string: a label per typo would
    grow without bound."""
    name = (requested or primary).partition("@")[0]
    return name if name in names else UNKNOWN_MODEL


def status_name(exc: BaseException) -> str:
    """The gRPC status a request that ends with `exc` is answered with: the error table's code, INTERNAL for
    anything unexpected, CANCELLED when the caller went away (or stopped reading)."""
    if isinstance(exc, ShardlineError):
        return exc.code.name
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


@dataclass
class ModelSeries:
    """One model's request series, bound once: a label lookup per token would cost a lock and a dict each."""

    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    tpot: Histogram
    e2e: Histogram


@dataclass
class _Timing:
    """A generation's token times: `events` counts pieces that carried a token or ended the request (an
    end-of-sequence is sampled like any token, though it is not sent)."""

    began: float
    first: float = 0.0
    last: float = 0.0
    events: int = 0


class Requests:
    """Requests as the core runs them: one outcome each (success by finish reason, or an error by code)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(f"{PREFIX}{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, ["model"], buckets=buckets, registry=registry)

        self.success = counter("request_success", "Requests that finished, by model and finish reason (stop: end "
                               "of sequence or a stop sequence; length: max_tokens; infer: an Infer's forward "
                               "pass). Answers from the result cache count too", ["model", "finished_reason"])
        self.errors = counter("request_errors", "Requests that ended with an error, by model and gRPC status code "
                              "(CANCELLED: the caller went away)", ["model", "code"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests that finished (an Infer's "
                                     "input tokens); cached answers are not counted", ["model"])
        self.generation_tokens = counter("generation_tokens", "Tokens generated, counted as each is streamed; "
                                         "cached answers are not counted", ["model"])
        self.ttft = histogram("time_to_first_token_seconds", "From a request's arrival at the coordinator's core "
                              "to its first generated token (cached answers are not observed)", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between a request's tokens after the "
                              "first: one observation per request of two tokens or more", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From a request's arrival to its last token (an "
                             "Infer's answer), for requests that finished", E2E_BUCKETS)
        self._series: dict[str, ModelSeries] = {}

    def series(self, model: str) -> ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = ModelSeries(
                self.prompt_tokens.labels(model), self.generation_tokens.labels(model), self.ttft.labels(model),
                self.tpot.labels(model), self.e2e.labels(model))
        return series

    async def generation(self, model: str, pieces: AsyncGenerator[P, None]) -> AsyncGenerator[P, None]:
        """`pieces` passed on, counted: a token counter increment per piece, the first token's latency, and
        the outcome once it is known (before the last piece is passed on, so a caller that stops reading
        then is not taken for one that went away)."""
        series = self.series(model)
        timing = _Timing(time.perf_counter())
        finished = False
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    if not piece.cached:
                        self._timed(piece, series, timing)
                    if piece.finish_reason:
                        finished = True
                        self._finished(model, piece, series, timing)
                    yield piece
        except BaseException as exc:
            if not finished:
                self.errors.labels(model, status_name(exc)).inc()
            raise

    @staticmethod
    def _timed(piece: Piece, series: ModelSeries, timing: _Timing) -> None:
        if not piece.token_ids and not piece.finish_reason:
            return
        now = time.perf_counter()
        if not timing.events:
            timing.first = now
            series.ttft.observe(now - timing.began)
        timing.last = now
        timing.events += 1
        if piece.token_ids:
            series.generation_tokens.inc(len(piece.token_ids))

    def _finished(self, model: str, piece: Piece, series: ModelSeries, timing: _Timing) -> None:
        self.success.labels(model, piece.finish_reason).inc()
        series.e2e.observe(time.perf_counter() - timing.began)
        if piece.cached:
            return
        series.prompt_tokens.inc(piece.prompt_tokens)
        if timing.events >= 2:
            series.tpot.observe((timing.last - timing.first) / (timing.events - 1))

    async def infer(self, model: str, call: Awaitable[tuple[T, int]]) -> tuple[T, int]:
        """An Infer (`call` answers its vectors and the tokens it processed), counted."""
        began = time.perf_counter()
        try:
            result = await call
        except BaseException as exc:
            self.errors.labels(model, status_name(exc)).inc()
            raise
        series = self.series(model)
        series.e2e.observe(time.perf_counter() - began)
        series.prompt_tokens.inc(result[1])
        self.success.labels(model, "infer").inc()
        return result


class StreamMetrics:
    """What the schedulers of one model report: queue time at a stream's first admission (a preempted stream
    queues again, which is counted as a preemption, not as a second wait), and preemptions."""

    def __init__(self, queue_time: Histogram, preemptions: Counter, refusals: Counter, model: str) -> None:
        self._interactive = queue_time.labels(model, "interactive")
        self._background = queue_time.labels(model, "background")
        self._preemptions = preemptions.labels(model)
        self._refusals = refusals
        self._model = model

    def admitted(self, waited_s: float, background: bool) -> None:
        (self._background if background else self._interactive).observe(waited_s)

    def preempted(self) -> None:
        self._preemptions.inc()

    def refused(self, reason: str) -> None:
        self._refusals.labels(self._model, reason).inc()


class CoordinatorMetrics:
    """Every metric of one coordinator, in a registry of its own (never the process-global one)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.requests = Requests(registry)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds", "Time a stream waited in its replica's "
                                    "queue before it first joined the running batch, by priority (background: job "
                                    "items)", ["model", "priority"], buckets=QUEUE_BUCKETS, registry=registry)
        self.preemptions = Counter(f"{PREFIX}num_preemptions", "Streams preempted for KV memory (each resumes by "
                                   "re-prefill)", ["model"], registry=registry)
        self.refusals = Counter(f"{PREFIX}stage_refusals", "Steps of a stream a stage refused, by reason (kv_full: "
                                "the stage was short of KV blocks the coordinator counted free; cache_lost: the "
                                "stream's cache was gone); each such stream replays", ["model", "reason"],
                                registry=registry)
        self.recoveries = Counter(f"{PREFIX}recoveries", "Failovers: chains healed after a lost worker or a broken "
                                  "link (their streams replayed on the new chain)", ["model", "replica"],
                                  registry=registry)
        self.recovery_seconds = Histogram(f"{PREFIX}recovery_duration_seconds", "How long a recovery took, from "
                                          "the failure's report to the new chain serving (probe, plan, load, "
                                          "install)", ["model"], buckets=RECOVERY_BUCKETS, registry=registry)
        self.replacements = Counter(f"{PREFIX}worker_replacements", "Workers a recovery brought into a chain "
                                    "in place of lost ones", ["model"], registry=registry)
        self.reregistrations = Counter(f"{PREFIX}worker_reregistrations", "Workers that registered again at an "
                                       "address already registered: their process restarted", registry=registry)
        self.restarts = Counter(f"{PREFIX}worker_restarts", "Worker processes `coordinator launch` restarted "
                                "after they died (0 elsewhere)", registry=registry)
        self.job_storage_errors = Counter(f"{PREFIX}job_storage_errors", "Job results the job store could not "
                                          "write at once (disk full, a locked file); each is retried with back-off, "
                                          "never computed again", registry=registry)
        self._streams: dict[str, StreamMetrics] = {}

    def streams(self, model: str) -> StreamMetrics:
        """The scheduler-side metrics of `model` (a deployment's name)."""
        streams = self._streams.get(model)
        if streams is None:
            streams = self._streams[model] = StreamMetrics(self.queue_time, self.preemptions, self.refusals, model)
        return streams

    def recovered(self, model: str, replica: str, seconds: float, replaced: int) -> None:
        self.recoveries.labels(model, replica).inc()
        self.recovery_seconds.labels(model).observe(seconds)
        if replaced:
            self.replacements.labels(model).inc(replaced)
