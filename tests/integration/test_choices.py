"""Several choices of one prompt (issue 30.2): n choices equal n single requests with the derived seeds (seed +
i), the prompt is prefilled once (the workers' counters), and a replay of every stream mid-generation changes
none of them."""

from __future__ import annotations

import asyncio

import pytest

from shardline.client import AsyncClient, Client
from shardline.errors import InvalidArgument
from shardline.v1 import worker_pb2
from tests.helpers import worker_stub
from tests.integration.test_structured import cluster  # noqa: F401 - the same small cluster, a module of its own

PROMPT = "Once upon a time in a small village by the sea, there lived an old fisherman who"


def prefilled(workers) -> list[int]:
    return [worker_stub(w.address).GetStatus(worker_pb2.GetStatusRequest()).metrics.prefill_tokens for w in workers]


def test_four_choices_equal_four_requests_with_the_derived_seeds_and_prefill_once(cluster):  # noqa: F811
    coordinator, workers = cluster
    with Client(coordinator.address, timeout=120) as client:
        before = prefilled(workers)
        several = client.generate(PROMPT + " (n)", n=4, max_tokens=24, temperature=1.0, seed=40, ignore_eos=True)
        after = prefilled(workers)
        singles = [client.generate(PROMPT + " (n)", max_tokens=24, temperature=1.0, seed=40 + i, ignore_eos=True)
                   for i in range(4)]
    prompt_tokens = several.prompt_tokens
    assert [a - b for a, b in zip(after, before, strict=True)] == [prompt_tokens] * len(workers)  # once, not 4 times
    assert [c.token_ids for c in several.choices] == [s.token_ids for s in singles]
    assert [c.seed for c in several.choices] == [40, 41, 42, 43]
    assert len({tuple(c.token_ids) for c in several.choices}) == 4  # four different samples
    assert several.completion_tokens == 4 * 24 and several.finish_reason == "length"
    assert all(c.finish_reason == "length" and c.text for c in several.choices)


def test_streamed_choices_interleave_by_index_and_survive_a_replay(cluster):  # noqa: F811
    coordinator, workers = cluster
    policy = coordinator.fleet.first.scheduler.policy
    params = dict(n=4, max_tokens=40, temperature=0.9, seed=7, ignore_eos=True)

    async def collect(disturb: bool) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(4)]
        async with AsyncClient(coordinator.address, timeout=120) as client:
            async for chunk in await client.generate(PROMPT, stream=True, **params):
                out[chunk.index] += chunk.token_ids
                if disturb and min(len(o) for o in out) == 5:  # every stage's caches go: each choice replays
                    disturb = False
                    sessions = [s.session_id for s in policy.streams()]
                    for w in workers:
                        worker_stub(w.address).EndSession(worker_pb2.EndSessionRequest(session_ids=sessions))
        return out

    undisturbed = asyncio.run(collect(False))
    refused = policy.refused
    disturbed = asyncio.run(collect(True))
    assert policy.refused - refused >= 4  # they found their caches gone, and replayed
    assert disturbed == undisturbed and all(len(t) == 40 for t in disturbed)


@pytest.mark.parametrize(("params", "words"), [({"n": 17}, "n must be between 1 and 16 (max_choices)"),
                                              ({"n": -1}, "n must be between 1 and 16")])
def test_too_many_choices_are_refused_naming_the_limit(cluster, params, words):  # noqa: F811
    coordinator, _ = cluster
    with Client(coordinator.address, timeout=60) as client, pytest.raises(InvalidArgument, match=words.replace(
            "(", r"\(").replace(")", r"\)")):
        client.generate(PROMPT, max_tokens=2, **params)
