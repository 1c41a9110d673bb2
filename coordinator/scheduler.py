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

Memory is admitted, not hoped for: each stage reports its KV capacity in blocks after loading, and the
scheduler accounts every stream's blocks (the same on every stage). A stream is admitted when the chain has
room for its prompt plus `reserve_tokens`; it takes more blocks as it grows. When the blocks run out, the
most recently admitted stream is preempted: its caches are freed on every stage, and it goes back to the
head of the queue to resume later by re-prefill (the same replay as failover, so its output is identical).
A request that could never fit alone is refused up front.

Two priorities: interactive streams (every RPC) and background streams (job items, coordinator/jobs.py). A
background stream is admitted only when no interactive one waits, and it is the first to go: an interactive
stream that finds no room (every slot taken, or KV short) preempts the most recently admitted background
stream, which resumes later by replay. Background streams never preempt interactive ones. While interactive
streams run, a step carries at most `background_share` background tokens per interactive token of that step
(rounded down: 0.5 lets a step grow by half at most, and a step of one decode token carries none); with no
interactive stream, background streams have every step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.chain import end_sessions
from coordinator.pipeline import RECOVERABLE, Pipeline
from coordinator.prefix import PrefixIndex, chain_hashes, reusable_tokens
from shardline.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShardlineError,
    Unavailable,
    code_from_number,
    error_for_code,
)
from shardline.v1 import worker_pb2

if TYPE_CHECKING:
    from coordinator.metrics import StreamMetrics

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
    min_tokens: int = 0  # stop ids are ordinary tokens until this many were produced
    done: bool = False
    tokens: asyncio.Queue[int | BaseException | None] = field(default_factory=asyncio.Queue)
    blocks: int = 0     # KV blocks held for this stream on every stage (as the scheduler accounts them)
    admitted: int = -1  # admission order: the most recent is preempted first
    preemptions: int = 0
    wants: int = 0      # blocks it waits for (being released by a preempted stream); admission leaves them
    waiting_in: collections.deque[Stream] | None = None  # the queue it waits in, left at once when it stops
    background: bool = False  # a job's item: admitted after every interactive stream, preempted first
    trace: str = ""     # the request span's W3C traceparent, passed to every stage with each step (tracing on)
    queued_at: float = field(default_factory=time.monotonic)  # when it was submitted (its queue time, metrics)
    prefix_hashes: list[bytes] | None = None  # its session's full prefill blocks' chain hashes (coordinator/prefix.py)
    prefix_tokens: int = 0  # its session, not started yet, starts with this many positions from the prefix store
    no_prefix: bool = False  # a stage lacked the prefix it was sent: its replay computes the whole prefill

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
        self.prefix_hashes, self.prefix_tokens = None, 0

    def stop(self, item: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.tokens.put_nowait(item)
            if self.waiting_in is not None:
                self.waiting_in.remove(self)
                self.waiting_in = None


@dataclass
class KVBudget:
    """The chain's KV memory as the scheduler accounts it: the smallest stage's blocks (every stage holds
    the same positions of a sequence). `releasing` blocks belong to sessions being ended: they are free
    once every stage has answered the EndSession."""

    block_tokens: int
    blocks_total: int
    held: int = 0
    releasing: int = 0
    stage_blocks: tuple[int, ...] = ()  # each stage's own capacity (blocks_total is the smallest; metrics)

    @property
    def free(self) -> int:
        return self.blocks_total - self.held - self.releasing

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_tokens)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks_total * self.block_tokens


MAX_FAILURES = 8  # a stream whose chain fails more often than this fails rather than loop forever


