"""A coordinator that dies loses no stream (issue 27): 8 SDK streams (greedy and seeded) run on a cluster of
real processes; the coordinator is SIGKILLed mid-stream and started again on the same store. The workers stay
up, register again, and the new coordinator adopts the shards they hold (no worker fetches a byte again); the
SDK resumes every stream, and each finishes with exactly the tokens of an undisturbed run.
Prints the time from the kill to each stream's next token, beside the undisturbed gap between tokens."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

import grpc
import pytest

from shardline.client import AsyncClient, Client
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.chaos import wait_until_no_sessions
from tests.e2e.standalone import Standalone
from tests.e2e.test_jobs_restart import stored

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]
STREAMS = 8
MAX_TOKENS = 120
REQUESTS = 24


def params(i: int) -> dict:
    greedy = i % 2 == 0
    return {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0 if greedy else 0.8,
            **({} if greedy else {"seed": 100 + i})}


def prompt(i: int) -> list[int]:
    return [(13 * i + j) % 120 + 1 for j in range(3 + i % 4)]


def loads(addresses: list[str]) -> dict[str, int]:
    """Each worker's count of loads that fetched weights (GetStatusResponse.loads)."""
    out = {}
    for address in addresses:
        with grpc.insecure_channel(address) as ch:
            stub = worker_pb2_grpc.ShardWorkerStub(ch)
            out[address] = stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10).loads
    return out


async def run_streams(endpoint: str, kill=None,
                      streams: int = STREAMS) -> tuple[list[list[int]], list[int], list[float]]:
    """The streams' (8 unless `streams`) tokens and how often each resumed; with `kill`, called once every stream has 3
    tokens, also each stream's wait from the kill to its next token."""
    counts = [0] * streams
    killed_at: list[float] = []
    waits = [0.0] * streams

    async with AsyncClient(endpoint, timeout=120) as client:
        await client.wait_ready(timeout=60)

        async def one(i: int) -> tuple[list[int], int]:
            tokens: list[int] = []
            stream = await client.generate(prompt(i), stream=True, **params(i))
            async for chunk in stream:
                if killed_at and not waits[i] and chunk.token_ids:
                    waits[i] = time.monotonic() - killed_at[0]
                tokens += chunk.token_ids
                counts[i] = len(tokens)
            return tokens, 0

        async def killer() -> None:
            if kill is None:
                return
            while min(counts) < 3:
                await asyncio.sleep(0.002)
            killed_at.append(time.monotonic())
            kill()

        results = await asyncio.gather(*(one(i) for i in range(streams)), killer())
    return [tokens for tokens, _ in results[:streams]], counts, waits


