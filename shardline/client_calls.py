"""The SDK's table of calls: each call of `Client` and `AsyncClient` described once, for both.

A call is a generator function. It builds its request proto from its arguments (and refuses bad ones, before
anything is sent), yields the steps it needs, and turns the replies into its return value:

    def promote_model(model: str, *, timeout: float | None = None) -> Steps[str]:
        reply = yield Unary("PromoteModel", coordinator_pb2.PromoteModelRequest(model=model), timeout)
        return str(reply.previous_version)

It does no I/O itself. A client drives it (`Client._run`, `AsyncClient._run`): it does each step, blocking or
awaited, sends the outcome back in and returns what the call returns. The clients own the error mapping: a
Unary step's grpc.RpcError is raised as its shardline.errors exception (from_rpc_error), into the call: one that
waits (wait_job) may catch it and try again; any other lets it go on to its caller. So a call, its
validation, paging and polling included, exists once, and the two clients cannot drift apart; both are thin
methods over this table (tests/unit/test_client_table.py holds them to the same names and signatures).

Generate is server-streaming, and its responses are read as they arrive: `generate` and `chat` describe the
request (a `Stream`); each client reads it with its own kind of iterator, through GenerateResult.add.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message as Proto
from grpc_health.v1 import health_pb2

from shardline.client_types import (
    ClusterStatus,
    Embeddings,
    GenerateResult,
    ModelInfo,
    models_of,
    status_of,
    vectors_of,
)
from shardline.errors import DeadlineExceeded, Unavailable, answered, from_rpc_error
from shardline.jobs import JobItemResult, JobStatus, as_item, items_from_jsonl
from shardline.v1 import coordinator_pb2

SERVICE = "shardline.v1.Coordinator"
Message = Mapping[str, Any] | tuple[str, str]
T = TypeVar("T")


@dataclass(frozen=True)
class Unary:
    """One unary RPC of the Coordinator service; the call receives its reply. `timeout`: None is the client's."""

    rpc: str
    request: Proto
    timeout: float | None = None


@dataclass(frozen=True)
class Probe:
    """One health check of the Coordinator service; the call receives True when it is SERVING. An error (a
    coordinator not up yet) is False, never raised."""

    request: ClassVar[health_pb2.HealthCheckRequest] = health_pb2.HealthCheckRequest(service=SERVICE)
    timeout: float = 5.0

    @staticmethod
    def serving(reply: health_pb2.HealthCheckResponse) -> bool:
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Unary | Probe | Sleep
Steps = Generator[Step, Any, T]  # a call: yields steps, receives their outcomes, returns its value


@dataclass(frozen=True)
class Stream:
    """A Generate stream: its responses, read as they arrive, are GenerateChunks (GenerateResult.add); without
    stream=True the call returns their sum, a GenerateResult."""

    request: coordinator_pb2.GenerateRequest
    timeout: float | None = None


RESUME_WINDOW_S = 30.0  # how long a broken stream waits for its coordinator to be back (within its deadline)


LIST_MODELS = coordinator_pb2.ListModelsRequest()  # the cheapest call: asked of a coordinator that is not serving


