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

Restarts: a Generate stream whose connection breaks (its coordinator died or restarted) resumes on its own
within its deadline: the request goes again with the token ids already received, and the caller sees the
tokens an undisturbed run gives, none twice (shardline.client_calls.Resuming; GenerateResult.resumed counts
the breaks), waiting up to 30 s for the coordinator to be back. A stream that had not begun when its
connection broke, and the coordinator's own UNAVAILABLE answers, are raised at once, as before, except while a
stream resumes: then they are waited through.

Message sizes: the client's channels accept responses up to MAX_RESPONSE_BYTES (64 MiB, the most the
coordinator sends: an Infer of 1024 embeddings of up to 16384 floats). Requests larger than the
coordinator's `max_request_bytes` (4 MiB by default) are refused with ResourceExhausted.

`AsyncClient` has every call of `Client` (the same names, arguments, values and errors), awaited;
generate(stream=True) gives an async iterator. Both are thin methods over one table of calls
(shardline.client_calls): how each call's arguments become its request, and its reply the value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from shardline import client_calls as calls
from shardline.client_calls import (
    POOLING,
    SERVICE,
    Message,
    Probe,
    Sleep,
    Step,
    Steps,
    Stream,
    generate_request,
    infer_request,
)
from shardline.client_channel import CHANNEL_OPTIONS, DEFAULT_TIMEOUT_S, Connection, TLSOption
from shardline.client_types import (
    ClusterStatus,
    DeploymentStatus,
    Embeddings,
    GenerateChunk,
    GenerateResult,
    Logprob,
    ModelInfo,
    PlanStage,
    ReplicaStatus,
    ToolCall,
    WorkerStatus,
)
from shardline.errors import DeadlineExceeded, ShardlineError, from_rpc_error
from shardline.jobs import JobItemResult, JobStatus
from shardline.leader import Redirect

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TIMEOUT_S", "POOLING", "SERVICE", "AsyncClient", "Client", "ClusterStatus",
           "DeploymentStatus", "Embeddings", "GenerateChunk", "GenerateResult", "Logprob", "Message", "ModelInfo",
           "PlanStage", "ReplicaStatus", "TLSOption", "ToolCall", "WorkerStatus", "generate_request", "infer_request"]

T = TypeVar("T")
CONNECT_EACH_S = 1.0  # resuming with several coordinators: how long each is given to accept a connection
STANDBY_PAUSE_S = 0.2  # a stream waiting at a standby for the election asks again this often (it costs nothing)


def standby_pause(err: grpc.RpcError, resuming: calls.Resuming) -> float | None:
    """The pause before a stream asks again (the resume rules'; None: the result is whole). At a standby
    (waiting for a new leader) no more than STANDBY_PAUSE_S, and the next pauses start small again: the new
    leader, not ready for a moment, is asked again soon, and the stream resumes within that of the election."""
    pause = resuming.after(err)
    if pause is None or not Redirect.of(err).standby:
        return pause
    resuming.pause = min(resuming.pause, 0.05)
    return min(pause, STANDBY_PAUSE_S)


