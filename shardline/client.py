"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a shardline coordinator.

    from shardline.client import Client

    with Client("127.0.0.1:50051") as client:
        client.wait_ready(timeout=120)
        result = client.generate("The capital of France is", max_tokens=16, temperature=0)
        print(result.text, result.finish_reason)
        for chunk in client.generate("Once upon a time", max_tokens=32, stream=True):
            print(chunk.text, end="", flush=True)

Errors raise shardline.errors exceptions whose `.code` is the grpc.StatusCode. No torch needed.

Security: `Client(target, api_key="sl_...", tls=...)`. The key travels as `authorization: Bearer <key>`;
`tls` is True (the system's CA roots), a certificates directory (its ca.crt; with `client_name`, also
client.NAME.crt/.key), or a `shardline.tls.ClientTLS` (CA, client certificate and key files). A missing or
wrong key raises Unauthenticated; a key without the role (admin calls) raises PermissionDenied; a server
certificate this client does not trust raises Unauthenticated too.

Deadlines: no call waits forever. Every call has a deadline of `timeout` seconds (the client's, default
DEFAULT_TIMEOUT_S = 300, or the call's own `timeout=`); past it the call raises DeadlineExceeded and the
coordinator frees whatever the request held. A request sent while the cluster recovers from a failure
waits for it within that deadline.

Message sizes: the client's channels accept responses up to MAX_RESPONSE_BYTES (64 MiB, the most the
coordinator sends: an Infer of 1024 embeddings of up to 16384 floats). Requests larger than the
coordinator's `max_request_bytes` (4 MiB by default) are refused with ResourceExhausted.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.codec import decode_tensor, dtype_from_enum, to_numpy
from shardline.errors import DeadlineExceeded, from_rpc_error
from shardline.jobs import FINISH, JobCalls
from shardline.limits import MAX_RESPONSE_BYTES, is_loopback
from shardline.tls import ClientTLS
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE = "shardline.v1.Coordinator"
DEFAULT_TIMEOUT_S = 300.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
Message = Mapping[str, str] | tuple[str, str]
TLSOption = bool | str | Path | ClientTLS | None


def _tls(tls: TLSOption, client_name: str) -> ClientTLS | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return ClientTLS()
    if isinstance(tls, ClientTLS):
        return tls
    return ClientTLS.from_certs_dir(tls, client_name)


def _open(target: str, tls: TLSOption, client_name: str, aio: bool) -> Any:
    """A channel to the coordinator's public port, plaintext or TLS."""
    settings = _tls(tls, client_name)
    if settings is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(target, options=CHANNEL_OPTIONS)
    options = [*CHANNEL_OPTIONS, *settings.options()]
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(target, settings.credentials(), options=options)


