"""The scheduler's driver: one supervised loop per micro-batch group runs the policy (policy.py) against the
replica's chain. It converts to protos only here, at the chain: a plan's slices become `SequenceSlice`s and
the chain's answer a `StepOutcome`. It performs the policy's effects: waking a group's loop, and ending
sessions on every stage (whose blocks the policy counts free once every stage answered)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from coordinator.serving.chain import end_sessions
from coordinator.serving.pipeline import RECOVERABLE, Pipeline
from coordinator.serving.policy import SchedulingPolicy
from coordinator.serving.streams import Release, Sampling, Slice, StepOutcome, StepPlan, StreamEvents
from shardline.errors import Internal, ShardlineError, Unavailable, code_from_number, error_for_code
from shardline.scores import TokenScore
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)  # built once per request's values, not once per slice per step
def sampling_proto(sampling: Sampling) -> worker_pb2.SamplingParams:
    s = sampling
    return worker_pb2.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                     min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                                     frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                                     logit_bias=dict(s.logit_bias), logprobs=s.logprobs,
                                     prompt_logprobs=s.prompt_logprobs, prompt_tokens=s.prompt_tokens)


def step_request(plan: StepPlan) -> tuple[list[worker_pb2.SequenceSlice], list[int]]:
    """A plan as the chain takes it: one slice per sequence (with its own ids when the last stage needs
    them), and every slice's ids packed in order."""
    sequences = [worker_pb2.SequenceSlice(session_id=p.session_id, start_position=p.position, num_tokens=p.tokens,
                                          sampling=sampling_proto(p.stream.sampling), traceparent=p.stream.trace,
                                          prefix_blocks=list(p.prefix_blocks), prefix_tokens=p.prefix_tokens,
                                          token_ids=p.ids if p.stream.sampling.needs_ids else (),
                                          allowed_tokens=allowed(p), fork_from=p.fork_from)
                 for p in plan.slices]
    return sequences, [t for p in plan.slices for t in p.ids]


def allowed(piece: Slice) -> bytes:
    """Structured output: the tokens the slice's sample may take, when that sample is the stream's next token
    (the slice feeds the rest of what is pending: not a prompt chunk before the last)."""
    stream = piece.stream
    if stream.constraint is None or len(stream.pending) != piece.tokens or stream.done:
        return b""
    try:
        return stream.constraint.mask()
    except ShardlineError as exc:  # its grammar failed (a limit met mid-stream): that stream ends, alone
        stream.stop(exc)
        return b""


def token_score(t: worker_pb2.ScoredToken) -> TokenScore:
    return TokenScore(t.position, t.token_id, t.logprob, tuple(zip(t.top_ids, t.top_logprobs, strict=True)))


def step_outcome(response: worker_pb2.ForwardResponse) -> StepOutcome:
    errors = {e.session_id: error_for_code(code_from_number(e.error.code), e.error.message)
              for e in response.sequence_errors}
    scores = tuple((token_score(s.sampled) if s.HasField("sampled") else None,
                    tuple(token_score(t) for t in s.prompt)) for s in response.logprobs)
    return StepOutcome(tuple(response.token_ids), errors, scores)


class Scheduler:
    """A replica's scheduler: `policy` decides (and holds every stream), this runs it."""

    def __init__(self, pipeline: Pipeline, groups: int, max_active: int = 64, max_queued: int = 256,
                 prefill_chunk: int = 256, max_step_tokens: int = 2048, reserve_tokens: int = 16,
                 background_share: float = 0.5, metrics: StreamEvents | None = None,
                 prefix_cache: bool = False) -> None:
        self.pipeline = pipeline
        self.policy = SchedulingPolicy(groups, max_active, max_queued, prefill_chunk, max_step_tokens,
                                       reserve_tokens, background_share, metrics, prefix_cache, effects=self)
        self._wake = [asyncio.Event() for _ in self.policy.groups]
        self._kv_freed = asyncio.Event()
        self._ending: set[asyncio.Task[None]] = set()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(len(self.policy.groups))]

    # -- the policy's effects ---------------------------------------------------------------------------
    def wake(self, group: int) -> None:
        self._wake[group].set()

    def end_sessions(self, release: Release) -> None:
        addresses = self.pipeline.addresses  # the chain that holds them, as it is now

        async def end() -> None:
            try:
                await end_sessions(addresses, list(release.sessions), self.pipeline.links)
            finally:
                self.policy.released(release)
                self._kv_freed.set()

        ending = asyncio.create_task(end())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    # -- the loops --------------------------------------------------------------------------------------
    async def _run(self, i: int) -> None:
        """Group i's loop, supervised: an unexpected error fails that cycle's streams only."""
        while True:
            try:
                await self._cycle(i)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged with its traceback; the loop goes on
                log.exception("micro-batch group %d failed; its streams end with INTERNAL", i)
                self.policy.fail_group(i, Internal("internal error; the server log has the details"))
                await asyncio.sleep(0.05)

    async def _cycle(self, i: int) -> None:
        if not self.policy.prepare(i):
            self._wake[i].clear()
            await self._wake[i].wait()
            return
        try:
            chain = await self.pipeline.wait_open()  # closed while the cluster heals: streams wait, not fail
        except ShardlineError as exc:  # the cluster cannot serve: say why, to every stream of the group
            self.policy.fail_group(i, exc)
            return
        epoch = self.pipeline.epoch
        plan = self.policy.schedule(i)
        if not plan.slices:
            self._kv_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kv_freed.wait(), 0.05)
            return
        sequences, ids = step_request(plan)
        try:
            response = await chain.step(sequences, ids, partial=True)
        except Exception as exc:  # noqa: BLE001
            if epoch != self.pipeline.epoch:
                return  # the chain was retired under this step: its streams are rewound at the next install
            if isinstance(exc, RECOVERABLE):
                await self.pipeline.heal(epoch, exc)  # the streams are rewound by then; the next cycle replays
                return
            self.policy.step_failed(plan, exc)
            return
        if epoch != self.pipeline.epoch:
            return  # the chain changed under this step: its streams were rewound, the result is stale
        self.policy.update(plan, step_outcome(response))

    async def close(self, reason: str = "the coordinator is stopping") -> None:
        for task in self._tasks:
            task.cancel()
        self.policy.fail_all(Unavailable(reason))
