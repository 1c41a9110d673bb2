"""Job files into JobItems (shardline/jobs.py), the result cache's key and bound, and the job store's
transitions (coordinator/jobs/store.py), without a cluster."""

from __future__ import annotations

import pytest

from coordinator.jobs.store import JobsLocked, NewItem, SqliteJobs
from coordinator.serving.generation import Plan
from coordinator.serving.result_cache import CachedResult, ResultCache, cache_key, entry_bytes
from coordinator.serving.streams import Sampling
from shardline.errors import InvalidArgument
from shardline.jobs import item_from_dict, items_from_jsonl
from shardline.v1 import coordinator_pb2


def test_job_lines_of_every_kind():
    items = items_from_jsonl(
        '{"custom_id": "a", "prompt": "hi", "max_tokens": 4, "temperature": 0, "stop": ["."]}\n\n'
        '{"messages": [{"role": "user", "content": "yo"}], "seed": 3}\n'
        '{"prompt_token_ids": [1, 2], "model": "m@2"}\n'
        '{"texts": ["a", "b"], "pooling": "cls", "normalize": false}\n'
        '{"custom_id": "o", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
        '"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stop": "!", "n": 1}}\n'
        '{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "one", "model": "e"}}\n')
    assert [i.source_line for i in items] == [1, 3, 4, 5, 6, 7]
    a, chat, ids, infer, openai, embed = items
    assert (a.custom_id, a.generate.prompt, a.generate.max_tokens, a.generate.HasField("temperature"),
            list(a.generate.stop)) == ("a", "hi", 4, True, ["."])
    assert chat.generate.messages[0].content == "yo" and chat.generate.seed == 3
    assert list(ids.generate.prompt_token_ids) == [1, 2] and ids.generate.model == "m@2"
    assert list(infer.infer.texts) == ["a", "b"] and infer.infer.pooling == coordinator_pb2.POOLING_CLS
    assert infer.infer.HasField("normalize") and not infer.infer.normalize
    assert (openai.custom_id, openai.generate.model, openai.generate.max_tokens, list(openai.generate.stop)) == (
        "o", "m", 5, ["!"])
    assert list(embed.infer.texts) == ["one"] and embed.infer.model == "e"


@pytest.mark.parametrize(("text", "error"), [
    ('{"prompt": "a"}\n[1, 2]', "line 2: a job line is a JSON object, not list"),
    ('{"prompt": "a"}\n{"prompt": ', "line 2: not JSON"),
    ('{"prompt": "a", "max_tokens": "many"}', "line 1: .*max_tokens"),
    ('{"texts": ["a"], "pooling": "max"}', "line 1: .*POOLING_MAX"),
    ('{"custom_id": "x", "body": 3}', "line 1: an OpenAI batch line"),
    ("\n\n", "no requests"),
])
def test_bad_job_lines_name_the_line(text, error):
    with pytest.raises(InvalidArgument, match=error):
        items_from_jsonl(text)


def test_a_dict_item_without_a_line():
    with pytest.raises(InvalidArgument, match="^item: .*colour"):
        item_from_dict({"prompt": "a", "colour": "red"})


def plan(ids=(1, 2, 3), temperature=0.0, seed=0, **kv):
    adjusted = {k: kv.pop(k) for k in ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                                       "logit_bias", "logprobs") if k in kv}
    sampling = Sampling(temperature=temperature, top_k=kv.pop("top_k", 0), top_p=kv.pop("top_p", 1.0), seed=seed,
                        **adjusted)
    return Plan(list(ids), kv.pop("max_tokens", 8), sampling, kv.pop("stop", ()), **kv)


def test_the_key_holds_every_value_that_decides_the_output():
    base = cache_key("d1", plan(), None)
    assert base == cache_key("d1", plan(seed=99), None)  # greedy without a caller's seed: the random seed is moot
    others = [cache_key("d2", plan(), None), cache_key("d1", plan(ids=(1, 2, 4)), None),
              cache_key("d1", plan(max_tokens=9), None), cache_key("d1", plan(top_k=5), None),
              cache_key("d1", plan(top_p=0.5), None), cache_key("d1", plan(stop=("x",)), None),
              cache_key("d1", plan(min_tokens=2), None), cache_key("d1", plan(ignore_eos=True), None),
              cache_key("d1", plan(), 7), cache_key("d1", plan(temperature=0.5, seed=7), 7),
              cache_key("d1", plan(min_p=0.1), None), cache_key("d1", plan(repetition_penalty=1.2), None),
              cache_key("d1", plan(frequency_penalty=0.5), None), cache_key("d1", plan(presence_penalty=0.5), None),
              cache_key("d1", plan(logit_bias=((5, 1.0),)), None)]
    assert base not in others and len(set(others)) == len(others)
    assert cache_key("d1", plan(temperature=0.5, seed=123), None) is None  # sampled, seed not the caller's
    assert cache_key("d1", plan(logprobs=2), None) is None  # the cache keeps no log probabilities