class _Authorized:
    """A stub whose every call carries `authorization: Bearer <key>` (when there is a key), and `metadata`."""

    def __init__(self, stub: Any, api_key: str | None, target: str = "", tls: TLSOption = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        if api_key and not tls and not is_loopback(target.rpartition(":")[0]):
            warnings.warn(f"the API key goes to {target} in plaintext: anyone on the network can read it "
                          "(give tls=)", stacklevel=3)
        if api_key is not None and (not api_key or any(c.isspace() for c in api_key) or not api_key.isascii()):
            raise ValueError("api_key must be one word of ASCII characters")
        self._stub = stub
        self._metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + metadata or None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return method if self._metadata is None else functools.partial(method, metadata=self._metadata)


@dataclass(frozen=True)
class GenerateChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None until the last chunk: "length" or "stop"
    prompt_tokens: int = 0            # usage, on the last chunk only (a stream's total, as GenerateResult's)
    completion_tokens: int = 0


@dataclass
class GenerateResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # answered from the coordinator's result cache

    def add(self, response: coordinator_pb2.GenerateResponse) -> GenerateChunk:
        finish = FINISH.get(response.finish_reason)
        usage = (response.usage.prompt_tokens, response.usage.completion_tokens) if finish else (0, 0)
        chunk = GenerateChunk(response.text, list(response.token_ids), finish, *usage)
        self.cached = self.cached or response.cached
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        if finish:
            self.finish_reason = finish
            self.prompt_tokens, self.completion_tokens = usage
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


def generate_request(prompt: str | Sequence[int] = "", messages: Sequence[Message] = (), *, model: str = "",
                     max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
                     top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = (),
                     min_tokens: int | None = None, ignore_eos: bool = False) -> coordinator_pb2.GenerateRequest:
    """The request for generate/chat. `prompt` is text, or token ids (prompt_token_ids: any model, even one
    without a tokenizer, which answers token ids and empty text). `min_tokens`: the end-of-sequence token
    and stop sequences count only after this many tokens; `ignore_eos`: the end-of-sequence token is just a
    token (run to max_tokens)."""
    chat = [coordinator_pb2.ChatMessage(role=m["role"], content=m["content"]) if isinstance(m, Mapping)
            else coordinator_pb2.ChatMessage(role=m[0], content=m[1]) for m in messages]
    text, ids = (prompt, []) if isinstance(prompt, str) else ("", [int(t) for t in prompt])
    request = coordinator_pb2.GenerateRequest(model=model, prompt=text, prompt_token_ids=ids, messages=chat,
                                              top_k=top_k, stop=list(stop), ignore_eos=ignore_eos)
    if min_tokens is not None:
        request.min_tokens = min_tokens
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    return request


POOLING = {"mean": coordinator_pb2.POOLING_MEAN, "cls": coordinator_pb2.POOLING_CLS}


def infer_request(texts: Sequence[str], pooling: str = "mean", normalize: bool = True,
                  model: str = "", truncate: bool = False) -> coordinator_pb2.InferRequest:
    """The request for embed/embeddings. A text longer than the model's positions is refused
    (INVALID_ARGUMENT, naming it and its tokens) unless `truncate`: then it is cut, and counted in the
    response's `truncated`."""
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {sorted(POOLING)}")
    return coordinator_pb2.InferRequest(texts=list(texts), pooling=POOLING[pooling], normalize=normalize,
                                        model=model, truncate=truncate)


def _vectors(response: coordinator_pb2.InferResponse) -> np.ndarray:
    return to_numpy(decode_tensor(response.embeddings, "embeddings")).copy()


def _models(response: coordinator_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.name, m.family, m.num_layers, m.size_bytes, m.context_tokens, m.ready, m.task,
                      m.has_tokenizer, m.version, m.is_default, tuple(m.versions), m.replicas, m.replicas_ready,
                      m.state) for m in response.models]


def _status(r: coordinator_pb2.GetClusterStatusResponse) -> ClusterStatus:
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