def test_streams_survive_a_coordinator_sigkill_and_the_workers_are_adopted(store, tmp_path):
    cluster = Standalone.serving(store.root, tmp_path, workers=2, result_cache_mb=0, http=False)
    endpoint = cluster.endpoint
    try:
        cluster.add_workers(2)
        with Client(endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
            workers = [w.address for w in client.cluster_status().workers]
        before = loads(workers)
        assert sorted(before.values()) == [1, 1], before
        undisturbed, _, _ = asyncio.run(run_streams(endpoint))

        def kill() -> None:
            cluster.kill_coordinator()
            cluster.restart_coordinator()

        t0 = time.monotonic()
        tokens, counts, waits = asyncio.run(run_streams(endpoint, kill))
        took = time.monotonic() - t0
        assert tokens == undisturbed  # every stream: the undisturbed tokens, none repeated or missing
        assert counts == [MAX_TOKENS] * STREAMS
        assert loads(workers) == before  # adopted: no worker fetched its weights again
        # no orphan left: the sessions of the coordinator's first life were ended when each worker registered
        # again (else they would hold KV for session_ttl_s), and the second life's when its streams ended
        assert all(s.sessions == 0 for s in wait_until_no_sessions(workers))
        with Client(endpoint, timeout=30) as client:
            status = client.cluster_status()
            assert sorted(w.address for w in status.workers) == sorted(workers)  # each once, its own address
        print(f"\nkill -> next token per stream: {', '.join(f'{w:.2f}' for w in waits)} s; all 8 streams "
              f"{took:.2f} s")
    finally:
        cluster.close()


@pytest.mark.slow  # about 50 s: `make test-slow` (and `make test-chaos`, which runs it 20 times)
def test_ten_restarts_racing_heartbeats_list_each_worker_once_and_only_a_leaver_leaves(store, tmp_path):
    """4 workers; the coordinator SIGKILLed and started again at once, 10 times, while the workers' heartbeats
    race the restart: every time, the status lists each live worker once, with its own address. Then SIGTERM
    one worker: it alone leaves (its LeaveCluster names its own identity, never another's record)."""
    cluster = Standalone.serving(store.root, tmp_path, workers=2, http=False, heartbeat_interval_ms=100)
    endpoint = cluster.endpoint

    def listed(client: Client, want: int, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = client.cluster_status()
                if len(status.workers) >= want and status.ready:
                    return [w.address for w in status.workers]
            except Exception:  # noqa: BLE001 - the coordinator is starting again
                pass
            assert time.monotonic() < deadline, f"not {want} workers and ready within {timeout} s"
            time.sleep(0.05)

    try:
        cluster.add_workers(4)
        with Client(endpoint, timeout=10) as client:
            client.wait_ready(timeout=180)
            assert sorted(listed(client, 4)) == sorted(cluster.addresses)
            for _ in range(10):
                cluster.kill_coordinator()
                cluster.restart_coordinator()
                addresses = listed(client, 4)
                assert sorted(addresses) == sorted(cluster.addresses), addresses  # each once, its own address
            cluster.workers[0].send_signal(signal.SIGTERM)
            assert cluster.workers[0].wait(60) == 0
            deadline = time.monotonic() + 60
            while sorted(addresses := [w.address for w in client.cluster_status().workers]) != \
                    sorted(cluster.addresses[1:]):
                assert time.monotonic() < deadline, addresses
                time.sleep(0.1)
            client.wait_ready(timeout=60)
            assert client.generate([1, 2, 3], max_tokens=4, temperature=0).completion_tokens == 4
    finally:
        cluster.close()


@pytest.mark.slow  # about 25 s: `make test-slow`
def test_run_time_versions_replicas_and_a_pinned_job_survive_a_sigkill(store, tmp_path):
    """v2 loaded at run time, promoted, scaled to 2 replicas; a job pinned to v2 submitted; the coordinator
    SIGKILLed mid-job and started again: v2 is back, still the default, with 2 replicas adopted from the shards
    the workers hold, and the job finishes with an uninterrupted run's results, no item computed twice."""
    cluster = Standalone.serving(store.root, tmp_path, workers=1, result_cache_mb=0, http=False, job_concurrency=4)
    endpoint = cluster.endpoint
    items = [{"prompt_token_ids": prompt(i), **params(i), "max_tokens": 40} for i in range(40)]
    try:
        cluster.add_workers(3)
        with Client(endpoint, timeout=120) as client:
            client.wait_ready(timeout=180)
            client.load_model("tiny-llama", version="2", source="tiny-llama")
            assert client.promote_model("tiny-llama@2") == "1"
            client.scale_model("tiny-llama@2", 2)
            deadline = time.monotonic() + 120
            while not all(r.state == "ready" for d in client.cluster_status().deployments for r in d.replicas):
                assert time.monotonic() < deadline, client.cluster_status()
                time.sleep(0.05)
            workers = [w.address for w in client.cluster_status().workers]
            before = loads(workers)
            job = client.submit_job(items, model="tiny-llama@2")
            deadline = time.monotonic() + 120
            while client.get_job(job).done < 5:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.02)
        cluster.kill_coordinator()
        done_before = sum(s == "done" for s, _, _ in stored(tmp_path / "jobs.sqlite3", job).values())
        cluster.restart_coordinator()
        with Client(endpoint, timeout=120) as client:
            client.wait_ready(timeout=180)
            status = client.wait_job(job, timeout=300)
            assert (status.state, status.done, status.failed) == ("completed", len(items), 0)
            models = {(m.name, m.version): m for m in client.list_models()}
            assert models["tiny-llama", "2"].is_default and not models["tiny-llama", "1"].is_default
            deployments = {f"{d.name}@{d.version}": d for d in client.cluster_status().deployments}
            assert len(deployments["tiny-llama@2"].replicas) == 2, deployments
            assert all("adopted" in r.plan_basis for d in deployments.values() for r in d.replicas), deployments
            assert loads(workers) == before  # every replica adopted: nothing fetched again
            ran = sum(r.requests for d in deployments.values() for r in d.replicas)
            assert ran == len(items) - done_before, (ran, done_before)  # what was done before the kill: not again
            results = client.job_results(job)
            expected = [client.generate(prompt(i), model="tiny-llama@2", **params(i) | {"max_tokens": 40}).token_ids
                        for i in range(len(items))]
            assert [list(r.token_ids) for r in results] == expected
    finally:
        cluster.close()


def coordinator_stub(endpoint: str) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(endpoint))


