"""Continuous batching over a pipeline of stages: the scheduler's decisions, as a synchronous policy.

`schedule(group)` returns a step plan of domain values and `update(plan, outcome)` applies what the chain
answered; nothing here awaits, touches the network or holds a protobuf message, so unit and property tests
drive it by the thousand (tests/unit/test_scheduler_policy.py). The driver (driver.py) runs one loop per
micro-batch group: it sends each plan through the chain, feeds the outcome back, and performs the two effects
the policy asks for through `Effects` (wake a group, end sessions on every stage).

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
token an undisturbed run gives).

Memory is admitted, not hoped for: each stage reports its KV capacity in blocks after loading, and the
policy accounts every stream's blocks (the same on every stage). A stream is admitted when the chain has
room for its prompt plus `reserve_tokens`; it takes more blocks as it grows. When the blocks run out, the
most recently admitted stream is preempted: its caches are freed on every stage, and it goes back to the
head of the queue to resume later by re-prefill (the same replay as failover, so its output is identical).
A request that could never fit alone is refused up front.

Two priorities: interactive streams (every RPC) and background streams (job items, coordinator/jobs/runner.py). A
background stream is admitted only when no interactive one waits, and it is the first to go: an interactive
stream that finds no room (every slot taken, or KV short) preempts the most recently admitted background
stream, which resumes later by replay. Background streams never preempt interactive ones. While interactive
streams run, a step carries at most `background_share` background tokens per interactive token of that step
(rounded down: 0.5 lets a step grow by half at most, and a step of one decode token carries none); with no
interactive stream, background streams have every step.

Between a plan and its update other groups step and streams are preempted, stopped or rewound; `update`
applies a slice only while its stream still has the session id the slice was planned under and is not done.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable

from coordinator.serving.prefix import PrefixIndex, blocks_to_name, start_past_prefix
from coordinator.serving.streams import (
    Constraint,
    Effects,
    KVBudget,
    NoEffects,
    Release,
    Sampling,
    Slice,
    StepOutcome,
    StepPlan,
    Stream,
    StreamEvents,
    StreamState,
)
from shardline.errors import Internal, InvalidArgument, NotFound, ResourceExhausted, ShardlineError, Unavailable

log = logging.getLogger(__name__)

MAX_FAILURES = 8  # a stream whose chain fails more often than this fails rather than loop forever
MAX_SHARES = 1024  # callers remembered by the fair queue before those already served are forgotten


class SchedulingPolicy:
    def __init__(self, groups: int, max_active: int = 64, max_queued: int = 256, prefill_chunk: int = 256,
                 max_step_tokens: int = 2048, reserve_tokens: int = 16, background_share: float = 0.5,
                 metrics: StreamEvents | None = None, prefix_cache: bool = False, effects: Effects | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics  # queue times and preemptions (coordinator/metrics.py)
        self.effects: Effects = effects or NoEffects()
        self.clock = clock
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
        self._admissions = itertools.count()
        self.replayed = 0  # streams rewound for replay, in all
        self.preempted = 0  # streams preempted for KV memory, in all
        self._vtime = 0.0  # the fair queue's virtual time, and each caller's last finish tag (`_fair_insert`)
        self._finish: dict[str, float] = {}
        self.refused = 0  # steps of a stream a stage refused (short of KV blocks, or its cache gone), in all

    # -- what is here -----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def interactive_active(self) -> int:
        return sum(1 for g in self.groups for s in g if not s.background)

    @property
    def busy(self) -> bool:
        """A stream runs or waits here (of either priority)."""
        return bool(self.active or self.waiting or self.background)

    def streams(self) -> list[Stream]:
        """Every stream here: waiting (both queues) and running."""
        return [*self.waiting, *self.background, *(s for g in self.groups for s in g)]

    # -- requests in ------------------------------------------------------------------------------------
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

    def submit(self, session_id: str, prompt: list[int], sampling: Sampling, max_tokens: int,
               stop_ids: frozenset[int], min_tokens: int = 0, background: bool = False, trace: str = "",
               tenant: str = "", share: str = "", constraint: Constraint | None = None,
               fork_of: Stream | None = None) -> Stream:
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
                        background=background, trace=trace, queued_at=self.clock(), tenant=tenant, share=share,
                        no_prefix=sampling.needs_ids or fork_of is not None,  # (the last stage needs every id)
                        constraint=constraint, fork_of=fork_of)
        self._enqueue(stream)
        self.admit()
        return stream

    def _enqueue(self, stream: Stream, front: bool = False) -> None:
        queue = self.background if stream.background else self.waiting
        if front:
            queue.appendleft(stream)
        elif stream.background:
            queue.append(stream)
        else:
            self._fair_insert(stream)
        stream.waiting_in = queue
        stream.move(StreamState.QUEUED)

    def _fair_insert(self, stream: Stream) -> None:
        """Start-time fair queueing by tokens among the callers (issue 28.2): a stream's tag starts where its
        caller's previous stream's cost (prompt + max_tokens) ended, or at the virtual time (the tag of the last
        stream admitted) if that is later; streams are admitted by tag. One busy key's queue then takes its turn
        beside a quiet key's single request instead of in front of it; with one caller it is first come, first
        served. Preempted and adopted streams go to the head, as before (they were admitted once)."""
        start = max(self._vtime, self._finish.get(stream.share, 0.0))
        self._finish[stream.share] = start + len(stream.ids) + stream.max_tokens
        stream.vstart = start
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].vstart > start:
            i -= 1
        self.waiting.insert(i, stream)

    # -- admission and KV -------------------------------------------------------------------------------
    def _admission_blocks(self, tokens: int, left: int) -> int:
        """Room for `tokens` ids plus the reservation, but never more than the stream can still reach."""
        return self.kv.blocks_for(tokens + min(self.reserve_tokens, left)) if self.kv is not None else 0

    def _can_admit(self, tokens: int) -> bool:
        if self.active >= self.max_active or self.waiting:
            return False
        return self.kv is None or self.kv.free >= self._admission_blocks(tokens, self.reserve_tokens)

    def admit(self) -> None:
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
            wanted = 0
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
            if queue is self.waiting:
                self._advance(stream.vstart)
            stream.waiting_in = None
            stream.move(StreamState.RUNNING)
            if stream.admitted < 0 and self.metrics is not None:  # its first admission: how long it queued
                self.metrics.admitted(self.clock() - stream.queued_at, stream.background)
            stream.blocks, stream.admitted = blocks, next(self._admissions)
            i = min(range(len(self.groups)), key=lambda g: len(self.groups[g]))
            self.groups[i].append(stream)
            self.effects.wake(i)

    def _advance(self, tag: float) -> None:
        """The virtual time moves to the tag of the stream admitted; callers whose last tag ended before it
        are forgotten (they start at the virtual time anyway)."""
        self._vtime = max(self._vtime, tag)
        if len(self._finish) > MAX_SHARES:
            self._finish = {k: v for k, v in self._finish.items() if v > self._vtime}

    def _wanted(self, background: bool) -> int:
        """Blocks running streams wait for, as a stream of this priority must leave them."""
        return sum(s.wants for g in self.groups for s in g if background or not s.background)

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

    def _preempt(self, stream: Stream, for_room: bool = True) -> None:
        """Free the stream's caches on every stage and put it back at the head of the queue; it resumes by
        re-prefill of its ids under a new session id, with the same output. `for_room`: preempted to make
        room (counted as a preemption); else it replays after a stage lost its cache (counted in `failures`)."""
        for group in self.groups:
            if stream in group:
                group.remove(stream)
        old = stream.session_id
        stream.rewind(failure=False)
        if for_room:
            stream.preemptions += 1
            self.preempted += 1
            if self.metrics is not None:
                self.metrics.preempted()
            log.info("preempted %s (%d KV blocks) to make room; it resumes by re-prefill", stream.request_id,
                     stream.blocks)
        self._end([old], stream.blocks)
        stream.blocks = stream.wants = 0
        self._enqueue(stream, front=True)

    def _end(self, sessions: list[str], blocks: int = 0) -> None:
        """Free the sessions on every stage; their `blocks` count as free once every stage has answered."""
        kv = self.kv
        if kv is not None:
            kv.held -= blocks
            kv.releasing += blocks
        self.effects.end_sessions(Release(tuple(sessions), blocks, kv))

    def released(self, release: Release) -> None:
        """Every stage answered the EndSession of `release`: its blocks are free (of the budget they were
        held in, which a newer chain may have replaced), and waiting streams may use them."""
        if release.kv is not None:
            release.kv.releasing -= release.blocks
        self.admit()

    # -- chains changing under the streams -------------------------------------------------------------
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
            stream.move(StreamState.MOVING)
            self.replayed += 1
        waiting = [*self.waiting, *self.background]
        self.waiting.clear()
        self.background.clear()
        for stream in waiting:
            stream.waiting_in = None
            stream.move(StreamState.MOVING)
        return running + waiting

    def adopt(self, streams: list[Stream], front: bool = True) -> None:
        """Streams from another replica join these queues (each its priority's), in their order (at the
        head: they were admitted before anything waiting here), and replay here."""
        for stream in reversed(streams) if front else streams:
            self._enqueue(stream, front=front)
        self.admit()

    def take_waiting(self, n: int) -> list[Stream]:
        """Up to `n` of the streams waiting here (the newest), for a replica that has room."""
        taken: list[Stream] = []
        while self.waiting and len(taken) < n:
            stream = self.waiting.pop()
            stream.waiting_in = None
            stream.move(StreamState.MOVING)
            taken.append(stream)
        return taken[::-1]

    def fail_all(self, error: BaseException) -> None:
        """Every stream, running or waiting, ends with `error` (the cluster cannot serve)."""
        for stream in self.streams():
            stream.stop(error)

    def fail_group(self, group: int, error: BaseException) -> None:
        """Every stream of one group ends with `error` (the chain cannot serve it, or its step loop broke)."""
        for stream in self.groups[group]:
            stream.stop(error)

    # -- one step ---------------------------------------------------------------------------------------
    def prepare(self, group: int) -> bool:
        """Between two of the group's steps: drop its finished streams (their caches are ended on every
        stage), admit waiting streams; True when the group has streams to step."""
        # a choice that finished is kept (its cache held) while an admitted sibling waits to start as a copy of
        # it; a sibling still queued does not hold it (kept choices would fill the slots it waits for): it
        # prefills on its own
        sources = {id(s.fork_of) for g in self.groups for s in g if s.fork_of and not s.done}
        finished = [s for s in self.groups[group] if s.done and id(s) not in sources]
        if finished:
            # between this group's steps, so no step of theirs is still in the pipeline
            self.groups[group] = [s for s in self.groups[group] if not s.done or id(s) in sources]
            self._end([s.session_id for s in finished], sum(s.blocks for s in finished))
            for stream in finished:
                stream.blocks, stream.released = 0, True
        self.admit()
        return bool(self.groups[group])

    def schedule(self, group: int) -> StepPlan:
        """The group's next step: interactive streams first, each a prompt chunk or its last sampled token,
        within the step's token budget, the background share and the KV blocks (taken here, preempting when
        short). Empty when nothing can run now (every member waits for blocks being released)."""
        planned: list[tuple[Stream, int, str]] = []
        forks: dict[str, str] = {}  # a choice's session id -> the session it starts as a copy of
        budget = self.max_step_tokens
        # interactive streams first; within each priority, the callers take turns (fair share, issue 28.2)
        members = interleaved(sorted(self.groups[group], key=lambda s: s.background))
        interactive = bool(self.waiting) or any(not s.background and not s.done for g in self.groups for s in g)
        extra = budget  # background tokens this step may carry
        for stream in members:
            if stream.background and interactive:
                # the share of this step's interactive tokens, rounded down: half of one decode token is none
                extra = min(extra, int(self.background_share * sum(n for s, n, _ in planned if not s.background)))
                interactive = False  # computed once, from the interactive tokens planned
            if stream.position == 0 and stream.prefix_hashes is None and self.prefixes is not None \
                    and not stream.no_prefix:
                start_past_prefix(stream, self.prefixes)
            fork = self._fork(stream) if stream.fork_of is not None and stream.position == 0 else ""
            if fork is None:
                continue  # its sibling's prompt is not in the cache yet: it waits
            start = len(stream.pending) - 1 if fork else stream.position  # a fork feeds the prompt's last id only
            n = min(len(stream.pending) - start + stream.position, self.prefill_chunk, budget,
                    extra if stream.background else budget)
            if stream.done or n <= 0 or stream not in self.groups[group]:
                continue
            if not self._take_blocks(stream, start + n):
                continue  # waits for KV blocks (or was preempted itself)
            if fork:
                stream.position = start
                del stream.pending[:-1]
                forks[stream.session_id] = fork
            planned.append((stream, n, stream.session_id))
            budget -= n
            if stream.background:
                extra -= n
            if budget <= 0:
                break
        # a stream planned early may have been preempted to make room for a later one
        return StepPlan(group, tuple(
            Slice(s, sid, s.position, tuple(s.pending[:n]), tuple(blocks_to_name(s, n, self.prefixes)), s.prefix_tokens,
                  forks.get(sid, ""))
            for s, n, sid in planned if s.session_id == sid))

    def _fork(self, stream: Stream) -> str | None:
        """A choice not started yet whose sibling (`fork_of`) prefilled the same prompt: once the sibling's whole
        prompt is in its cache on every stage (its answer came back), the choice starts as a copy of it and feeds
        only the prompt's last id (to sample its own first token). Returns the session to copy; None: wait; "":
        the sibling ended, so the choice prefills on its own."""
        sibling, prompt = stream.fork_of, len(stream.pending)
        if sibling is None or sibling.state in (StreamState.FAILED, StreamState.CANCELLED) or sibling.released \
                or prompt < 2 or stream.done:
            stream.fork_of = None
            return ""
        if sibling.state not in (StreamState.RUNNING, StreamState.FINISHED) or sibling.position < prompt \
                or sibling.prefix_tokens:
            return None  # (a finished sibling's cache is held while this waits: `prepare`)
        return sibling.session_id

    def step_failed(self, plan: StepPlan, error: BaseException) -> None:
        """The step's message was refused as a whole (its fault, not the chain's): every stream of it hears."""
        for piece in plan.slices:
            piece.stream.stop(error)

    def update(self, plan: StepPlan, outcome: StepOutcome) -> None:
        """Apply what the chain answered: each slice's sampled token (a prompt chunk's sample is not the next
        token until the prompt is all fed), its stop, or its failure. Slices whose stream was preempted,
        rewound or stopped since the plan are stale and change nothing."""
        tokens = iter(outcome.tokens)
        scores = iter(outcome.scores)
        for piece in plan.slices:
            stream, n = piece.stream, piece.tokens
            error = outcome.errors.get(piece.session_id)
            token = next(tokens, None) if error is None else None  # consumed for stale slices too
            sampled, prompt = next(scores, (None, ())) if error is None else (None, ())
            if stream.session_id != piece.session_id or stream.done:
                continue  # preempted (or stopped) while the step ran: the result is stale
            if token is None:
                self._slice_failed(piece, error or Internal(
                    f"the chain answered {len(outcome.tokens)} tokens for {len(plan.slices)} sequences and "
                    f"{len(outcome.errors)} failures"))
                continue
            if self.prefixes is not None and piece.prefix_blocks:
                self.prefixes.add(list(piece.prefix_blocks))
            stream.prefix_tokens = 0
            stream.fork_of = None  # started: a replay prefills on its own
            stream.position += n
            del stream.pending[:n]
            for score in prompt:  # a replay scores the prompt again: the same values
                stream.prompt_scores[score.position] = score
            if stream.pending:
                continue  # mid-prefill: this chunk's sample is not the next token
            if stream.sampling.logprobs is not None:
                if sampled is None:
                    stream.stop(Internal("the last stage reported no log probabilities (is it an older worker?)"))
                    continue
                stream.scores.append(sampled)
            if stream.constraint is not None and not stream.constraint.consume(token):
                stream.stop(Internal(f"the last stage sampled {token}, which the output's grammar does not allow "
                                     "(is it an older worker?)"))
                continue
            stream.produced += 1
            stream.ids.append(token)
            stream.tokens.put_nowait(token)
            stops = stream.produced > stream.min_tokens and token in stream.stop_ids  # EOS only after min_tokens
            if stream.constraint is not None and stream.constraint.finished:
                stops = True  # the structured output is complete: nothing but its end can follow
            if stops or stream.produced >= stream.max_tokens:
                stream.stop()
            else:
                stream.pending = [token]

    def _count_refusal(self, error: ShardlineError) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.refused("kv_full" if isinstance(error, ResourceExhausted) else "cache_lost")

    def _slice_failed(self, piece: Slice, error: ShardlineError) -> None:
        """One sequence failed on a stage. A prefix a stage no longer holds, a cache that is gone (expired, its
        worker restarted) or a stage short of KV blocks is the cluster's state, not the request's: the stream
        is preempted and replays. Anything else is the request's own fault: it ends with that error, alone."""
        stream = piece.stream
        if isinstance(error, NotFound) and piece.fork_from:
            stream.fork_of = None  # its sibling's cache is gone: it replays with the whole prefill (not a failure)
            log.info("%s: %s; it prefills on its own", stream.request_id, error)
        elif isinstance(error, NotFound) and stream.prefix_tokens and self.prefixes is not None:
            # a stage no longer holds the prefix: forget it; the stream replays with the whole prefill.
            # The cluster's cache, not the request's failure: it never counts against MAX_FAILURES
            self.prefixes.forget(list(piece.prefix_blocks))
            stream.no_prefix = True
            log.info("%s: %s; it replays with the whole prefill", stream.request_id, error)
        elif isinstance(error, (NotFound, ResourceExhausted)) and stream.failures < MAX_FAILURES:
            stream.failures += 1
            self._count_refusal(error)
            log.info("%s: %s; it resumes by replay", stream.request_id, error)
        else:
            if isinstance(error, (NotFound, ResourceExhausted)):
                self._count_refusal(error)  # the last of too many: the stream fails with it
            stream.stop(error)
            return
        self._preempt(stream, for_room=False)
        self.admit()


def interleaved(streams: list[Stream]) -> list[Stream]:
    """The streams with their callers taking turns, priority by priority (interactive, then background): the
    first stream of each caller, then the second of each, and so on, each caller's in their order here. With
    one caller, the order is unchanged. A step's token budget then reaches a quiet caller's stream beside a
    busy caller's many, instead of after them."""
    out: list[Stream] = []
    for background in (False, True):
        by_share: dict[str, list[Stream]] = {}
        for stream in streams:
            if stream.background == background:
                by_share.setdefault(stream.share, []).append(stream)
        queues = list(by_share.values())
        for turn in range(max((len(q) for q in queues), default=0)):
            out.extend(q[turn] for q in queues if turn < len(q))
    return out


__all__ = ["MAX_FAILURES", "SchedulingPolicy", "interleaved"]