class Client(Connection):
    """A blocking client. `timeout` (seconds) is the default deadline of every call; `api_key`, `tls` and
    `client_name` as the module's docstring says."""

    aio = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._route.all_channels():
            channel.close()

    def _run(self, steps: Steps[T]) -> T:
        """A call of the table, driven: each step done, its outcome sent back; the call's value returned."""
        try:
            step = next(steps)
            while True:
                try:
                    outcome = self._do(step)
                except ShardlineError as exc:  # the call may wait it out (wait_job, across a failover)
                    step = steps.throw(exc)
                    continue
                step = steps.send(outcome)
        except StopIteration as done:
            value: T = done.value
            return value

    def _do(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Probe):
            used = self.channel
            try:
                serving = step.serving(self.health.Check(step.request, timeout=step.timeout))
            except grpc.RpcError as err:
                self._switch(err, used)  # several coordinators: the next probe asks the next one
                return False
            if not serving and self._several():  # a standby, or a leader not ready yet: a standby names the leader
                try:
                    self.stub.ListModels(calls.LIST_MODELS, timeout=step.timeout)
                except grpc.RpcError as err:
                    self._switch(err, used)
            return serving
        used, stub = self._authorized()
        try:
            return self._call(step, stub)
        except grpc.RpcError as err:
            if not self._switch(err, used):
                raise from_rpc_error(err) from err
        try:  # a standby named the leader: the call goes there
            return self._call(step)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _stream(self, call: Stream, stream: bool) -> Any:
        result = GenerateResult.of(call.request)
        resuming = calls.Resuming(call, result, call.timeout or self.timeout, several=len(self.endpoints) > 1)
        used, stub = self._authorized()
        # started now, not at the first read: streams opened together run together
        chunks = self._chunks(resuming, used, self._generate(resuming.request(), resuming.remaining(), stub))
        if stream:
            return chunks
        for _ in chunks:
            pass
        return result

    def _chunks(self, resuming: calls.Resuming, used: Any, responses: Any) -> Iterator[GenerateChunk]:
        """The stream's chunks as they arrive; a stream that breaks resumes (calls.Resuming)."""
        redirected = False
        while True:
            try:
                for response in responses:
                    resuming.resumed()
                    redirected = False
                    yield resuming.result.add(response)
                return
            except grpc.RpcError as err:
                # a standby named the leader: sent there at once (once in a row: standbys naming each other do not
                # spin); else the resume rules (and, with several coordinators, the next one when this one cannot
                # be reached)
                follow = self._switch(err, used) and not redirected
                redirected = follow
                pause = 0.0 if follow else standby_pause(err, resuming)
            finally:  # closed early: the coordinator frees the stream now, not at GC
                responses.cancel()
            if pause is None:
                return
            time.sleep(pause)
            self._connected(resuming)
            used, stub = self._authorized()
            responses = self._generate(resuming.request(), resuming.remaining(), stub)

    def _connected(self, resuming: calls.Resuming) -> None:
        """A coordinator reached again (a connection), within the break's window: with several, each is given
        a second before the next is tried."""
        while True:
            ready = grpc.channel_ready_future(self.channel)
            try:
                ready.result(timeout=min(resuming.window(), CONNECT_EACH_S if self._several() else 1e9))
                return
            except grpc.FutureTimeoutError:
                if resuming.window() <= 0.001:
                    raise resuming.gone(resuming.broke) from None
                self._switch(None, self.channel)
            finally:
                ready.cancel()

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False, timeout: float | None = None,
                 **params: Any) -> Any:
        """Text for a prompt (a string, or token ids): a GenerateResult, or with stream=True an iterator of
        GenerateChunk. `params`:
        model, max_tokens, temperature, top_k, top_p, seed, stop, min_tokens, ignore_eos (generate_request)."""
        return self._stream(calls.generate(prompt, timeout=timeout, **params), stream)

    def chat(self, messages: Sequence[Message], *, stream: bool = False, timeout: float | None = None,
             **params: Any) -> Any:
        """Like generate, for chat messages ({"role": ..., "content": ...}); the model's template applies."""
        return self._stream(calls.chat(messages, timeout=timeout, **params), stream)

    def embed(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
              timeout: float | None = None, truncate: bool = False) -> np.ndarray:
        """One vector per text ([len(texts), hidden] float32) from an encoder model (Infer); `model` names
        it (name or name@version) when the cluster serves several. A text longer than the model's positions
        is refused (InvalidArgument), unless `truncate` (then it is cut: `embeddings()` says how many were)."""
        return self._run(calls.embed(texts, pooling=pooling, normalize=normalize, model=model, timeout=timeout,
                                     truncate=truncate))

    def embeddings(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
                   timeout: float | None = None, truncate: bool = False) -> Embeddings:
        """As embed, with the tokens the encoder processed (usage) and how many texts were truncated."""
        return self._run(calls.embeddings(texts, pooling=pooling, normalize=normalize, model=model,
                                          timeout=timeout, truncate=truncate))

    def list_models(self) -> list[ModelInfo]:
        return self._run(calls.list_models())

    def cluster_status(self) -> ClusterStatus:
        return self._run(calls.cluster_status())

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the coordinator reports SERVING (every shard loaded and verified); DeadlineExceeded
        saying why when the cause is a usual one (nothing listens, TLS on one side only, another CA)."""
        try:
            return self._run(calls.wait_ready(timeout))
        except DeadlineExceeded as exc:
            reason = self._unreachable()
            raise DeadlineExceeded(f"{exc.message}: {reason}" if reason else exc.message) from None

    def drain_worker(self, address: str) -> str:
        """Admin: move a worker's layers elsewhere without failing a request; returns what was done."""
        return self._run(calls.drain_worker(address))

    def rebalance(self) -> str:
        """Admin: re-plan onto up to the configured number of workers, folding in spares."""
        return self._run(calls.rebalance())

    def load_model(self, name: str, *, version: str = "", source: str = "", replicas: int = 1, workers: int = 0,
                   promote: bool = False, min_replicas: int = 0, max_replicas: int = 0, target_queue: float = 0,
                   scale_up_after_s: float = 0, scale_down_after_s: float = 0, timeout: float | None = None) -> str:
        """Admin: deploy `source` (a model in the store; default `name`) as name@version on free workers while
        everything else serves; returns once a replica serves. `promote`: then make it the name's default.
        `max_replicas` > 0 turns autoscaling on."""
        return self._run(calls.load_model(
            name, version=version, source=source, replicas=replicas, workers=workers, promote=promote,
            min_replicas=min_replicas, max_replicas=max_replicas, target_queue=target_queue,
            scale_up_after_s=scale_up_after_s, scale_down_after_s=scale_down_after_s, timeout=timeout))

    def unload_model(self, model: str, *, grace_s: float | None = None,
                     timeout: float | None = None) -> tuple[str, int]:
        """Admin: drain `model` (name@version) for up to `grace_s` (None: the coordinator's default), then
        free its workers; returns (what happened, weight bytes freed)."""
        return self._run(calls.unload_model(model, grace_s=grace_s, timeout=timeout))

    def scale_model(self, model: str, replicas: int, *, grace_s: float | None = None,
                    timeout: float | None = None) -> str:
        """Admin: give `model` (name or name@version) this many replicas. Removed ones are drained: their
        streams have `grace_s` (None: the coordinator's default) to finish, then move to another by replay."""
        return self._run(calls.scale_model(model, replicas, grace_s=grace_s, timeout=timeout))

    def promote_model(self, model: str, *, timeout: float | None = None) -> str:
        """Admin: make name@version its name's default, atomically; returns the previous default version."""
        return self._run(calls.promote_model(model, timeout=timeout))

    def submit_job(self, items: Iterable[Any], *, model: str = "", label: str = "",
                   timeout: float | None = None) -> str:
        """Store a job and return its id at once. `items`: dicts as a job file's lines (see shardline.jobs),
        GenerateRequest / InferRequest (generate_request(), infer_request()) or JobItem; `model` is for the
        items that name none. One bad item refuses the whole job (InvalidArgument naming it)."""
        return self._run(calls.submit_job(items, model=model, label=label, timeout=timeout))

    def submit_job_file(self, path: str, *, model: str = "", label: str = "", timeout: float | None = None) -> str:
        """A job from a JSON Lines file (see shardline.jobs)."""
        return self._run(calls.submit_job_file(path, model=model, label=label, timeout=timeout))

    def get_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return self._run(calls.get_job(job_id, timeout=timeout))

    def job_results(self, job_id: str, *, timeout: float | None = None) -> list[JobItemResult]:
        """Every item's result, in order (fetched a page at a time)."""
        return self._run(calls.job_results(job_id, timeout=timeout))

    def list_jobs(self, *, limit: int = 100, timeout: float | None = None) -> list[JobStatus]:
        return self._run(calls.list_jobs(limit=limit, timeout=timeout))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return self._run(calls.cancel_job(job_id, timeout=timeout))

    def wait_job(self, job_id: str, timeout: float = 3600.0, poll_s: float = 0.5) -> JobStatus:
        """Block until the job has finished (completed or cancelled); DeadlineExceeded after `timeout`."""
        return self._run(calls.wait_job(job_id, timeout, poll_s))