class Resuming:
    """How a Generate stream survives its coordinator going away (a restart, a dropped connection): within the
    call's deadline, the request is sent again with the token ids already received (resume_token_ids), the
    version that served it and its seed, and the stream goes on where it broke: the caller sees no gap, no
    repeat and no error. Greedy and seeded sampling continue with the tokens an undisturbed run gives.

    A stream resumes when its connection breaks (UNAVAILABLE that no shardline server sent: shardline.errors.
    answered) after its first message, which names the version serving it (a coordinator too old to resume
    names none: its stream would start over, so it is not resumed). Before that, a broken connection, and an
    UNAVAILABLE the coordinator answers itself (a cluster that cannot serve, a drain), are raised at once, as
    before; once resuming, the coordinator's UNAVAILABLE (not ready again yet) is waited through, with a pause
    that doubles up to 1 s. A coordinator that is not back within `window_s` of the break (or the call's
    deadline, if sooner) is not waited for longer: Unavailable, saying why. A break after the last message
    (only the status was lost) ends the call with the whole result. Each client drives it with its own kind of
    I/O (Client._chunks, AsyncClient._chunks): before each resumed call it waits for its channel to connect,
    at most until the window ends."""

    def __init__(self, call: Stream, result: GenerateResult, timeout: float,
                 window_s: float = RESUME_WINDOW_S, several: bool = False) -> None:
        self.call, self.result, self.timeout, self.window_s = call, result, timeout, window_s
        # several coordinators (standbys): a stream whose connection failed before its first message is sent
        # again too (to the next coordinator), as a broken one is
        self.several = several
        self.deadline = time.monotonic() + timeout
        self.until = self.deadline  # the end of the current break's window (the deadline while unbroken)
        self.broke = ""     # why the stream broke (empty while it has not)
        self.pause = 0.05

    def request(self) -> coordinator_pb2.GenerateRequest:
        """What to send now: the request, or once it broke, the request resumed after what was received."""
        if not self.broke:
            return self.call.request
        again = coordinator_pb2.GenerateRequest()
        again.CopyFrom(self.call.request)
        again.resume_token_ids[:] = self.result.token_ids
        if self.result.model:
            again.model = self.result.model
        if self.result.seed is not None:
            again.seed = self.result.seed
        return again

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def after(self, err: grpc.RpcError) -> float | None:
        """The stream ended with `err`: the seconds to wait before resuming, None when the result is whole
        already (the last message arrived, the status did not), or the error to raise."""
        if self.result.finish_reason:
            return None
        if self.call.request.n > 1 or self.call.request.tools:  # not resumed (several choices; a call's text
            raise from_rpc_error(err)                             # half read): the error is the caller's
        code, details = err.code(), err.details() or ""
        if self.broke and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.gone(details)
        # a break is the connection's doing (not the coordinator's answer), on a stream that can resume;
        # once broken, the coordinator's own UNAVAILABLE (not ready again yet) is waited through too
        broke = not answered(err) and (bool(self.result.model) or self.several)
        # resuming, a quota may still count the broken stream (its end not seen yet): waited through too
        waits = code == grpc.StatusCode.UNAVAILABLE or (self.broke and code == grpc.StatusCode.RESOURCE_EXHAUSTED)
        if not waits or not (broke or self.broke):
            raise from_rpc_error(err)
        if not self.broke:
            self.result.resumed += 1
            self.until = min(self.deadline, time.monotonic() + self.window_s)
        self.broke = details
        pause, self.pause = self.pause, min(self.pause * 2, 1.0)
        if self.until - time.monotonic() <= pause:
            raise self.gone(details)
        return pause

    def window(self) -> float:
        """Seconds left to reach the coordinator again in this break."""
        return max(self.until - time.monotonic(), 0.001)

    def resumed(self) -> None:
        """A message arrived: the stream goes on (a later break is a new one)."""
        if self.broke:
            self.broke, self.pause, self.until = "", 0.05, self.deadline

    def gone(self, details: str) -> Unavailable:
        within = min(self.window_s, self.timeout)
        return Unavailable(f"the stream broke after {len(self.result.token_ids)} tokens and could not resume "
                           f"within {within:.0f} s: {details or 'no answer'}")


def generate_request(prompt: str | Sequence[int] = "", messages: Sequence[Message] = (), *, model: str = "",
                     max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
                     top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = (),
                     min_tokens: int | None = None, ignore_eos: bool = False,
                     stop_token_ids: Iterable[int] = (), logprobs: int | None = None,
                     prompt_logprobs: int | None = None, logit_bias: Mapping[int, float] | None = None,
                     repetition_penalty: float | None = None, frequency_penalty: float = 0.0,
                     presence_penalty: float = 0.0, min_p: float = 0.0,
                     json_schema: Mapping[str, Any] | str | None = None, json_object: bool = False,
                     regex: str | None = None, grammar: str | None = None,
                     tools: Sequence[Mapping[str, Any]] = (),
                     tool_choice: str | Mapping[str, Any] = "", n: int = 1) -> coordinator_pb2.GenerateRequest:
    """The request for generate/chat. `prompt` is text, or token ids (prompt_token_ids: any model, even one
    without a tokenizer, which answers token ids and empty text). `min_tokens`: the end-of-sequence token
    and stop sequences count only after this many tokens; `ignore_eos`: the end-of-sequence token is just a
    token (run to max_tokens); `stop_token_ids`: token ids that end the stream too (ignore_eos or not).
    `logprobs=k`: each new token's log probability and the k likeliest (`result.logprobs`); `prompt_logprobs=k`:
    the prompt's tokens' too (`result.prompt_logprobs`; the first has None). `logit_bias` ({id: bias}),
    `repetition_penalty`, `frequency_penalty`, `presence_penalty` and `min_p` change the logits before sampling
    (README "Log probabilities, penalties and biases"). Structured output, one of: `json_schema` (a dict or JSON
    text), `json_object=True`, `regex`, `grammar` (Lark, llguidance's dialect) (README "Structured output").
    `tools` (chat): OpenAI's tool objects, or {"name", "description", "parameters"}; `tool_choice`: "auto", "none",
    "required", a tool's name or OpenAI's {"type": "function", "function": {"name": ...}}; the calls come back
    in `result.tool_calls` (README "Tool calls"). `n`: several choices of the prompt, prefilled once, choice i
    seeded with seed + i: `result.choices`, and each chunk's `index`."""
    chat = [chat_message(m) for m in messages]
    text, ids = (prompt, []) if isinstance(prompt, str) else ("", [int(t) for t in prompt])
    request = coordinator_pb2.GenerateRequest(model=model, prompt=text, prompt_token_ids=ids, messages=chat,
                                              top_k=top_k, stop=list(stop), ignore_eos=ignore_eos,
                                              stop_token_ids=list(stop_token_ids), logit_bias=dict(logit_bias or {}),
                                              frequency_penalty=frequency_penalty,
                                              presence_penalty=presence_penalty, min_p=min_p,
                                              json_schema=json_schema if isinstance(json_schema, str | None)
                                              else json.dumps(json_schema), json_object=json_object,
                                              regex=regex, grammar=grammar, tools=[tool_proto(t) for t in tools], n=n,
                                              tool_choice=tool_choice if isinstance(tool_choice, str)
                                              else str(tool_choice.get("function", {}).get("name", "")))
    optional = {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "repetition_penalty": repetition_penalty,
                "min_tokens": min_tokens, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed}
    for name, value in optional.items():  # proto3 optional fields: unset unless given
        if value is not None:
            setattr(request, name, value)
    return request


