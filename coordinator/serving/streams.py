"""The scheduler's value types: a request's stream (and its states), the chain's KV budget, what one step plans
and brings back, and what the policy asks of its driver and its metrics. Domain values only: no protobuf
message and no awaits (the driver converts at the chain)."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from coordinator.transitions import moved
from shardline.errors import ShardlineError
from shardline.scores import TokenScore

TOKEN_WAIT_S = 900.0  # the default bound on a request's wait for its next token or step (config token_wait_s)


class StreamState(StrEnum):
    QUEUED = "queued"        # waits for admission (new, preempted, or adopted from a sibling replica)
    RUNNING = "running"      # in a micro-batch group (rewound in place when its chain changes)
    MOVING = "moving"        # taken out of its replica's scheduler for a sibling's (evacuated, rebalanced)
    FINISHED = "finished"    # its last token: end of sequence, a stop id, max_tokens
    FAILED = "failed"        # ended with an error
    CANCELLED = "cancelled"  # its caller went away


_S = StreamState
ENDED = frozenset({_S.FINISHED, _S.FAILED, _S.CANCELLED})
STREAM_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    _S.QUEUED: frozenset({_S.RUNNING, _S.MOVING, _S.FAILED, _S.CANCELLED}),  # failed: it can never fit now
    _S.RUNNING: frozenset({_S.QUEUED, _S.MOVING, *ENDED}),  # queued: preempted, or replays a lost cache
    _S.MOVING: frozenset({_S.QUEUED, _S.FAILED, _S.CANCELLED}),  # failed: no sibling could take it
    _S.FINISHED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class Sampling:
    """A request's sampling values (temperature 0 = greedy; seeded by (seed, position) on the last stage)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias), sorted by id
    logprobs: int | None = None         # each new token's log probability and this many likeliest
    prompt_logprobs: int | None = None  # the prompt's tokens' too
    prompt_tokens: int = 0              # the prompt's length (frequency and presence penalties count the rest)

    @property
    def needs_ids(self) -> bool:
        """The last stage needs the sequence's ids: every slice carries its own, and the session starts at
        position 0 (never from the prefix store)."""
        return (self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)
                or self.prompt_logprobs is not None)


@dataclass(eq=False)
class Stream:
    """One request's sequence as the scheduler runs it. `tokens` receives each sampled id, then None
    when the scheduler stops it (end of sequence or max_tokens), or an exception."""

    request_id: str
    ids: list[int]      # every id of the sequence so far: the prompt, then each sampled token
    sampling: Sampling
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
    prefix_hashes: list[bytes] | None = None  # its session's full prefill blocks' chain hashes (serving/prefix.py)
    prefix_tokens: int = 0  # its session, not started yet, starts with this many positions from the prefix store
    no_prefix: bool = False  # a stage lacked the prefix it was sent: its replay computes the whole prefill
    state: StreamState = StreamState.QUEUED  # moved only along STREAM_TRANSITIONS (`move`)
    tenant: str = ""    # whose prompt: its prefix blocks are this tenant's alone (serving/prefix.py)
    share: str = ""     # whose share of the replica it uses: its caller's API key ("" = the keyless callers')
    vstart: float = 0.0  # its virtual start tag in the fair queue (policy.py `_fair_insert`)
    constraint: Constraint | None = None  # structured output: what it may produce next (serving/constraints.py)
    fork_of: Stream | None = None  # another choice of the same prompt: it starts as a copy of that one's cache
    released: bool = False  # finished, and its caches ended on every stage (no sibling can copy them)
    scores: list[TokenScore] = field(default_factory=list)  # each produced token's log probabilities (asked)
    prompt_scores: dict[int, TokenScore] = field(default_factory=dict)  # the prompt's, by position (asked)

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

    def move(self, state: StreamState) -> None:
        moved(f"stream {self.request_id}", STREAM_TRANSITIONS, self.state, state)
        self.state = state

    def stop(self, item: BaseException | None = None) -> None:
        """It ends: finished (None), or failed with `item`; its caller hears at once."""
        self._end(item, StreamState.FINISHED if item is None else StreamState.FAILED)

    def cancel(self) -> None:
        """Its caller went away (a no-op once it ended)."""
        self._end(None, StreamState.CANCELLED)

    def _end(self, item: BaseException | None, state: StreamState) -> None:
        if not self.done:
            self.done = True
            self.move(state)
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


@dataclass(frozen=True)
class Slice:
    """One stream's part of a step: `tokens` ids fed at `position` of its session."""

    stream: Stream
    session_id: str
    position: int
    ids: tuple[int, ...]
    prefix_blocks: tuple[bytes, ...] = ()  # block hashes named to the stages (coordinator/serving/prefix.py)
    prefix_tokens: int = 0                 # the session starts with this many positions from the prefix store
    fork_from: str = ""                    # the session starts as a copy of this session (another choice's)

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class StepPlan:
    """What group `group` sends through the chain in one step (empty: nothing can run now)."""

    group: int
    slices: tuple[Slice, ...]


@dataclass(frozen=True)
class StepOutcome:
    """What the chain answered for a step: one sampled id per slice that did not fail, in the plan's order,
    and the failures by session id."""

    tokens: tuple[int, ...]
    errors: dict[str, ShardlineError] = field(default_factory=dict)
    # with log probabilities asked: per token, the sampled id's (or None) and the prompt's scored in the step
    scores: tuple[tuple[TokenScore | None, tuple[TokenScore, ...]], ...] = ()


@dataclass(frozen=True)
class Release:
    """Caches to end on every stage; `blocks` of `kv` are free once every stage answered."""

    sessions: tuple[str, ...]
    blocks: int
    kv: KVBudget | None


class Constraint(Protocol):
    """Structured output's matcher, as the scheduler uses it (coordinator/serving/constraints.py)."""

    def mask(self) -> bytes:
        """The token ids allowed next, a bitmask."""

    def consume(self, token: int) -> bool:
        """Feed a produced token; False when it was not allowed."""

    @property
    def finished(self) -> bool:
        """Nothing can follow: the output is complete."""


class Effects(Protocol):
    """What the policy asks of its driver; both calls return at once (the driver does the I/O later)."""

    def wake(self, group: int) -> None:
        """Group `group` has streams to step."""

    def end_sessions(self, release: Release) -> None:
        """End these sessions on every stage; call `policy.released(release)` once every stage answered."""


class StreamEvents(Protocol):
    """Where the policy reports what metrics count (coordinator/metrics.py StreamMetrics)."""

    def admitted(self, waited_s: float, background: bool) -> None:
        """A stream's first admission, after `waited_s` in the queue."""

    def preempted(self) -> None:
        """A stream was preempted to make room."""

    def refused(self, reason: str) -> None:
        """A stage refused a stream's step ("kv_full": short of KV blocks; "cache_lost": its cache was gone);
        the stream replays."""


class NoEffects:
    """A policy without a driver (unit tests record instead)."""

    def wake(self, group: int) -> None:
        pass

    def end_sessions(self, release: Release) -> None:
        pass