class AsyncClient(Connection):
    """The asyncio client: every call of Client (the same names, arguments, values and errors), awaited;
    generate(stream=True) and chat(stream=True) give an async iterator."""

    aio = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._route.all_channels():
            await channel.close(None)

    async def _run(self, steps: Steps[T]) -> T:
        """A call of the table, driven: each step awaited, its outcome sent back; the call's value returned."""
        try:
            step = next(steps)
            while True:
                try:
                    outcome = await self._do(step)
                except ShardlineError as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(outcome)
        except StopIteration as done:
            value: T = done.value
            return value

    async def _do(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, Probe):
            used = self.channel
            try:
                serving = step.serving(await self.health.Check(step.request, timeout=step.timeout))
            except grpc.RpcError as err:
                self._switch(err, used)
                return False
            if not serving and self._several():
                try:
                    await self.stub.ListModels(calls.LIST_MODELS, timeout=step.timeout)
                except grpc.RpcError as err:
                    self._switch(err, used)
            return serving
        used, stub = self._authorized()
        try:
            return await self._call(step, stub)
        except grpc.RpcError as err:
            if not self._switch(err, used):
                raise from_rpc_error(err) from err
        try:  # a standby named the leader: the call goes there
            return await self._call(step)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def _stream(self, call: Stream, stream: bool) -> Any:
        result = GenerateResult.of(call.request)
        resuming = calls.Resuming(call, result, call.timeout or self.timeout, several=len(self.endpoints) > 1)
        used, stub = self._authorized()
        chunks = self._chunks(resuming, used, self._generate(resuming.request(), resuming.remaining(), stub))
        if stream:
            return chunks
        async for _ in chunks:
            pass
        return result

    async def _chunks(self, resuming: calls.Resuming, used: Any, responses: Any) -> AsyncIterator[GenerateChunk]:
        """As Client._chunks, awaited; closed early (aclose, a cancelled task), the call is cancelled at once."""
        redirected = False
        while True:
            try:
                async for response in responses:
                    resuming.resumed()
                    redirected = False
                    yield resuming.result.add(response)
                return
            except grpc.RpcError as err:
                follow = self._switch(err, used) and not redirected
                redirected = follow
                pause = 0.0 if follow else standby_pause(err, resuming)
            finally:
                responses.cancel()
            if pause is None:
                return
            await asyncio.sleep(pause)
            await self._connected(resuming)
            used, stub = self._authorized()
            responses = self._generate(resuming.request(), resuming.remaining(), stub)

    async def _connected(self, resuming: calls.Resuming) -> None:
        """As Client._connected, awaited."""
        while True:
            try:
                await asyncio.wait_for(self.channel.channel_ready(),
                                       min(resuming.window(), CONNECT_EACH_S if self._several() else 1e9))
                return
            except TimeoutError:
                if resuming.window() <= 0.001:
                    raise resuming.gone(resuming.broke) from None
                self._switch(None, self.channel)

    async def generate(self, prompt: str | Sequence[int], *, stream: bool = False, timeout: float | None = None,
                       **params: Any) -> Any:
        """As Client.generate (the same `params`), awaited; stream=True gives an async iterator."""
        return await self._stream(calls.generate(prompt, timeout=timeout, **params), stream)

    async def chat(self, messages: Sequence[Message], *, stream: bool = False, timeout: float | None = None,
                   **params: Any) -> Any:
        return await self._stream(calls.chat(messages, timeout=timeout, **params), stream)

    async def embed(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True, model: str = "",
                    timeout: float | None = None, truncate: bool = False) -> np.ndarray:
        return await self._run(calls.embed(texts, pooling=pooling, normalize=normalize, model=model,
                                           timeout=timeout, truncate=truncate))

    async def embeddings(self, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True,
                         model: str = "", timeout: float | None = None, truncate: bool = False) -> Embeddings:
        return await self._run(calls.embeddings(texts, pooling=pooling, normalize=normalize, model=model,
                                                timeout=timeout, truncate=truncate))

    async def list_models(self) -> list[ModelInfo]:
        return await self._run(calls.list_models())

    async def cluster_status(self) -> ClusterStatus:
        return await self._run(calls.cluster_status())

    async def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            return await self._run(calls.wait_ready(timeout))
        except DeadlineExceeded as exc:
            reason = await asyncio.to_thread(self._unreachable)
            raise DeadlineExceeded(f"{exc.message}: {reason}" if reason else exc.message) from None

    async def drain_worker(self, address: str) -> str:
        return await self._run(calls.drain_worker(address))

    async def rebalance(self) -> str:
        return await self._run(calls.rebalance())

    async def load_model(self, name: str, *, version: str = "", source: str = "", replicas: int = 1,
                         workers: int = 0, promote: bool = False, min_replicas: int = 0, max_replicas: int = 0,
                         target_queue: float = 0, scale_up_after_s: float = 0, scale_down_after_s: float = 0,
                         timeout: float | None = None) -> str:
        return await self._run(calls.load_model(
            name, version=version, source=source, replicas=replicas, workers=workers, promote=promote,
            min_replicas=min_replicas, max_replicas=max_replicas, target_queue=target_queue,
            scale_up_after_s=scale_up_after_s, scale_down_after_s=scale_down_after_s, timeout=timeout))

    async def unload_model(self, model: str, *, grace_s: float | None = None,
                           timeout: float | None = None) -> tuple[str, int]:
        return await self._run(calls.unload_model(model, grace_s=grace_s, timeout=timeout))

    async def scale_model(self, model: str, replicas: int, *, grace_s: float | None = None,
                          timeout: float | None = None) -> str:
        return await self._run(calls.scale_model(model, replicas, grace_s=grace_s, timeout=timeout))

    async def promote_model(self, model: str, *, timeout: float | None = None) -> str:
        return await self._run(calls.promote_model(model, timeout=timeout))

    async def submit_job(self, items: Iterable[Any], *, model: str = "", label: str = "",
                         timeout: float | None = None) -> str:
        return await self._run(calls.submit_job(items, model=model, label=label, timeout=timeout))

    async def submit_job_file(self, path: str, *, model: str = "", label: str = "",
                              timeout: float | None = None) -> str:
        return await self._run(calls.submit_job_file(path, model=model, label=label, timeout=timeout))

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return await self._run(calls.get_job(job_id, timeout=timeout))

    async def job_results(self, job_id: str, *, timeout: float | None = None) -> list[JobItemResult]:
        return await self._run(calls.job_results(job_id, timeout=timeout))

    async def list_jobs(self, *, limit: int = 100, timeout: float | None = None) -> list[JobStatus]:
        return await self._run(calls.list_jobs(limit=limit, timeout=timeout))

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> JobStatus:
        return await self._run(calls.cancel_job(job_id, timeout=timeout))

    async def wait_job(self, job_id: str, timeout: float = 3600.0, poll_s: float = 0.5) -> JobStatus:
        return await self._run(calls.wait_job(job_id, timeout, poll_s))
