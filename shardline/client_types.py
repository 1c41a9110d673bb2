"""The values the SDK's calls return (GenerateResult, Embeddings, ModelInfo, ClusterStatus, ...) and how each is
read from its reply proto. `shardline.client` exports them all; import them from there."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from shardline.codec import decode_tensor, dtype_from_enum, to_numpy
from shardline.jobs import FINISH
from shardline.v1 import coordinator_pb2


@dataclass(frozen=True)
class Logprob:
    """A token's log probability (of the model's own logits), its text alone, and the likeliest tokens at its
    position as (token id, text, log probability), best first."""

    token_id: int
    token: str
    logprob: float | None  # None: the prompt's first token (nothing comes before it)
    top: tuple[tuple[int, str, float], ...] = ()

    @classmethod
    def of(cls, t: coordinator_pb2.TokenLogprob) -> Logprob:
        return cls(t.token_id, t.token, t.logprob if t.HasField("logprob") else None,
                   tuple((x.token_id, x.token, x.logprob) for x in t.top))


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: the function's name and its arguments (JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class GenerateChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None until the last chunk: "length" or "stop"
    prompt_tokens: int = 0            # on the first chunk and the last (usage)
    completion_tokens: int = 0        # usage, on the last chunk only (a stream's total, as GenerateResult's)
    model: str = ""                   # on the first chunk: the version serving it, "name@version"
    # logprobs=k: one per token id; the last chunk's may end with the id that ended the stream (end-of-sequence
    # or a stop id), which is not among the token ids
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # prompt_logprobs=k: on the first chunk with ids
    tool_calls: list[ToolCall] = field(default_factory=list)  # with tools: the calls completed here (not in text)
    index: int = 0  # n > 1: the choice it belongs to


@dataclass
class GenerateResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # answered from the coordinator's result cache
    model: str = ""       # the version that served it, "name@version"
    seed: int | None = None  # the seed a sampled stream sampled with
    resumed: int = 0      # times the stream broke and went on (its coordinator restarted, say)
    logprobs: list[Logprob] = field(default_factory=list)  # logprobs=k: as GenerateChunk's, all of them
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # prompt_logprobs=k: every prompt token's
    tool_calls: list[ToolCall] = field(default_factory=list)  # with tools: every call (finish_reason "tool_calls")
    # n > 1: each choice's result (text, ids, finish reason, seed, ...); then this one holds the model, the
    # prompt's tokens, the completion tokens of all, and a finish reason once every choice has one
    choices: list[GenerateResult] = field(default_factory=list)

    @classmethod
    def of(cls, request: coordinator_pb2.GenerateRequest) -> GenerateResult:
        return cls(choices=[cls() for _ in range(request.n)] if request.n > 1 else [])

    def add(self, response: coordinator_pb2.GenerateResponse) -> GenerateChunk:
        if self.choices:
            return self._add_choice(response)
        if response.model and not self.model:  # the first message's; a resumed stream's names the same
            self.model = response.model
        if response.HasField("seed") and self.seed is None:  # its first message's (each choice's own)
            self.seed = response.seed
        finish = FINISH.get(response.finish_reason)
        usage = (response.usage.prompt_tokens, response.usage.completion_tokens) if finish \
            else (response.prompt_tokens, 0)
        chunk = GenerateChunk(response.text, list(response.token_ids), finish, *usage, model=response.model,
                              logprobs=[Logprob.of(t) for t in response.logprobs],
                              prompt_logprobs=[Logprob.of(t) for t in response.prompt_logprobs],
                              tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in response.tool_calls])
        self.cached = self.cached or response.cached
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.tool_calls += chunk.tool_calls
        self.prompt_logprobs = self.prompt_logprobs or chunk.prompt_logprobs
        if finish:
            self.finish_reason = finish
            self.prompt_tokens, self.completion_tokens = usage
        return chunk

    def _add_choice(self, response: coordinator_pb2.GenerateResponse) -> GenerateChunk:
        if not 0 <= response.index < len(self.choices):
            raise ValueError(f"the response names choice {response.index} of {len(self.choices)}")
        choice = self.choices[response.index]
        chunk = replace(choice.add(response), index=response.index)
        self.model = self.model or choice.model
        self.prompt_tokens = self.prompt_tokens or choice.prompt_tokens
        self.cached = self.cached or choice.cached
        self.completion_tokens = sum(c.completion_tokens for c in self.choices)
        if all(c.finish_reason for c in self.choices):
            self.finish_reason = chunk.finish_reason
        return chunk


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # [len(texts), hidden] float32
    tokens: int          # tokens the encoder processed, all inputs together
    truncated: int = 0   # inputs cut to the model's positions (only with truncate=True)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    num_layers: int
    size_bytes: int
    context_tokens: int
    ready: bool
    task: str = ""            # "generate" or "embed"
    has_tokenizer: bool = True
    version: str = ""
    is_default: bool = True   # the version the name alone means
    versions: tuple[str, ...] = ()
    replicas: int = 0
    replicas_ready: int = 0
    state: str = ""


@dataclass(frozen=True)
class WorkerStatus:
    address: str
    state: str
    start_layer: int
    end_layer: int
    weight_bytes: int
    memory_budget_bytes: int
    rss_bytes: int
    sessions: int
    kv_cache_bytes: int
    last_heartbeat_age_ms: int
    last_error: str
    busy_ms: int = 0
    idle_ms: int = 0
    queue_depth: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tokens_per_second: float = 0.0
    replica: str = ""         # the replica it serves (name@version/rN); "" = free, in the pool
    device: str = ""          # "cpu" or "cuda:N" ("" = an older worker that did not say)
    device_name: str = ""
    device_memory_total_bytes: int = 0
    device_memory_free_bytes: int = 0
    dtype: str = ""           # the compute dtype it runs ("" = the LoadShard's, none loaded yet)
    engine: str = ""          # "torch" or "deepspeed"


@dataclass(frozen=True)
class ReplicaStatus:
    name: str
    state: str
    message: str
    workers: tuple[str, ...]
    running: int
    queued: int
    outstanding_tokens: int
    requests: int
    recoveries: int
    draining: bool
    plan: tuple[PlanStage, ...] = ()  # why each stage holds its range (README "Planning for mixed machines")
    plan_basis: str = ""              # "time (...)": balanced on calibrations; "bytes (...)": on weights, and why


@dataclass(frozen=True)
class PlanStage:
    """One stage of a replica's plan: its worker, measured speed and link, predicted times, memory."""

    worker: str
    start_layer: int
    end_layer: int
    seconds_per_layer: float   # 0: not calibrated
    compute_s: float
    hop_s: float
    weight_bytes: int
    memory_budget_bytes: int
    rtt_s: float
    bandwidth_bytes_per_s: float
    threads: int


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    version: str
    source: str
    is_default: bool
    state: str
    replicas: list[ReplicaStatus]
    min_replicas: int
    max_replicas: int
    target_queue: float
    events: tuple[str, ...]


