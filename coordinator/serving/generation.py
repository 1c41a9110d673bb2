"""A generation request, validated into domain values, and the loop that runs it through the chain.

Validation comes in two parts: `check_parameters` (counts, bytes and numbers: no tokenizer, cheap enough for
the event loop, and run before anything else) and `prepare` (tokenizing and what needs the token count: off
the event loop). Every error names the field and the limit, and the config field that sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple, TypedDict

from coordinator.config import CoordinatorConfig
from coordinator.serving.constraints import Constraint, GrammarKind, Structure, compile_grammar
from coordinator.serving.driver import Scheduler
from coordinator.serving.streams import TOKEN_WAIT_S, Sampling, Stream, StreamState
from coordinator.serving.textmodel import TextStream, TokenModel
from coordinator.serving.tools import (
    CallStream,
    Tool,
    ToolCall,
    check_schemas,
    check_tools,
    forced_grammar,
    template_tools,
    tools_bytes,
)
from shardline.errors import Internal, InvalidArgument, Unavailable
from shardline.scores import TokenScore

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
# top_p may be as small as float32's smallest normal number: a tiny top_p keeps only the likeliest token
# (greedy-like); a subnormal one is refused
MIN_TOP_P = 1.1754944e-38
MAX_MODEL_NAME_CHARS = 128  # as the store's names (coordinator/store/models.py)
MAX_PROMPT_SCORES = 262_144  # prompt tokens x (1 + prompt_logprobs): one answer's size stays bounded


class FinishReason(StrEnum):
    """Why a generation ended ("" on every piece but the last)."""

    NONE = ""
    STOP = "stop"      # the end-of-sequence token or a stop sequence
    LENGTH = "length"  # max_tokens reached
    TOOL_CALLS = "tool_calls"  # it stopped after calling tools


class Turn(NamedTuple):
    """One chat message: (role, content), and an assistant's tool calls or the call a tool's message answers."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    model: str = ""
    prompt: str = ""
    messages: tuple[Turn | tuple[str, str], ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    prompt_ids: tuple[int, ...] = ()
    resume_ids: tuple[int, ...] = ()  # a broken stream's tokens already received: it goes on after them
    stop_ids: tuple[int, ...] = ()    # token ids that end the stream, besides end-of-sequence
    logprobs: int | None = None       # each new token's log probability, and this many likeliest
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0
    structure: Structure | None = None  # structured output: a JSON schema, JSON object, regex or grammar
    tools: tuple[Tool, ...] = ()        # chat only: offered to the model's template (serving/tools.py)
    tool_choice: str = ""               # "" / auto, none, required, or a tool's name
    n: int = 1                          # choices of the same prompt (serving/choices.py)


@dataclass(frozen=True)
class Plan:
    """What the loop needs: the prompt's ids and the resolved parameters. A resumed request's `resumed` ids
    were produced before (they count towards max_tokens and min_tokens), and `texts` has read them: the text
    it releases next is what the broken stream would have released."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    min_tokens: int = 0
    ignore_eos: bool = False
    resumed: tuple[int, ...] = ()
    texts: TextStream | None = None
    stop_ids: frozenset[int] = frozenset()  # the caller's (stop_token_ids): they end the stream, ignore_eos or not
    constraint: Constraint | None = None  # structured output's matcher (it has read `resumed`)
    structure: Structure | None = None
    tool_calls: bool = False  # the text is searched for tool calls (tools given, tool_choice not "none")

    def ending(self, text: TokenModel) -> frozenset[int]:
        """The token ids that end this stream: end-of-sequence (unless ignore_eos) and the caller's."""
        return (frozenset() if self.ignore_eos else text.stop_ids) | self.stop_ids


@dataclass(frozen=True)
class Logprob:
    """A token's log probability, with its text alone, and the likeliest tokens at its position."""

    token_id: int
    token: str
    logprob: float | None  # None: the prompt's first token (nothing comes before it)
    top: tuple[tuple[int, str, float], ...] = ()


def logprob(score: TokenScore, text: TokenModel) -> Logprob:
    return Logprob(score.token_id, text.token_text(score.token_id), score.logprob,
                   tuple((i, text.token_text(i), lp) for i, lp in score.top))


@dataclass
class Piece:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # answered from the result cache
    model: str = ""       # the first piece only: the version serving it, "name@version" (a resume names it)
    seed: int | None = None  # the first piece only, sampled streams: the seed (a resume sends it)
    # with logprobs: one per token id, and on the last piece the id that ended the stream (end-of-sequence or a
    # stop id, not in token_ids) after them
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # the first piece with tokens, when asked
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed in this piece (not in `text`)
    index: int = 0  # the choice it belongs to (n > 1)


def utf8_bytes(text: str) -> int:
    """The UTF-8 size of `text` (a character is 1 to 4 bytes; ASCII is counted without encoding)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def shown(text: str, at_most: int = 40) -> str:
    """`text` for an error message: quoted, and cut short when long (messages never echo a whole input)."""
    return repr(text) if len(text) <= at_most else f"{text[:at_most]!r}... ({len(text)} characters)"


def check_parameters(req: GenerationRequest, config: CoordinatorConfig) -> None:
    """Everything that can be checked without the tokenizer, counts and sizes first; errors name the field
    and the limit."""
    if len(req.model) > MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(f"model is {len(req.model)} characters; a model name has at most "
                              f"{MAX_MODEL_NAME_CHARS}")
    given = [name for name, value in (("prompt", req.prompt), ("messages", req.messages),
                                      ("prompt_token_ids", req.prompt_ids)) if value]
    if not given:
        raise InvalidArgument("prompt is empty (send a prompt, chat messages or prompt_token_ids)")
    if len(given) > 1:
        raise InvalidArgument(f"send one of prompt, messages and prompt_token_ids, not {' and '.join(given)}")
    if len(req.prompt_ids) > config.max_prompt_tokens:
        raise InvalidArgument(f"prompt_token_ids holds {len(req.prompt_ids)} tokens; the limit is "
                              f"{config.max_prompt_tokens} (max_prompt_tokens)")
    if len(req.messages) > config.max_chat_messages:
        raise InvalidArgument(f"messages holds {len(req.messages)} messages; the limit is "
                              f"{config.max_chat_messages} (max_chat_messages)")
    if len(req.stop_ids) > config.max_stop_sequences:
        raise InvalidArgument(f"stop_token_ids holds {len(req.stop_ids)} ids; the limit is "
                              f"{config.max_stop_sequences} (max_stop_sequences)")
    if len(req.stop) > config.max_stop_sequences:
        raise InvalidArgument(f"stop holds {len(req.stop)} sequences; the limit is {config.max_stop_sequences} "
                              "(max_stop_sequences)")
    size = utf8_bytes(req.prompt) + sum(utf8_bytes(m[1]) for m in req.messages) + tools_bytes(req.tools) + sum(
        utf8_bytes(c.arguments) + len(c.name) for m in req.messages for c in Turn(*m).tool_calls)
    if size > config.max_prompt_bytes:
        name = "prompt" if req.prompt else "messages (their contents, calls and tools together)"
        raise InvalidArgument(f"{name} is {size} bytes; the limit is {config.max_prompt_bytes} (max_prompt_bytes)")
    for i, s in enumerate(req.stop):
        if not s:
            raise InvalidArgument(f"stop[{i}] is empty")
        if (n := utf8_bytes(s)) > config.max_stop_bytes:
            raise InvalidArgument(f"stop[{i}] is {n} bytes; the limit is {config.max_stop_bytes} (max_stop_bytes)")
    for i, m in enumerate(req.messages):
        if m[0] not in ("system", "user", "assistant", "tool"):
            raise InvalidArgument(f"messages[{i}].role {shown(m[0])} must be system, user, assistant or tool")
    if req.tools or req.tool_choice:
        if not req.messages:
            raise InvalidArgument("tools are offered in chat: send messages, not a prompt")
        check_tools(req.tools, req.tool_choice)
    limit = config.max_tokens_limit
    if len(req.resume_ids) >= limit:  # the count bound; `resumed` checks them against max_tokens
        raise InvalidArgument(f"resume_token_ids holds {len(req.resume_ids)} tokens; a stream produces at most "
                              f"{limit} (max_tokens_limit), so that stream had finished")
    if req.max_tokens is not None and not 1 <= req.max_tokens <= limit:
        raise InvalidArgument(f"max_tokens must be between 1 and {limit} (max_tokens_limit), got {req.max_tokens}")
    if not 0 <= req.min_tokens <= (req.max_tokens if req.max_tokens is not None else limit):
        bound = "max_tokens" if req.max_tokens is not None else f"{limit} (max_tokens_limit)"
        raise InvalidArgument(f"min_tokens must be between 0 and {bound}, got {req.min_tokens}")
    check_sampling(req.temperature, req.top_p, req.top_k)
    check_scoring(req, config)
    if not 1 <= req.n <= config.max_choices:
        raise InvalidArgument(f"n must be between 1 and {config.max_choices} (max_choices), got {req.n}")
    if req.n > 1 and req.resume_ids:
        raise InvalidArgument("resume_token_ids resumes one stream: send n = 1")


def check_scoring(req: GenerationRequest, config: CoordinatorConfig) -> None:
    """Log probabilities, penalties and biases: in range, bounded."""
    for name, k in (("logprobs", req.logprobs), ("prompt_logprobs", req.prompt_logprobs)):
        if k is not None and not 0 <= k <= config.max_logprobs:
            raise InvalidArgument(f"{name} must be between 0 and {config.max_logprobs} (max_logprobs), got {k}")
    if len(req.logit_bias) > config.max_logit_bias:
        raise InvalidArgument(f"logit_bias holds {len(req.logit_bias)} entries; the limit is {config.max_logit_bias} "
                              "(max_logit_bias)")
    bad = next((i for i, b in req.logit_bias if not (math.isfinite(b) and -100 <= b <= 100)), None)
    if bad is not None:
        raise InvalidArgument(f"logit_bias[{bad}] must be between -100 and 100")
    if req.repetition_penalty is not None and not (math.isfinite(req.repetition_penalty)
                                                   and 0 < req.repetition_penalty <= 10):
        raise InvalidArgument(f"repetition_penalty must be in (0, 10] (1 = none), got {req.repetition_penalty!r}")
    for name, value in (("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty)):
        if not (math.isfinite(value) and -2 <= value <= 2):
            raise InvalidArgument(f"{name} must be between -2 and 2, got {value!r}")
    if not (math.isfinite(req.min_p) and 0 <= req.min_p <= 1):
        raise InvalidArgument(f"min_p must be between 0 and 1, got {req.min_p!r}")
    if req.structure is not None and (n := utf8_bytes(req.structure.spec)) > config.max_grammar_bytes:
        raise InvalidArgument(f"{req.structure.field} is {n} bytes; the limit is {config.max_grammar_bytes} "
                              "(max_grammar_bytes)")


def check_sampling(temperature: float | None, top_p: float | None, top_k: int) -> None:
    """Sampling values a worker can use as they are: finite, in range, never subnormal."""
    if temperature is not None and not (
            temperature == 0 or (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)):
        raise InvalidArgument(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                              f"{MAX_TEMPERATURE:g}, got {temperature!r}")
    if top_p is not None and not (math.isfinite(top_p) and MIN_TOP_P <= top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1] (and not subnormal), got {top_p!r}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = no limit), got {top_k}")


def prepare(req: GenerationRequest, text: TokenModel, config: CoordinatorConfig) -> Plan:
    """Tokenize and resolve defaults (runs off the event loop: tokenizing is compute that grows with the
    prompt)."""
    check_parameters(req, config)
    if text.vocab_size and req.top_k > text.vocab_size:
        raise InvalidArgument(f"top_k must be between 0 and {text.vocab_size} (the model's vocabulary), "
                              f"got {req.top_k}")
    if req.prompt_ids:
        ids = list(req.prompt_ids)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < (text.vocab_size or 2**31)), None)
        if bad is not None:
            raise InvalidArgument(f"prompt_token_ids[{bad}] is {ids[bad]}, outside the model's vocabulary "
                                  f"[0, {text.vocab_size})")
    else:
        check_schemas(req.tools)
        offered = template_tools(req.tools) if req.tools and req.tool_choice != "none" else None
        ids = text.encode_chat([Turn(*m) for m in req.messages], offered) if req.messages else text.encode(req.prompt)
    vocab = text.vocab_size or 2**31
    bad_stop = next((i for i, t in enumerate(req.stop_ids) if not 0 <= t < vocab), None)
    if bad_stop is not None:
        raise InvalidArgument(f"stop_token_ids[{bad_stop}] is {req.stop_ids[bad_stop]}, outside the model's "
                              f"vocabulary [0, {vocab})")
    bad_bias = next((i for i, _ in req.logit_bias if not 0 <= i < vocab), None)
    if bad_bias is not None:
        raise InvalidArgument(f"logit_bias names token id {bad_bias}, outside the model's vocabulary [0, {vocab})")
    if req.stop and text.tokenizer is None:
        raise InvalidArgument("stop sequences need the model's tokenizer, and this model has none")
    if not ids:
        raise InvalidArgument("prompt encodes to no tokens")
    if len(ids) > config.max_prompt_tokens:
        raise InvalidArgument(f"prompt is {len(ids)} tokens; the limit is {config.max_prompt_tokens} "
                              "(max_prompt_tokens)")
    if req.prompt_logprobs is not None and len(ids) * (req.prompt_logprobs + 1) > MAX_PROMPT_SCORES:
        raise InvalidArgument(f"prompt_logprobs: {len(ids)} prompt tokens x {req.prompt_logprobs + 1} scores is "
                              f"more than {MAX_PROMPT_SCORES}; ask for fewer likeliest tokens or a shorter prompt")
    max_tokens_limit = config.max_tokens_limit
    if req.max_tokens is not None:
        max_tokens = req.max_tokens
    else:  # the default, or min_tokens if that is more
        max_tokens = max(min(config.default_max_tokens, max_tokens_limit), req.min_tokens)
    if text.context_tokens and len(ids) + max_tokens > text.context_tokens:
        if req.max_tokens is not None:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                  f"context of {text.context_tokens} tokens")
        max_tokens = text.context_tokens - len(ids)
        if max_tokens < 1:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) leaves no room in the model's context of "
                                  f"{text.context_tokens} tokens")
    if req.min_tokens > max_tokens:
        raise InvalidArgument(f"min_tokens ({req.min_tokens}) is above the {max_tokens} tokens the model's context "
                              f"of {text.context_tokens} leaves after the prompt ({len(ids)} tokens)")
    sampling = Sampling(
        temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed if req.seed is not None else random.getrandbits(63), min_p=req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        logit_bias=tuple(sorted(req.logit_bias)), logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs,
        prompt_tokens=len(ids))
    structure, constraint = req.structure, None
    if (forced := forced_grammar(req.tools, req.tool_choice)) is not None:
        if structure is not None:
            raise InvalidArgument(f"tool_choice {req.tool_choice!r} forces a tool call: send no {structure.field}")
        structure = Structure(GrammarKind.GRAMMAR, forced)
    if structure is not None:
        guidance = text.guidance()
        constraint = Constraint(guidance, compile_grammar(structure, guidance))
    plan = Plan(ids, max_tokens, sampling, req.stop, req.min_tokens, req.ignore_eos,
                stop_ids=frozenset(req.stop_ids), constraint=constraint, structure=structure,
                tool_calls=bool(req.tools) and req.tool_choice != "none")
    return resumed(plan, req.resume_ids, text) if req.resume_ids else plan


def resumed(plan: Plan, ids: tuple[int, ...], text: TokenModel) -> Plan:
    """`plan` going on after `ids`, a broken stream's tokens: checked to be this model's, and not to have
    ended that stream; its text read as the stream read it, so the text given out next is the same."""
    if len(ids) >= plan.max_tokens:
        raise InvalidArgument(f"resume_token_ids holds {len(ids)} tokens, as many as max_tokens ({plan.max_tokens}) "
                              "allows: that stream had finished")
    vocab = text.vocab_size or 2**31
    stop_ids = plan.ending(text)
    texts = TextStream(text, plan.stop)
    for i, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise InvalidArgument(f"resume_token_ids[{i}] is {token}, outside the model's vocabulary [0, {vocab}): "
                                  "are they this model's?")
        if token in stop_ids and i >= plan.min_tokens:
            raise InvalidArgument(f"resume_token_ids[{i}] is {token}, a token that ends the stream "
                                  "(end-of-sequence or one of stop_token_ids): that stream had finished")
        texts.push(token, match=i + 1 > plan.min_tokens)
        if texts.stopped:
            raise InvalidArgument(f"resume_token_ids[{i}] completes a stop sequence: that stream had finished")
        if plan.constraint is not None:
            if not plan.constraint.consume(token):
                raise InvalidArgument(f"resume_token_ids[{i}] is {token}, which the output's "
                                      f"{plan.structure.field if plan.structure else 'grammar'} does not allow there")
            if plan.constraint.finished:
                raise InvalidArgument(f"resume_token_ids[{i}] completes the structured output: that stream had "
                                      "finished")
    return replace(plan, resumed=tuple(ids), texts=texts)


async def run(scheduler: Scheduler, text: TokenModel, plan: Plan, session_id: str,
              background: bool = False, trace: str = "", tenant: str = "",
              token_wait_s: float = TOKEN_WAIT_S, share: str = "") -> AsyncGenerator[Piece, None]:
    """The request's tokens as the scheduler produces them, turned into pieces of text as they become
    final; the stream leaves the running batch when this generator ends, however it ends."""
    stream = submit(scheduler, text, plan, session_id, background, trace, tenant, share)
    async with contextlib.aclosing(produce(stream, text, plan, token_wait_s)) as pieces:
        async for piece in pieces:
            yield piece


def submit(scheduler: Scheduler, text: TokenModel, plan: Plan, session_id: str, background: bool = False,
           trace: str = "", tenant: str = "", share: str = "", fork_of: Stream | None = None) -> Stream:
    """The plan's stream, queued in the scheduler (`fork_of`: a sibling choice of the same prompt, whose cache
    it starts as a copy of)."""
    produced = len(plan.resumed)  # a resumed stream goes on after the tokens its caller holds
    return scheduler.policy.submit(session_id, plan.prompt_ids + list(plan.resumed), plan.sampling,
                                   plan.max_tokens - produced, plan.ending(text),
                                   min_tokens=max(plan.min_tokens - produced, 0), background=background,
                                   trace=trace, tenant=tenant, share=share, constraint=plan.constraint,
                                   fork_of=fork_of)


async def produce(stream: Stream, text: TokenModel, plan: Plan,
                  token_wait_s: float = TOKEN_WAIT_S) -> AsyncGenerator[Piece, None]:
    """A submitted stream's tokens as pieces of text; the stream leaves the batch when this ends.

    End-of-sequence ids (none with `ignore_eos`), the caller's stop ids and stop sequences count only once
    `min_tokens` tokens were produced; before that, such an id is just a token. A stream that gets no token for
    `token_wait_s` (a step, a heal or an interactive queue that never moves) fails with UNAVAILABLE saying
    where it waited; a job's item waiting in the queue for its turn waits on."""
    stop_ids = plan.ending(text)
    produced = len(plan.resumed)
    texts = plan.texts or TextStream(text, plan.stop)
    finished = False  # the last piece was made (a stop sequence or max_tokens seen here, or the stream's end)
    prompt_tokens = len(plan.prompt_ids)
    taken = 0  # tokens this stream produced (its log probabilities: stream.scores[taken - 1])
    try:
        while True:
            token = await next_token(stream, token_wait_s)
            if isinstance(token, BaseException):
                raise token
            if token is not None:
                taken += 1
            scored = scores_of(stream, taken, text, token is not None)
            if token is None or (token in stop_ids and produced >= plan.min_tokens):
                finished = True
                yield Piece(texts.flush(), [], FinishReason.STOP, prompt_tokens, produced, **scored)
                return
            produced += 1
            piece = texts.push(token, match=produced > plan.min_tokens)
            if texts.stopped:
                finished = True
                yield Piece(piece, [token], FinishReason.STOP, prompt_tokens, produced, **scored)
                return
            if produced == plan.max_tokens:
                finished = True
                yield Piece(piece + texts.flush(), [token], FinishReason.LENGTH, prompt_tokens, produced, **scored)
                return
            yield Piece(piece, [token], **scored)
    finally:
        if finished:
            stream.stop()  # ended here (a stop sequence): finished, not cancelled; a no-op once it ended
        else:
            stream.cancel()  # its caller went away (a no-op once it ended)


