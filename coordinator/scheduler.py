"""Continuous batching over a pipeline of stages.

Running streams are spread over as many micro-batch groups as there are stages. Each group steps on its
own: one Forward for all its members (a prompt chunk for those still prefilling, the last sampled token for
the others), then the next as soon as the reply is back. So while group A is in stage 2, group B is in
stage 1, and every stage is busy. Streams join a group and leave it between steps; prompts longer than
`prefill_chunk` are fed a chunk per step so they never stall the streams decoding beside them. A finished
or cancelled stream's KV cache is freed on every stage when its group drops it, between two steps. At most
`max_active` streams run, `max_queued` more wait, and the rest are refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field

from coordinator.chain import ChainClient
from shardline.errors import ResourceExhausted, Unavailable
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Stream:
    """One request's sequence as the scheduler runs it. `tokens` receives each sampled id, then None
    when the scheduler stops it (end of sequence or max_tokens), or an exception."""

    session_id: str
    pending: list[int]  # ids still to feed: the prompt, then the last sampled token
    sampling: worker_pb2.SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    position: int = 0
    produced: int = 0
    done: bool = False
    tokens: asyncio.Queue[int | BaseException | None] = field(default_factory=asyncio.Queue)

    def stop(self, item: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.tokens.put_nowait(item)


class Scheduler:
    def __init__(self, chain: ChainClient, groups: int, max_active: int = 64, max_queued: int = 256,
                 prefill_chunk: int = 256, max_step_tokens: int = 2048) -> None:
        self.chain = chain
        self.max_active, self.max_queued = max_active, max_queued
        self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
        self.groups: list[list[Stream]] = [[] for _ in range(max(1, groups))]
        self.waiting: collections.deque[Stream] = collections.deque()
        self._wake = [asyncio.Event() for _ in self.groups]
        self._ending: set[asyncio.Task[None]] = set()
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

    async def _run(self, i: int) -> None:
        while True:
            finished = [s.session_id for s in self.groups[i] if s.done]
            if finished:
                # between this group's steps, so no step of theirs is still in the pipeline
                self.groups[i] = [s for s in self.groups[i] if not s.done]
                ending = asyncio.create_task(self.chain.end_sessions(finished))
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)
            self._admit()
            if not self.groups[i]:
                self._wake[i].clear()
                await self._wake[i].wait()
                continue
            batch: list[tuple[Stream, int]] = []
            budget = self.max_step_tokens
            for stream in self.groups[i]:
                n = min(len(stream.pending), self.prefill_chunk, budget)
                if n <= 0:
                    break
                batch.append((stream, n))
                budget -= n
            sequences = [worker_pb2.SequenceSlice(session_id=s.session_id, start_position=s.position, num_tokens=n,
                                                  sampling=s.sampling) for s, n in batch]
            ids = [t for s, n in batch for t in s.pending[:n]]
            try:
                response = await self.chain.step(sequences, ids)
            except Exception as exc:  # noqa: BLE001 - every stream of the step hears of it
                for stream, _ in batch:
                    stream.stop(exc)
                continue
            for (stream, n), token in zip(batch, response.token_ids, strict=True):
                stream.position += n
                del stream.pending[:n]
                if stream.pending or stream.done:
                    continue  # mid-prefill: this chunk's sample is not the next token
                stream.produced += 1
                stream.tokens.put_nowait(token)
                if token in stream.stop_ids or stream.produced >= stream.max_tokens:
                    stream.stop()
                else:
                    stream.pending = [token]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in [*self.waiting, *(s for g in self.groups for s in g)]:
            stream.stop(Unavailable("the cluster is redeploying; try again"))
