"""Jobs and the result cache on a real coordinator with real workers (tiny-llama, token ids in and out):
a job's results equal the interactive ones, a job yields to interactive requests, CancelJob frees the KV
caches on every stage, the cache answers repeated deterministic requests (and nothing else), and bad input
is refused with the item's line."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.client import AsyncClient, Client, generate_request
from shardline.errors import InvalidArgument, NotFound
from shardline.jobs import items_from_jsonl
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.chaos import wait_until_no_sessions, worker_statuses

PROMPTS = [[(7 * i + j) % 120 + 1 for j in range(3 + i % 5)] for i in range(40)]


def register(coordinator, servers):
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))


@pytest.fixture()
def cluster(loop, store, parameters, workers, tmp_path):
    """tiny-llama@1 and tiny-llama@2 (the same weights, another version) on 2 stages each; jobs in tmp_path."""
    started = []

    def start(**settings):
        config = CoordinatorConfig(
            store=store.root, workers=2, port=0, parameters_address=parameters.address,
            heartbeat_timeout_ms=3_600_000, jobs_dir=tmp_path, **{
                "deployments": [dict(name="tiny-llama"), dict(name="tiny-llama", version="2", default=False)],
                **settings})
        coordinator = loop.run(start_coordinator(config))
        started.append(coordinator)
        register(coordinator, workers(4))
        with Client(coordinator.address, timeout=120) as client:
            client.wait_ready(timeout=120)
            deadline = time.monotonic() + 60
            while not all(m.ready for m in client.list_models()):
                assert time.monotonic() < deadline, "version 2 did not get ready"
                time.sleep(0.1)
        return coordinator

    yield start
    for coordinator in started:
        loop.run(coordinator.stop())


def items(prompts, **params):
    return [generate_request(p, model="tiny-llama", **params) for p in prompts]


def test_a_job_gives_the_interactive_results_and_reports_progress(cluster, caplog):
    coordinator = cluster()
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    seeded = dict(max_tokens=16, temperature=0.9, top_k=50, ignore_eos=True)
    with Client(coordinator.address, timeout=60) as client:
        job = [*items(PROMPTS[:10], **greedy), *[generate_request(p, model="tiny-llama", seed=i, **seeded)
                                                 for i, p in enumerate(PROMPTS[10:20])]]
        job_id = client.submit_job(job, label="mixed")
        status = client.wait_job(job_id, timeout=120)
        assert (status.state, status.done, status.failed, status.total, status.models) == (
            "completed", 20, 0, 20, ("tiny-llama@1",))
        assert status.expires > status.finished_at > status.created
        results = client.job_results(job_id)
        assert [r.index for r in results] == list(range(20))
        interactive = [client.generate(p, **greedy).token_ids for p in PROMPTS[:10]]
        interactive += [client.generate(p, seed=i, **seeded).token_ids for i, p in enumerate(PROMPTS[10:20])]
        assert [list(r.token_ids) for r in results] == interactive
        assert all(r.finish_reason == "length" and r.completion_tokens == 16 for r in results)
        assert job_id in [j.job_id for j in client.list_jobs()]

    # each item's request log line quotes its custom_id
    with Client(coordinator.address, timeout=60) as client, caplog.at_level("INFO", logger="shardline.requests"):
        client.wait_job(client.submit_job([{"custom_id": "row 7", "prompt_token_ids": [5, 9], "max_tokens": 2,
                                            "model": "tiny-llama"}]), timeout=60)
    assert any(' client_id="row 7" kind=generate ' in r.getMessage() and "priority=background" in r.getMessage()
               for r in caplog.records if r.name == "shardline.requests")


def test_a_repeated_deterministic_request_is_answered_from_the_cache(cluster):
    coordinator = cluster(result_cache_mb=1)
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    with Client(coordinator.address, timeout=60) as client:
        first = client.generate(PROMPTS[0], **greedy)
        assert not first.cached
        times = []
        for _ in range(20):
            start = time.perf_counter()
            again = client.generate(PROMPTS[0], **greedy)
            times.append(time.perf_counter() - start)
            assert again.cached and again.token_ids == first.token_ids and again.finish_reason == "length"
            assert (again.prompt_tokens, again.completion_tokens) == (first.prompt_tokens, 24)
        assert statistics.median(times) < 0.005, times  # the whole round trip, coordinator included
        # anything that changes the output is another entry
        for other in (dict(seed=7), dict(temperature=0.5, seed=1), dict(top_k=5), dict(max_tokens=23),
                      dict(model="tiny-llama@2"), dict(min_tokens=3)):
            result = client.generate(PROMPTS[0], **{**greedy, **other})
            assert not result.cached, other
        assert client.generate(PROMPTS[0], **greedy, model="tiny-llama@2").cached  # now it is in the cache
        # sampling without a seed of the caller's is never cached
        for _ in range(2):
            assert not client.generate(PROMPTS[0], max_tokens=8, temperature=0.8).cached
        seeded = [client.generate(PROMPTS[1], max_tokens=8, temperature=0.8, seed=3) for _ in range(2)]
        assert [r.cached for r in seeded] == [False, True] and seeded[0].token_ids == seeded[1].token_ids
        entries, held, most, hits, misses = client.cluster_status().cache
        assert (entries, hits, misses, most) == (8, 22, 8, 2**20) and 0 < held <= most  # unseeded: not looked up
    cache = coordinator.server.servicer.cache
    assert 0 < cache.bytes <= cache.max_bytes


def test_a_job_yields_to_interactive_requests(cluster):
    """Every slot is taken by a job's items; an interactive request still starts at once (it preempts the
    newest item, which resumes later by replay) and the job's results are unchanged by that."""
    coordinator = cluster(max_active_streams=4, job_concurrency=8)
    long = dict(max_tokens=120, temperature=0, ignore_eos=True)
    scheduler = coordinator.fleet.deployments["tiny-llama@1"].replicas[0].scheduler.policy
    with Client(coordinator.address, timeout=120) as client:
        job_id = client.submit_job(items(PROMPTS[:12], **long))
        deadline = time.monotonic() + 30
        while scheduler.active < 4:
            assert time.monotonic() < deadline, "the job's items did not fill the slots"
            time.sleep(0.01)
        preempted = scheduler.preempted
        chunks = client.generate(PROMPTS[20], stream=True, max_tokens=8, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        next(chunks)
        first_token_s = time.perf_counter() - start
        assert len(list(chunks)) == 7
        assert scheduler.preempted > preempted  # a background stream made room
        client.wait_job(job_id, timeout=180)
        results = [list(r.token_ids) for r in client.job_results(job_id)]
    with Client(coordinator.address, timeout=120) as client:
        assert results == [client.generate(p, **long).token_ids for p in PROMPTS[:12]]
    assert first_token_s < 2.0, first_token_s


def test_cancel_stops_a_job_and_frees_its_kv_on_every_stage(cluster):
    coordinator = cluster(job_concurrency=6)
    addresses = [w.address for r in coordinator.fleet.deployments["tiny-llama@1"].replicas for w in r.assignment]
    with Client(coordinator.address, timeout=60) as client:
        job_id = client.submit_job(items(PROMPTS[:30], max_tokens=200, temperature=0, ignore_eos=True))
        deadline = time.monotonic() + 30
        while min(s.sessions for s in worker_statuses(addresses)) < 6:
            assert time.monotonic() < deadline, "the job's items did not start"
            time.sleep(0.02)
        start = time.monotonic()
        assert client.cluster_status().job_items_running == 6
        status = client.cancel_job(job_id)
        wait_until_no_sessions(addresses, timeout=5)
        freed_s = time.monotonic() - start
        assert status.state == "cancelled" and status.cancelled >= 24 and status.done < 6
        assert all(s.kv_cache_bytes == 0 for s in worker_statuses(addresses))
        time.sleep(0.3)
        assert client.get_job(job_id).done == status.done  # nothing ran on
        results = client.job_results(job_id)
        assert {r.state for r in results} <= {"done", "cancelled"}
        after = client.cluster_status()
        assert (after.jobs_unfinished, after.job_items_running, after.jobs_off) == (0, 0, "")
    assert freed_s < 1.0, freed_s


def test_bad_jobs_are_refused_whole_with_the_line(cluster, tmp_path):
    coordinator = cluster(job_result_ttl_s=2)
    with Client(coordinator.address, timeout=30) as client:
        lines = ['{"prompt_token_ids": [1, 2, 3], "max_tokens": 4}', "",
                 '{"prompt_token_ids": [4, 5], "max_tokens": 4, "temperature": 500}']
        with pytest.raises(InvalidArgument, match=r"line 3 \(item 1\): temperature must be"):
            client.submit_job(items_from_jsonl("\n".join(lines)), model="tiny-llama")
        with pytest.raises(InvalidArgument, match="line 2: not JSON"):
            items_from_jsonl('{"prompt": "a"}\n{"prompt": ')
        with pytest.raises(InvalidArgument, match="line 1: unknown key 'colour' \\(a line takes custom_id and model"):
            items_from_jsonl('{"prompt": "a", "colour": 1}')
        with pytest.raises(InvalidArgument, match="line 2: unknown key 'max_token'; did you mean 'max_tokens'\\?"):
            items_from_jsonl('{"prompt": "a"}\n{"prompt": "a", "max_token": 3}')
        with pytest.raises(InvalidArgument, match="line 1 \\(item 0\\): .*nope"):
            client.submit_job(items_from_jsonl('{"prompt_token_ids": [1], "model": "nope"}'))
        with pytest.raises(InvalidArgument, match="item 0: n is not taken in a job's items"):
            client.submit_job([{"prompt_token_ids": [1, 2], "n": 2}], model="tiny-llama")
        with pytest.raises(InvalidArgument, match="item 0: logprobs is not taken in a job's items"):
            client.submit_job([{"prompt_token_ids": [1, 2], "logprobs": 1}], model="tiny-llama")
        with pytest.raises(InvalidArgument, match="item 0: prompt is empty"):
            client.submit_job([{"max_tokens": 3}], model="tiny-llama")
        with pytest.raises(InvalidArgument, match="no items"):
            client.submit_job([])
        assert client.list_jobs() == []  # nothing of them was stored
        with pytest.raises(NotFound, match="no job 'job-0000'"):
            client.get_job("job-0000")
        with pytest.raises(NotFound, match="no job"):
            client.cancel_job("job-0000")
        with pytest.raises(InvalidArgument, match="job_id is empty"):
            client.get_job("")
        job_id = client.submit_job([{"prompt_token_ids": [1, 2], "max_tokens": 2}], model="tiny-llama")
        client.wait_job(job_id, timeout=60, poll_s=0.05)
        time.sleep(2.1)
        with pytest.raises(NotFound, match=f"job {job_id} expired at .* UTC"):
            client.job_results(job_id)
    # another request runs on undisturbed
    with Client(coordinator.address, timeout=30) as client:
        assert len(client.generate([1, 2, 3], max_tokens=3, model="tiny-llama").token_ids) == 3


async def _timed(address, prompt, n):
    async with AsyncClient(address, timeout=120) as client:
        start = time.perf_counter()
        result = await client.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        assert len(result.token_ids) == n
        return time.perf_counter() - start


def test_an_interactive_request_beside_a_large_job_is_not_slowed_much(cluster):
    coordinator = cluster()
    prompt, n = PROMPTS[33], 128
    idle = min(asyncio.run(_timed(coordinator.address, prompt, n)) for _ in range(3))
    with Client(coordinator.address, timeout=60) as client:
        job_id = client.submit_job(items(PROMPTS * 5, max_tokens=64, temperature=0, ignore_eos=True))
        time.sleep(0.5)
        busy = sorted(asyncio.run(_timed(coordinator.address, prompt, n)) for _ in range(3))[1]
        assert client.get_job(job_id).state == "running"  # it was running all along
        client.cancel_job(job_id)
    print(f"idle {idle:.3f} s, beside the job {busy:.3f} s: {busy / idle:.2f}x")
    assert busy <= 1.5 * idle, (busy, idle)


def test_items_pinned_to_a_version_that_goes_away_wait_for_it_then_fail_naming_it(cluster, monkeypatch):
    """The version a job's items are pinned to is unloaded mid-job (as after a restart, before it is back):
    the items wait for it, and finish once it is loaded again; when it does not come back within the bound,
    they fail naming it."""
    from coordinator.jobs import runner

    monkeypatch.setattr(runner, "MAX_VERSION_WAIT_S", 60.0)
    coordinator = cluster(job_concurrency=2)
    with Client(coordinator.address, timeout=120) as client:
        v2 = [generate_request(p, model="tiny-llama@2", max_tokens=24, ignore_eos=True) for p in PROMPTS[:30]]
        job = client.submit_job(v2)
        client.unload_model("tiny-llama@2", grace_s=0)
        time.sleep(1.0)
        waiting = client.get_job(job)
        assert waiting.state == "running" and waiting.done < 30, waiting
        assert "waiting for tiny-llama@2" in waiting.message, waiting
        client.load_model("tiny-llama", version="2", source="tiny-llama")
        finished = client.wait_job(job, timeout=120)
        assert (finished.state, finished.done, finished.failed) == ("completed", 30, 0), finished

        monkeypatch.setattr(runner, "MAX_VERSION_WAIT_S", 1.0)
        job = client.submit_job([generate_request(p, model="tiny-llama@2", max_tokens=200, ignore_eos=True)
                                 for p in PROMPTS[:4]])
        client.unload_model("tiny-llama@2", grace_s=0)
        ended = client.wait_job(job, timeout=60)
        assert ended.failed >= 1, ended
        errors = [r.error for r in client.job_results(job) if r.state == "failed"]
        assert errors and all("waited 1 s for tiny-llama@2" in e for e in errors), errors


def test_a_job_store_at_its_quota_refuses_new_jobs_naming_it(cluster):
    """Issue 28.5: jobs_max_mb bounds the results kept; past it a submission is RESOURCE_EXHAUSTED naming the
    quota, and nothing is queued (the results already kept stay readable)."""
    from shardline.errors import ResourceExhausted

    coordinator = cluster(jobs_max_mb=0.0005)  # about 500 bytes of results
    with Client(coordinator.address, timeout=60) as client:
        first = client.submit_job(items(PROMPTS[:20], max_tokens=16, temperature=0, ignore_eos=True))
        assert client.wait_job(first, timeout=120).state == "completed"
        held = coordinator.jobs.opened().result_bytes()
        assert held >= 0.0005 * 2**20, held  # the first job's results fill the quota
        before = len(client.list_jobs())
        with pytest.raises(ResourceExhausted, match=r"the job store keeps [\d.e-]+ MiB of results, the quota "
                                                    r"\(jobs_max_mb 0.0005 MiB\)"):
            client.submit_job(items(PROMPTS[:1], max_tokens=2))
        assert len(client.list_jobs()) == before and len(client.job_results(first)) == 20


def test_a_result_the_store_cannot_take_is_retried_with_backoff_and_never_computed_again(cluster, monkeypatch):
    """Issue 28.5: a full disk (the store's write fails) makes the item wait, said in the job's status and
    counted in the metrics; the result is written once the store takes it, and the item ran once."""
    import sqlite3

    from coordinator.jobs.store import JobStore

    coordinator = cluster()
    real = JobStore.finish_item
    failures = {"left": 2}

    def full_disk(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish_item", full_disk)
    with Client(coordinator.address, timeout=60) as client:
        before = sum(r.requests for d in client.cluster_status().deployments for r in d.replicas)
        job = client.submit_job(items(PROMPTS[:1], max_tokens=4, temperature=0, ignore_eos=True))
        status = client.wait_job(job, timeout=60)
        assert (status.state, status.done) == ("completed", 1)
        after = sum(r.requests for d in client.cluster_status().deployments for r in d.replicas)
    assert after - before == 1  # computed once, stored on the third try
    assert coordinator.fleet.metrics.job_storage_errors._value.get() == 2