class Scheduler:
    def __init__(self, pipeline: Pipeline, groups: int, max_active: int = 64, max_queued: int = 256,
                 prefill_chunk: int = 256, max_step_tokens: int = 2048, reserve_tokens: int = 16,
                 background_share: float = 0.5, metrics: StreamMetrics | None = None,
                 prefix_cache: bool = False) -> None:
        self.pipeline = pipeline
        self.metrics = metrics  # queue times and preemptions (coordinator/metrics.py)
        self.max_active, self.max_queued = max_active, max_queued
        self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
        self.reserve_tokens = reserve_tokens
        self.background_share = background_share
        self.kv: KVBudget | None = None  # unknown (no limit) until the chain reports its capacity
        self.prefix_cache = prefix_cache
        self.prefixes: PrefixIndex | None = None  # what the chain's stages keep (with prefix_cache and a capacity)
        self.groups: list[list[Stream]] = [[] for _ in range(max(1, groups))]
        self.waiting: collections.deque[Stream] = collections.deque()     # interactive streams
        self.background: collections.deque[Stream] = collections.deque()  # job items (bounded by the runner)
        self._wake = [asyncio.Event() for _ in self.groups]
        self._kv_freed = asyncio.Event()
        self._ending: set[asyncio.Task[None]] = set()
        self._admissions = itertools.count()
        self.replayed = 0  # streams rewound for replay, in all
        self.preempted = 0  # streams preempted for KV memory, in all
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(len(self.groups))]

    @property
    def active(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def busy(self) -> bool:
        """A stream runs or waits here (of either priority)."""
        return bool(self.active or self.waiting or self.background)

    def streams(self) -> list[Stream]:
        """Every stream here: waiting (both queues) and running."""
        return [*self.waiting, *self.background, *(s for g in self.groups for s in g)]

    def set_capacity(self, kv: KVBudget | None) -> None:
        """The KV capacity of a newly installed chain (called with every stream rewound: nothing is held)."""
        self.kv = kv
        self.prefixes = PrefixIndex(kv.block_tokens, kv.blocks_total) if kv is not None and self.prefix_cache \
            else None
        for group in self.groups:
            for stream in group:
                stream.blocks = 0

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """A request that could never fit alone is refused before it is queued."""
        kv = self.kv
        if kv is not None and kv.blocks_for(prompt_tokens + max_tokens) > kv.blocks_total:
            raise InvalidArgument(
                f"the request needs {prompt_tokens + max_tokens} tokens of KV cache (prompt {prompt_tokens} + "
                f"max_tokens {max_tokens}); the cluster can hold {kv.capacity_tokens} tokens: shorten the prompt "
                "or lower max_tokens")

    def submit(self, session_id: str, prompt: list[int], sampling: worker_pb2.SamplingParams, max_tokens: int,
               stop_ids: frozenset[int], min_tokens: int = 0, background: bool = False, trace: str = "") -> Stream:
        """Queue a stream; interactive streams beyond `max_queued` waiting are refused (background ones are
        bounded by their submitter)."""
        self.check_fits(len(prompt), max_tokens)
        if not background and len(self.waiting) >= self.max_queued and not self._can_admit(len(prompt)):
            running = f"{self.active} streams running"
            if self.kv is not None:
                running += f", {self.kv.held} of {self.kv.blocks_total} KV blocks held"
            raise ResourceExhausted(f"the cluster is at capacity ({running}, {len(self.waiting)} waiting); "
                                    "try again later")
        stream = Stream(session_id, list(prompt), sampling, max_tokens, stop_ids, min_tokens=min_tokens,
                        background=background, trace=trace)
        self._enqueue(stream)
        self._admit()
        return stream

    def _enqueue(self, stream: Stream, front: bool = False) -> None:
        queue = self.background if stream.background else self.waiting
        if front:
            queue.appendleft(stream)
        else:
            queue.append(stream)
        stream.waiting_in = queue

    def _admission_blocks(self, tokens: int, left: int) -> int:
        """Room for `tokens` ids plus the reservation, but never more than the stream can still reach."""
        return self.kv.blocks_for(tokens + min(self.reserve_tokens, left)) if self.kv is not None else 0

    def _can_admit(self, tokens: int) -> bool:
        if self.active >= self.max_active or self.waiting:
            return False
        return self.kv is None or self.kv.free >= self._admission_blocks(tokens, self.reserve_tokens)

    def _admit(self) -> None:
        """Move waiting streams, oldest first (interactive ones before any background one), into the
        least-loaded groups while there is room for their prompt plus the reservation; wake those groups. An
        interactive stream without room preempts background streams until it has room."""
        while (queue := self.waiting or self.background) and (self.active < self.max_active or self.waiting):
            stream = queue[0]
            blocks = self._admission_blocks(len(stream.ids), stream.max_tokens - stream.produced)
            if self.kv is not None and blocks > self.kv.blocks_total:  # the chain shrank under it
                stream.stop(ResourceExhausted(
                    f"the request needs {len(stream.ids)} tokens of KV cache; the cluster now holds "
                    f"{self.kv.capacity_tokens} (a smaller chain took over): retry with a shorter request"))
                continue
            short = self.active >= self.max_active
            if self.kv is not None:
                # running streams waiting to grow come first: else a preempted stream, readmitted into the
                # blocks it just freed, would be preempted again and again
                # (an interactive stream heeds only interactive ones: a background stream's wish, which may
                # wait for a step it is not given while interactive streams run, never holds it back)
                wanted = self._wanted(stream.background)
                short = short or self.kv.free - wanted < blocks
            if short:
                if queue is self.background or not self._preempt_background(blocks + wanted):
                    return
                continue  # room was made (or is being released): look again
            if self.kv is not None:
                self.kv.held += blocks
            queue.popleft()
            stream.waiting_in = None
            if stream.admitted < 0 and self.metrics is not None:  # its first admission: how long it queued
                self.metrics.admitted(time.monotonic() - stream.queued_at, stream.background)
            stream.blocks, stream.admitted = blocks, next(self._admissions)
            i = min(range(len(self.groups)), key=lambda g: len(self.groups[g]))
            self.groups[i].append(stream)
            self._wake[i].set()

    def _wanted(self, background: bool) -> int:
        """Blocks running streams wait for, as a stream of this priority must leave them."""
        return sum(s.wants for g in self.groups for s in g if background or not s.background)

    @property
    def interactive_active(self) -> int:
        return sum(1 for g in self.groups for s in g if not s.background)

    def _preempt_background(self, blocks: int) -> bool:
        """Make room for an interactive stream needing `blocks`: preempt the most recently admitted
        background stream (one per call). False when there is none to preempt, or when the room is being
        released already (the stream is admitted once the EndSessions are answered)."""
        kv = self.kv
        if self.active < self.max_active and kv is not None and kv.free + kv.releasing >= blocks:
            return False  # enough is on its way back
        running = [s for g in self.groups for s in g if s.background and not s.done]
        victim = max(running, key=lambda s: s.admitted, default=None)
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _take_blocks(self, stream: Stream, positions: int) -> bool:
        """Hold the blocks `stream` needs for `positions`; preempts the most recently admitted streams when
        the chain is short. False when the stream must wait (blocks are still being released, or it was
        itself preempted)."""
        kv = self.kv
        if kv is None:
            return True
        extra = kv.blocks_for(positions) - stream.blocks
        if extra <= 0:
            return True
        while kv.free + kv.releasing < extra:
            # background streams go first; a background stream never preempts an interactive one
            running = [s for g in self.groups for s in g if not s.done and s.blocks
                       and (s.background or not stream.background)]
            victim = max(running, key=lambda s: (s.background, s.admitted), default=None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is stream:
                return False
        if kv.free < extra:
            stream.wants = extra
            return False
        kv.held += extra
        stream.blocks += extra
        stream.wants = 0
        return True

    def _preempt(self, stream: Stream) -> None:
        """Free the stream's caches on every stage and put it back at the head of the queue; it resumes by
        re-prefill of its ids under a new session id, with the same output."""
        for group in self.groups:
            if stream in group:
                group.remove(stream)
        old = stream.session_id
        stream.rewind(failure=False)
        stream.preemptions += 1
        self.preempted += 1
        if self.metrics is not None:
            self.metrics.preempted()
        log.info("preempted %s (%d KV blocks) to make room; it resumes by re-prefill", stream.request_id,
                 stream.blocks)
        self._end([old], stream.blocks)
        stream.blocks = stream.wants = 0
        self._enqueue(stream, front=True)

    def rewind(self, failure: bool) -> list[str]:
        """Rewind every running stream for replay on a new chain (called while the gate is closed and the old
        chain is retired, so no step of theirs can still count); returns the session ids whose caches the old
        chain's workers may still hold."""
        old: list[str] = []
        for group in self.groups:
            for stream in group:
                old.append(stream.session_id)
                stream.blocks = 0  # the new chain holds nothing yet; set_capacity starts its account afresh
                if stream.done:
                    continue
                stream.rewind(failure)
                self.replayed += 1
                if stream.failures > MAX_FAILURES:
                    stream.stop(Unavailable(f"the chain failed {stream.failures} times while this request ran"))
        return old

    def evacuate(self, failure: bool) -> list[Stream]:
        """Every unfinished stream leaves this scheduler, rewound to replay elsewhere (a sibling replica):
        running ones first, oldest first, then those waiting. Their caches here are freed (best effort); a
        step of theirs still in flight is stale when it returns (their session ids changed)."""
        running = sorted((s for g in self.groups for s in g if not s.done), key=lambda s: s.admitted)
        self._end([s.session_id for s in running], sum(s.blocks for s in running))
        for group in self.groups:
            group[:] = [s for s in group if s.done]
        for stream in running:
            stream.blocks = stream.wants = 0
            stream.rewind(failure)
            self.replayed += 1
        waiting = [*self.waiting, *self.background]
        self.waiting.clear()
        self.background.clear()
        for stream in waiting:
            stream.waiting_in = None
        return running + waiting

    def adopt(self, streams: list[Stream], front: bool = True) -> None:
        """Streams from another replica join these queues (each its priority's), in their order (at the
        head: they were admitted before anything waiting here), and replay here."""
        for stream in reversed(streams) if front else streams:
            self._enqueue(stream, front=front)
        self._admit()

    def take_waiting(self, n: int) -> list[Stream]:
        """Up to `n` of the streams waiting here (the newest), for a replica that has room."""
        taken: list[Stream] = []
        while self.waiting and len(taken) < n:
            stream = self.waiting.pop()
            stream.waiting_in = None
            taken.append(stream)
        return taken[::-1]

    def fail_all(self, error: BaseException) -> None:
        """Every stream, running or waiting, ends with `error` (the cluster cannot serve)."""
        for stream in self.streams():
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

    def _end(self, sessions: list[str], blocks: int = 0) -> None:
        """Free the sessions on every stage; their `blocks` count as free once every stage has answered."""
        kv, addresses = self.kv, self.pipeline.addresses
        if kv is not None:
            kv.held -= blocks
            kv.releasing += blocks

        async def end() -> None:
            try:
                await end_sessions(addresses, sessions, self.pipeline.links)
            finally:
                if kv is not None:
                    kv.releasing -= blocks
                    self._kv_freed.set()
                    self._admit()

        ending = asyncio.create_task(end())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _cycle(self, i: int) -> None:
        finished = [s for s in self.groups[i] if s.done]
        if finished:
            # between this group's steps, so no step of theirs is still in the pipeline
            self.groups[i] = [s for s in self.groups[i] if not s.done]
            self._end([s.session_id for s in finished], sum(s.blocks for s in finished))
            for stream in finished:
                stream.blocks = 0
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
        planned: list[tuple[Stream, int, str]] = []
        budget = self.max_step_tokens
        members = sorted(self.groups[i], key=lambda s: s.background)  # interactive streams first
        interactive = bool(self.waiting) or any(not s.background and not s.done for g in self.groups for s in g)
        extra = budget  # background tokens this step may carry
        for stream in members:
            if stream.background and interactive:
                # the share of this step's interactive tokens, rounded down: half of one decode token is none
                extra = min(extra, int(self.background_share * sum(n for s, n, _ in planned if not s.background)))
                interactive = False  # computed once, from the interactive tokens planned
            if stream.position == 0 and stream.prefix_hashes is None and self.prefixes is not None \
                    and not stream.no_prefix:
                self._reuse_prefix(stream, self.prefixes)
            n = min(len(stream.pending), self.prefill_chunk, budget, extra if stream.background else budget)
            if stream.done or n <= 0 or stream not in self.groups[i]:
                continue
            if not self._take_blocks(stream, stream.position + n):
                continue  # waits for KV blocks (or was preempted itself)
            planned.append((stream, n, stream.session_id))
            budget -= n
            if stream.background:
                extra -= n
            if budget <= 0:
                break
        # a stream planned early may have been preempted to make room for a later one
        batch = [(s, n, sid) for s, n, sid in planned if s.session_id == sid]
        if not batch:
            self._kv_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kv_freed.wait(), 0.05)
            return
        sequences = [worker_pb2.SequenceSlice(session_id=sid, start_position=s.position, num_tokens=n,
                                              sampling=s.sampling, traceparent=s.trace,
                                              prefix_blocks=self._prefix_blocks(s, n), prefix_tokens=s.prefix_tokens)
                     for s, n, sid in batch]
        ids = [t for s, n, _ in batch for t in s.pending[:n]]
        try:
            response = await chain.step(sequences, ids, partial=True)
        except Exception as exc:  # noqa: BLE001
            if epoch != self.pipeline.epoch:
                return  # the chain was retired under this step: its streams are rewound at the next install
            if isinstance(exc, RECOVERABLE):
                await self.pipeline.heal(epoch, exc)  # the streams are rewound by then; the next cycle replays
                return
            for stream, _, _ in batch:  # the message's fault, not the chain's: every stream of it hears of it
                stream.stop(exc)
            return
        if epoch != self.pipeline.epoch:
            return  # the chain changed under this step: its streams were rewound, the result is stale
        failed = {e.session_id: error_for_code(code_from_number(e.error.code), e.error.message)
                  for e in response.sequence_errors}
        tokens = iter(response.token_ids)
        for stream, n, sid in batch:
            error = failed.get(sid)
            token = next(tokens, None) if error is None else None
            if error is None and token is None:
                error = Internal(f"the chain answered {len(response.token_ids)} tokens for {len(batch)} sequences "
                                 f"and {len(failed)} failures")
            if stream.session_id != sid or stream.done:
                continue  # preempted (or stopped) while the step ran: the result is stale
            if error is not None:
                if isinstance(error, NotFound) and stream.prefix_tokens and self.prefixes is not None:
                    # a stage no longer holds the prefix: forget it; the stream replays with the whole prefill.
                    # The cluster's cache, not the request's failure: it never counts against MAX_FAILURES
                    self.prefixes.forget(self._prefix_blocks(stream, n))
                    stream.no_prefix = True
                    log.info("%s: %s; it replays with the whole prefill", stream.request_id, error)
                    self._preempt(stream)
                    self._admit()
                    continue
                self._sequence_failed(stream, error)
                continue
            if self.prefixes is not None and (sent := self._prefix_blocks(stream, n)):
                self.prefixes.add(sent)
            stream.prefix_tokens = 0
            stream.position += n
            del stream.pending[:n]
            if stream.pending:
                continue  # mid-prefill: this chunk's sample is not the next token
            stream.produced += 1
            stream.ids.append(token)  # type: ignore[arg-type]
            stream.tokens.put_nowait(token)  # type: ignore[arg-type]
            stops = stream.produced > stream.min_tokens and token in stream.stop_ids  # EOS only after min_tokens
            if stops or stream.produced >= stream.max_tokens:
                stream.stop()
            else:
                stream.pending = [token]  # type: ignore[list-item]

    def _reuse_prefix(self, stream: Stream, prefixes: PrefixIndex) -> None:
        """A new session: hash its full blocks, and start it past the longest prefix the stages keep."""
        stream.prefix_hashes = chain_hashes(stream.pending, prefixes.block_tokens)
        skip = reusable_tokens(len(stream.pending), prefixes.match(stream.prefix_hashes), prefixes.block_tokens)
        if skip:
            prefixes.hits += 1
            stream.prefix_tokens = stream.position = skip
            del stream.pending[:skip]

    def _prefix_blocks(self, stream: Stream, n: int) -> list[bytes]:
        """The block hashes a slice names to the stages: when its session completes blocks by the slice's end
        (to keep), or starts from the prefix store (its first slice; `prefix_tokens` says how far)."""
        hashes, prefixes = stream.prefix_hashes, self.prefixes
        if not hashes or prefixes is None:
            return []
        bt = prefixes.block_tokens
        full = min(len(hashes), max((stream.position + n) // bt, -(-stream.prefix_tokens // bt)))
        if not stream.prefix_tokens and full <= stream.position // bt:
            return []
        return hashes[:full]

    def _sequence_failed(self, stream: Stream, error: ShardlineError) -> None:
        """One sequence failed on a stage. A cache that is gone (expired, its worker restarted) or a stage
        short of KV blocks is the cluster's state, not the request's: the stream is preempted and replays.
        Anything else is the request's own fault: it ends with that error, alone."""
        if isinstance(error, (NotFound, ResourceExhausted)) and stream.failures < MAX_FAILURES:
            stream.failures += 1
            log.info("%s: %s; it resumes by replay", stream.request_id, error)
            self._preempt(stream)
            self._admit()
            return
        stream.stop(error)

    async def close(self, reason: str = "the coordinator is stopping") -> None:
        for task in self._tasks:
            task.cancel()
        self.fail_all(Unavailable(reason))
