"""Jobs outlive their leader (issue 29.5): two `coordinator serve --etcd` sharing a PostgreSQL (`jobs_db`), three
workers, a 200-item job (greedy, sampled with a seed, sampled without one). The leader is SIGKILLed mid-job;
the standby takes over and finishes it. Every item is done exactly once: the results stored before the kill
stay as they were, the new leader serves exactly the items that had none (its request count), and the
results equal an uninterrupted run's (the same requests, interactively, on the new leader)."""

from __future__ import annotations

import time

import psycopg
import pytest

from coordinator.ha.local_etcd import LocalEtcd
from shardline.client import Client
from shardline.v1 import coordinator_pb2
from tests.e2e.test_jobs_restart import line
from tests.e2e.test_standby_failover import Pair

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.slow]
N = 200
MAX_TOKENS = 16


def stored(url: str, job_id: str) -> dict[int, tuple[str, bytes | None, bytes]]:
    with psycopg.connect(url) as conn:
        return {i: (s, bytes(r) if r is not None else None, bytes(q)) for i, s, r, q in conn.execute(
            "SELECT idx, state, result, request FROM items WHERE job = %s", (job_id,))}


def test_a_job_finishes_exactly_once_when_its_leader_is_sigkilled(store, tmp_path, jobs_db):
    etcd = LocalEtcd.start(tmp_path / "etcd")
    pair = Pair(store.root, tmp_path, etcd, f'jobs_db = "{jobs_db}"\njob_concurrency = 16\n')
    try:
        with Client(pair.endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
            job_id = client.submit_job([{**line(i), "max_tokens": MAX_TOKENS} for i in range(N)], model="tiny-llama")
            deadline = time.monotonic() + 180
            while client.get_job(job_id).done < N // 4:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.02)
        first = pair.leader()
        assert first is not None
        pair.kill(first)
        killed_at = time.monotonic()
        before = {i: r for i, (s, r, _) in stored(jobs_db, job_id).items() if s == "done"}
        assert N // 4 <= len(before) < N, len(before)  # killed mid-job

        with Client(pair.endpoint, timeout=30) as client:
            status = client.wait_job(job_id, timeout=300)
            took = time.monotonic() - killed_at
            assert (status.state, status.done, status.failed) == ("completed", N, 0)
            second = pair.leader()
            assert second is not None and second.address != first.address
            ran = sum(r.requests for d in client.cluster_status().deployments for r in d.replicas)
            after = stored(jobs_db, job_id)
            assert {i: after[i][1] for i in before} == before  # the results stored before the kill: untouched
            assert ran == N - len(before), (ran, len(before))  # each other item served once, by the new leader
            items = {i: coordinator_pb2.JobItem.FromString(q) for i, (_, _, q) in after.items()}
            expected = []
            for i in range(N):
                request = items[i].generate
                expected.append(client.generate(list(request.prompt_token_ids), max_tokens=MAX_TOKENS,
                                                ignore_eos=True, temperature=request.temperature,
                                                seed=request.seed).token_ids)
            results = client.job_results(job_id)
        assert [r.custom_id for r in results] == [f"req-{i}" for i in range(N)]
        assert [list(r.token_ids) for r in results] == expected
        assert items[2].generate.HasField("seed")  # sampled without a seed: it got one at submission
        print(f"\n{len(before)}/{N} items done at the kill; the new leader finished the job {took:.1f} s after it")
    finally:
        pair.close()
        etcd.stop()