class Client(JobCalls):
    """A blocking client. `timeout` (seconds) is the default deadline of every call; `api_key`, `tls` and
    `client_name` as the module's docstring says."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = DEFAULT_TIMEOUT_S, *,
                 api_key: str | None = None, tls: TLSOption = None, client_name: str = "") -> None:
        self.channel = _open(target, tls, client_name, aio=False)
        self.stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self.channel), api_key, target, tls)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False, timeout: float | None = None,
                 **params: Any) -> Any:
        """Text for a prompt (a string, or token ids): a GenerateResult, or with stream=True an iterator of
        GenerateChunk. `params`:
        model, max_tokens, temperature, top_k, top_p, seed, stop, min_tokens, ignore_eos (generate_request)."""
        return self._run(generate_request(prompt, **params), stream, timeout)

    def chat(self, messages: Sequence[Message], *, stream: bool = False, timeout: float | None = None,
             **params: Any) -> Any:
        """Like generate, for chat messages ({"role": ..., "content": ...}); the model's template applies."""
        return self._run(generate_request("", messages, **params), stream, timeout)

    def _run(self, request: coordinator_pb2.GenerateRequest, stream: bool, timeout: float | None) -> Any:
        responses = self.stub.Generate(request, timeout=timeout or self.timeout)
        if stream:
            return self._chunks(responses)
        result = GenerateResult()
        try:
            for response in responses:
                result.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return result

    @staticmethod
    def _chunks(responses: Iterator[coordinator_pb2.GenerateResponse]) -> Iterator[GenerateChunk]:
        result = GenerateResult()
        try:
            for response in responses:
                yield result.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def embed(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
              timeout: float | None = None, truncate: bool = False) -> np.ndarray:
        """One vector per text ([len(texts), hidden] float32) from an encoder model (Infer); `model` names
        it (name or name@version) when the cluster serves several. A text longer than the model's positions
        is refused (InvalidArgument), unless `truncate` (then it is cut: `embeddings()` says how many were)."""
        return self.embeddings(texts, pooling=pooling, normalize=normalize, model=model, timeout=timeout,
                               truncate=truncate).vectors

    def embeddings(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
                   timeout: float | None = None, truncate: bool = False) -> Embeddings:
        """As embed, with the tokens the encoder processed (usage) and how many texts were truncated."""
        try:
            response = self.stub.Infer(infer_request(texts, pooling, normalize, model, truncate),
                                       timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return Embeddings(_vectors(response), response.tokens, response.truncated)

    def list_models(self) -> list[ModelInfo]:
        try:
            return _models(self.stub.ListModels(coordinator_pb2.ListModelsRequest(), timeout=self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def cluster_status(self) -> ClusterStatus:
        try:
            return _status(self.stub.GetClusterStatus(coordinator_pb2.GetClusterStatusRequest(), timeout=self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def drain_worker(self, address: str) -> str:
        """Admin: move a worker's layers elsewhere without failing a request; returns what was done."""
        try:
            reply = self.stub.DrainWorker(coordinator_pb2.DrainWorkerRequest(address=address), timeout=self.timeout)
            return str(reply.message)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def rebalance(self) -> str:
        """Admin: re-plan onto up to the configured number of workers, folding in spares."""
        try:
            return str(self.stub.Rebalance(coordinator_pb2.RebalanceRequest(), timeout=self.timeout).message)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _admin(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def load_model(self, name: str, *, version: str = "", source: str = "", replicas: int = 1, workers: int = 0,
                   promote: bool = False, min_replicas: int = 0, max_replicas: int = 0, target_queue: float = 0,
                   scale_up_after_s: float = 0, scale_down_after_s: float = 0, timeout: float | None = None) -> str:
        """Admin: deploy `source` (a model in the store; default `name`) as name@version on free workers while
        everything else serves; returns once a replica serves. `promote`: then make it the name's default.
        `max_replicas` > 0 turns autoscaling on."""
        request = coordinator_pb2.LoadModelRequest(
            name=name, version=version, source=source, replicas=replicas, workers=workers, promote=promote,
            min_replicas=min_replicas, max_replicas=max_replicas, target_queue=target_queue,
            scale_up_after_ms=int(scale_up_after_s * 1000), scale_down_after_ms=int(scale_down_after_s * 1000))
        return str(self._admin("LoadModel", request, timeout).message)

    def unload_model(self, model: str, *, grace_s: float | None = None,
                     timeout: float | None = None) -> tuple[str, int]:
        """Admin: drain `model` (name@version) for up to `grace_s` (None: the coordinator's default), then
        free its workers; returns (what happened, weight bytes freed)."""
        request = coordinator_pb2.UnloadModelRequest(model=model)
        if grace_s is not None:
            request.grace_ms = int(grace_s * 1000)
        reply = self._admin("UnloadModel", request, timeout)
        return str(reply.message), int(reply.freed_weight_bytes)

    def scale_model(self, model: str, replicas: int, *, grace_s: float | None = None,
                    timeout: float | None = None) -> str:
        """Admin: give `model` (name or name@version) this many replicas. Removed ones are drained: their
        streams have `grace_s` (None: the coordinator's default) to finish, then move to another by replay."""
        request = coordinator_pb2.ScaleModelRequest(model=model, replicas=replicas)
        if grace_s is not None:
            request.grace_ms = int(grace_s * 1000)
        return str(self._admin("ScaleModel", request, timeout).message)

    def promote_model(self, model: str, *, timeout: float | None = None) -> str:
        """Admin: make name@version its name's default, atomically; returns the previous default version."""
        return str(self._admin("PromoteModel", coordinator_pb2.PromoteModelRequest(model=model),
                               timeout).previous_version)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the coordinator reports SERVING (every shard loaded and verified)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"the cluster was not ready within {timeout:.0f} s")
            time.sleep(0.25)


class AsyncClient:
    """The asyncio client: the same calls, awaited; generate(stream=True) gives an async iterator."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = DEFAULT_TIMEOUT_S, *,
                 api_key: str | None = None, tls: TLSOption = None, client_name: str = "") -> None:
        self.channel = _open(target, tls, client_name, aio=True)
        self.stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self.channel), api_key, target, tls)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._target, self._tls = target, tls

    def with_api_key(self, api_key: str | None, metadata: tuple[tuple[str, str], ...] = ()) -> AsyncClient:
        """This client with another key (and `metadata`) on every call, over the same channel (no new
        connection): how a gateway passes each caller's key, request id and trace context on. Closing it closes
        the shared channel: close the original only. ValueError if the key is not one word of ASCII characters."""
        view = copy.copy(self)
        view.stub = _Authorized(coordinator_pb2_grpc.CoordinatorStub(self.channel), api_key, self._target, self._tls,
                                metadata)
        return view

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def generate(self, prompt: str | Sequence[int], *, stream: bool = False, timeout: float | None = None,
                       **params: Any) -> Any:
        """As Client.generate (the same `params`), awaited; stream=True gives an async iterator."""
        return await self._run(generate_request(prompt, **params), stream, timeout)

    async def chat(self, messages: Sequence[Message], *, stream: bool = False, timeout: float | None = None,
                   **params: Any) -> Any:
        return await self._run(generate_request("", messages, **params), stream, timeout)

    async def _run(self, request: coordinator_pb2.GenerateRequest, stream: bool, timeout: float | None) -> Any:
        call = self.stub.Generate(request, timeout=timeout or self.timeout)
        if stream:
            return self._chunks(call)
        result = GenerateResult()
        try:
            async for response in call:
                result.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return result

    @staticmethod
    async def _chunks(call: Any) -> AsyncIterator[GenerateChunk]:
        result = GenerateResult()
        try:
            async for response in call:
                yield result.add(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:  # closed early (aclose, a cancelled task): the coordinator frees the stream now, not at GC
            call.cancel()

    async def embed(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
                    timeout: float | None = None, truncate: bool = False) -> np.ndarray:
        return (await self.embeddings(texts, pooling=pooling, normalize=normalize, model=model,
                                      timeout=timeout, truncate=truncate)).vectors

    async def embeddings(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True,
                         model: str = "", timeout: float | None = None, truncate: bool = False) -> Embeddings:
        """As embed, with the tokens the encoder processed (usage) and how many texts were truncated."""
        try:
            response = await self.stub.Infer(infer_request(texts, pooling, normalize, model, truncate),
                                             timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return Embeddings(_vectors(response), response.tokens, response.truncated)

    async def list_models(self) -> list[ModelInfo]:
        try:
            return _models(await self.stub.ListModels(coordinator_pb2.ListModelsRequest(), timeout=self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def cluster_status(self) -> ClusterStatus:
        try:
            return _status(await self.stub.GetClusterStatus(coordinator_pb2.GetClusterStatusRequest(),
                                                            timeout=self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"the cluster was not ready within {timeout:.0f} s")
            await asyncio.sleep(0.25)
