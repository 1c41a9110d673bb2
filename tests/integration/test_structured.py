"""Structured output (issue 30.4): a JSON schema, a JSON object, a regex and a grammar, through the native API and
the SDK; valid every time, alone, under 16 concurrent streams and after a replay; bad structures refused before
admission, naming the field."""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest
from transformers import AutoTokenizer

from coordinator.config import CoordinatorConfig
from shardline.client import AsyncClient, Client
from shardline.errors import InvalidArgument
from shardline.v1 import worker_pb2
from tests.chaos import streams
from tests.clusters import registered, text_llama
from tests.helpers import worker_stub

MODEL = "sg-llama"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}
PROMPTS = [f"Describe person number {i} as JSON:" for i in range(100)]


@pytest.fixture(scope="module")
def cluster(loop, store, parameters, tmp_path_factory):
    """A small random Llama that speaks text (SmolLM2's tokenizer) on 2 workers: what it writes is noise, so
    only the grammar makes it valid."""
    text_llama(store, MODEL, tmp_path_factory, seed=11)
    config = CoordinatorConfig(store=store.root, model=MODEL, workers=2, port=0, max_tokens_limit=4096,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    with registered(loop, config, 2) as running:
        yield running


def valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_100_prompts_with_a_json_schema_all_validate_and_16_at_once_give_the_same(cluster):
    coordinator, _ = cluster
    params = dict(max_tokens=256, temperature=0.9, json_schema=SCHEMA)
    with Client(coordinator.address, timeout=300) as client:
        alone = [client.generate(p, seed=i, **params) for i, p in enumerate(PROMPTS)]
    assert all(r.finish_reason == "stop" for r in alone)  # complete, not cut at max_tokens
    values = [valid(r.text) for r in alone]
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 50  # sampled: real, varied outputs

    async def at_once():
        async with AsyncClient(coordinator.address, timeout=300) as client:
            sem = asyncio.Semaphore(16)

            async def one(i, p):
                async with sem:
                    return await client.generate(p, seed=i, **params)

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    together = asyncio.run(at_once())
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]  # batching changes nothing


def test_structured_streams_replayed_mid_generation_stay_valid_and_unchanged(cluster):
    """Every stage's caches of 16 structured streams are ended while they run: each replays (the grammar's
    state is the coordinator's, rebuilt from nothing) and writes what an undisturbed run writes."""
    coordinator, workers = cluster
    prompts = PROMPTS[:16]
    params = dict(max_tokens=256, temperature=0.9, seed=3, json_schema=SCHEMA)
    undisturbed = asyncio.run(streams(coordinator.address, prompts, **params))
    policy = coordinator.fleet.first.scheduler.policy
    refused = policy.refused

    async def end_everything() -> None:
        sessions = [s.session_id for s in policy.streams()]
        for w in workers:
            worker_stub(w.address).EndSession(worker_pb2.EndSessionRequest(session_ids=sessions), timeout=10)

    disturbed = asyncio.run(streams(coordinator.address, prompts, action=end_everything, after_tokens=4, **params))
    assert policy.refused - refused >= len(prompts)  # each found its caches gone, and replayed
    assert disturbed == undisturbed
    tokenizer = AutoTokenizer.from_pretrained(coordinator.fleet.store.path(MODEL))
    for tokens in disturbed:
        valid(tokenizer.decode(tokens, skip_special_tokens=True))


def test_a_json_object_a_regex_and_a_grammar_are_followed(cluster):
    coordinator, _ = cluster
    with Client(coordinator.address, timeout=300) as client:
        objects = [client.generate("JSON:", max_tokens=300, temperature=0.7, seed=seed, json_object=True)
                   for seed in range(10)]
        # noise fills a string until max_tokens, unless it closes the object: those that end are objects
        done = [o for o in objects if o.finish_reason == "stop"]
        assert done and all(isinstance(json.loads(o.text), dict) for o in done)
        assert all(o.text.startswith("{") for o in objects)
        for seed in range(5):
            phone = client.generate("Phone:", max_tokens=40, temperature=1.0, seed=seed, regex=r"\+1-[0-9]{3}-[0-9]{4}")
            assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", phone.text) and phone.finish_reason == "stop"
            answer = client.generate("Yes or no?", max_tokens=10, temperature=1.0, seed=seed,
                                     grammar='start: "yes" | "no" | "maybe later"')
            assert answer.text in ("yes", "no", "maybe later")
        greedy = client.generate("Phone:", max_tokens=40, temperature=0, regex=r"[0-9]{6}", logprobs=1)
        assert re.fullmatch(r"[0-9]{6}", greedy.text)
        # the model's own log probabilities, unmasked: those of the same ids fed as a prompt, scored freely
        ids = client.generate("Phone:", max_tokens=1, temperature=0, prompt_logprobs=0)
        free = client.generate(ids.prompt_logprobs and [t.token_id for t in ids.prompt_logprobs] + greedy.token_ids,
                               max_tokens=1, temperature=0, prompt_logprobs=0)
        tail = [t.logprob for t in free.prompt_logprobs[-len(greedy.token_ids):]]
        assert [t.logprob for t in greedy.logprobs[:len(greedy.token_ids)]] == pytest.approx(tail, abs=1e-4)
        assert sum(tail) < -1.0  # a mask's renormalized scores would be near 0 for such forced digits


@pytest.mark.parametrize(("params", "words"), [
    ({"json_schema": '{"type": 5}'}, "json_schema cannot be compiled"),
    ({"json_schema": "{not json"}, "json_schema is not JSON"),
    ({"regex": "a(?=b)"}, "regex cannot be compiled"),
    ({"regex": "(unclosed"}, "regex is not a regular expression"),
    ({"grammar": "start: missing_rule"}, "grammar cannot be compiled"),
    ({"grammar": "x" * 70_000}, "grammar is 70000 bytes; the limit is 65536 (max_grammar_bytes)"),
    ({"regex": "a", "json_object": True}, "at most one of json_schema, json_object, regex and grammar"),
])
def test_bad_structures_are_refused_before_admission_naming_the_field(cluster, params, words):
    coordinator, _ = cluster
    policy = coordinator.fleet.first.scheduler.policy

    async def beside():  # a good stream runs meanwhile, undisturbed
        async with AsyncClient(coordinator.address, timeout=120) as client:
            good = asyncio.create_task(client.generate("Hello", max_tokens=24, temperature=0, ignore_eos=True))
            await asyncio.sleep(0.05)
            with pytest.raises(InvalidArgument, match=re.escape(words)):
                await client.generate("Hello", max_tokens=8, **params)
            return await good

    started = time.monotonic()
    assert len(asyncio.run(beside()).token_ids) == 24
    assert time.monotonic() - started < 60 and not policy.waiting