class Scored(TypedDict, total=False):
    logprobs: list[Logprob]
    prompt_logprobs: list[Logprob]


def scores_of(stream: Stream, taken: int, text: TokenModel, new: bool) -> Scored:
    """The log probabilities a piece carries, when asked: of the token just taken (`new`), and the prompt's
    with the first."""
    s, out = stream.sampling, Scored()
    if s.logprobs is not None and new:
        out["logprobs"] = [logprob(stream.scores[taken - 1], text)]
    if s.prompt_logprobs is not None and taken == 1 and new:
        first = stream.ids[0]
        missing = next((p for p in range(1, s.prompt_tokens) if p not in stream.prompt_scores), None)
        if missing is not None:  # a gap would shift every later entry: never answered
            raise Internal(f"the prompt's log probability at position {missing} did not come back")
        out["prompt_logprobs"] = [Logprob(first, text.token_text(first), None)] + [
            logprob(stream.prompt_scores[p], text) for p in range(1, s.prompt_tokens)]
    return out


async def with_tool_calls(pieces: AsyncIterator[Piece]) -> AsyncGenerator[Piece, None]:
    """`pieces` with the tool calls taken out of their text as they complete (serving/tools.py), choice by
    choice; a choice that called tools and stopped says tool_calls."""
    streams: dict[int, CallStream] = {}
    async for piece in pieces:
        calls = streams.setdefault(piece.index, CallStream())
        piece.text, piece.tool_calls = calls.push(piece.text)
        if piece.finish_reason:
            piece.text += calls.flush()[0]
            if calls.calls and piece.finish_reason is FinishReason.STOP:
                piece.finish_reason = FinishReason.TOOL_CALLS
        yield piece


async def next_token(stream: Stream, wait_s: float) -> int | BaseException | None:
    """The stream's next item, within `wait_s` of waiting (a background stream still queued waits its turn,
    however long); past it the stream fails (its slot and KV freed by the scheduler) with UNAVAILABLE."""
    if not stream.tokens.empty():  # the common case while a stream runs: no timer at all
        return stream.tokens.get_nowait()
    while True:
        try:
            async with asyncio.timeout(wait_s):  # no task of its own (wait_for makes one per call on 3.11)
                return await stream.tokens.get()
        except TimeoutError:
            if stream.background and stream.state is StreamState.QUEUED:
                continue
            if stream.done or not stream.tokens.empty():  # an item came just as the wait ran out: take it
                return stream.tokens.get_nowait()
            failure = Unavailable(f"no token came for {wait_s:g} s while the stream was {stream.state.value} "
                                  "(token_wait_s): the cluster is stuck healing, or overloaded; try again later")
            stream.stop(failure)
            return failure
