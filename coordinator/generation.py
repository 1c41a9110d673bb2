"""A generation request, validated into domain values, and the loop that runs it through the chain."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from coordinator.scheduler import Scheduler
from coordinator.textmodel import TextModel, TextStream
from shardline.errors import InvalidArgument
from shardline.v1 import worker_pb2


@dataclass(frozen=True)
class GenerationRequest:
    model: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What the loop needs: the prompt's ids and the resolved parameters."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: worker_pb2.SamplingParams
    stop: tuple[str, ...]


@dataclass
class Piece:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "", "length" or "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def check_parameters(req: GenerationRequest, max_tokens_limit: int) -> None:
    """Everything that can be checked without the tokenizer; errors name the field."""
    if not req.prompt and not req.messages:
        raise InvalidArgument("prompt is empty (send a prompt or chat messages)")
    if req.prompt and req.messages:
        raise InvalidArgument("send either prompt or messages, not both")
    for i, (role, _) in enumerate(req.messages):
        if role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"messages[{i}].role {role!r} must be system, user or assistant")
    if req.max_tokens is not None and not 1 <= req.max_tokens <= max_tokens_limit:
        raise InvalidArgument(f"max_tokens must be between 1 and {max_tokens_limit}, got {req.max_tokens}")
    if req.temperature is not None and not req.temperature >= 0:
        raise InvalidArgument(f"temperature must be >= 0, got {req.temperature}")
    if req.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {req.top_k}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {req.top_p}")
    if any(not s for s in req.stop):
        raise InvalidArgument("stop holds an empty sequence")


def prepare(req: GenerationRequest, text: TextModel, default_max_tokens: int, max_tokens_limit: int) -> Plan:
    """Tokenize and resolve defaults (runs off the event loop: tokenizing is compute)."""
    check_parameters(req, max_tokens_limit)
    ids = text.encode_chat(list(req.messages)) if req.messages else text.encode(req.prompt)
    if not ids:
        raise InvalidArgument("prompt encodes to no tokens")
    max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max_tokens, max_tokens_limit)
    if text.context_tokens and len(ids) + max_tokens > text.context_tokens:
        if req.max_tokens is not None:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                  f"context of {text.context_tokens} tokens")
        max_tokens = text.context_tokens - len(ids)
        if max_tokens < 1:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) leaves no room in the model's context of "
                                  f"{text.context_tokens} tokens")
    sampling = worker_pb2.SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed if req.seed is not None else random.getrandbits(63))
    return Plan(ids, max_tokens, sampling, req.stop)


async def run(scheduler: Scheduler, text: TextModel, plan: Plan, session_id: str) -> AsyncIterator[Piece]:
    """The request's tokens as the scheduler produces them, turned into pieces of text as they become
    final; the stream leaves the running batch when this generator ends, however it ends."""
    stream = scheduler.submit(session_id, plan.prompt_ids, plan.sampling, plan.max_tokens, text.stop_ids)
    texts = TextStream(text, plan.stop)
    produced = 0
    usage = {"prompt_tokens": len(plan.prompt_ids)}
    try:
        while True:
            token = await stream.tokens.get()
            if isinstance(token, BaseException):
                raise token
            if token is None or token in text.stop_ids:
                yield Piece(texts.flush(), [], "stop", completion_tokens=produced, **usage)
                return
            produced += 1
            piece = texts.push(token)
            if texts.stopped:
                yield Piece(piece, [token], "stop", completion_tokens=produced, **usage)
                return
            if produced == plan.max_tokens:
                yield Piece(piece + texts.flush(), [token], "length", completion_tokens=produced, **usage)
                return
            yield Piece(piece, [token])
    finally:
        stream.stop()
