"""Several choices of one prompt (`n`): one stream per choice, each seeded on its own (the request's seed + its
index), so a choice is the single request with that seed, whatever the batch, a replay or a failover. The
first choice prefills the prompt; the others start as copies of its cache once it is there (a fork: the last
stage samples each one's first token from the prompt's last position), so the prompt is computed once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import replace

from coordinator.serving.driver import Scheduler
from coordinator.serving.generation import Piece, Plan, produce, submit
from coordinator.serving.streams import TOKEN_WAIT_S
from coordinator.serving.textmodel import TokenModel

SEEDS = 2**64


def choice_plans(plan: Plan, n: int) -> list[Plan]:
    """Choice i samples with seed + i (greedy choices are all the same); the prompt's log probabilities come
    with the first only; each has its own structured-output matcher."""
    return [plan] + [replace(plan, sampling=replace(plan.sampling, seed=(plan.sampling.seed + i) % SEEDS,
                                                    prompt_logprobs=None),
                             constraint=plan.constraint.copy() if plan.constraint is not None else None)
                     for i in range(1, n)]


async def run_choices(scheduler: Scheduler, text: TokenModel, plans: list[Plan], session_id: str,
                      background: bool = False, trace: str = "", tenant: str = "",
                      token_wait_s: float = TOKEN_WAIT_S, share: str = "") -> AsyncGenerator[Piece, None]:
    """Every choice's pieces as they come, each marked with its `index` (and its seed, on its first piece).
    A choice that fails fails the request; the others then leave the batch too."""
    streams = [submit(scheduler, text, plans[0], session_id, background, trace, tenant, share)]
    try:
        for i, p in enumerate(plans[1:], start=1):
            streams.append(submit(scheduler, text, p, f"{session_id}.c{i}", background, trace, tenant, share,
                                  fork_of=streams[0]))
    except BaseException:  # the queue is full for a later choice: the earlier ones leave at once
        for stream in streams:
            stream.cancel()
        raise
    gens = [produce(s, text, p, token_wait_s) for s, p in zip(streams, plans, strict=True)]
    started = [False] * len(gens)
    pending: dict[asyncio.Future[Piece], int] = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):  # in choice order: the same run, the same order
                i = pending.pop(future)
                try:
                    piece = future.result()
                except StopAsyncIteration:
                    continue
                piece.index = i
                if not started[i]:
                    started[i] = True
                    piece.seed = plans[i].sampling.seed if plans[i].sampling.temperature else None
                yield piece
                pending[asyncio.ensure_future(anext(gens[i]))] = i
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for gen in gens:
            with contextlib.suppress(RuntimeError):
                await gen.aclose()