@dataclass(frozen=True)
class ClusterStatus:
    model: str
    ready: bool
    state: str
    message: str
    workers: list[WorkerStatus]
    active_sessions: int
    recoveries: int = 0
    last_recovery_ms: int = 0
    last_recovery: str = ""
    deployments: list[DeploymentStatus] = field(default_factory=list)
    cache: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # result cache: entries, bytes, max bytes, hits, misses
    jobs_unfinished: int = 0
    job_items_running: int = 0
    jobs_off: str = ""  # why jobs are off on this coordinator

    def __str__(self) -> str:  # print(status): one line (repr() keeps every field)
        ready = sum(w.state == "ready" for w in self.workers)
        return (f"{self.model}: {self.state}{' - ' + self.message if self.message else ''}; {ready}/"
                f"{len(self.workers)} workers ready, {self.active_sessions} active sessions")


def vectors_of(response: coordinator_pb2.InferResponse) -> np.ndarray:
    return to_numpy(decode_tensor(response.embeddings, "embeddings")).copy()


def models_of(response: coordinator_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.name, m.family, m.num_layers, m.size_bytes, m.context_tokens, m.ready, m.task,
                      m.has_tokenizer, m.version, m.is_default, tuple(m.versions), m.replicas, m.replicas_ready,
                      m.state) for m in response.models]


def status_of(r: coordinator_pb2.GetClusterStatusResponse) -> ClusterStatus:
    workers = [WorkerStatus(w.address, w.state, w.start_layer, w.end_layer, w.weight_bytes, w.memory_budget_bytes,
                            w.rss_bytes, w.sessions, w.kv_cache_bytes, w.last_heartbeat_age_ms, w.last_error,
                            w.busy_ms, w.idle_ms, w.queue_depth, w.bytes_in, w.bytes_out, w.tokens_per_second,
                            w.replica, w.device.device, w.device.name, w.device.memory_total_bytes,
                            w.device.memory_free_bytes, dtype_from_enum(w.device.dtype) if w.device.dtype else "",
                            w.device.engine)
               for w in r.workers]
    deployments = [DeploymentStatus(
        d.name, d.version, d.source, d.is_default, d.state,
        [ReplicaStatus(x.name, x.state, x.message, tuple(x.workers), x.running, x.queued, x.outstanding_tokens,
                       x.requests, x.recoveries, x.draining,
                       tuple(PlanStage(p.worker, p.start_layer, p.end_layer, p.seconds_per_layer, p.compute_s,
                                       p.hop_s, p.weight_bytes, p.memory_budget_bytes, p.rtt_s,
                                       p.bandwidth_bytes_per_s, p.threads) for p in x.plan), x.plan_basis)
         for x in d.replicas],
        d.min_replicas, d.max_replicas, d.target_queue, tuple(d.events)) for d in r.deployments]
    return ClusterStatus(r.model, r.ready, r.state, r.message, workers, r.active_sessions, r.recoveries,
                         r.last_recovery_ms, r.last_recovery, deployments,
                         (r.cache_entries, r.cache_bytes, r.cache_max_bytes, r.cache_hits, r.cache_misses),
                         r.jobs_unfinished, r.job_items_running, r.jobs_off)