def chat_message(m: Message) -> coordinator_pb2.ChatMessage:
    """A message as a (role, content) pair or a mapping; a mapping may hold an assistant's tool_calls (OpenAI's
    shape, or {"id", "name", "arguments"}) or a tool message's tool_call_id."""
    if not isinstance(m, Mapping):
        return coordinator_pb2.ChatMessage(role=m[0], content=m[1])
    calls = []
    for c in m.get("tool_calls") or ():
        f = c.get("function", c)
        arguments = f.get("arguments", "{}")
        calls.append(coordinator_pb2.ToolCall(id=c.get("id", ""), name=f.get("name", ""),
                                              arguments=arguments if isinstance(arguments, str)
                                              else json.dumps(arguments)))
    return coordinator_pb2.ChatMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls,
                                       tool_call_id=m.get("tool_call_id") or "")


def tool_proto(t: Mapping[str, Any]) -> coordinator_pb2.Tool:
    f = t.get("function", t)
    parameters = f.get("parameters", {})
    return coordinator_pb2.Tool(name=f.get("name", ""), description=f.get("description") or "",
                                parameters=parameters if isinstance(parameters, str) else json.dumps(parameters))


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


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# serving

def generate(prompt: str | Sequence[int], *, timeout: float | None = None, **params: Any) -> Stream:
    return Stream(generate_request(prompt, **params), timeout)


def chat(messages: Sequence[Message], *, timeout: float | None = None, **params: Any) -> Stream:
    return Stream(generate_request("", messages, **params), timeout)


def embeddings(texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
               timeout: float | None = None, truncate: bool = False) -> Steps[Embeddings]:
    reply = yield Unary("Infer", infer_request(texts, pooling, normalize, model, truncate), timeout)
    return Embeddings(vectors_of(reply), reply.tokens, reply.truncated)


def embed(texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
          timeout: float | None = None, truncate: bool = False) -> Steps[np.ndarray]:
    found = yield from embeddings(texts, pooling=pooling, normalize=normalize, model=model, timeout=timeout,
                                  truncate=truncate)
    return found.vectors


def list_models() -> Steps[list[ModelInfo]]:
    reply = yield Unary("ListModels", coordinator_pb2.ListModelsRequest())
    return models_of(reply)


def cluster_status() -> Steps[ClusterStatus]:
    reply = yield Unary("GetClusterStatus", coordinator_pb2.GetClusterStatusRequest())
    return status_of(reply)


def wait_ready(timeout: float = 60.0) -> Steps[None]:
    deadline = time.monotonic() + timeout
    while True:
        serving = yield Probe()
        if serving:
            return
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the cluster was not ready within {timeout:.0f} s")
        yield Sleep(0.25)


# admin: the cluster's workers and its models

def drain_worker(address: str) -> Steps[str]:
    reply = yield Unary("DrainWorker", coordinator_pb2.DrainWorkerRequest(address=address))
    return str(reply.message)


