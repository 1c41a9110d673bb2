"""The two ways a request runs, shared by the interactive RPCs and the job runner: a generation (checked,
tokenized, answered from the result cache or run through a replica's scheduler) and an Infer (checked,
tokenized, run as micro-batches through a replica's pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.metrics import status_name
from coordinator.serving.choices import choice_plans, run_choices
from coordinator.serving.embedding import (
    EmbedRequest,
    Pooling,
    check_batch,
    check_response_size,
    check_tokens,
    embed,
    inputs_from_tensors,
)
from coordinator.serving.generation import (
    MAX_MODEL_NAME_CHARS,
    GenerationRequest,
    Piece,
    Plan,
    check_parameters,
    prepare,
    run,
    with_tool_calls,
)
from coordinator.serving.request_log import RequestRecord, prompt_json
from coordinator.serving.result_cache import CachedResult, Key, ResultCache, cache_key
from coordinator.store.models import ModelTask
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from coordinator.fleet.deployments import Deployment
    from coordinator.fleet.fleet import Fleet

def generating(fleet: Fleet, req: GenerationRequest) -> Deployment:
    """The deployment a generation names, after the checks that need no tokenizer."""
    check_parameters(req, fleet.config)  # a malformed or oversized request fails first, whatever the state
    try:
        deployment = fleet.find(req.model)
    except NotFound as exc:
        if not req.resume_ids:
            raise
        raise InvalidArgument(f"model {req.model[:MAX_MODEL_NAME_CHARS]!r} is not served here, and resume_token_ids "
                              f"continue that version's output ({exc.message})") from None
    if deployment.task == ModelTask.EMBED:
        raise FailedPrecondition(f"model {deployment.key!r} is an encoder: it embeds text and does not generate; "
                                 "use `coordinator embed` or the SDK's embed()")
    return deployment


async def plan_generation(fleet: Fleet, req: GenerationRequest) -> tuple[Deployment, Plan]:
    """Every check of a generation, and its plan (tokenized off the event loop); the deployment need not
    serve yet (a job is checked when it is submitted)."""
    deployment = generating(fleet, req)
    return deployment, await asyncio.to_thread(prepare, req, deployment.text, fleet.config)


async def generate(fleet: Fleet, cache: ResultCache, req: GenerationRequest, session_id: str,
                   background: bool = False, trace: str = "", client_id: str = "",
                   tenant: str = "") -> AsyncIterator[Piece]:
    """`_generate`, counted in the coordinator's metrics: every protocol and the job runner come here, so
    each request is counted once, under the deployment it names. `tenant`: the caller's API key name, whose
    own result and prefix caches it uses (with cache_scope "key"; one shared cache with "shared")."""
    share = tenant if fleet.config.fair_share else ""  # whose turn it is in the scheduler: the key's
    tenant = tenant if fleet.config.cache_scope == "key" else ""
    # closed here, at once, when the caller stops early (not later by the garbage collector): the scheduler's
    # stream leaves the batch as soon as its caller is gone
    model = fleet.label(req.model)
    record = RequestRecord(session_id, "generate", model, client_id, background=background)
    if fleet.config.log_prompts:
        record.prompt = prompt_json(req.prompt if not req.messages else [list(m[:2]) for m in req.messages])
    try:
        async with contextlib.aclosing(_generate(fleet, cache, req, session_id, background, trace,
                                                 tenant, share)) as pieces, \
                contextlib.aclosing(fleet.metrics.requests.generation(model, pieces)) as counted:
            async for piece in counted:
                record.piece(piece)
                yield piece
    except BaseException as exc:
        record.failed(exc)
        raise
    finally:
        record.write()


async def _generate(fleet: Fleet, cache: ResultCache, req: GenerationRequest, session_id: str,
                    background: bool = False, trace: str = "", tenant: str = "",
                    share: str = "") -> AsyncGenerator[Piece, None]:
    """The pieces of a generation: from the cache (one piece, marked cached) when a deterministic request
    was answered before on the same deployment, else as the scheduler of the replica that owes least
    produces them (a background stream for a job's item). `trace` is the request span's traceparent (tracing
    on), which every stage's step spans take as their parent."""
    deployment = generating(fleet, req)
    fleet.serving(deployment)  # not ready: say so before the prompt is even read
    plan = await asyncio.to_thread(prepare, req, deployment.text, fleet.config)
    # a resumed stream's result is only its tail: neither answered from the cache nor put in it
    # (nor a chat with tools, nor several choices: the cache keeps one text, not calls or choices)
    key = None if plan.resumed or plan.tool_calls or req.n > 1 else cache_key(deployment.uid, plan, req.seed, tenant)
    hit = cache.get(key)
    seed = plan.sampling.seed if plan.sampling.temperature else None
    if hit is not None:
        yield Piece(hit.text, hit.ids, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, cached=True,
                    model=deployment.key, seed=seed)
        return
    _, scheduler = fleet.route(deployment)
    first = True
    running = run(scheduler, deployment.text, plan, session_id, background, trace, tenant,
                  fleet.config.token_wait_s, share) if req.n == 1 else \
        run_choices(scheduler, deployment.text, choice_plans(plan, req.n), session_id, background, trace, tenant,
                    fleet.config.token_wait_s, share)
    async with contextlib.aclosing(running) as produced, \
            contextlib.aclosing(remembered(produced, cache, key)) as kept, \
            contextlib.aclosing(with_tool_calls(kept) if plan.tool_calls else kept) as pieces:
        async for piece in pieces:
            if first:  # what a resume names (this version, this seed), and the prompt's size
                piece.model, first = deployment.key, False
                piece.seed = seed if req.n == 1 else piece.seed  # (each choice's first piece names its own)
                piece.prompt_tokens = len(plan.prompt_ids)
            yield piece


async def remembered(pieces: AsyncIterator[Piece], cache: ResultCache,
                     key: Key | None) -> AsyncGenerator[Piece, None]:
    """`pieces` passed on; once the last one is out, the whole result goes into the cache."""
    texts: list[str] = []
    ids: list[int] = []
    async for piece in pieces:
        texts.append(piece.text)
        ids.extend(piece.token_ids)
        yield piece
        if piece.finish_reason and key is not None:
            cache.put(key, CachedResult.of("".join(texts), ids, piece.finish_reason, piece.prompt_tokens))


@dataclass(frozen=True)
class InferPlan:
    deployment: Deployment
    inputs: list[list[int]]
    pooling: Pooling
    normalize: bool
    truncated: int = 0  # inputs cut to the model's positions (the request asked for truncation)


async def plan_infer(fleet: Fleet, request: EmbedRequest, serving: bool = True) -> InferPlan:
    """Every check of an Infer (bounds first, then the model, then the tokens), and its inputs; with
    `serving`, a model not ready says so before the texts are even read (a job's item is checked when the
    job is submitted, ready or not)."""
    config = fleet.config
    if len(request.model) > MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(f"model is {len(request.model)} characters; a model name has at most "
                              f"{MAX_MODEL_NAME_CHARS}")
    batch = request.batch
    check_batch(batch, config.max_infer_batch)
    deployment = fleet.find(request.model)
    if deployment.task != ModelTask.EMBED:
        raise FailedPrecondition(f"model {deployment.key!r} generates text and does not embed: use `coordinator "
                                 "generate` or the SDK's generate(); embeddings come from an encoder (e.g. minilm)")
    if serving:
        fleet.serving(deployment)
    text = deployment.text
    check_response_size(batch, text.hidden_size)
    positions = text.context_tokens or 512
    if request.input_ids is not None:
        vocab = int(text.tokenizer.vocab_size) if text.tokenizer is not None else text.vocab_size
        inputs = await asyncio.to_thread(inputs_from_tensors, request.input_ids, request.attention_mask, vocab,
                                         positions)
        truncated = 0
    else:
        inputs, truncated = await asyncio.to_thread(text.encode_batch, list(request.texts), positions,
                                                    request.truncate)
    check_tokens(inputs, config.max_infer_tokens)
    return InferPlan(deployment, inputs, request.pooling, request.normalize,
                     truncated)


async def infer(fleet: Fleet, request: EmbedRequest, client_id: str = "") -> tuple[np.ndarray, int]:
    """An Infer's pooled vectors and the tokens it processed, counted in the coordinator's metrics."""
    vectors, tokens, _ = await infer_truncating(fleet, request, client_id)
    return vectors, tokens


def refused_infer(fleet: Fleet, requested_model: str, client_id: str, exc: BaseException) -> None:
    """An Infer the edge refused before the core saw it (a malformed message, coordinator/wire.py): counted
    and logged as every other refused request."""
    model = fleet.label(requested_model)
    fleet.metrics.requests.errors.labels(model, status_name(exc)).inc()
    record = RequestRecord(uuid.uuid4().hex, "infer", model, client_id)
    record.failed(exc)
    record.write()


async def infer_truncating(fleet: Fleet, request: EmbedRequest, client_id: str = "") -> tuple[np.ndarray, int, int]:
    """`infer`, and how many inputs were cut to the model's positions (the request asked for truncation);
    counted in the metrics and written to the request log."""
    model = fleet.label(request.model)
    record = RequestRecord(uuid.uuid4().hex, "infer", model, client_id, inputs=len(request.texts))
    if fleet.config.log_prompts:
        record.prompt = prompt_json(list(request.texts))
    try:
        (vectors, truncated), tokens = await fleet.metrics.requests.infer(model, _infer(fleet, request, record))
    except BaseException as exc:
        record.failed(exc)
        raise
    finally:
        record.write()
    return vectors, tokens, truncated


async def _infer(fleet: Fleet, request: EmbedRequest, record: RequestRecord) -> tuple[tuple[np.ndarray, int], int]:
    plan = await plan_infer(fleet, request)
    record.inputs, record.truncated = len(plan.inputs), plan.truncated
    record.prompt_tokens = sum(len(i) for i in plan.inputs)
    replica, scheduler = fleet.route(plan.deployment)
    replica.infers += 1  # a drain waits for it as for a stream
    try:
        vectors = await embed(scheduler.pipeline, plan.inputs, fleet.config.infer_micro_batch, plan.pooling,
                              plan.normalize, fleet.config.token_wait_s)
    finally:
        replica.infers -= 1
    record.outcome = "infer"
    return (vectors, plan.truncated), record.prompt_tokens
