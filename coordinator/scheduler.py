"""Continuous batching over a pipeline of stages.

Running streams are spread over as many micro-batch groups as there are stages. Each group steps on its
own: one Forward for all its members (a prompt chunk for those still prefilling, the last sampled token for
the others), then the next as soon as the reply is back. So while group A is in stage 2, group B is in
stage 1, and every stage is busy. Streams join a group and leave it between steps; prompts longer than
`prefill_chunk` are fed a chunk per step so they never stall the streams decoding beside them. A finished
or cancelled stream's KV cache is freed on every stage when its group drops it, between two steps. At most
`max_active` streams run, `max_queued` more wait, and the rest are refused with RESOURCE_EXHAUSTED.

Every stream keeps its token ids (prompt and sampled tokens). When the chain breaks, the cluster heals it and
rewinds every stream: a new session id, position 0, and all its ids to feed again; the first step after the
replayed prefill samples the next new token (sampling is seeded by seed and position, so it is the same
token an undisturbed run gives). Each group loop is supervised: a failure in one cycle fails the streams of
that cycle's batch, is logged, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field

from coordinator.chain import end_sessions
from coordinator.pipeline import RECOVERABLE, Pipeline
from shardline.errors import Internal, ResourceExhausted, ShardlineError, Unavailable
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Stream:
    """One request's sequence as the scheduler runs it. `tokens` receives each sampled id, then None
    when the scheduler stops it (end of sequence or max_tokens), or an exception."""

    request_id: str
    ids: list[int]      # every id of the sequence so far: the prompt, then each sampled token
    sampling: worker_pb2.SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    pending: list[int] = field(default_factory=list)  # ids still to feed: the prompt, then the last sample
    position: int = 0
    produced: int = 0
    replays: int = 0    # chains this stream moved to (each a new session id)
    failures: int = 0   # of which after a failure
    done: bool = False
    tokens: asyncio.Queue[int | BaseException | None] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.pending = list(self.ids)

    @property
    def session_id(self) -> str:
        """The id of this stream's caches on the workers; a replay starts a new one."""
        return f"{self.request_id}.r{self.replays}" if self.replays else self.request_id

    def rewind(self, failure: bool) -> None:
        """Start over on a new chain: feed every id again, under a new session id."""
        self.replays += 1
        self.failures += failure
        self.position = 0
        self.pending = list(self.ids)

    def stop(self, item: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.tokens.put_nowait(item)


MAX_FAILURES = 8  # a stream whose chain fails more often than this fails rather than loop forever


class Scheduler:
    def __init__(self, pipeline: Pipeline, groups: int, max_active: int = 64, max_queued: int = 256,
                 prefill_chunk: int = 256, max_step_tokens: int = 2048) -> None:
        self.pipeline = pipeline
        self.max_active, self.max_queued = max_active, max_queued
        self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
        self.groups: list[list[Stream]] = [[] for _ in range(max(1, groups))]
        self.waiting: collections.deque[Stream] = collections.deque()
        self._wake = [asyncio.Event() for _ in self.groups]
        self._ending: set[asyncio.Task[None]] = set()
        self.replayed = 0  # streams rewound for replay, in all
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(len(self.groups))]

    @property
    def active(self) -> int:
        return sum(len(g) for g in self.groups)

    def submit(self, session_id: str, prompt: list[int], sampling: worker_pb2.SamplingParams, max_tokens: int,
               stop_ids: frozenset[int]) -> Stream:
        if self.active >= self.max_active and len(self.waiting) >= self.max_queued:
            raise ResourceExhausted(f"the cluster is at capacity ({self.max_active} streams running, "
                                    f"{self.max_queued} waiting); try again later")
        stream = Stream(session_id, list(prompt), sampling, max_tokens, stop_ids)
        self.waiting.append(stream)
        self._admit()
        return stream

    def _admit(self) -> None:
        """Move waiting streams into the least-loaded groups, and wake those groups."""
        while self.waiting and self.active < self.max_active:
            stream = self.waiting.popleft()
            if stream.done:
                continue
            i = min(range(len(self.groups)), key=lambda g: len(self.groups[g]))
            self.groups[i].append(stream)
            self._wake[i].set()

    def rewind(self, failure: bool) -> list[str]:
        """Rewind every running stream for replay on a new chain (called while the gate is closed and the old
        chain is retired, so no step of theirs can still count); returns the session ids whose caches the old
        chain's workers may still hold."""
        old: list[str] = []
        for group in self.groups:
            for stream in group:
                old.append(stream.session_id)
                if stream.done:
                    continue
                stream.rewind(failure)
                self.replayed += 1
                if stream.failures > MAX_FAILURES:
                    stream.stop(Unavailable(f"the chain failed {stream.failures} times while this request ran"))
        return old

    def fail_all(self, error: BaseException) -> None:
        """Every stream, running or waiting, ends with `error` (the cluster cannot serve)."""
        for stream in [*self.waiting, *(s for g in self.groups for s in g)]:
            stream.stop(error)

    async def _run(self, i: int) -> None:
        """Group i's loop, supervised: an unexpected error fails that cycle's streams only."""
        while True:
            try:
                await self._cycle(i)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged with its traceback; the loop goes on
                log.exception("micro-batch group %d failed; its streams end with INTERNAL", i)
                for stream in self.groups[i]:
                    stream.stop(Internal("internal error; the server log has the details"))
                await asyncio.sleep(0.05)

    def _end(self, sessions: list[str]) -> None:
        ending = asyncio.create_task(end_sessions(self.pipeline.addresses, sessions))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _cycle(self, i: int) -> None:
        finished = [s.session_id for s in self.groups[i] if s.done]
        if finished:
            # between this group's steps, so no step of theirs is still in the pipeline
            self.groups[i] = [s for s in self.groups[i] if not s.done]
            self._end(finished)
        self._admit()
        if not self.groups[i]:
            self._wake[i].clear()
            await self._wake[i].wait()
            return
        try:
            chain = await self.pipeline.wait_open()  # closed while the cluster heals: streams wait, not fail
        except ShardlineError as exc:  # the cluster cannot serve: say why, to every stream of the group
            for stream in self.groups[i]:
                stream.stop(exc)
            return
        epoch = self.pipeline.epoch
        batch: list[tuple[Stream, int]] = []
        budget = self.max_step_tokens
        for stream in self.groups[i]:
            n = min(len(stream.pending), self.prefill_chunk, budget)
            if stream.done or n <= 0:
                continue
            batch.append((stream, n))
            budget -= n
            if budget <= 0:
                break
        if not batch:
            return
        sequences = [worker_pb2.SequenceSlice(session_id=s.session_id, start_position=s.position, num_tokens=n,
                                              sampling=s.sampling) for s, n in batch]
        ids = [t for s, n in batch for t in s.pending[:n]]
        try:
            response = await chain.step(sequences, ids)
        except Exception as exc:  # noqa: BLE001
            if epoch != self.pipeline.epoch:
                return  # the chain was retired under this step: its streams are rewound at the next install
            if isinstance(exc, RECOVERABLE):
                await self.pipeline.heal(epoch, exc)  # the streams are rewound by then; the next cycle replays
                return
            for stream, _ in batch:  # the request's fault, not the chain's: every stream of the step hears of it
                stream.stop(exc)
            return
        if epoch != self.pipeline.epoch:
            return  # the chain changed under this step: its streams were rewound, the result is stale
        for (stream, n), token in zip(batch, response.token_ids, strict=True):
            stream.position += n
            del stream.pending[:n]
            if stream.pending or stream.done:
                continue  # mid-prefill: this chunk's sample is not the next token
            stream.produced += 1
            stream.ids.append(token)
            stream.tokens.put_nowait(token)
            if token in stream.stop_ids or stream.produced >= stream.max_tokens:
                stream.stop()
            else:
                stream.pending = [token]

    async def close(self, reason: str = "the coordinator is stopping") -> None:
        for task in self._tasks:
            task.cancel()
        self.fail_all(Unavailable(reason))