def rebalance() -> Steps[str]:
    reply = yield Unary("Rebalance", coordinator_pb2.RebalanceRequest())
    return str(reply.message)


def load_model(name: str, *, version: str = "", source: str = "", replicas: int = 1, workers: int = 0,
               promote: bool = False, min_replicas: int = 0, max_replicas: int = 0, target_queue: float = 0,
               scale_up_after_s: float = 0, scale_down_after_s: float = 0,
               timeout: float | None = None) -> Steps[str]:
    request = coordinator_pb2.LoadModelRequest(
        name=name, version=version, source=source, replicas=replicas, workers=workers, promote=promote,
        min_replicas=min_replicas, max_replicas=max_replicas, target_queue=target_queue,
        scale_up_after_ms=_ms(scale_up_after_s), scale_down_after_ms=_ms(scale_down_after_s))
    reply = yield Unary("LoadModel", request, timeout)
    return str(reply.message)


def unload_model(model: str, *, grace_s: float | None = None, timeout: float | None = None) -> Steps[tuple[str, int]]:
    request = coordinator_pb2.UnloadModelRequest(model=model)
    if grace_s is not None:
        request.grace_ms = _ms(grace_s)
    reply = yield Unary("UnloadModel", request, timeout)
    return str(reply.message), int(reply.freed_weight_bytes)


def scale_model(model: str, replicas: int, *, grace_s: float | None = None,
                timeout: float | None = None) -> Steps[str]:
    request = coordinator_pb2.ScaleModelRequest(model=model, replicas=replicas)
    if grace_s is not None:
        request.grace_ms = _ms(grace_s)
    reply = yield Unary("ScaleModel", request, timeout)
    return str(reply.message)


def promote_model(model: str, *, timeout: float | None = None) -> Steps[str]:
    reply = yield Unary("PromoteModel", coordinator_pb2.PromoteModelRequest(model=model), timeout)
    return str(reply.previous_version)


# jobs (shardline.jobs: job files, items, JobStatus and JobItemResult)

def submit_job(items: Iterable[Any], *, model: str = "", label: str = "", timeout: float | None = None) -> Steps[str]:
    request = coordinator_pb2.SubmitJobRequest(model=model, label=label, items=[as_item(i) for i in items])
    reply = yield Unary("SubmitJob", request, timeout)
    return str(reply.job_id)


def submit_job_file(path: str, *, model: str = "", label: str = "", timeout: float | None = None) -> Steps[str]:
    with open(path, encoding="utf-8") as f:
        items = items_from_jsonl(f.read())
    job_id = yield from submit_job(items, model=model, label=label or path, timeout=timeout)
    return job_id


def get_job(job_id: str, *, timeout: float | None = None) -> Steps[JobStatus]:
    reply = yield Unary("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id), timeout)
    return JobStatus.of(reply.job)


def job_results(job_id: str, *, timeout: float | None = None) -> Steps[list[JobItemResult]]:
    results: list[JobItemResult] = []
    offset = 0
    while True:
        request = coordinator_pb2.GetJobRequest(job_id=job_id, results=True, offset=offset)
        page = yield Unary("GetJob", request, timeout)
        results += [JobItemResult.of(r) for r in page.results]
        if not page.next_offset:
            return results
        offset = page.next_offset


def list_jobs(*, limit: int = 100, timeout: float | None = None) -> Steps[list[JobStatus]]:
    reply = yield Unary("ListJobs", coordinator_pb2.ListJobsRequest(limit=limit), timeout)
    return [JobStatus.of(j) for j in reply.jobs]


def cancel_job(job_id: str, *, timeout: float | None = None) -> Steps[JobStatus]:
    reply = yield Unary("CancelJob", coordinator_pb2.CancelJobRequest(job_id=job_id), timeout)
    return JobStatus.of(reply.job)


def wait_job(job_id: str, timeout: float = 3600.0, poll_s: float = 0.5) -> Steps[JobStatus]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = yield from get_job(job_id)
        except (Unavailable, DeadlineExceeded) as exc:  # the coordinator restarts, or a standby takes over (a
            # paused leader does not answer): asked again until the deadline
            if time.monotonic() + poll_s >= deadline:
                raise DeadlineExceeded(f"job {job_id}: no answer on it within {timeout:.0f} s (the last: "
                                       f"{exc.message})") from exc
            yield Sleep(poll_s)
            continue
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"job {job_id} did not finish within {timeout:.0f} s ({status.done} of "
                                   f"{status.total} done)")
        yield Sleep(poll_s)