def test_the_cache_is_lru_and_bounded_in_bytes():
    result = CachedResult.of("hello", [5, 6, 7], "length", 3)
    keys = [cache_key("d", plan(ids=(i,)), None) for i in range(4)]
    size = entry_bytes(keys[0], result)
    cache = ResultCache(3 * size)
    for key in keys[:3]:
        cache.put(key, result)
    assert cache.get(keys[0]) == result  # used: the least recently used is now keys[1]
    cache.put(keys[3], result)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == result and cache.get(keys[3]) == result
    assert len(cache) == 3 and cache.bytes == 3 * size <= cache.max_bytes
    assert cache.get(keys[0]).ids == [5, 6, 7]
    off = ResultCache(0)
    off.put(keys[0], result)
    assert off.get(keys[0]) is None and len(off) == 0
    tiny = ResultCache(size - 1)  # an entry larger than the whole cache is never stored
    tiny.put(keys[0], result)
    assert len(tiny) == 0 and tiny.bytes == 0


def test_the_job_store_keeps_results_and_expires_them(tmp_path):
    store = SqliteJobs(tmp_path)
    with pytest.raises(JobsLocked, match="another coordinator"):
        SqliteJobs(tmp_path)
    keeps_results_and_expires_them(store)
    store.close()
    reopened = SqliteJobs(tmp_path)  # the lock went with the first
    assert reopened.job("job-1").state == "expired"
    reopened.close()


def keeps_results_and_expires_them(store):
    """What every job store does (SQLite here, PostgreSQL in tests/integration/test_jobs_postgres.py)."""
    items = [NewItem(f"c{i}", coordinator_pb2.JobItem(custom_id=f"c{i}").SerializeToString(), i == 1)
             for i in range(3)]
    assert store.create("job-1", "alice", "label", items, ["m@1"], now=100.0, max_unfinished=1)
    assert not store.create("job-2", "alice", "", items, ["m@1"], now=101.0, max_unfinished=1)  # one is the limit
    assert store.unfinished() == ["job-1"] and store.unfinished_count() == 1
    assert [(i, s) for i, _, s in store.pending("job-1", -1, 10)] == [(0, False), (1, True), (2, False)]
    assert store.pending("job-1", -1, 10)[0][1] == items[0].request
    assert store.claim("job-1", 0)  # a runner claims an item before running it (SQLite: always its own)
    assert store.finish_item("job-1", 0, "done", b"r0", cached=True)
    assert not store.finish_item("job-1", 0, "failed", b"again", cached=False)  # a finished item: never again
    assert [i for i, _, _ in store.pending("job-1", -1, 10)] == [1, 2] and store.remaining("job-1") == 2
    assert store.result_bytes() == 2 and store.result_bytes("alice") == 2 and store.result_bytes("bob") == 0
    store.finish("job-1", "cancelled", now=200.0, ttl_s=50.0)
    row = store.job("job-1")
    assert (row.state, row.counts, row.cached, row.expires, row.models, row.label) == (
        "cancelled", {"done": 1, "cancelled": 2}, 1, 250.0, ("m@1",), "label")
    assert [(r.index, r.state, r.result, r.cached) for r in store.items("job-1", 0, 10)] == [
        (0, "done", b"r0", True), (1, "cancelled", None, False), (2, "cancelled", None, False)]
    assert store.jobs(("bob",), 10) == [] and [r.job_id for r in store.jobs(("alice",), 10)] == ["job-1"]
    assert [r.job_id for r in store.jobs(None, 10)] == ["job-1"] and store.unfinished_count() == 0
    assert store.expire(now=249.0) == 0 and store.expire(now=251.0) == 1
    assert store.job("job-1").state == "expired" and store.items("job-1", 0, 10) == []


def pages_stop_at_their_byte_cap(store):
    items = [NewItem(f"c{i}", coordinator_pb2.JobItem(custom_id=f"c{i}").SerializeToString(), False)
             for i in range(10)]
    assert store.create("job-1", "alice", "", items, ["m@1"], now=100.0, max_unfinished=1)
    for i in range(10):
        assert store.claim("job-1", i)
        assert store.finish_item("job-1", i, "done", bytes([i]) * 2**20, cached=False)  # 1 MiB each
    page = store.items("job-1", 0, 1000, max_bytes=int(2.5 * 2**20))
    assert [r.index for r in page] == [0, 1, 2]  # the third passes the cap: the page ends with it
    assert [r.result[:1] for r in page] == [b"\x00", b"\x01", b"\x02"]
    assert [r.index for r in store.items("job-1", 3, 1000, max_bytes=int(2.5 * 2**20))] == [3, 4, 5]
    assert len(store.items("job-1", 0, 1000)) == 10  # without a cap: the limit alone


def test_a_page_of_large_results_stops_reading_at_its_byte_cap(tmp_path):
    """Issue 28.5: the sizes are read first and the page ends once their results pass max_bytes (the blobs past
    it are never read); the next page starts where this one stopped."""
    store = SqliteJobs(tmp_path)
    pages_stop_at_their_byte_cap(store)
    store.close()