def _kv(address: str) -> worker_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)


def _refusals(metrics_url: str) -> dict[str, float]:
    """shardline:stage_refusals_total by reason, from the coordinator's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "shardline:stage_refusals_total":
                out[sample.labels["reason"]] = out.get(sample.labels["reason"], 0) + sample.value
    return out


@pytest.mark.slow
def test_after_a_restart_the_orphaned_sessions_take_no_kv_and_24_long_requests_need_no_replay(smollm2_store,
                                                                                             tmp_path):
    """Issue 27's KV item: the dead coordinator's sessions fill most of the workers' KV; after the restart the
    workers end them as they register again (the new coordinator did not create them), the coordinator reads
    the blocks actually free, and 24 long requests under that tight budget all finish with the tokens they get
    alone, with no step refused for KV (stage_refusals_total{reason="kv_full"} stays 0)."""
    from shardline.limits import process_bound
    from tests.e2e.test_join_and_generate import free_port
    from tests.integration.test_kv_memory import kv_llama

    kv_llama(smollm2_store)
    metrics = free_port()
    cluster = Standalone.serving(smollm2_store.root, tmp_path, model="kv-llama", workers=3, http=False,
                                 result_cache_mb=0, kv_reserve_tokens=0, max_queued_streams=32, session_ttl_s=600,
                                 metrics_port=metrics)
    try:
        # a bound that leaves each shard 130 MiB at the estimated runtime (400 MiB; the real one is smaller, so
        # ~170 MiB): the first life's streams fill most of it
        cluster.add_workers(3, "--worker-memory-mb", str(process_bound(130 * 2**20) // 2**20))
        with Client(cluster.endpoint, timeout=300) as client:
            client.wait_ready(timeout=300)
        before = {a: _kv(a) for a in cluster.addresses}
        smallest = min(s.kv.blocks_total for s in before.values())

        # the first life's streams: long prompts that keep going, until they hold most of the smallest stage
        stub = coordinator_stub(cluster.endpoint)
        stop = threading.Event()

        def orphan(i: int) -> None:
            ids = [(i * 7919 + j * 31) % 40000 + 100 for j in range(2000)]
            with contextlib.suppress(grpc.RpcError):
                for _ in stub.Generate(coordinator_pb2.GenerateRequest(prompt_token_ids=ids, max_tokens=2000,
                                                                       ignore_eos=True), timeout=300):
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=orphan, args=(i,), daemon=True) for i in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while max(_kv(a).kv.blocks_used / _kv(a).kv.blocks_total for a in cluster.addresses) < 0.6:
            assert time.monotonic() < deadline, [_kv(a).kv for a in cluster.addresses]
            time.sleep(0.1)
        cluster.kill_coordinator()
        held = [_kv(a) for a in cluster.addresses]
        assert all(s.sessions > 0 and s.kv.blocks_used > 0 for s in held), held  # orphans, until they register
        stop.set()

        cluster.restart_coordinator()
        with Client(cluster.endpoint, timeout=300) as client:
            client.wait_ready(timeout=300)
            after = {a: _kv(a) for a in cluster.addresses}
            assert all(s.sessions == 0 and s.kv.blocks_used == 0 for s in after.values()), after
            assert {a: s.loads for a, s in after.items()} == {a: s.loads for a, s in before.items()}  # adopted

            block = after[cluster.addresses[0]].kv.block_tokens
            fit = max(2, round(smallest * block / 1500))
            length = smallest // fit * block
            assert REQUESTS * (length + 24) > 2 * smallest * block  # they really do not fit at once
            prompts = [[(k * 104729 + j * 7919) % 40000 + 100 for j in range(length)] for k in range(3)]
            alone = [client.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids for p in prompts]

            async def burst() -> list:
                async with AsyncClient(cluster.endpoint, timeout=600) as many:
                    return await asyncio.gather(*(many.generate(prompts[i % 3], max_tokens=24, temperature=0,
                                                                ignore_eos=True) for i in range(REQUESTS)))

            results = asyncio.run(burst())
        assert [r.token_ids for r in results] == [alone[i % 3] for i in range(REQUESTS)]
        assert _refusals(f"http://127.0.0.1:{metrics}/metrics").get("kv_full", 0) == 0
    finally:
        cluster.close()
